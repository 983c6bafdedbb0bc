"""Nemotron-H and Nemotron-H v2 (remote-code checkpoints), made right for heterogeneous students and every parallelism.

ModelOpt 0.47 has two descriptors for ``model_type: nemotron_h``: ``nemotron_h`` (the MoE generation,
Nemotron-3 Nano: Mamba-2, attention and MoE layers; its saver knows no plain-MLP weights) and
``nemotron_h_v2`` (the dense one, Nemotron Nano v2: Mamba-2, attention and MLP layers; FFN-width pruning).
Both expect NVIDIA's remote-code layout (``backbone.*``, decoder class ``NemotronHBlock`` found by scanning
``transformers_modules``). What goes wrong with them and AutoModel 0.7.0 as shipped, and what this module does:

* **The patch misses the model.** The descriptors find ``NemotronHBlock`` only among cached dynamic modules
  (an assertion otherwise), and AutoModel loads a local checkpoint without ``trust_remote_code``, i.e. with
  transformers' native ``NemotronHForCausalLM``, whose blocks are a different class: the student comes out
  homogeneous. :func:`prepare_checkpoint` loads with ``trust_remote_code`` (what the descriptors declare
  they need) after caching the checkpoint's modules (ModelOpt's ``force_cache_dynamic_modules``, under a
  file lock: ranks share the cache).
* **No-op blocks.** The descriptors' no-op hook reads ``config.block_configs[i].ffn``, which is a list of
  dicts as read from config.json (``'dict' object has no attribute 'ffn'``); it puts ``Same`` where the
  norm was, whose ``weight`` is an empty fp32 tensor, so under bf16 the block casts the residual stream to
  fp32 (and ``lm_head`` then fails on the dtype); and an attention block's ``MatchingZeros`` returns one
  tensor where two are unpacked. :class:`NemotronHDescriptor` / :class:`NemotronHV2Descriptor` cast the
  configs and make a removed block return its input unchanged.
* **Block configs the build would ignore.** The layer type comes from ``hybrid_override_pattern``, not the
  block configs; the descriptors apply KV heads, FFN width, expert count and expert width, nothing else
  (not the top-k, not the shared expert, not the Mamba sizes). :func:`check_block_configs` refuses, in one
  line before any weights load, a block config that does not fit its layer or sets what is not applied.
* **Pipeline and tensor parallelism** (``nemotron_h_parallel.py``): AutoModel's splitter does not know
  Nemotron-H's names, and its Nemotron-H TP policy splits only MLP layers and refuses sequence parallelism.
"""

import dataclasses
import json
import os
from pathlib import Path

from torch import nn

from modelopt.torch.puzzletron.anymodel.models.nemotron_h.nemotron_h_model_descriptor import NemotronHModelDescriptor
from modelopt.torch.puzzletron.anymodel.models.nemotron_h_v2.nemotron_h_v2_model_descriptor import (
    NemotronHV2ModelDescriptor,
)
from modelopt.torch.puzzletron.anymodel.puzzformer.no_op import MatchingZeros, Same, return_tuple_of_size
from modelopt.torch.puzzletron.block_config import maybe_cast_block_configs

from architectures import nemotron_h_parallel
from architectures.interface import Architecture
from architectures.nemotron_h_parallel import KIND
from common.errors import AnyModelError

DESCRIPTOR_NAMES = ("nemotron_h", "nemotron_h_v2")
# Block-config fields the Nemotron-H descriptors turn into a different layer, and the ones ModelOpt's converter
# writes that only describe the layer (accepted when they equal the model config, see check_block_configs).
_APPLIED = {"attention.no_op", "attention.num_key_value_heads", "ffn.no_op", "ffn.intermediate_size",
            "ffn.moe.num_local_experts", "ffn.moe.expert_intermediate_dim"}
_DESCRIPTIVE = {"attention.mamba.state_dim": "ssm_state_size", "attention.mamba.num_heads": "mamba_num_heads",
                "attention.mamba.head_dim": "mamba_head_dim", "attention.mamba.num_groups": "n_groups",
                "ffn.moe.num_experts_per_tok": "num_experts_per_tok",
                "ffn.moe.shared_expert_intermediate_dim": "moe_shared_expert_intermediate_size"}
# The fields each kind of layer may set (besides no_op) and still be built as asked.
KIND_FIELDS = {
    "mamba": {"attention.mamba"}, "attention": {"attention.num_key_value_heads"},
    "mlp": {"ffn.intermediate_size"}, "moe": {"ffn.moe"},
}


# --- descriptors --------------------------------------------------------------------------------------------

def _return_input(module, args, kwargs, output):
    hidden_states = args[0] if args else kwargs["hidden_states"]
    return hidden_states


def remove_block(decoder_layer: nn.Module) -> None:
    """Make a Nemotron-H block whose attention and FFN are both no-op an identity, as ModelOpt intends.

    ModelOpt's ``Same`` / ``MatchingZeros`` replace the norm and mixer (no parameters, nothing to load);
    an attention mixer returns a tuple as the block unpacks; and a forward hook hands the block's input back
    as its output, so the residual stream keeps its dtype (``Same.weight`` is fp32) and its placement.
    """
    decoder_layer.norm = Same()
    attention = KIND.get(decoder_layer.block_type) == "attention"
    decoder_layer.mixer = return_tuple_of_size(MatchingZeros, 2)() if attention else MatchingZeros()
    decoder_layer.register_forward_hook(_return_input, with_kwargs=True)


def _no_op_post_init(decoder_layer: nn.Module) -> None:
    block = maybe_cast_block_configs(decoder_layer.config.block_configs)[decoder_layer.layer_idx]
    if block.attention.no_op and block.ffn.no_op and not isinstance(decoder_layer.mixer, MatchingZeros):
        remove_block(decoder_layer)


class NemotronHDescriptor(NemotronHModelDescriptor):
    """ModelOpt's ``nemotron_h`` descriptor with :func:`remove_block` as its no-op hook."""

    attn_no_op_post_init = staticmethod(_no_op_post_init)
    mlp_no_op_post_init = staticmethod(_no_op_post_init)


class NemotronHV2Descriptor(NemotronHV2ModelDescriptor):
    """ModelOpt's ``nemotron_h_v2`` descriptor with :func:`remove_block` as its no-op hook."""

    attn_no_op_post_init = staticmethod(_no_op_post_init)
    mlp_no_op_post_init = staticmethod(_no_op_post_init)


FIXED = {NemotronHModelDescriptor: NemotronHDescriptor, NemotronHV2ModelDescriptor: NemotronHV2Descriptor}


# --- build --------------------------------------------------------------------------------------------------

def prepare_checkpoint(config_source, kwargs: dict) -> None:
    """Before the config is read: ``trust_remote_code`` and the checkpoint's modules in the cache.

    Sets ``kwargs["trust_remote_code"] = True`` (the descriptors declare they need it; without it transformers
    builds its native class, which ModelOpt's patch does not reach) and, for a checkpoint directory, caches its
    ``auto_map`` modules so the descriptor finds ``NemotronHBlock``.
    """
    kwargs["trust_remote_code"] = True
    if isinstance(config_source, (str, os.PathLike)) and os.path.isdir(config_source):
        check_remote_code(config_source)
        cache_dynamic_modules(config_source)


def check_remote_code(checkpoint: str | os.PathLike) -> None:
    """A checkpoint directory in NVIDIA's remote-code layout: ``auto_map`` naming a config and a causal-LM class.

    Without it (e.g. saved by transformers' native ``NemotronHForCausalLM``: ``model.*`` names) the descriptors
    find no ``NemotronHBlock`` to patch; raises :class:`AnyModelError` saying so.
    """
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    auto_map = config.get("auto_map") or {}
    if not {"AutoConfig", "AutoModelForCausalLM"} <= set(auto_map):
        raise AnyModelError(
            f"{checkpoint}: the Nemotron-H descriptors build NVIDIA's remote-code model (backbone.*, NemotronHBlock), "
            f"but config.json has no auto_map with AutoConfig and AutoModelForCausalLM (found: {sorted(auto_map)}); "
            "use the checkpoint as published, with its configuration_nemotron_h.py and modeling_nemotron_h.py")
    missing = [name for name in {ref.split("--")[-1].split(".")[0] + ".py" for ref in auto_map.values()
                                 if isinstance(ref, str)} if not (Path(checkpoint) / name).is_file()]
    if missing:
        raise AnyModelError(f"{checkpoint}: config.json's auto_map names {', '.join(sorted(missing))}, which the "
                            "directory does not have; copy the remote-code files of the original checkpoint into it")


def cache_dynamic_modules(checkpoint: str | os.PathLike) -> None:
    """ModelOpt's ``force_cache_dynamic_modules`` for ``checkpoint``, one process at a time (the cache is shared)."""
    from filelock import FileLock
    from transformers import AutoConfig
    from transformers.utils import HF_MODULES_CACHE

    from modelopt.torch.puzzletron.tools.checkpoint_utils_hf import force_cache_dynamic_modules

    os.makedirs(HF_MODULES_CACHE, exist_ok=True)
    with FileLock(os.path.join(HF_MODULES_CACHE, ".anymodel_nemotron_h.lock")):
        config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=True)
        force_cache_dynamic_modules(config, checkpoint, trust_remote_code=True)


def prepare_config(hf_config, block_configs: list[dict] | None, source, kwargs: dict) -> None:
    """After the block configs are read: check them against the layers, and build from exactly them.

    Raises :class:`AnyModelError` (see :func:`check_block_configs`). The model is built from ``hf_config``
    with ``block_configs`` in it (``kwargs["config"]``), the list the descriptor's no-op hook reads.
    """
    if block_configs is None:
        return
    check_block_configs(maybe_cast_block_configs(block_configs), hf_config, source)
    hf_config.block_configs = block_configs
    kwargs["config"] = hf_config


def _fields(config, prefix: str = ""):
    for field in dataclasses.fields(config):
        name, value = prefix + field.name, getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            yield from _fields(value, name + ".")
        else:
            yield name, field, value


def _is_default(field, value) -> bool:
    if field.default is not dataclasses.MISSING:
        return value == field.default
    if field.default_factory is not dataclasses.MISSING:
        return value == field.default_factory()
    return False


def check_block_configs(blocks, hf_config, source="block configs") -> None:
    """Refuse block configs a Nemotron-H build would not follow, one line naming the layer and field.

    Per layer, from its type in ``hybrid_override_pattern``: only its own subblock may differ from the
    teacher (KV heads of an attention layer, the width of an MLP, expert count and width of an MoE; a Mamba
    layer only as a whole); both ``attention.no_op`` and ``ffn.no_op`` remove the layer, one alone would be
    ignored; the fields the descriptor does not apply (Mamba sizes, top-k, shared expert) must equal the
    model config's; KV heads must divide the attention heads.
    """
    layer_types = list(hf_config.layers_block_type)
    if len(blocks) != len(layer_types):
        raise AnyModelError(f"{source}: {len(blocks)} block configs for {len(layer_types)} Nemotron-H layers "
                            f"({hf_config.hybrid_override_pattern!r}); give one per layer")
    for index, (block, layer_type) in enumerate(zip(blocks, layer_types)):
        kind = KIND[layer_type]
        where = f"{source}: layer {index} ({kind}, {hf_config.hybrid_override_pattern[index]!r} in the pattern)"
        if block.attention.no_op and block.ffn.no_op:
            continue
        own = {"mamba": block.ffn.no_op, "attention": block.ffn.no_op,
               "mlp": block.attention.no_op, "moe": block.attention.no_op}[kind]
        if not own:
            raise AnyModelError(f"{where}: a {kind} layer has {'ffn' if kind in ('mamba', 'attention') else 'attention'}"
                                ".no_op=false, but its one mixer is the other subblock; set both no_op=true to "
                                "remove the layer, or keep the converter's block config")
        for name, field, value in _fields(block):
            # ModelOpt's nemotron_h converter leaves the shared expert's width at its default.
            lenient = name not in _DESCRIPTIVE or name == "ffn.moe.shared_expert_intermediate_dim"
            if name.endswith(".no_op") or value is None or (lenient and _is_default(field, value)):
                continue
            if name in _DESCRIPTIVE:
                expected = getattr(hf_config, _DESCRIPTIVE[name])
                if value != expected:
                    raise AnyModelError(f"{where} sets {name}={value!r}, which the Nemotron-H descriptors do not "
                                        f"apply (the layer keeps {_DESCRIPTIVE[name]}={expected}); set it to {expected}")
            if not any(name == f or name.startswith(f + ".") for f in KIND_FIELDS[kind]):
                if name in _DESCRIPTIVE or name in ("attention.weights_precision", "ffn.weights_precision"):
                    continue
                raise AnyModelError(f"{where} sets {name}={value!r}, which a {kind} layer does not have (the layer "
                                    f"would be built without it); fields a {kind} layer applies: "
                                    f"{', '.join(sorted(KIND_FIELDS[kind]))}")
        if kind == "attention":
            kv_heads = block.attention.num_key_value_heads or hf_config.num_key_value_heads
            if kv_heads < 1 or hf_config.num_attention_heads % kv_heads:
                raise AnyModelError(f"{where} has num_key_value_heads={kv_heads}, which does not divide "
                                    f"num_attention_heads={hf_config.num_attention_heads}")


# --- descriptor choice --------------------------------------------------------------------------------------

def descriptor_name_for(config: dict) -> str:
    """``nemotron_h_v2`` for a dense Nemotron-H checkpoint (MLP layers, no MoE), else ``nemotron_h``.

    ModelOpt's ``auto`` maps every ``model_type: nemotron_h`` to ``nemotron_h``, whose saver has no names for
    plain-MLP weights; a Nemotron Nano v2 checkpoint is ``nemotron_h_v2``'s.
    """
    pattern = config.get("hybrid_override_pattern")
    kinds = {KIND.get(t, t) for t in config.get("layers_block_type") or ()} or {
        {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}.get(c) for c in pattern or ""}
    return "nemotron_h_v2" if "mlp" in kinds and "moe" not in kinds else "nemotron_h"


class NemotronH(Architecture):
    """Nemotron-H (MoE, ``nemotron_h``) and Nemotron-H v2 (dense, ``nemotron_h_v2``): the fixed descriptors,
    remote code, per-layer block-config checks, ``auto`` choosing between the two, the per-layer TP plan and
    pipeline stages of ``nemotron_h_parallel``, and no context parallelism."""

    descriptor_names = DESCRIPTOR_NAMES
    model_types = ("nemotron_h",)
    applied_fields = frozenset(_APPLIED | set(_DESCRIPTIVE))
    automodel_needs_cuda = "its Mamba-2 layers import mamba_ssm's CUDA kernels"
    replaces_automodel_parallelizer = True

    def refine_auto(self, detected, config):
        """ModelOpt's ``auto`` gives every ``model_type: nemotron_h`` ``nemotron_h``: :func:`descriptor_name_for`."""
        return descriptor_name_for(config)

    def fix_descriptor(self, descriptor):
        return FIXED.get(descriptor, descriptor)

    def prepare_checkpoint(self, config_source, kwargs):
        prepare_checkpoint(config_source, kwargs)

    def prepare_config(self, hf_config, block_configs, source, kwargs):
        prepare_config(hf_config, block_configs, source, kwargs)

    def owns(self, model: nn.Module) -> bool:
        return nemotron_h_parallel.is_nemotron_h(model)

    def tp_plan(self, model, tp_size, sequence_parallel, user_plan):
        if user_plan is not None:
            return super().tp_plan(model, tp_size, sequence_parallel, user_plan)
        return nemotron_h_parallel.tp_plan(model, tp_size, sequence_parallel)

    def parallelism_problem(self, section, descriptor_name, sizes):
        """Context parallelism: AutoModel's own Nemotron-H policy gives Mamba-2 layers ``MambaContextParallel``;
        the per-layer policy here does not, so each CP rank would scan its own chunk of the sequence from a zero
        state: different results, not an error."""
        cp_size = sizes["cp_size"]
        if descriptor_name is None or cp_size <= 1:
            return None
        return (f"distributed.cp_size={cp_size} with {section}.anymodel_descriptor={descriptor_name}: this "
                "example's Nemotron-H build has no context parallelism for Mamba-2 layers (AutoModel's "
                "MambaContextParallel comes with its own Nemotron-H policy, which the per-layer TP plan replaces); "
                "set distributed.cp_size=1 and use distributed.sequence_parallel=true with tp_size > 1 for long "
                "sequences")

    def install(self) -> None:
        nemotron_h_parallel.install_pipeline_split()

    def uninstall(self) -> None:
        nemotron_h_parallel.uninstall_pipeline_split()
