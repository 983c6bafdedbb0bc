"""ModelOpt descriptors by name, and the per-layer block configs a descriptor builds from.

A descriptor is named by ``anymodel_descriptor``: a name ModelOpt registers, an older alias, or ``auto``
(ModelOpt's detection from ``config.json``, refined by the architecture). Block configs come from a side file
or from ``config.json``, and are checked against what the descriptor applies (``Architecture.applied_fields``)
before any weights load.
"""

import dataclasses
import json
import os
import warnings
from pathlib import Path

from modelopt.torch.puzzletron.anymodel import ModelDescriptorFactory, resolve_descriptor_from_pretrained
from modelopt.torch.puzzletron.block_config import maybe_cast_block_configs

from architectures import registry
from architectures.interface import MOE_FIELDS
from common.errors import AnyModelError

BLOCK_CONFIGS_FILE = "block_configs.json"
# Older ModelOpt docs and configs use these names for what 0.47 registers under another.
DESCRIPTOR_ALIASES = {"gpt_oss_20b": "gpt_oss"}


def descriptor_names() -> list[str]:
    return sorted([*ModelDescriptorFactory.CLASS_MAPPING, *DESCRIPTOR_ALIASES, "auto"])


def descriptor_name(descriptor: type) -> str:
    """The name ModelOpt registers a descriptor class under."""
    return next(n for n, cls in ModelDescriptorFactory.CLASS_MAPPING.items() if cls is descriptor)


def resolve_descriptor(name: str, checkpoint: str | os.PathLike | None = None):
    """Map a descriptor name (a registered one, an alias, or ``auto``) to ModelOpt's descriptor class."""
    if name == "auto":
        if checkpoint is None:
            raise AnyModelError("anymodel_descriptor=auto needs a checkpoint path to read model_type from")
        config_file = Path(checkpoint) / "config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else None
        try:
            detected = descriptor_name(resolve_descriptor_from_pretrained(str(checkpoint)))
        except ValueError as e:
            # A model_type ModelOpt's detection lacks, claimed by one of this example's architectures.
            claimed = registry.for_model_type((config or {}).get("model_type"))
            if claimed is None:
                raise AnyModelError(f"anymodel_descriptor=auto: {e}; set one of {descriptor_names()}") from None
            return ModelDescriptorFactory.get(claimed.descriptor_names[0])
        if config is not None:
            detected = registry.for_descriptor(detected).refine_auto(detected, config)
        return ModelDescriptorFactory.get(detected)
    name = DESCRIPTOR_ALIASES.get(name, name)
    if name not in ModelDescriptorFactory.CLASS_MAPPING:
        raise AnyModelError(f"unknown anymodel_descriptor {name!r}; valid names: {', '.join(descriptor_names())}")
    return ModelDescriptorFactory.get(name)


def build_descriptor(descriptor):
    """The descriptor to build with: ModelOpt's, or the architecture's fix of it."""
    return registry.for_descriptor(descriptor_name(descriptor)).fix_descriptor(descriptor)


def same_architecture(descriptor, other) -> bool:
    """Two descriptor classes the same architecture serves (e.g. both Nemotron-H ones build ``nemotron_h``)."""
    return registry.for_descriptor(descriptor_name(descriptor)) is registry.for_descriptor(descriptor_name(other))


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
    architecture = registry.for_descriptor(descriptor)
    applied = architecture.applied_fields
    for index, block in enumerate(blocks):
        fields = dict(_set_fields(block))
        if applied is not None:
            for name, value in fields.items():
                if name not in applied and not any(a.startswith(name + ".") for a in applied):
                    raise AnyModelError(
                        f"{source}: layer {index} sets {name}={value!r}, which the {descriptor} descriptor does not "
                        f"apply (the layer would be built without it); fields it applies: {', '.join(sorted(applied))}")
        for name, key in architecture.config_wide_fields.items():
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
        for name in ("ffn.intermediate_size", *sorted(MOE_FIELDS)):
            if name in fields and not fields.get("ffn.no_op") and fields[name] < 1:
                raise AnyModelError(f"{source}: layer {index} has {name}={fields[name]}; it must be >= 1 "
                                    "(use ffn.no_op=true to remove the block)")
