"""Entry point: distill (``--mode kd``) or train (``--mode pretrain``) AnyModel checkpoints with AutoModel, or
run a teacher once over the KD data into a teacher cache (``--mode teacher_cache``) that KD then reads.

    torchrun --nproc_per_node=2 -m run --mode kd -c kd.yaml \\
        model.pretrained_model_name_or_path=/ckpts/student model.anymodel_descriptor=llama \\
        teacher_model.pretrained_model_name_or_path=/ckpts/teacher

Overrides take any of the forms ``a.b=v``, ``--a.b=v`` and ``--a.b v``; values are read as YAML
scalars (``null``, ``true``, ``1e-5``, ``[0.9, 0.95]``). Works under ``torchrun`` and as plain
``python -m run`` (one process). ``--help`` explains all this; ``--print-config`` prints the config a
command line resolves to, after the checks a real run makes, and starts nothing.
"""

import contextlib
import difflib
import json
import os
import sys
import time
from pathlib import Path

import yaml

from safety import resume

HERE = Path(__file__).resolve().parent
MODES = {"kd": "kd.yaml", "pretrain": "pretrain.yaml", "teacher_cache": "kd.yaml"}
USAGE = ("usage: python -m run --mode {kd,pretrain,teacher_cache} [-c CONFIG] [--print-config] "
         "[key=value | --key=value | --key value ...]")
HELP_FLAGS = ("-h", "--help")
PRINT_CONFIG = "--print-config"
HELP = f"""{USAGE}
       torchrun --nproc_per_node=N -m run ...   (one process per GPU; on a CPU-only machine, gloo)

Distill (kd) or train (pretrain) Puzzletron / AnyModel checkpoints with NeMo AutoModel 0.7.0's recipes.

modes:
  --mode kd         the student learns from a teacher: loss = (1 - kd_ratio) * CE + kd_ratio * KD
                    (+ hidden_kd.weight * H, with hidden-state KD)
  --mode pretrain   the student alone, AutoModel's fine-tuning recipe
  --mode teacher_cache
                    run teacher_model once over the KD data and write a sparse teacher cache to
                    teacher_cache.path; then --mode kd with teacher_cache.path distills from it, no teacher loaded

options:
  -c, --config CONFIG   the YAML config (default: {MODES['kd']} for kd and teacher_cache, {MODES['pretrain']} for
                        pretrain)
  --print-config        print the config this command line resolves to (overrides applied, the CPU backend
                        switch included) as YAML, after the checks a real run makes, and exit; starts no
                        process group, loads no weights, writes nothing
  -h, --help            print this message and exit

overrides, in any of three forms; values are YAML (null, true, 1e-5, [0.9, 0.95]):
  section.key=value   --section.key=value   --section.key value
  e.g. model.pretrained_model_name_or_path=/ckpts/student model.anymodel_descriptor=llama kd_ratio=0.9

shipped configs, in {HERE}:
  {MODES['kd']}         student (model), teacher_model, kd_ratio, kd_loss_fn, fused_linear_loss, hidden_kd,
                  distributed, optimizer, data, checkpoint; the checkpoint paths are null and must be given
  {MODES['pretrain']}   the same without the teacher and the KD keys
{HERE / 'README.md'} explains them: "Configs and overrides" (sections, override forms), "Checkpoints"
(anymodel_descriptor, block configs), "Errors and recovery" (what is checked before a run starts).
"""
# Top-level sections AutoModel 0.7.0's LLM recipes read that kd.yaml / pretrain.yaml leave out:
# overriding one adds it; overriding any other missing section is a typo.
OPTIONAL_SECTIONS = ("lr_scheduler", "clip_grad_norm", "packed_sequence", "peft", "fp8", "qat", "quantization",
                     "compile", "wandb", "mlflow", "comet", "teacher_distributed", "moe_metrics", "mtp", "neftune",
                     "freeze_config", "validation_dataloaders")


class UsageError(Exception):
    """A mistake on the command line or in the config; the message says how to fix it."""


def parse_argv(argv: list[str]) -> tuple[str, Path, list[tuple[str, str]]]:
    """Split the command line into ``(mode, config_path, [(dotted_key, raw_value), ...])``.

    ``-h``, ``--help`` and ``--print-config`` are left to :func:`main`: never an override, nor an override's value.
    """
    mode, config, overrides = None, None, []
    i = 0
    while i < len(argv):
        token = argv[i]
        flag, eq, inline = token.partition("=")
        if token in (*HELP_FLAGS, PRINT_CONFIG):
            pass  # main() acts on these; they are never overrides
        elif flag in ("--mode", "-c", "--config"):
            if eq:
                value = inline
            elif i + 1 < len(argv):
                i += 1
                value = argv[i]
            else:
                raise UsageError(f"{flag} needs a value")
            if flag == "--mode":
                mode = value
            else:
                config = value
        elif token.startswith("--"):
            key = flag[2:]
            if eq:
                overrides.append((key, inline))
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--") and argv[i + 1] not in HELP_FLAGS:
                i += 1
                overrides.append((key, argv[i]))
            else:
                overrides.append((key, "true"))
        elif eq and flag:
            overrides.append((flag, inline))
        else:
            raise UsageError(f"unexpected argument {token!r}; overrides look like key.subkey=value")
        i += 1

    if mode not in MODES:
        raise UsageError(f"--mode must be one of {', '.join(MODES)} (got {mode!r})")
    config_path = Path(config) if config is not None else HERE / MODES[mode]
    if not config_path.is_file():
        raise UsageError(f"config file {config_path} does not exist; pass -c PATH to a YAML config")
    return mode, config_path, overrides


def parse_value(raw: str):
    """A YAML scalar, or the string itself where YAML reads it as one (AutoModel then reads ``1e-5``)."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _dotted_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        keys.append(prefix + key)
        if isinstance(value, dict):
            keys += _dotted_keys(value, prefix + key + ".")
    return keys


def load_config(config_path: Path, overrides: list[tuple[str, str]]):
    """Load the YAML with AutoModel's loader and apply the overrides, warning on keys it lacks."""
    from nemo_automodel.components.config.loader import load_yaml_config

    try:
        cfg = load_yaml_config(str(config_path))
    except yaml.YAMLError as e:
        mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None) or str(e).splitlines()[0]
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UsageError(f"{config_path} is not valid YAML{where}: {problem}") from None
    except (AttributeError, TypeError):
        cfg = None
    if cfg is None or not isinstance(cfg.raw_config, dict):
        raise UsageError(f"{config_path} is not a YAML mapping of sections; start from kd.yaml or pretrain.yaml")
    known = _dotted_keys(cfg.raw_config)
    sections = [key for key, value in cfg.raw_config.items() if isinstance(value, dict)]
    for key, raw in overrides:
        section = key.split(".")[0]
        if "." in key and section not in sections and section not in OPTIONAL_SECTIONS:
            close = difflib.get_close_matches(section, sections + list(OPTIONAL_SECTIONS), n=1)
            hint = f"did you mean {close[0]}?" if close else f"sections: {', '.join(sections)}"
            raise UsageError(f"override {key}: {config_path.name} has no section {section!r}; {hint}")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            print(f"warning: override {key} is not in {config_path.name}, adding it{hint}", file=sys.stderr)
        cfg.set_by_dotted(key, parse_value(raw))
    return cfg


def setup_runtime() -> bool:
    """Patch AutoModel for AnyModel checkpoints and, without CUDA, for the CPU. Returns ``on_cpu``."""
    import torch

    import patch_automodel

    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        from common import cpu_support

        cpu_support.apply()
    patch_automodel.apply_patch()
    resume.install()
    _log_every_row_when_its_step_ends()
    # AutoModel resolves `_target_` only in allowlisted or already-imported modules.
    import loss  # noqa: F401

    return on_cpu


def _log_every_row_when_its_step_ends() -> None:
    """AutoModel buffers up to 100 rows of ``training.jsonl`` / ``validation.jsonl``, which a crash or a full
    disk loses; its recipes build the loggers through ``train_ft.build_metric_logger``, which takes the buffer
    size (and an fsync per write)."""
    from functools import partial

    from nemo_automodel.components.loggers.metric_logger import build_metric_logger
    from nemo_automodel.recipes.llm import train_ft

    train_ft.build_metric_logger = partial(build_metric_logger, buffer_size=1, flush=True)


def prepare(argv: list[str]):
    """Everything before the recipe: returns ``(recipe_class, cfg)``.

    Raises :class:`UsageError` or :class:`preflight.PreflightError`, on every rank alike, before
    the process group exists or any weights load.
    """
    mode, config_path, overrides = parse_argv(argv)
    on_cpu = setup_runtime()
    # After the patch: the config's `_target_` must resolve to the patched from_pretrained.
    cfg = load_config(config_path, overrides)
    if mode == "kd" and cfg.get("kd_loss_fn", None) is None and cfg.get("teacher_model", None) is not None:
        # AutoModel's fallback (KLDivLoss) fails at step 0 on num_batch_labels; ours is the documented default.
        cfg.set_by_dotted("kd_loss_fn._target_", "loss.KDLoss")
    from safety import preflight

    cache_settings = preflight.check(cfg, mode)
    restore_from = resume.restore_target(cfg)
    if restore_from is not None:
        # This student's own checkpoint (preflight compared them): AutoModel would compare path strings.
        cfg.set_by_dotted("checkpoint.restore_from", restore_from)
    if on_cpu:
        from common import cpu_support

        cpu_support.use_gloo(cfg)

    if mode == "kd":
        from recipe import KnowledgeDistillationRecipeForNextTokenPrediction as Recipe
    elif mode == "teacher_cache":
        from functools import partial

        from distillation.teacher_cache_build import TeacherCacheRecipe

        Recipe = partial(TeacherCacheRecipe, settings=cache_settings)
    else:
        from nemo_automodel.recipes.llm.train_ft import TrainFinetuneRecipeForNextTokenPrediction as Recipe
    return Recipe, cfg


def _print_on_rank_zero(text: str) -> None:
    """Print once per job, also under torchrun, where every rank runs main()."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(text)


def user_error_types() -> tuple[type[Exception], ...]:
    """Errors that mean "fix your input": printed as one line, exit code 2, no traceback."""
    types = [UsageError]
    for module, name in (("common.errors", "PreflightError"), ("common.errors", "AnyModelError"),
                         ("recipe", "NonFiniteLossError"), ("safety.checkpoint_lock", "CheckpointDirLockedError")):
        if module in sys.modules:
            types.append(getattr(sys.modules[module], name))
    return tuple(types)


def report_error(line: str, usage: bool = False) -> None:
    """Print the one-line error. Under torchrun also write it where the agent looks, so its failure
    summary names the cause even when it stops this rank's peers before they print."""
    print(line + (f"\n{USAGE}" if usage else ""), file=sys.stderr)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        info = {"py_callstack": line, "timestamp": str(int(time.time()))}
        Path(error_file).write_text(json.dumps({"message": {"message": line, "extraInfo": info}}))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if set(HELP_FLAGS) & set(argv):  # before any parsing: help needs no --mode
        _print_on_rank_zero(HELP.rstrip())
        return
    if PRINT_CONFIG in argv:
        # stdout carries the YAML alone: what the checks print (ModelOpt's detections) goes to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            _, cfg = prepare(argv)
        # What the run would save as each checkpoint's config.yaml (AutoModel's base recipe).
        _print_on_rank_zero(yaml.safe_dump(cfg.to_yaml_dict(use_orig_values=True), sort_keys=False).rstrip())
        return
    Recipe, cfg = prepare(argv)
    lock = None
    if parse_argv(argv)[0] == "teacher_cache":  # one build per cache directory
        from safety.checkpoint_lock import CheckpointDirLock

        lock = CheckpointDirLock(cfg.get("teacher_cache.path")).acquire()
    elif cfg.get("checkpoint.enabled", True) and cfg.get("checkpoint.checkpoint_dir", None):
        from safety.checkpoint_lock import CheckpointDirLock

        lock = CheckpointDirLock(cfg.get("checkpoint.checkpoint_dir")).acquire()
        resume.record_student(cfg)
    try:
        recipe = Recipe(cfg)
        recipe.setup()
        recipe.run_train_validation_loop()
    finally:
        if lock is not None:
            lock.release()
    import torch.distributed as dist

    if dist.is_initialized():
        # Only after a finished run: with a peer still inside a collective this could hang. Left to
        # AutoModel's atexit hook, a finished 2-rank gloo run aborted once in CI at interpreter exit
        # ("terminate called without an active exception"); torch asks for this call at the end of main.
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except Exception as e:
        if not isinstance(e, user_error_types()):
            raise
        report_error(f"run.py: error: {e}", usage=isinstance(e, UsageError))
        sys.exit(2)
    # Everything is written (logs closed, checkpoints finalized, process group destroyed). Interpreter
    # teardown still aborted now and then on 2-rank gloo runs ("terminate called without an active
    # exception", a C++ thread destroyed at exit), turning a finished run into exit code -6.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
