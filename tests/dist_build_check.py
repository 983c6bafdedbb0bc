"""Run on 2 ranks by tests/test_distributed.py (``run_job``: ``python -m tests.dist_build_check``, or under torchrun):
set up the real recipe, then report how the student and teacher were built. Arguments: OUT_DIR <run.py arguments...>

Each rank writes ``OUT_DIR/rank<N>.json`` with, per model, whether every parameter is a DTensor,
the largest difference between its full (unsharded) value and the tensor on disk, and each
parameter's placement on the ``tp`` mesh dimension with its local shape.
"""

import json
import os
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # noqa: E402
from conftest import checkpoint_tensors  # noqa: E402


def _tp_layout(param) -> list:
    """``[placement on the tp mesh dimension ("none" when not split over it), local shape]``."""
    names = param.device_mesh.mesh_dim_names or () if isinstance(param, DTensor) else ()
    placement = str(param.placements[names.index("tp")]) if "tp" in names else "none"
    local = param.to_local() if isinstance(param, DTensor) else param
    return [placement, list(local.shape)]


def describe(parts, checkpoint) -> dict:
    on_disk = checkpoint_tensors(checkpoint)
    params = {n: p for part in parts for n, p in part.named_parameters()}
    diffs = {}
    for name, p in params.items():
        full = p.full_tensor() if isinstance(p, DTensor) else p
        diffs[name] = (full.detach().float() - on_disk[name].float()).abs().max().item()
    return {
        "tp": {name: _tp_layout(p) for name, p in params.items()},
        "all_dtensor": all(isinstance(p, DTensor) for p in params.values()),
        "placements": sorted({str(p.placements) for p in params.values() if isinstance(p, DTensor)}),
        "max_abs_diff": max(diffs.values()),
        "names": sorted(params),
        "frozen": all(not p.requires_grad for p in params.values()),
    }


def main():
    out_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    Recipe, cfg = run.prepare(argv)
    recipe = Recipe(cfg)
    recipe.setup()
    report = {"student": describe(recipe.model_parts, cfg.get("model.pretrained_model_name_or_path"))}
    teacher = getattr(recipe, "teacher_model", None)
    if teacher is not None:
        parts = teacher.parts if hasattr(teacher, "parts") else [teacher]
        report["teacher"] = describe(parts, cfg.get("teacher_model.pretrained_model_name_or_path"))
        report["teacher"]["eval"] = all(not p.training for p in parts)
    rank = torch.distributed.get_rank()
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    # As run.py does: interpreter teardown after gloo sometimes aborts; the report is on disk.
    os._exit(0)


if __name__ == "__main__":
    main()
