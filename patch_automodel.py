"""Teach ``NeMoAutoModelForCausalLM`` to build heterogeneous (Puzzletron "AnyModel") checkpoints.

After :func:`apply_patch`::

    NeMoAutoModelForCausalLM.from_pretrained(path, anymodel_descriptor="llama",
                                             block_configs_path=None, ...)
    NeMoAutoModelForCausalLM.from_config(config, anymodel_descriptor="llama", ...)

build the model under ModelOpt's ``deci_x_patcher`` so each decoder layer gets its own
block config (KV heads, FFN width, no-op attention/FFN). Everything else, sharding included,
is AutoModel's own ``from_pretrained`` / ``from_config``: the patch only wraps them.

Three things make that work in a real recipe:

* The wrappers are installed as ``classmethod`` objects, so ``NeMoAutoModelForCausalLM.from_pretrained``
  stays equal to itself across attribute accesses. ``train_ft.build_model`` compares the config's
  ``_target_`` with it to decide whether to hand the model its ``distributed_setup``; a wrapper that
  breaks that comparison trains an unsharded student without a word.
* ``force_hf=True``: AutoModel has its own Llama/Qwen3 implementations, but ModelOpt patches the
  Hugging Face decoder layer classes.
* Multi-rank loading reads weights with DCP from the checkpoint directory and does not follow the
  index into ModelOpt's ``subblocks_safetensors/`` folder, so the base-weight loader is pointed at
  that folder when the checkpoint has ModelOpt's layout.
"""

import dataclasses
import json
import os
import warnings
from functools import wraps
from pathlib import Path

from nemo_automodel import NeMoAutoModelForCausalLM
from nemo_automodel.components.checkpoint.checkpointing import Checkpointer

from modelopt.torch.puzzletron.anymodel import (
    ModelDescriptorFactory,
    deci_x_patcher,
    resolve_descriptor_from_pretrained,
)
from modelopt.torch.puzzletron.block_config import maybe_cast_block_configs

import gpt_oss
import nemotron_h
import qwen3_vl
from tp_plan import per_layer_tp_plans

SUBBLOCKS_DIR = "subblocks_safetensors"
BLOCK_CONFIGS_FILE = "block_configs.json"
# Older ModelOpt docs and configs use these names for what 0.47 registers under another.
DESCRIPTOR_ALIASES = {"gpt_oss_20b": "gpt_oss"}

_saved: dict[str, object] = {}  # what apply_patch replaced, restored by remove_patch
_impl: dict[str, object] = {}  # the functions the wrappers call


class AnyModelError(ValueError):
    """Bad ``anymodel_descriptor`` or block configs; the message says what to fix."""


def descriptor_names() -> list[str]:
    return sorted([*ModelDescriptorFactory.CLASS_MAPPING, *DESCRIPTOR_ALIASES, "auto"])


def resolve_descriptor(name: str, checkpoint: str | os.PathLike | None = None):
    """Map a descriptor name (a registered one, an alias, or ``auto``) to ModelOpt's descriptor class."""
    if name == "auto":
        if checkpoint is None:
            raise AnyModelError("anymodel_descriptor=auto needs a checkpoint path to read model_type from")
        try:
            return nemotron_h.refine_auto(resolve_descriptor_from_pretrained(str(checkpoint)), checkpoint)
        except ValueError as e:
            if qwen3_vl.auto_descriptor_name(checkpoint):  # a model_type ModelOpt's auto-detection lacks
                return ModelDescriptorFactory.get(qwen3_vl.auto_descriptor_name(checkpoint))
            raise AnyModelError(f"anymodel_descriptor=auto: {e}; set one of {descriptor_names()}") from None
    name = DESCRIPTOR_ALIASES.get(name, name)
    if name not in ModelDescriptorFactory.CLASS_MAPPING:
        raise AnyModelError(f"unknown anymodel_descriptor {name!r}; valid names: {', '.join(descriptor_names())}")
    return ModelDescriptorFactory.get(name)


def build_descriptor(descriptor):
    """The descriptor to build with: ModelOpt's, or this example's fix of it (``gpt_oss.py``, ``nemotron_h.py``)."""
    if descriptor is gpt_oss.GptOssModelDescriptor:
        return gpt_oss.GptOssDescriptor
    return nemotron_h.fixed_descriptor(descriptor)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AnyModelError(f"{path} is not valid JSON ({e}); fix or regenerate the file") from None


def load_block_configs(checkpoint: str | os.PathLike | None, block_configs_path: str | os.PathLike | None,
                       num_hidden_layers: int | None, *, descriptor: str | None = None,
                       num_attention_heads: int | None = None, model_config: dict | None = None) -> list[dict] | None:
    """Per-layer block configs, from the first source that has them.

    Order: ``block_configs_path``; ``<checkpoint>/block_configs.json``; ``config.json["block_configs"]``
    (where ModelOpt's ``save_checkpoint`` writes them). ``None`` means a homogeneous model.
    Raises :class:`AnyModelError` for invalid JSON, a non-list, a layer count that differs from
    ``num_hidden_layers``, or fields ModelOpt's ``BlockConfig`` does not know; with ``descriptor``
    (a registered name), also for values :func:`check_block_configs` rejects.
    """
    sources = []
    if block_configs_path is not None:
        path = Path(block_configs_path)
        if not path.is_file():
            raise AnyModelError(f"block_configs_path {path} does not exist; pass the JSON file with one entry per layer")
        sources.append(path)
    if checkpoint is not None and os.path.isdir(checkpoint):
        sources += [Path(checkpoint) / BLOCK_CONFIGS_FILE, Path(checkpoint) / "config.json"]

    for path in sources:
        if not path.is_file():
            continue
        data = _read_json(path)
        if path.name == "config.json":
            data = data.get("block_configs")
            if data is None:
                continue
        if not isinstance(data, list):
            raise AnyModelError(f"{path}: block configs must be a JSON list with one entry per layer, got {type(data).__name__}")
        if num_hidden_layers is not None and len(data) != num_hidden_layers:
            raise AnyModelError(
                f"{path}: {len(data)} block configs for a model with num_hidden_layers={num_hidden_layers}; "
                "give exactly one entry per layer"
            )
        try:
            # ModelOpt drops unknown fields with a warning; a typo must not silently change the model.
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                blocks = maybe_cast_block_configs(data)
        except Exception as e:
            raise AnyModelError(f"{path}: invalid block config ({e}); see modelopt.torch.puzzletron.block_config") from None
        if descriptor is not None:
            check_block_configs(blocks, DESCRIPTOR_ALIASES.get(descriptor, descriptor), num_attention_heads, path,
                                model_config)
        return data
    return None


# The block-config fields each ModelOpt descriptor turns into a different layer (with this example's
# GPT-OSS fix). Any other field set to a non-default value would be ignored by the build.
_DENSE_FIELDS = {"attention.no_op", "attention.num_key_value_heads", "ffn.no_op", "ffn.intermediate_size"}
_MOE_FIELDS = {"ffn.moe.num_local_experts", "ffn.moe.num_experts_per_tok", "ffn.moe.expert_intermediate_dim"}
APPLIED_FIELDS = {
    "llama": _DENSE_FIELDS, "qwen2": _DENSE_FIELDS, "qwen3": _DENSE_FIELDS, "mistral_small": _DENSE_FIELDS,
    "gpt_oss": {"attention.no_op", "attention.num_key_value_heads", "ffn.no_op", *_MOE_FIELDS},
    "qwen3_vl": {*_DENSE_FIELDS, *_MOE_FIELDS},
    **nemotron_h.APPLIED_FIELDS,
}


# Fields a descriptor accepts but builds every layer with the model's own value of (config key): a block
# config may only repeat that value.
CONFIG_WIDE_FIELDS = {"qwen3_vl": {"ffn.moe.num_experts_per_tok": "num_experts_per_tok"}}


def _set_fields(config, prefix: str = ""):
    """``(dotted name, value)`` of every leaf field of a ModelOpt block-config dataclass that is not its default."""
    for field in dataclasses.fields(config):
        name, value = prefix + field.name, getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            yield from _set_fields(value, name + ".")
            continue
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            yield name, value  # a required field (e.g. of a Mamba config) is always set
            continue
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        if value != default:
            yield name, value


def check_block_configs(blocks, descriptor: str, num_attention_heads: int | None, source,
                        model_config: dict | None = None) -> None:
    """Refuse (:class:`AnyModelError`, one line naming layer and field) block configs the built model would
    not follow: fields the descriptor ignores, and sizes that cannot build (KV heads that do not divide the
    attention heads, non-positive widths). ModelOpt's ``BlockConfig`` already refuses a top-k above the
    expert count."""
    applied = APPLIED_FIELDS.get(descriptor)
    for index, block in enumerate(blocks):
        fields = dict(_set_fields(block))
        if applied is not None:
            for name, value in fields.items():
                if name not in applied and not any(a.startswith(name + ".") for a in applied):
                    raise AnyModelError(
                        f"{source}: layer {index} sets {name}={value!r}, which the {descriptor} descriptor does not "
                        f"apply (the layer would be built without it); fields it applies: {', '.join(sorted(applied))}")
        for name, key in CONFIG_WIDE_FIELDS.get(descriptor, {}).items():
            model_value = (model_config or {}).get(key)
            if name in fields and model_value is not None and fields[name] != model_value:
                raise AnyModelError(
                    f"{source}: layer {index} sets {name}={fields[name]!r}, but the {descriptor} descriptor builds "
                    f"every layer with the model's {key}={model_value}; set it to {model_value} or leave it out")
        kv_heads = fields.get("attention.num_key_value_heads")
        if kv_heads is not None and not fields.get("attention.no_op") and (
                kv_heads < 1 or (num_attention_heads and num_attention_heads % kv_heads)):
            raise AnyModelError(f"{source}: layer {index} has num_key_value_heads={kv_heads}, which does not divide "
                                f"num_attention_heads={num_attention_heads}; use a divisor of {num_attention_heads}")
        for name in ("ffn.intermediate_size", *_MOE_FIELDS):
            if name in fields and not fields.get("ffn.no_op") and fields[name] < 1:
                raise AnyModelError(f"{source}: layer {index} has {name}={fields[name]}; it must be >= 1 "
                                    "(use ffn.no_op=true to remove the block)")


def _num_hidden_layers(config) -> int | None:
    return getattr(getattr(config, "text_config", config), "num_hidden_layers", None)


def _build_anymodel(original, cls, config_source, args, kwargs, *, checkpoint):
    descriptor_name = kwargs.pop("anymodel_descriptor", None)
    block_configs_path = kwargs.pop("block_configs_path", None)
    if descriptor_name is None:
        if block_configs_path is not None:
            raise AnyModelError("block_configs_path is set but anymodel_descriptor is not; set model.anymodel_descriptor")
        return original(cls, config_source, *args, **kwargs)

    descriptor = build_descriptor(resolve_descriptor(descriptor_name, checkpoint))
    try:
        nemotron_h.prepare_checkpoint(descriptor, config_source, kwargs)  # remote code, cached before the patch
    except nemotron_h.AnyModelError as e:
        raise AnyModelError(str(e)) from None
    if isinstance(config_source, (str, os.PathLike)):
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(config_source, trust_remote_code=kwargs.get("trust_remote_code", False))
    else:
        hf_config = config_source
    text_config = getattr(hf_config, "text_config", hf_config)
    block_configs = load_block_configs(checkpoint, block_configs_path, _num_hidden_layers(hf_config),
                                       descriptor=descriptor_name if descriptor_name != "auto" else None,
                                       num_attention_heads=getattr(text_config, "num_attention_heads", None),
                                       model_config=text_config.to_dict())
    try:
        nemotron_h.prepare_config(descriptor, hf_config, block_configs, block_configs_path or checkpoint, kwargs)
    except nemotron_h.AnyModelError as e:
        raise AnyModelError(str(e)) from None
    kwargs["force_hf"] = True
    # Qwen3-VL: AutoModel's image-text class, same from_pretrained/from_config (`original`), vision tower frozen.
    cls = qwen3_vl.build_class(cls, hf_config)
    qwen3_vl.prepare_build_kwargs(hf_config, kwargs)
    # AutoModel parallelizes inside the build; a layer's KV heads may not split over TP ranks.
    with deci_x_patcher(descriptor, block_configs), per_layer_tp_plans():
        model = original(cls, config_source, *args, **kwargs)
    for part in getattr(model, "parts", [model]):
        gpt_oss.fit_experts_kernel(part)
        if block_configs is not None:
            # Saved checkpoints must rebuild the same layers without the side file.
            getattr(part, "config", hf_config).block_configs = block_configs
    return model


def _from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
    return _build_anymodel(_impl["from_pretrained"], cls, pretrained_model_name_or_path, args, kwargs,
                           checkpoint=pretrained_model_name_or_path)


def _from_config(cls, config, *args, **kwargs):
    checkpoint = config if isinstance(config, (str, os.PathLike)) else getattr(config, "name_or_path", None) or None
    return _build_anymodel(_impl["from_config"], cls, config, args, kwargs, checkpoint=checkpoint)


def anymodel_weights_dir(model_name: str | os.PathLike) -> str | os.PathLike:
    """The folder DCP must read: ModelOpt's ``subblocks_safetensors/`` when the index points there."""
    index = Path(model_name) / "model.safetensors.index.json"
    if index.is_file() and (Path(model_name) / SUBBLOCKS_DIR).is_dir():
        files = set(json.loads(index.read_text())["weight_map"].values())
        if files and all(f.startswith(SUBBLOCKS_DIR + "/") for f in files):
            return str(Path(model_name) / SUBBLOCKS_DIR)
    return model_name


def _load_base_model(self, model, device, root_dir, model_name, load_base_model=True):
    if load_base_model and model_name is not None and os.path.isdir(model_name):
        model_name = anymodel_weights_dir(model_name)
    return _impl["load_base_model"](self, model, device, root_dir, model_name, load_base_model)


def is_applied() -> bool:
    return bool(_saved)


def apply_patch() -> None:
    """Install the wrappers. Idempotent."""
    if is_applied():
        return
    for name in ("from_pretrained", "from_config"):
        # None: the class inherits it from AutoModel's base class, and removal deletes ours.
        _saved[name] = NeMoAutoModelForCausalLM.__dict__.get(name)
        _impl[name] = getattr(NeMoAutoModelForCausalLM, name).__func__
    _saved["load_base_model"] = _impl["load_base_model"] = Checkpointer.load_base_model
    NeMoAutoModelForCausalLM.from_pretrained = classmethod(wraps(_impl["from_pretrained"])(_from_pretrained))
    NeMoAutoModelForCausalLM.from_config = classmethod(wraps(_impl["from_config"])(_from_config))
    Checkpointer.load_base_model = wraps(_impl["load_base_model"])(_load_base_model)
    gpt_oss.install()
    nemotron_h.install()
    qwen3_vl.install()


def remove_patch() -> None:
    """Restore exactly what :func:`apply_patch` replaced. Idempotent."""
    if not is_applied():
        return
    for name in ("from_pretrained", "from_config"):
        if _saved[name] is None:
            delattr(NeMoAutoModelForCausalLM, name)
        else:
            setattr(NeMoAutoModelForCausalLM, name, _saved[name])
    Checkpointer.load_base_model = _saved["load_base_model"]
    gpt_oss.uninstall()
    nemotron_h.uninstall()
    qwen3_vl.uninstall()
    _saved.clear()
    _impl.clear()
