"""Check a run's config and files before any expensive work (process group, weights, data).

``run.py`` calls :func:`check` right after loading the config, before the recipe is built. Every
rank runs the same checks on the same inputs, so a mistake stops all ranks together, before any
collective, with one line that names the bad value and the fix (a :class:`PreflightError`).
Nothing here loads weights; it reads ``config.json``, block configs and tokenizer files.

Checkpoint and dataset values that are Hugging Face hub ids (``org/name``, nothing on disk) are
left to AutoModel: checking them would need the network.
"""

import contextlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import patch_automodel
from loss import DIVERGENCES

# Keys that must name a checkpoint before anything is built, per mode.
REQUIRED_PATHS = {
    "kd": ("model.pretrained_model_name_or_path", "teacher_model.pretrained_model_name_or_path"),
    "pretrain": ("model.pretrained_model_name_or_path",),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
PARALLEL_SIZES = ("tp_size", "pp_size", "cp_size", "ep_size")
DATASET_KEYS = ("dataset_name", "path_or_dataset")


class PreflightError(ValueError):
    """A config value or file that cannot work; the message names it and says how to fix it."""


@dataclass
class Checkpoint:
    """A model section's checkpoint as seen on disk. ``config`` is None for a hub id."""

    section: str
    path: str
    config: dict | None

    @property
    def key(self) -> str:
        return f"{self.section}.pretrained_model_name_or_path"

    def get(self, name: str):
        """A field of ``config.json``, or of its ``text_config`` for multimodal checkpoints."""
        return self.config.get("text_config", self.config).get(name, self.config.get(name))


def check(cfg, mode: str, world_size: int | None = None) -> None:
    """Raise :class:`PreflightError` for the first setting or file that cannot work.

    ``world_size`` defaults to the ``WORLD_SIZE`` that torchrun exports (1 without torchrun).
    """
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    for key in REQUIRED_PATHS[mode]:
        if cfg.get(key, None) is None:
            raise PreflightError(f"{key} is not set; pass {key}=/path/to/checkpoint")
    if mode == "kd":
        check_kd_config(cfg)
    check_parallel_sizes(cfg, world_size)

    needs_student_tokenizer = cfg.get("dataset.tokenizer", None) is None
    student = read_checkpoint(cfg, "model", needs_tokenizer=mode == "kd" or needs_student_tokenizer)
    check_anymodel(cfg, student)
    models = [student]
    if mode == "kd":
        teacher = read_checkpoint(cfg, "teacher_model", needs_tokenizer=True)
        check_anymodel(cfg, teacher)
        check_same_vocabulary(student, teacher)
        models.append(teacher)
    for model in models:
        check_fits_parallelism(cfg, model)
    for section in ("dataset", "validation_dataset"):
        check_dataset(cfg, section)


def check_kd_config(cfg) -> None:
    """``kd_ratio`` in [0, 1], ``kd_loss_fn.temperature > 0``, a known divergence, and no PP with CP."""
    kd_ratio = cfg.get("kd_ratio", 0.5)
    if not _is_number(kd_ratio) or not 0.0 <= float(kd_ratio) <= 1.0:
        raise PreflightError(f"kd_ratio={kd_ratio!r} must be a number in [0, 1] (0: CE only, 1: KD only)")
    temperature = cfg.get("kd_loss_fn.temperature", 1.0)
    if not _is_number(temperature) or float(temperature) <= 0.0:
        raise PreflightError(f"kd_loss_fn.temperature={temperature!r} must be a number > 0 (1.0 is the usual choice)")
    divergence = cfg.get("kd_loss_fn.divergence", "forward_kl")
    if divergence not in DIVERGENCES:
        raise PreflightError(f"kd_loss_fn.divergence={divergence!r} is not one of {', '.join(DIVERGENCES)}")
    if _size(cfg, "pp_size") > 1 and _size(cfg, "cp_size") > 1:
        raise PreflightError("distributed.pp_size > 1 with distributed.cp_size > 1 is not supported for KD; "
                             "set one of them to 1")


def check_parallel_sizes(cfg, world_size: int) -> None:
    """Positive integer sizes whose product divides the number of processes; no expert parallelism."""
    sizes = {}
    for name in PARALLEL_SIZES:
        value = cfg.get(f"distributed.{name}", 1)
        if value is None:
            value = 1
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PreflightError(f"distributed.{name}={value!r} must be an integer >= 1")
        sizes[name] = value
    if sizes["ep_size"] > 1:
        raise PreflightError(f"distributed.ep_size={sizes['ep_size']} is not supported (no MoE expert parallelism "
                             "in this example); set distributed.ep_size=1")
    model_parallel = sizes["tp_size"] * sizes["pp_size"] * sizes["cp_size"]
    if world_size % model_parallel:
        raise PreflightError(
            f"tp_size * pp_size * cp_size = {sizes['tp_size']} * {sizes['pp_size']} * {sizes['cp_size']} = "
            f"{model_parallel} does not divide the {world_size} processes; launch a multiple of {model_parallel} "
            "processes (torchrun --nproc_per_node) or lower the sizes")
    dp_size = cfg.get("distributed.dp_size", None)
    if isinstance(dp_size, int) and not isinstance(dp_size, bool) and dp_size * model_parallel != world_size:
        raise PreflightError(
            f"distributed.dp_size={dp_size} times tp*pp*cp={model_parallel} is not the {world_size} processes; "
            "set distributed.dp_size=none to infer it")


def read_checkpoint(cfg, section: str, needs_tokenizer: bool) -> Checkpoint:
    """The section's checkpoint: a directory with a readable ``config.json`` (and a tokenizer if needed)."""
    key = f"{section}.pretrained_model_name_or_path"
    path = str(cfg.get(key))
    if _is_hub_id(path):
        return Checkpoint(section, path, None)
    if not os.path.exists(path):
        raise PreflightError(f"{key}={path} does not exist; pass the directory of a Hugging Face checkpoint")
    if not os.path.isdir(path):
        raise PreflightError(f"{key}={path} is a file, not a directory; pass the checkpoint directory that holds "
                             "config.json")
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise PreflightError(f"{key}={path} has no config.json; pass the checkpoint directory itself "
                             "(the one saved with save_pretrained)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise PreflightError(f"{config_file} is not valid JSON ({e}); re-save the checkpoint") from None
    if needs_tokenizer and not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        raise PreflightError(f"{key}={path} has no tokenizer ({', '.join(TOKENIZER_FILES)}); KD and data loading "
                             "read it from there: save the tokenizer into that directory (tokenizer.save_pretrained)")
    return Checkpoint(section, path, config)


def check_anymodel(cfg, ckpt: Checkpoint) -> None:
    """A known descriptor that matches the checkpoint's ``model_type``, and block configs that fit it."""
    section = ckpt.section
    name = cfg.get(f"{section}.anymodel_descriptor", None)
    block_configs_path = cfg.get(f"{section}.block_configs_path", None)
    if name is None:
        if block_configs_path is not None:
            raise PreflightError(f"{section}.block_configs_path is set but {section}.anymodel_descriptor is not; "
                                 f"set {section}.anymodel_descriptor")
        if ckpt.config is not None and ckpt.config.get("block_configs") is not None:
            raise PreflightError(f"{ckpt.key}={ckpt.path} is a heterogeneous (AnyModel) checkpoint; set "
                                 f"{section}.anymodel_descriptor=auto (or its architecture: "
                                 f"{', '.join(patch_automodel.descriptor_names())})")
        return
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # ModelOpt prints what it detects
            descriptor = patch_automodel.resolve_descriptor(str(name), ckpt.path if name == "auto" else None)
            if ckpt.config is None:
                return
            expected = patch_automodel.resolve_descriptor("auto", ckpt.path)
        if descriptor is not expected:
            raise PreflightError(
                f"{section}.anymodel_descriptor={name} does not match the checkpoint's "
                f"model_type={ckpt.config.get('model_type')!r}; set {section}.anymodel_descriptor="
                f"{_descriptor_name(expected)} (or auto)")
        patch_automodel.load_block_configs(ckpt.path, block_configs_path, ckpt.get("num_hidden_layers"))
    except patch_automodel.AnyModelError as e:
        raise PreflightError(f"{section}: {e}") from None


def check_same_vocabulary(student: Checkpoint, teacher: Checkpoint) -> None:
    """Same logits width and the same tokenizer (token -> id), as token-level KD compares them."""
    if student.config is None or teacher.config is None:
        return
    s_vocab, t_vocab = student.get("vocab_size"), teacher.get("vocab_size")
    if s_vocab != t_vocab:
        raise PreflightError(f"student vocab_size={s_vocab} and teacher vocab_size={t_vocab} differ; KD compares "
                             "logits token by token: distill from a teacher with the student's vocabulary")
    from transformers import AutoTokenizer

    s_tok, t_tok = (AutoTokenizer.from_pretrained(c.path) for c in (student, teacher))
    if s_tok.get_vocab() != t_tok.get_vocab() or s_tok.pad_token != t_tok.pad_token:
        raise PreflightError(f"student tokenizer ({len(s_tok)} tokens, {student.path}) and teacher tokenizer "
                             f"({len(t_tok)} tokens, {teacher.path}) differ; use the same tokenizer for both")


def check_fits_parallelism(cfg, ckpt: Checkpoint) -> None:
    """Enough layers for the pipeline stages, and heads that split over TP ranks where nothing replicates them.

    AnyModel students get per-layer TP plans (``tp_plan.py``) that replicate blocks whose heads do not
    split, so only plain Hugging Face models (teachers, homogeneous students) must divide evenly.
    """
    if ckpt.config is None:
        return
    pp_size, tp_size = _size(cfg, "pp_size"), _size(cfg, "tp_size")
    layers = ckpt.get("num_hidden_layers")
    if layers is not None and pp_size > layers:
        raise PreflightError(f"distributed.pp_size={pp_size} is more than {ckpt.section}'s {layers} layers; "
                             f"set distributed.pp_size <= {layers}")
    if tp_size == 1 or cfg.get(f"{ckpt.section}.anymodel_descriptor", None) is not None:
        return
    for field in ("num_attention_heads", "num_key_value_heads"):
        heads = ckpt.get(field)
        if heads is not None and heads % tp_size:
            raise PreflightError(f"distributed.tp_size={tp_size} does not divide {ckpt.section}'s {field}={heads}; "
                                 f"pick a tp_size that divides {heads}")


def check_dataset(cfg, section: str) -> None:
    """A local dataset path must exist (hub ids are left to the datasets library)."""
    for name in DATASET_KEYS:
        value = cfg.get(f"{section}.{name}", None)
        if isinstance(value, str) and not _is_hub_id(value) and not os.path.exists(value):
            raise PreflightError(f"{section}.{name}={value} does not exist; pass a directory with train.jsonl / "
                                 "validation.jsonl or a hub dataset id")


def _is_hub_id(value: str) -> bool:
    # "org/name" or "name" that is not on disk; "/abs", "./rel", "~/x" and "a/b/c" are local paths.
    return not os.path.exists(value) and not value.startswith((".", "/", "~")) and value.count("/") <= 1


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _size(cfg, name: str) -> int:
    return cfg.get(f"distributed.{name}", 1) or 1


def _descriptor_name(descriptor) -> str:
    from modelopt.torch.puzzletron.anymodel import ModelDescriptorFactory

    return next(n for n, cls in ModelDescriptorFactory.CLASS_MAPPING.items() if cls is descriptor)
