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
from pathlib import Path

from architectures import descriptors, registry
from common.checkpoint import Checkpoint
from common.errors import AnyModelError, PreflightError
from distillation import fused_kd_forward, hidden_kd, separate_meshes
from loss import DIVERGENCES
from safety import paths, resume, teacher_cache_checks

# Keys that must name a checkpoint before anything is built, per mode.
REQUIRED_PATHS = {
    "kd": ("model.pretrained_model_name_or_path", "teacher_model.pretrained_model_name_or_path"),
    "pretrain": ("model.pretrained_model_name_or_path",),
    "teacher_cache": ("teacher_model.pretrained_model_name_or_path", "teacher_cache.path"),
}
# tekken.json alone is what ModelOpt's copy_tokenizer writes for a Mistral child (transformers 5 + mistral-common).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "tekken.json")
PARALLEL_SIZES = ("tp_size", "pp_size", "cp_size", "ep_size")
DATASET_KEYS = ("dataset_name", "path_or_dataset", "path_or_dataset_id")
# Hyper-parameters that must be numbers (YAML may give "1e-5" as a string; AutoModel converts those),
# and step counts that must be positive integers (max_steps may be null: the epochs decide).
NUMERIC_KEYS = ("optimizer.lr", "optimizer.weight_decay", "optimizer.eps", "clip_grad_norm.max_norm")
STEP_KEYS = ("step_scheduler.global_batch_size", "step_scheduler.local_batch_size", "step_scheduler.max_steps",
             "step_scheduler.ckpt_every_steps", "step_scheduler.val_every_steps", "step_scheduler.num_epochs")
SAFETENSORS_HEADER_LIMIT = 100 * 1024 * 1024  # the safetensors format's own cap on the JSON header


def check(cfg, mode: str, world_size: int | None = None) -> dict | None:
    """Raise :class:`PreflightError` for the first setting or file that cannot work.

    ``world_size`` defaults to the ``WORLD_SIZE`` that torchrun exports (1 without torchrun). For
    ``--mode teacher_cache``, returns the settings the cache's manifest will hold.
    """
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cached = mode == "kd" and cfg.get("teacher_cache.path", None) is not None
    if mode == "kd" and cfg.get("teacher_model", None) is None and not cached:
        raise PreflightError("the config has no teacher_model section, which --mode kd needs (with kd_ratio and "
                             "kd_loss_fn): start from kd.yaml, or train without a teacher with --mode pretrain")
    for key in REQUIRED_PATHS[mode]:
        if cfg.get(key, None) is None and not (cached and key.startswith("teacher_model.")):
            what = "cache" if key == teacher_cache_checks.KEY else "checkpoint"
            raise PreflightError(f"{key} is not set; pass {key}=/path/to/{what}")
    paths.check_run(cfg, mode)
    if mode in ("kd", "teacher_cache"):
        check_kd_config(cfg)
    check_numbers(cfg)
    check_parallel_sizes(cfg, world_size)
    check_packing(cfg)

    models, student, teacher = [], None, None
    if mode != "teacher_cache":
        needs_student_tokenizer = cfg.get("dataset.tokenizer", None) is None
        student = read_checkpoint(cfg, "model", needs_tokenizer=mode == "kd" or needs_student_tokenizer)
        check_anymodel(cfg, student)
        models.append(student)
    if mode == "teacher_cache" or (mode == "kd" and cfg.get("teacher_model.pretrained_model_name_or_path", None)):
        teacher = read_checkpoint(cfg, "teacher_model", needs_tokenizer=True)
        check_anymodel(cfg, teacher)
        if student is not None:
            check_same_vocabulary(student, teacher)
        models.append(teacher)
    for model in models:
        check_weight_files(model)
        check_fits_parallelism(cfg, model)
    for section in ("dataset", "validation_dataset"):
        check_dataset(cfg, section)
    if mode == "teacher_cache":
        return teacher_cache_checks.check_build(cfg, teacher)
    if mode == "kd" and cfg.get("fused_linear_loss", False):
        fused_kd_forward.check_config(cfg)
    if cached:
        teacher_cache_checks.check_read(cfg)
    if mode == "kd":
        hidden_kd.check_config(cfg, student, teacher)
    resume.check_same_student(cfg)
    return None


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


def check_numbers(cfg) -> None:
    """Numeric hyper-parameters are numbers and step counts positive integers, wherever the config sets them."""
    for key in NUMERIC_KEYS:
        value = cfg.get(key, None)
        if value is not None and not _is_number(value) and not _is_numeric_string(value):
            raise PreflightError(f"{key}={value!r} is not a number; pass one, e.g. {key}=1e-5")
    for key in STEP_KEYS:
        value = cfg.get(key, None)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise PreflightError(f"{key}={value!r} must be an integer >= 1")


def check_parallel_sizes(cfg, world_size: int) -> None:
    """Positive integer sizes whose product divides the processes (each mesh's share with separate meshes); no EP."""
    meshes = {"distributed": world_size}
    if separate_meshes.enabled(cfg):
        meshes = separate_meshes.check_config(cfg, world_size)
    for section, processes in meshes.items():
        _check_mesh_sizes(cfg, section, processes)


def _check_mesh_sizes(cfg, section: str, world_size: int) -> None:
    sizes = {}
    for name in PARALLEL_SIZES:
        value = cfg.get(f"{section}.{name}", 1)
        value = 1 if value is None else value
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PreflightError(f"{section}.{name}={value!r} must be an integer >= 1")
        sizes[name] = value
    if sizes["ep_size"] > 1:
        raise PreflightError(f"{section}.ep_size={sizes['ep_size']} is not supported (no MoE expert parallelism "
                             f"in this example); set {section}.ep_size=1")
    model_parallel = sizes["tp_size"] * sizes["pp_size"] * sizes["cp_size"]
    if world_size % model_parallel:
        raise PreflightError(
            f"tp_size * pp_size * cp_size = {sizes['tp_size']} * {sizes['pp_size']} * {sizes['cp_size']} = "
            f"{model_parallel} does not divide the {world_size} processes; launch a multiple of {model_parallel} "
            "processes (torchrun --nproc_per_node) or lower the sizes")
    if sizes["pp_size"] > 1:
        check_pipeline_microbatches(cfg, sizes["pp_size"], section)
    dp_size = cfg.get(f"{section}.dp_size", None)
    if isinstance(dp_size, int) and not isinstance(dp_size, bool) and dp_size * model_parallel != world_size:
        raise PreflightError(
            f"{section}.dp_size={dp_size} times tp*pp*cp={model_parallel} is not the {world_size} processes; "
            f"set {section}.dp_size=none to infer it")


def check_packing(cfg) -> None:
    """Packed sequences: AutoModel 0.7.0 packs them for Hugging Face models only through Flash Attention, and
    only without context parallelism (``kernel_patches._apply_preload_overrides`` asserts both at model build)."""
    size = cfg.get("packed_sequence.packed_sequence_size", 0) or 0
    if size <= 0:
        return
    key, cp_size = f"packed_sequence.packed_sequence_size={size}", _size(cfg, "cp_size")
    if cp_size > 1:
        raise PreflightError(f"{key} with distributed.cp_size={cp_size}: AutoModel 0.7.0 packs "
                             "sequences only without context parallelism; set one of them back (packed_sequence_size=0 "
                             "or distributed.cp_size=1)")
    from nemo_automodel._transformers import kernel_patches

    if not (kernel_patches.HAS_FA or kernel_patches.HAS_FA3 or kernel_patches.HAS_FA4):
        raise PreflightError(f"{key}: AutoModel 0.7.0 packs sequences only through Flash Attention, which is not "
                             "installed here (flash-attn needs a CUDA GPU); set packed_sequence.packed_sequence_size=0 "
                             "or install flash-attn on a GPU machine")


def check_pipeline_microbatches(cfg, pp_size: int, section: str = "distributed") -> None:
    """Under PP the local batch splits into whole microbatches, at least one per stage (AutoModel asserts this
    after the process group is up)."""
    local = cfg.get("step_scheduler.local_batch_size", 1)
    micro = cfg.get(f"{section}.pipeline.pp_microbatch_size", 1)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (local, micro)):
        return  # check_numbers names those
    if local % micro or local // micro < pp_size:
        raise PreflightError(
            f"step_scheduler.local_batch_size={local} must split into whole microbatches of "
            f"{section}.pipeline.pp_microbatch_size={micro}, at least {section}.pp_size={pp_size} of them: "
            f"set local_batch_size to a multiple of {micro} that is >= {micro * pp_size}, or lower pp_microbatch_size")


def read_checkpoint(cfg, section: str, needs_tokenizer: bool) -> Checkpoint:
    """The section's checkpoint: a directory with a readable ``config.json`` (and a tokenizer if needed)."""
    key = f"{section}.pretrained_model_name_or_path"
    path = str(cfg.get(key))
    if _is_hub_id(path):
        return Checkpoint(section, path, None)
    paths.readable_dir(key, path, "the directory of a Hugging Face checkpoint (the one that holds config.json)")
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
    if needs_tokenizer:
        check_mistral_common_tokenizer(key, path, config.get("model_type"))
    return Checkpoint(section, path, config)


def check_mistral_common_tokenizer(key: str, path: str, model_type: str | None) -> None:
    """A tokenizer file mistral-common reads, where AutoModel loads the tokenizer with mistral-common.

    AutoModel 0.7.0's ``NeMoAutoTokenizer`` (what the KD recipe's tokenizer check and the data loading
    call) sends the model types of its tokenizer registry's mistral-common entry (``mistral``,
    ``mistral3``, ``pixtral``, ``ministral3``) to ``MistralCommonBackend``, which reads ``tekken.json``
    or a SentencePiece ``*.model`` and never ``tokenizer.json``. Without one it fails after setup
    starts ("No tokenizer file found."). Asks AutoModel's registry, so a patch that re-registers
    those model types is followed.
    """
    from nemo_automodel._transformers.tokenization.registry import TokenizerRegistry

    if model_type is None or not TokenizerRegistry.has_custom_tokenizer(model_type):
        return
    if getattr(TokenizerRegistry.get_custom_tokenizer_cls(model_type), "__name__", None) != "MistralCommonBackend":
        return
    from mistral_common.tokens.tokenizers.utils import get_one_valid_tokenizer_file

    try:
        get_one_valid_tokenizer_file(os.listdir(path))
    except ValueError:
        raise PreflightError(
            f"{key}={path} has no tekken.json: AutoModel 0.7.0 loads the tokenizer of model_type={model_type!r} "
            "with mistral-common, which reads tekken.json (or a SentencePiece *.model), not tokenizer.json; copy "
            f"tekken.json from the checkpoint this one was made from into {path}") from None


def check_weight_files(ckpt: Checkpoint) -> None:
    """Every weight file the checkpoint's index lists exists and has a readable safetensors header."""
    if ckpt.config is None:
        return
    root = Path(ckpt.path)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise PreflightError(f"{index} is not a valid safetensors index ({e!r}); re-save the checkpoint") from None
    else:
        files = sorted(p.name for p in root.glob("*.safetensors"))
    for name in files:
        path = root / name
        if not path.is_file():
            raise PreflightError(f"{ckpt.key}={ckpt.path}: {name} is listed in model.safetensors.index.json but "
                                 "missing; copy the whole checkpoint directory again")
        problem = _safetensors_header_problem(path)
        if problem:
            raise PreflightError(f"{ckpt.key}={ckpt.path}: {name} {problem}; the file is damaged or was only "
                                 "partly copied: copy it again")


def _safetensors_header_problem(path: Path) -> str | None:
    """Why the file's safetensors header cannot be read (None if it can). Reads the header only."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            return f"has {size} bytes, fewer than a safetensors header"
        length = int.from_bytes(prefix, "little")
        if length > SAFETENSORS_HEADER_LIMIT or 8 + length > size:
            return f"is truncated ({size} bytes; its header alone claims {8 + length})"
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return "has an unreadable safetensors header"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end > size:
        return f"is truncated ({size} bytes; its tensors end at byte {8 + length + end})"
    return None


def check_anymodel(cfg, ckpt: Checkpoint) -> None:
    """A known descriptor that matches the checkpoint's ``model_type``, a model the causal-LM class can build,
    and block configs that fit it. The mismatch message names the descriptor the user set, also where
    ModelOpt's auto-detection knows no descriptor for the ``model_type``."""
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
                                 f"{', '.join(descriptors.descriptor_names())})")
        check_runs_without_cuda(ckpt)
        check_image_text_has_descriptor(ckpt)
        return
    if ckpt.config is not None:
        check_builds_as_causal_lm(cfg, ckpt)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # ModelOpt prints what it detects
            descriptor = descriptors.resolve_descriptor(str(name), ckpt.path if name == "auto" else None)
            if ckpt.config is None:
                return
            expected = _descriptor_for_model_type(ckpt)
        model_type = ckpt.config.get("model_type")
        if expected is None:
            raise PreflightError(f"{section}.anymodel_descriptor={name} does not match the checkpoint's "
                                 f"model_type={model_type!r}: ModelOpt 0.47 has no descriptor for that model_type")
        if descriptor is not expected and not descriptors.same_architecture(descriptor, expected):
            raise PreflightError(
                f"{section}.anymodel_descriptor={name} does not match the checkpoint's "
                f"model_type={model_type!r}; set {section}.anymodel_descriptor="
                f"{descriptors.descriptor_name(expected)} (or auto)")
        descriptors.load_block_configs(ckpt.path, block_configs_path, ckpt.get("num_hidden_layers"),
                                       descriptor=descriptors.descriptor_name(descriptor),
                                       num_attention_heads=ckpt.get("num_attention_heads"),
                                       model_config=ckpt.config.get("text_config", ckpt.config))
    except AnyModelError as e:
        raise PreflightError(f"{section}: {e}") from None


def check_runs_without_cuda(ckpt: Checkpoint) -> None:
    """On a machine without CUDA, a plain checkpoint must not get an AutoModel implementation that needs it
    (``Architecture.automodel_needs_cuda``; transformers' implementation, chosen with a descriptor, runs anywhere)."""
    import torch

    model_type = ckpt.config.get("model_type") if ckpt.config is not None else None
    architecture = registry.for_model_type(model_type)
    if architecture is None or architecture.automodel_needs_cuda is None or torch.cuda.is_available():
        return
    raise PreflightError(
        f"{ckpt.key}={ckpt.path} is a {model_type} checkpoint without {ckpt.section}.anymodel_descriptor: AutoModel "
        f"0.7.0 then uses its own {model_type} implementation, which needs CUDA "
        f"({architecture.automodel_needs_cuda}); on this CPU-only machine set "
        f"{ckpt.section}.anymodel_descriptor={model_type} (transformers' implementation)")


def check_builds_as_causal_lm(cfg, ckpt: Checkpoint) -> None:
    """An AnyModel checkpoint that ``NeMoAutoModelForCausalLM`` can build.

    With a descriptor, ``patch_automodel`` builds the model with transformers' own class
    (``force_hf=True``) through ``NeMoAutoModelForCausalLM``, which only knows the model types of
    transformers' causal-LM mapping (or a remote-code ``auto_map`` entry). Image-text checkpoints
    (e.g. Mistral-Small 3.1: ``mistral3``) are not among them and would fail in the build ("Unrecognized
    configuration class"), after the process group is up; Qwen3-VL-MoE (``qwen3_vl_moe``) is built with
    AutoModel's image-text class instead (``architectures/qwen3_vl.py``). Model types transformers knows as neither
    are left to the build.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    model_type = ckpt.config.get("model_type")
    if (model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or "AutoModelForCausalLM" in ckpt.config.get("auto_map", {})
            or model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
            or model_type in registry.image_text_model_types()):
        return
    name = cfg.get(f"{ckpt.section}.anymodel_descriptor")
    architecture = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[model_type]
    text_only = [n for n in descriptors.descriptor_names()
                 if n not in (*registry.image_text_model_types().values(), "auto") and n not in descriptors.DESCRIPTOR_ALIASES]
    raise PreflightError(
        f"{ckpt.section}.anymodel_descriptor={name}: {ckpt.key}={ckpt.path} has model_type={model_type!r} "
        f"({architecture}), which AutoModel 0.7.0's NeMoAutoModelForCausalLM, the class this example builds every "
        f"model with, cannot build (of image-text models only Qwen3-VL-MoE builds here, anymodel_descriptor "
        f"qwen3_vl): distill a text-only causal-LM checkpoint (anymodel_descriptor {', '.join(text_only)})")


def check_image_text_has_descriptor(ckpt: Checkpoint) -> None:
    """An image-text checkpoint this example builds only through its descriptor (Qwen3-VL-MoE) has one set.

    Without a descriptor the model is AutoModel's ``NeMoAutoModelForCausalLM`` build as shipped, which cannot
    build an image-text model and fails after the process group is up.
    """
    model_type = ckpt.config.get("model_type") if ckpt.config is not None else None
    image_text = registry.image_text_model_types()
    if model_type in image_text:
        raise PreflightError(
            f"{ckpt.key}={ckpt.path} is a {model_type} (image-text) checkpoint without "
            f"{ckpt.section}.anymodel_descriptor, which AutoModel 0.7.0's NeMoAutoModelForCausalLM cannot build; set "
            f"{ckpt.section}.anymodel_descriptor={image_text[model_type]} (also for a homogeneous model)")


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

    AnyModel students get per-layer TP plans (``architectures/tensor_parallel.py``) that replicate blocks whose heads do not
    split, so only plain Hugging Face models (teachers, homogeneous students) must divide evenly.
    """
    if ckpt.config is None:
        return
    mesh = "teacher_distributed" if ckpt.section == "teacher_model" and separate_meshes.enabled(cfg) else "distributed"
    pp_size, tp_size = _size(cfg, "pp_size", mesh), _size(cfg, "tp_size", mesh)
    architecture = registry.for_model_type(ckpt.config.get("model_type"))
    if architecture is not None:
        sizes = {name: _size(cfg, name, mesh) for name in ("tp_size", "pp_size", "cp_size")}
        problem = architecture.parallelism_problem(ckpt.section, cfg.get(f"{ckpt.section}.anymodel_descriptor", None),
                                                   sizes)
        if problem is not None:
            raise PreflightError(problem)
    if pp_size > 1 and ckpt.section == "model" and _ties_word_embeddings(ckpt):
        raise PreflightError(
            f"distributed.pp_size={pp_size} with a model whose tie_word_embeddings is true ({ckpt.path}): AutoModel "
            "0.7.0 keeps the first stage's embedding and the last stage's LM head as two copies that would train "
            "apart; train this model with FSDP2 and/or TP (distributed.pp_size=1)")
    layers = ckpt.get("num_hidden_layers")
    if layers is not None and pp_size > layers:
        raise PreflightError(f"{mesh}.pp_size={pp_size} is more than {ckpt.section}'s {layers} layers; "
                             f"set {mesh}.pp_size <= {layers}")
    if tp_size == 1 or cfg.get(f"{ckpt.section}.anymodel_descriptor", None) is not None:
        return
    for field in ("num_attention_heads", "num_key_value_heads"):
        heads = ckpt.get(field)
        if heads is not None and heads % tp_size:
            raise PreflightError(f"{mesh}.tp_size={tp_size} does not divide {ckpt.section}'s {field}={heads}; "
                                 f"pick a tp_size that divides {heads}")


def check_dataset(cfg, section: str) -> None:
    """A local dataset path must exist and its file for this split must hold rows (hub ids are left to the
    datasets library)."""
    for name in DATASET_KEYS:
        value = cfg.get(f"{section}.{name}", None)
        if not isinstance(value, str) or _is_hub_id(value):
            continue
        paths.readable(f"{section}.{name}", value,
                       "a directory with train.jsonl / validation.jsonl or a hub dataset id")
        split = cfg.get(f"{section}.split", None)
        data_file = Path(value) / f"{split}.jsonl" if os.path.isdir(value) and split else Path(value)
        if data_file.suffix in (".jsonl", ".json") and data_file.is_file() and not _has_rows(data_file):
            raise PreflightError(f"{section}.{name}={value}: {data_file} has no rows; point it at a file with at "
                                 "least one JSON line")


def _is_hub_id(value: str) -> bool:
    # "org/name" or "name" that is not on disk; "/abs", "./rel", "~/x" and "a/b/c" are local paths.
    return not os.path.exists(value) and not value.startswith((".", "/", "~")) and value.count("/") <= 1


def _has_rows(path: Path) -> bool:
    with open(path, "rb") as f:
        return any(line.strip() for line in f)


def _is_numeric_string(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return isinstance(value, str)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _ties_word_embeddings(ckpt: Checkpoint) -> bool:
    """``tie_word_embeddings`` of the checkpoint, or of its model type's config class where the file leaves it out."""
    tied = ckpt.get("tie_word_embeddings")
    if tied is None:
        from transformers import CONFIG_MAPPING

        config_class = CONFIG_MAPPING.get(ckpt.config.get("model_type"), None)
        tied = config_class is not None and config_class().get_text_config().tie_word_embeddings
    return bool(tied)


def _size(cfg, name: str, section: str = "distributed") -> int:
    return cfg.get(f"{section}.{name}", 1) or 1


def _descriptor_for_model_type(ckpt: Checkpoint):
    """The descriptor class ModelOpt detects for the checkpoint's ``model_type``, or None if it detects none."""
    try:
        return descriptors.resolve_descriptor("auto", ckpt.path)
    except AnyModelError:
        return None
