"""Teach ``NeMoAutoModelForCausalLM`` to build heterogeneous (Puzzletron "AnyModel") checkpoints.

After :func:`apply_patch`::

    NeMoAutoModelForCausalLM.from_pretrained(path, anymodel_descriptor="llama",
                                             block_configs_path=None, ...)
    NeMoAutoModelForCausalLM.from_config(config, anymodel_descriptor="llama", ...)

build the model under ModelOpt's ``deci_x_patcher`` so each decoder layer gets its own
block config (KV heads, FFN width, no-op attention/FFN). Everything else, sharding included,
is AutoModel's own ``from_pretrained`` / ``from_config``: the patch only wraps them.

What one architecture needs (a fixed descriptor, remote code, an image-text class, a TP plan) comes from
its entry in ``architectures/registry.py``, asked at each step of the build. Three things make the wrapping
work in a real recipe:

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

import json
import os
from functools import wraps
from pathlib import Path

from nemo_automodel import NeMoAutoModelForCausalLM
from nemo_automodel.components.checkpoint.checkpointing import Checkpointer

from modelopt.torch.puzzletron.anymodel import deci_x_patcher

from architectures import descriptors, registry
from architectures.parallelizer import per_layer_tp_plans
from common.errors import AnyModelError

SUBBLOCKS_DIR = "subblocks_safetensors"

_saved: dict[str, object] = {}  # what apply_patch replaced, restored by remove_patch
_impl: dict[str, object] = {}  # the functions the wrappers call


def _num_hidden_layers(config) -> int | None:
    return getattr(getattr(config, "text_config", config), "num_hidden_layers", None)


def _build_anymodel(original, cls, config_source, args, kwargs, *, checkpoint):
    name = kwargs.pop("anymodel_descriptor", None)
    block_configs_path = kwargs.pop("block_configs_path", None)
    if name is None:
        if block_configs_path is not None:
            raise AnyModelError("block_configs_path is set but anymodel_descriptor is not; set model.anymodel_descriptor")
        return original(cls, config_source, *args, **kwargs)

    resolved = descriptors.resolve_descriptor(name, checkpoint)
    architecture = registry.for_descriptor(descriptors.descriptor_name(resolved))
    descriptor = architecture.fix_descriptor(resolved)
    architecture.prepare_checkpoint(config_source, kwargs)
    if isinstance(config_source, (str, os.PathLike)):
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(config_source, trust_remote_code=kwargs.get("trust_remote_code", False))
    else:
        hf_config = config_source
    text_config = getattr(hf_config, "text_config", hf_config)
    block_configs = descriptors.load_block_configs(checkpoint, block_configs_path, _num_hidden_layers(hf_config),
                                                   descriptor=name if name != "auto" else None,
                                                   num_attention_heads=getattr(text_config, "num_attention_heads", None),
                                                   model_config=text_config.to_dict())
    architecture.prepare_config(hf_config, block_configs, block_configs_path or checkpoint, kwargs)
    kwargs["force_hf"] = True
    cls = architecture.build_class(cls, hf_config)
    architecture.prepare_build_kwargs(hf_config, kwargs)
    # AutoModel parallelizes inside the build; a layer's KV heads may not split over TP ranks.
    with deci_x_patcher(descriptor, block_configs), per_layer_tp_plans():
        model = original(cls, config_source, *args, **kwargs)
    for part in getattr(model, "parts", [model]):
        architecture.after_build(part)
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
    registry.install()


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
    registry.uninstall()
    _saved.clear()
    _impl.clear()
