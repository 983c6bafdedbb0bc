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
* **Pipeline parallelism.** AutoModel's splitter expects ``model.model.layers`` and ``embed_tokens`` /
  ``norm`` / ``rotary_emb`` (the upstream docs list Nemotron-H's naming as a PP exception). :func:`install`
  wraps ``split_model_into_stages`` for these models: stages are cut at ``backbone.embeddings``,
  ``backbone.layers.<i>``, ``backbone.norm_f``, ``lm_head``, and each stage runs :func:`stage_forward`.
* **Tensor parallelism.** AutoModel's own Nemotron-H policy splits only MLP layers (all of them, whatever
  their width) and refuses sequence parallelism. :func:`tp_plan` is a per-layer plan in the style of
  ``tp_plan.py``: attention by heads and MLPs by channels where they divide ``tp_size``, Mamba-2 and MoE
  mixers (and blocks that do not divide) replicated with mean-reduced gradients, removed blocks left alone;
  sequence parallelism as in AutoModel's Llama plan.
"""

import dataclasses
import os
import types
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.tensor.parallel import ParallelStyle

from modelopt.torch.puzzletron.anymodel.models.nemotron_h.nemotron_h_model_descriptor import NemotronHModelDescriptor
from modelopt.torch.puzzletron.anymodel.models.nemotron_h_v2.nemotron_h_v2_model_descriptor import (
    NemotronHV2ModelDescriptor,
)
from modelopt.torch.puzzletron.anymodel.puzzformer.no_op import MatchingZeros, Same, return_tuple_of_size
from modelopt.torch.puzzletron.block_config import maybe_cast_block_configs

DESCRIPTOR_NAMES = ("nemotron_h", "nemotron_h_v2")
# Block-config fields the Nemotron-H descriptors turn into a different layer, and the ones ModelOpt's converter
# writes that only describe the layer (accepted when they equal the model config, see check_block_configs).
_APPLIED = {"attention.no_op", "attention.num_key_value_heads", "ffn.no_op", "ffn.intermediate_size",
            "ffn.moe.num_local_experts", "ffn.moe.expert_intermediate_dim"}
_DESCRIPTIVE = {"attention.mamba.state_dim": "ssm_state_size", "attention.mamba.num_heads": "mamba_num_heads",
                "attention.mamba.head_dim": "mamba_head_dim", "attention.mamba.num_groups": "n_groups",
                "ffn.moe.num_experts_per_tok": "num_experts_per_tok",
                "ffn.moe.shared_expert_intermediate_dim": "moe_shared_expert_intermediate_size"}
APPLIED_FIELDS = {name: _APPLIED | set(_DESCRIPTIVE) for name in DESCRIPTOR_NAMES}
# Layer kinds, from the block type (transformers' names and the legacy ones of NVIDIA's remote code).
KIND = {"linear_attention": "mamba", "mamba": "mamba", "full_attention": "attention", "attention": "attention",
        "mlp": "mlp", "moe": "moe"}
# The fields each kind of layer may set (besides no_op) and still be built as asked.
KIND_FIELDS = {
    "mamba": {"attention.mamba"}, "attention": {"attention.num_key_value_heads"},
    "mlp": {"ffn.intermediate_size"}, "moe": {"ffn.moe"},
}


class AnyModelError(ValueError):
    """A Nemotron-H block config the build would not follow (``patch_automodel`` reports it as its own)."""


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


def is_nemotron_h_descriptor(descriptor) -> bool:
    return descriptor in FIXED or descriptor in FIXED.values()


def fixed_descriptor(descriptor):
    """The descriptor to build with: this module's fix of a Nemotron-H descriptor, any other unchanged."""
    return FIXED.get(descriptor, descriptor)


# --- build --------------------------------------------------------------------------------------------------

def prepare_checkpoint(descriptor, config_source, kwargs: dict) -> None:
    """Before the config is read: ``trust_remote_code`` and the checkpoint's modules in the cache.

    With a Nemotron-H descriptor, sets ``kwargs["trust_remote_code"] = True`` (the descriptors declare they
    need it; without it transformers builds its native class, which ModelOpt's patch does not reach) and,
    for a checkpoint directory, caches its ``auto_map`` modules so the descriptor finds ``NemotronHBlock``.
    """
    if not is_nemotron_h_descriptor(descriptor):
        return
    kwargs["trust_remote_code"] = True
    if isinstance(config_source, (str, os.PathLike)) and os.path.isdir(config_source):
        check_remote_code(config_source)
        cache_dynamic_modules(config_source)


def check_remote_code(checkpoint: str | os.PathLike) -> None:
    """A checkpoint directory in NVIDIA's remote-code layout: ``auto_map`` naming a config and a causal-LM class.

    Without it (e.g. saved by transformers' native ``NemotronHForCausalLM``: ``model.*`` names) the descriptors
    find no ``NemotronHBlock`` to patch; raises :class:`AnyModelError` saying so.
    """
    import json
    from pathlib import Path

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


def prepare_config(descriptor, hf_config, block_configs: list[dict] | None, source, kwargs: dict) -> None:
    """After the block configs are read: check them against the layers, and build from exactly them.

    Raises :class:`AnyModelError` (see :func:`check_block_configs`). The model is built from ``hf_config``
    with ``block_configs`` in it (``kwargs["config"]``), the list the descriptor's no-op hook reads.
    """
    if not is_nemotron_h_descriptor(descriptor) or block_configs is None:
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


# --- model structure ----------------------------------------------------------------------------------------

def is_nemotron_h(model: nn.Module) -> bool:
    """A Nemotron-H causal LM in the remote-code layout (``backbone`` with ``embeddings``/``layers``/``norm_f``)."""
    backbone = getattr(model, "backbone", None)
    return (getattr(getattr(model, "config", None), "model_type", None) == "nemotron_h"
            and backbone is not None and hasattr(backbone, "layers"))


def block_kind(block: nn.Module) -> str:
    """``mamba``, ``attention``, ``mlp``, ``moe`` or ``no_op`` (a removed block) for one ``NemotronHBlock``."""
    if isinstance(block.mixer, MatchingZeros):
        return "no_op"
    return KIND[block.block_type]


def _layers(backbone: nn.Module):
    layers = backbone.layers
    return layers.items() if isinstance(layers, nn.ModuleDict) else ((str(i), b) for i, b in enumerate(layers))


# --- tensor parallelism -------------------------------------------------------------------------------------

def tp_plan(model: nn.Module, tp_size: int, sequence_parallel: bool = False) -> dict[str, ParallelStyle]:
    """Per-layer TP plan of a (heterogeneous) Nemotron-H model, without wildcards.

    Styles are AutoModel's Llama ones (``_parallelize_llama``) under Nemotron-H's names: embeddings
    row-parallel, ``lm_head`` column-parallel with vocabulary-sharded logits, and per block:

    * attention whose query and KV heads divide ``tp_size``: ``q/k/v_proj`` column-, ``o_proj`` row-parallel;
    * MLP whose width divides ``tp_size``: ``up_proj`` column-, ``down_proj`` row-parallel;
    * Mamba-2 and MoE mixers, and blocks that do not divide: ``tp_plan.ReplicateOnTP`` (whole on every rank,
      gradients mean-reduced across TP ranks);
    * removed blocks: nothing.

    With ``sequence_parallel`` the residual stream is sequence-sharded: the block norm all-gathers like
    Llama's ``input_layernorm``, row-parallel outputs reduce-scatter, replicated mixers take the gathered
    sequence and re-shard their output, ``norm_f`` is ``SequenceParallel``.
    """
    from nemo_automodel.components.distributed.optimized_tp_plans import _parallelize_llama

    from tp_plan import ReplicateOnTP

    llama = _parallelize_llama(None, sequence_parallel)
    plan = {"backbone.embeddings": llama["model.embed_tokens"], "lm_head": llama["lm_head"]}
    if sequence_parallel:
        plan["backbone.norm_f"] = llama["model.norm"]
    sharded_styles = {
        "attention": {f"mixer.{p}": llama[f"model.layers.*.self_attn.{p}"] for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
        "mlp": {f"mixer.{p}": llama[f"model.layers.*.mlp.{p}"] for p in ("up_proj", "down_proj")},
    }
    for index, block in _layers(model.backbone):
        prefix = f"backbone.layers.{index}"
        kind = block_kind(block)
        if kind == "no_op":
            continue
        if sequence_parallel:
            plan[f"{prefix}.norm"] = llama["model.layers.*.input_layernorm"]
        if _splits(block.mixer, kind, tp_size):
            plan.update({f"{prefix}.{name}": style for name, style in sharded_styles[kind].items()})
        else:
            plan[f"{prefix}.mixer"] = ReplicateOnTP(sequence_parallel)
    return plan


def _splits(mixer: nn.Module, kind: str, tp_size: int) -> bool:
    if kind == "attention":
        head_dim = mixer.head_dim
        return (mixer.q_proj.out_features // head_dim) % tp_size == 0 and (mixer.k_proj.out_features // head_dim) % tp_size == 0
    if kind == "mlp":
        return mixer.down_proj.in_features % tp_size == 0
    return False


def block_tp_modes(model: nn.Module, tp_size: int) -> list[str]:
    """``sharded`` / ``replicated`` / ``no_op`` per layer, as :func:`tp_plan` treats them (for tests and logs)."""
    modes = []
    for _, block in _layers(model.backbone):
        kind = block_kind(block)
        modes.append("no_op" if kind == "no_op" else "sharded" if _splits(block.mixer, kind, tp_size) else "replicated")
    return modes


# --- pipeline parallelism -----------------------------------------------------------------------------------

def stage_module_names(module_names_per_stage: list[list[str]], layers_prefix: str, **_) -> list[list[str]]:
    """AutoModel's default stage split (``model.embed_tokens``, ``model.layers.<i>``, ``model.norm``, ``lm_head``)
    under Nemotron-H's names (``backbone.embeddings``, ``backbone.layers.<i>``, ``backbone.norm_f``)."""
    names = {"embed_tokens": "embeddings", "norm": "norm_f"}
    stages = []
    for stage in module_names_per_stage:
        renamed = []
        for name in stage:
            if name.startswith(layers_prefix):
                first, _, rest = name[len(layers_prefix):].partition(".")
                if first == "rotary_emb":
                    continue
                name = "backbone." + ".".join(filter(None, (names.get(first, first), rest)))
            renamed.append(name)
        stages.append(renamed)
    return stages


def layer_masks(backbone: nn.Module, hidden_states: torch.Tensor, attention_mask, position_ids) -> dict:
    """The mask each kind of block reads, as the remote-code ``NemotronHModel.forward`` builds them: a 4D causal
    mask for attention, the 2D padding mask (None without padding) for Mamba-2, none for MLP and MoE."""
    from transformers.masking_utils import create_causal_mask, create_recurrent_attention_mask

    if isinstance(attention_mask, dict):
        return attention_mask
    mask_kwargs = {"config": backbone.config, "inputs_embeds": hidden_states, "attention_mask": attention_mask,
                   "past_key_values": None, "position_ids": position_ids}
    return {"attention": create_causal_mask(**mask_kwargs), "mamba": create_recurrent_attention_mask(**mask_kwargs)}


def stage_forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                  logits_to_keep: int = 0, **kwargs) -> torch.Tensor:
    """The forward of one pipeline stage of a Nemotron-H causal LM (bound to the stage's model).

    Input: token ids ``[B, S]`` on the first stage (it holds ``backbone.embeddings``), hidden states
    ``[B, S, H]`` on the others (in ``input_ids``' place, as AutoModel's schedule passes them). Output: hidden
    states ``[B, S, H]`` for the next stage; logits ``[B, S', V]`` from the stage that holds ``lm_head``, or its
    final hidden states when ``_pp_return_hidden_states`` is set (AutoModel's fused-loss path).
    """
    backbone = self.backbone
    hidden_states = inputs_embeds
    if hidden_states is None:
        if backbone.embeddings is not None:
            hidden_states = backbone.embeddings(input_ids)
        elif input_ids is not None and input_ids.is_floating_point():
            hidden_states = input_ids
        else:
            raise ValueError("a Nemotron-H pipeline stage without embeddings needs hidden states as input")
    if position_ids is None:
        position_ids = torch.arange(hidden_states.shape[1], device=hidden_states.device)[None]
    masks = layer_masks(backbone, hidden_states, attention_mask, position_ids)
    for _, block in _layers(backbone):
        hidden_states = block(hidden_states, attention_mask=masks.get(KIND.get(block.block_type)))
    if backbone.norm_f is not None:
        hidden_states = backbone.norm_f(hidden_states)
    if getattr(self, "_pp_return_hidden_states", False) is True or self.lm_head is None:
        return hidden_states
    slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    return self.lm_head(hidden_states[:, slice_indices, :])


def _patch_stage_for_pp(stage_model, **_) -> None:
    stage_model.forward = types.MethodType(stage_forward, stage_model)
    stage_model._pp_return_hidden_states_supported = True


@contextmanager
def _as_hf_pipeline_model(model: nn.Module):
    """While AutoModel splits ``model``: ``model.model`` is the backbone (the splitter reads it before any
    hook), the default split is renamed (:func:`stage_module_names`) and stages get :func:`stage_forward`."""
    from nemo_automodel.components.distributed.pipelining import functional

    cls, patch = type(model), functional.patch_hf_model_for_pp
    cls.model = property(lambda self: self.backbone)
    cls.customize_pipeline_stage_modules = staticmethod(stage_module_names)
    functional.patch_hf_model_for_pp = lambda stage_model, **kw: (
        _patch_stage_for_pp(stage_model) if is_nemotron_h(stage_model) else patch(stage_model, **kw))
    try:
        yield
    finally:
        functional.patch_hf_model_for_pp = patch
        del cls.model, cls.customize_pipeline_stage_modules


_saved: dict = {}


def install() -> None:
    """Wrap AutoModel's ``split_model_into_stages`` for Nemotron-H models. Idempotent."""
    from nemo_automodel.components.distributed.pipelining import functional

    if _saved:
        return
    original = _saved["split_model_into_stages"] = functional.split_model_into_stages

    def split_model_into_stages(model, *args, **kwargs):
        if not is_nemotron_h(model):
            return original(model, *args, **kwargs)
        with _as_hf_pipeline_model(model):
            return original(model, *args, **kwargs)

    functional.split_model_into_stages = split_model_into_stages


def uninstall() -> None:
    from nemo_automodel.components.distributed.pipelining import functional

    if _saved:
        functional.split_model_into_stages = _saved.pop("split_model_into_stages")


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


def refine_auto(descriptor, checkpoint):
    """ModelOpt's ``auto`` choice for ``checkpoint``, with :func:`descriptor_name_for` between the two Nemotron-H ones."""
    import json
    from pathlib import Path

    from modelopt.torch.puzzletron.anymodel import ModelDescriptorFactory

    config_file = Path(checkpoint) / "config.json"
    if descriptor not in (NemotronHModelDescriptor, NemotronHV2ModelDescriptor) or not config_file.is_file():
        return descriptor
    return ModelDescriptorFactory.get(descriptor_name_for(json.loads(config_file.read_text())))


def same_model_type(descriptor, expected) -> bool:
    """Both descriptors build a ``model_type: nemotron_h`` checkpoint here (they differ in what ModelOpt prunes and saves)."""
    ours = (NemotronHModelDescriptor, NemotronHV2ModelDescriptor)
    return descriptor in ours and expected in ours


def parallelism_problem(section: str, descriptor_name: str | None, model_type: str | None, cp_size: int) -> str | None:
    """Why a Nemotron-H model built through a descriptor cannot run with these sizes (None: it can).

    Context parallelism: AutoModel's own Nemotron-H policy gives Mamba-2 layers ``MambaContextParallel``;
    the per-layer policy here does not, so each CP rank would scan its own chunk of the sequence from a zero
    state: different results, not an error.
    """
    if descriptor_name is None or model_type != "nemotron_h" or cp_size <= 1:
        return None
    return (f"distributed.cp_size={cp_size} with {section}.anymodel_descriptor={descriptor_name}: this example's "
            "Nemotron-H build has no context parallelism for Mamba-2 layers (AutoModel's MambaContextParallel comes "
            "with its own Nemotron-H policy, which the per-layer TP plan replaces); set distributed.cp_size=1 and "
            "use distributed.sequence_parallel=true with tp_size > 1 for long sequences")
