"""The house: imports run downward only, with no circle, architecture modules are reached through the registry
alone, no module is longer than 500 lines, and the registry serves every descriptor ModelOpt registers."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Floors, lowest first: a module imports its own floor or lower ones. Within a floor, only the cycle check applies.
FLOORS = {"common": 0, "loss": 1, "architectures": 2, "distillation": 2, "patch_automodel": 3, "safety": 3,
          "recipe": 3, "run": 4, "tools": 5, "benchmarks": 5}
# The architecture package's own machinery; every other module in it serves one architecture.
ARCHITECTURE_MACHINERY = {"__init__", "interface", "registry", "descriptors", "tensor_parallel", "parallelizer"}
MAX_LINES = 500


def project_files() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py")
                  if not {".venv", "tests", "demo_out", ".git"} & set(p.relative_to(ROOT).parts))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules ``path`` imports anywhere in its body (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in project_files()}
    return {name: imports(path, set(files)) - {name} for name, path in files.items()}


def floor(module: str) -> int:
    return FLOORS[module.split(".")[0]]


def test_every_project_module_has_a_floor(graph):
    assert [m for m in graph if m.split(".")[0] not in FLOORS] == []


def test_no_import_cycle_among_project_modules(graph):
    cycles, state = [], {}

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_no_module_imports_a_higher_floor(graph):
    upward = [(m, t) for m, targets in graph.items() for t in targets
              if t.split(".")[0] != m.split(".")[0] and floor(t) > floor(m)]
    assert upward == []


def test_architecture_modules_are_imported_only_through_the_registry(graph):
    specific = {m for m in graph if m.startswith("architectures.") and m.split(".")[1] not in ARCHITECTURE_MACHINERY}
    assert {"architectures.gpt_oss", "architectures.nemotron_h", "architectures.qwen3_vl"} <= specific
    outside = [(m, t) for m, targets in graph.items() for t in targets & specific
               if m != "architectures.registry" and m not in specific]
    assert outside == []


def test_no_module_is_longer_than_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in [*project_files(), *ROOT.glob("tests/*.py")]
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_registry_serves_every_modelopt_descriptor_once():
    from modelopt.torch.puzzletron.anymodel import ModelDescriptorFactory

    from architectures import registry

    listed = [name for arch in registry.ARCHITECTURES for name in arch.descriptor_names]
    assert len(listed) == len(set(listed))
    assert set(listed) == set(ModelDescriptorFactory.CLASS_MAPPING)
    assert registry.for_descriptor("nemotron_h") is registry.for_descriptor("nemotron_h_v2")
    assert registry.for_descriptor("llama") is not registry.for_descriptor("qwen3")
