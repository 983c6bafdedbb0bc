"""Nemotron-H with the module layout of NVIDIA's remote code, computed by transformers' implementation.

Written beside a checkpoint by ``tools/build_checkpoints.py --arch nemotron_h[_v2]`` and named in its
``config.json["auto_map"]``, as on the hub. What ModelOpt's Nemotron-H descriptors and the checkpoint rely
on is the layout of NVIDIA's ``modeling_nemotron_h.py``, reproduced here:

* ``NemotronHForCausalLM.backbone`` (``NemotronHModel``: ``embeddings``, ``layers``, ``norm_f``) and
  ``lm_head``; parameter names ``backbone.layers.<i>.norm.weight`` and ``backbone.layers.<i>.mixer.*``;
* ``NemotronHBlock(config, layer_idx)`` with ``norm``, ``mixer`` and ``block_type``, one mixer per layer
  from ``hybrid_override_pattern``: Mamba-2 (``M``), attention (``*``), MLP (``-``) or MoE (``E``);
* the MoE mixer ``NemotronHMOE``: ``gate`` (``weight``, ``e_score_correction_bias``), ``experts`` as a
  list of MLPs (``experts.<j>.up_proj`` / ``down_proj``) and ``shared_experts``.

The mixers' arithmetic is transformers 5.18's own (``transformers.models.nemotron_h``): Mamba-2 with its
PyTorch fallback when ``mamba-ssm`` is absent (CPU), attention through ``ALL_ATTENTION_FUNCTIONS``, the
sigmoid top-k router. The model is built without kernels from the hub.
"""

import torch
from torch import nn
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_recurrent_attention_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.nemotron_h import modeling_nemotron_h as native
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_nemotron_h import NemotronHConfig

NemotronHMamba2Mixer = native.NemotronHMamba2Mixer
NemotronHAttention = native.NemotronHAttention
NemotronHMLP = native.NemotronHMLP
NemotronHRMSNorm = native.NemotronHRMSNorm
NemotronHTopkRouter = native.NemotronHTopkRouter


class NemotronHMOE(nn.Module):
    """Routed experts (one ``NemotronHMLP`` each) plus a shared expert, as in NVIDIA's remote code."""

    def __init__(self, config, layer_idx=None):
        super().__init__()
        self.config = config
        self.experts = nn.ModuleList(
            [NemotronHMLP(config, intermediate_size=config.moe_intermediate_size) for _ in range(config.n_routed_experts)]
        )
        self.gate = NemotronHTopkRouter(config)
        self.shared_experts = NemotronHMLP(config, intermediate_size=config.moe_shared_expert_intermediate_size)

    def moe(self, hidden_states: torch.Tensor, topk_indices: torch.Tensor, topk_weights: torch.Tensor):
        final_hidden_states = torch.zeros_like(hidden_states, dtype=topk_weights.dtype)
        expert_mask = nn.functional.one_hot(topk_indices, num_classes=len(self.experts)).permute(2, 0, 1)
        for expert_idx, expert in enumerate(self.experts):
            token_indices, weight_indices = torch.where(expert_mask[expert_idx])
            if token_indices.numel() > 0:
                expert_output = expert(hidden_states[token_indices])
                weighted = expert_output * topk_weights[token_indices, weight_indices].unsqueeze(-1)
                final_hidden_states.index_add_(0, token_indices, weighted.to(final_hidden_states.dtype))
            else:
                # Keep an expert no token chose in the graph (zero gradient), so every rank of a sharded
                # model runs the same collectives.
                final_hidden_states = final_hidden_states + 0.0 * expert(hidden_states[:1]).sum()
        return final_hidden_states.type(hidden_states.dtype)

    def forward(self, hidden_states):
        residuals = hidden_states
        orig_shape = hidden_states.shape
        _, topk_weights, topk_indices = self.gate(hidden_states)
        hidden_states = hidden_states.view(-1, hidden_states.shape[-1])
        hidden_states = self.moe(hidden_states, topk_indices, topk_weights).view(*orig_shape)
        return hidden_states + self.shared_experts(residuals)


# Block types: transformers' names and the legacy names of NVIDIA's remote code.
MIXER_TYPES = {
    "linear_attention": NemotronHMamba2Mixer, "mamba": NemotronHMamba2Mixer,
    "full_attention": NemotronHAttention, "attention": NemotronHAttention,
    "mlp": NemotronHMLP,
    "moe": NemotronHMOE,
}
MAMBA_TYPES = ("linear_attention", "mamba")
ATTENTION_TYPES = ("full_attention", "attention")


class NemotronHBlock(GradientCheckpointingLayer):
    """Pre-norm residual block around one mixer (Mamba-2, attention, MLP or MoE)."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.norm = NemotronHRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.block_type = config.layers_block_type[layer_idx]
        self.mixer = MIXER_TYPES[self.block_type](config, layer_idx=layer_idx)

    def forward(self, hidden_states, past_key_values=None, attention_mask=None, position_ids=None,
                use_cache=False, **kwargs):
        residual = hidden_states
        hidden_states = self.norm(hidden_states.to(dtype=self.norm.weight.dtype))
        if self.block_type in MAMBA_TYPES:
            hidden_states = self.mixer(hidden_states, cache_params=past_key_values, attention_mask=attention_mask,
                                       **kwargs)
        elif self.block_type in ATTENTION_TYPES:
            hidden_states, _ = self.mixer(hidden_states=hidden_states, past_key_values=past_key_values,
                                          attention_mask=attention_mask, position_ids=position_ids,
                                          use_cache=use_cache, **kwargs)
        else:
            hidden_states = self.mixer(hidden_states)
        return residual + hidden_states


class NemotronHPreTrainedModel(native.NemotronHPreTrainedModel):
    config_class = NemotronHConfig
    base_model_prefix = "backbone"
    _no_split_modules = ["NemotronHBlock"]
    _can_record_outputs = {"hidden_states": NemotronHBlock, "attentions": NemotronHAttention}


class NemotronHModel(NemotronHPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([NemotronHBlock(config, layer_idx=idx) for idx in range(config.num_hidden_layers)])
        self.norm_f = NemotronHRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, new_embeddings):
        self.embeddings = new_embeddings

    def layer_masks(self, inputs_embeds, attention_mask, past_key_values, position_ids) -> dict:
        """The mask each block type reads: 4D causal for attention, 2D padding (or None) for Mamba."""
        if isinstance(attention_mask, dict):
            return attention_mask
        mask_kwargs = {"config": self.config, "inputs_embeds": inputs_embeds, "attention_mask": attention_mask,
                       "past_key_values": past_key_values, "position_ids": position_ids}
        causal = create_causal_mask(**mask_kwargs)
        recurrent = create_recurrent_attention_mask(**mask_kwargs)
        return {**dict.fromkeys(ATTENTION_TYPES, causal), **dict.fromkeys(MAMBA_TYPES, recurrent)}

    @merge_with_config_defaults
    @capture_outputs
    def forward(self, input_ids=None, inputs_embeds=None, position_ids=None, past_key_values=None, use_cache=None,
                attention_mask=None, **kwargs):
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embeddings(input_ids)
        if use_cache and past_key_values is None:
            from transformers.cache_utils import DynamicCache

            past_key_values = DynamicCache(config=self.config)
        hidden_states = inputs_embeds
        if position_ids is None:
            past_seen_tokens = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(hidden_states.shape[1], device=hidden_states.device) + past_seen_tokens)[None]
        masks = self.layer_masks(inputs_embeds, attention_mask, past_key_values, position_ids)
        for block in self.layers:
            hidden_states = block(hidden_states, attention_mask=masks.get(block.block_type), position_ids=position_ids,
                                  past_key_values=past_key_values, use_cache=use_cache, **kwargs)
        hidden_states = self.norm_f(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states,
                                       past_key_values=past_key_values if use_cache else None)


class NemotronHForCausalLM(NemotronHPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {}

    def __init__(self, config):
        super().__init__(config)
        self.backbone = NemotronHModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, new_embeddings):
        return self.backbone.set_input_embeddings(new_embeddings)

    def get_decoder(self):
        return self.backbone

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        outputs = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                                **kwargs)
        hidden_states = outputs[0]
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :]).float()
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)


__all__ = ["NemotronHPreTrainedModel", "NemotronHModel", "NemotronHForCausalLM", "NemotronHBlock"]
