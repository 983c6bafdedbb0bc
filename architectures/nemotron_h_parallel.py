"""Nemotron-H's model structure, per-layer tensor-parallel plan and pipeline stages (see ``nemotron_h.py``).

* **Tensor parallelism.** AutoModel's own Nemotron-H policy splits only MLP layers (all of them, whatever
  their width) and refuses sequence parallelism. :func:`tp_plan` is a per-layer plan in the style of
  ``tensor_parallel.py``: attention by heads and MLPs by channels where they divide ``tp_size``, Mamba-2 and
  MoE mixers (and blocks that do not divide) replicated with mean-reduced gradients, removed blocks left
  alone; sequence parallelism as in AutoModel's Llama plan.
* **Pipeline parallelism.** AutoModel's splitter expects ``model.model.layers`` and ``embed_tokens`` /
  ``norm`` / ``rotary_emb`` (the upstream docs list Nemotron-H's naming as a PP exception).
  :func:`install_pipeline_split` wraps ``split_model_into_stages`` for these models: stages are cut at
  ``backbone.embeddings``, ``backbone.layers.<i>``, ``backbone.norm_f``, ``lm_head``, and each stage runs
  :func:`stage_forward`.
"""

import types
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.tensor.parallel import ParallelStyle

from modelopt.torch.puzzletron.anymodel.puzzformer.no_op import MatchingZeros

from architectures.tensor_parallel import ReplicateOnTP

# Layer kinds, from the block type (transformers' names and the legacy ones of NVIDIA's remote code).
KIND = {"linear_attention": "mamba", "mamba": "mamba", "full_attention": "attention", "attention": "attention",
        "mlp": "mlp", "moe": "moe"}


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
    * Mamba-2 and MoE mixers, and blocks that do not divide: ``tensor_parallel.ReplicateOnTP`` (whole on every rank,
      gradients mean-reduced across TP ranks);
    * removed blocks: nothing.

    With ``sequence_parallel`` the residual stream is sequence-sharded: the block norm all-gathers like
    Llama's ``input_layernorm``, row-parallel outputs reduce-scatter, replicated mixers take the gathered
    sequence and re-shard their output, ``norm_f`` is ``SequenceParallel``.
    """
    from nemo_automodel.components.distributed.optimized_tp_plans import _parallelize_llama

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


def install_pipeline_split() -> None:
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


def uninstall_pipeline_split() -> None:
    from nemo_automodel.components.distributed.pipelining import functional

    if _saved:
        functional.split_model_into_stages = _saved.pop("split_model_into_stages")
