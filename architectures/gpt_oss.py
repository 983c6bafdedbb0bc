"""GPT-OSS, as transformers 5.18 builds it, made right for heterogeneous students and for PP and TP.

Four things go wrong with ModelOpt 0.47's ``gpt_oss`` descriptor and AutoModel 0.7.0 as shipped:

* **Expert widths are ignored.** The descriptor maps ``ffn.moe.expert_intermediate_dim`` to
  ``moe_intermediate_size``, which ``GptOssExperts`` never reads (it reads ``intermediate_size``),
  so a student with narrower experts is built at full width. :class:`GptOssDescriptor` sets both.
* **Sliding windows vanish under pipeline parallelism.** AutoModel's pipeline forward picks a
  layer's mask from ``decoder_layer.attention_type`` and builds the sliding mask only for models
  with ``has_sliding_layers``; transformers' GPT-OSS has neither (its own forward reads
  ``config.layer_types``), so every layer attends to the whole sequence. :meth:`GptOss.install` adds both
  as properties derived from the config.
* **Pruned expert widths crash** transformers' default ``grouped_mm`` experts kernel when a width
  breaks its 16-byte alignment: :func:`fit_experts_kernel` runs those layers with the eager loop.
* **Tensor parallelism splits nothing but the embedding and ``lm_head``.** GPT-OSS has no TP plan
  in transformers or AutoModel (its attention sinks and fused experts fit no stock style).
  :func:`tp_plan` is one: attention by heads with each head's sink on the rank that owns the head
  (:class:`ShardAttentionSinks`), experts by intermediate channels (:class:`ShardExperts`), norms
  and sequence parallelism as in AutoModel's Llama plan.
"""

import copy

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle
from transformers.models.gpt_oss.modeling_gpt_oss import (
    GptOssDecoderLayer,
    GptOssExperts,
    GptOssForCausalLM,
    GptOssModel,
)

from modelopt.torch.puzzletron.anymodel.models.gpt_oss.gpt_oss_model_descriptor import GptOssModelDescriptor
from nemo_automodel.components.distributed.optimized_tp_plans import _parallelize_llama
from nemo_automodel.components.distributed.tp_replicas import mark_tp_replica_gradient_reduction

from architectures.interface import DENSE_FIELDS, MOE_FIELDS, Architecture
from architectures.tensor_parallel import SEQUENCE_DIM, LocalParameters, SumGradientsOverTP, per_layer_tp_plan

class GptOssDescriptor(GptOssModelDescriptor):
    """ModelOpt's GPT-OSS descriptor, with ``expert_intermediate_dim`` reaching the experts."""

    @staticmethod
    def block_config_to_layer_overrides(block_config):
        overrides = GptOssModelDescriptor.block_config_to_layer_overrides(block_config)
        if "moe_intermediate_size" in overrides:
            overrides["intermediate_size"] = overrides["moe_intermediate_size"]
        return overrides


def fit_experts_kernel(model: nn.Module) -> None:
    """Run the eager experts loop in layers whose width torch's ``grouped_mm`` cannot take.

    transformers runs GPT-OSS experts with ``grouped_mm`` by default, which needs 16-byte strides:
    a ``gate_up_proj`` row of ``2 * width`` (per TP rank) bf16 values must be a multiple of 8, which a
    pruned width such as 33 is not ("strides should be multiple of 16 bytes"). Such layers get their
    own config copy asking for transformers' eager implementation; the others keep ``grouped_mm``.
    """
    for module in model.modules():
        if not isinstance(module, GptOssExperts) or module.config._experts_implementation != "grouped_mm":
            continue
        gate_up = module.gate_up_proj
        if (gate_up.to_local() if isinstance(gate_up, DTensor) else gate_up).shape[-1] % 8:
            module.config = copy.copy(module.config)
            module.config._experts_implementation = "eager"


def _attention_type(layer: GptOssDecoderLayer) -> str:
    # A no-op attention (ModelOpt's MatchingZeros) reads no mask; any type does.
    return getattr(layer.self_attn, "layer_type", None) or "full_attention"


def _has_sliding_layers(model: GptOssModel) -> bool:
    return "sliding_attention" in (getattr(model.config, "layer_types", None) or ())


class ShardAttentionSinks(ParallelStyle):
    """Split GPT-OSS attention's ``sinks`` ``[heads]`` as ``Shard(0)``, like the heads of ``q_proj``.

    Each rank's softmax then sees the sink logits of exactly the heads it computes.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        module.register_parameter("sinks", nn.Parameter(distribute_tensor(module.sinks, device_mesh, [Shard(0)])))
        LocalParameters(module, {"sinks": lambda t: t})
        return module


class ShardExperts(ParallelStyle):
    """Tensor-parallel GPT-OSS MoE block (``GptOssMLP``): every expert split on its intermediate channels.

    Per expert, ``gate_up_proj [E, hidden, 2I]`` (gate and up interleaved) and ``gate_up_proj_bias [E, 2I]``
    are ``Shard(-1)``, ``down_proj [E, I, hidden]`` is ``Shard(1)``: a contiguous slice of ``2I`` keeps
    each gate/up pair together, so rank ``r`` computes channels ``[r I/tp, (r+1) I/tp)`` of every
    expert and its ``down_proj`` rows. The router and ``down_proj_bias`` stay whole.

    Every rank routes the full input and produces a partial sum of the block's output; one all-reduce
    (a reduce-scatter under sequence parallelism) completes it. ``down_proj_bias`` enters each partial
    sum divided by ``tp``, so the sum holds it once. The router's and the bias's gradients are then
    partial on each rank, and are marked for ``synchronize_tp_replica_gradients`` to sum; the input's
    gradient is summed over the ranks in the backward pass, as a column-parallel layer's is.

    Args:
        sequence_parallel: The block's input arrives as a gathered ``Replicate`` DTensor and its output
            leaves as ``Shard(1)`` (sequence), as AutoModel's Llama SP plan does for ``down_proj``.
    """

    def __init__(self, sequence_parallel: bool = False):
        super().__init__()
        self.sequence_parallel = sequence_parallel

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        experts, tp = module.experts, device_mesh.size()
        for name, dim in (("gate_up_proj", -1), ("gate_up_proj_bias", -1), ("down_proj", 1)):
            param = getattr(experts, name)
            experts.register_parameter(name, nn.Parameter(distribute_tensor(param, device_mesh, [Shard(dim)])))
        LocalParameters(experts, {"gate_up_proj": lambda t: t, "gate_up_proj_bias": lambda t: t,
                                   "down_proj": lambda t: t, "down_proj_bias": lambda t: t / tp})
        for submodule in (module.router, experts):
            mark_tp_replica_gradient_reduction(submodule, "sum")
        group = device_mesh.get_group()

        def gather_input(mod, args):
            x = args[0].full_tensor() if isinstance(args[0], DTensor) else args[0]
            return (SumGradientsOverTP.apply(x, group), *args[1:])

        def reduce_output(mod, args, output):
            hidden, router_scores = output
            partial = DTensor.from_local(hidden, device_mesh, [Partial()], run_check=False)
            if self.sequence_parallel:
                return partial.redistribute(device_mesh, [Shard(SEQUENCE_DIM)]), router_scores
            return partial.redistribute(device_mesh, [Replicate()]).to_local(), router_scores

        module.register_forward_pre_hook(gather_input)
        module.register_forward_hook(reduce_output)
        return module


def tp_plan(sequence_parallel: bool = False) -> dict[str, ParallelStyle]:
    """GPT-OSS's TP plan, with the ``model.layers.*`` wildcards ``tensor_parallel.per_layer_tp_plan`` expands.

    Attention and norms are AutoModel's Llama entries (GPT-OSS's projections have the same names and
    biases, which column-parallel styles shard with their rows); its MLP entries are replaced by
    :class:`ShardExperts`, and :class:`ShardAttentionSinks` joins the attention.
    """
    plan = {key: style for key, style in _parallelize_llama(None, sequence_parallel).items() if ".mlp." not in key}
    plan["model.layers.*.self_attn"] = ShardAttentionSinks()
    plan["model.layers.*.mlp"] = ShardExperts(sequence_parallel)
    return plan


class GptOss(Architecture):
    """GPT-OSS: :class:`GptOssDescriptor`, the eager experts kernel where widths need it, the sliding-window
    attributes AutoModel's pipeline forward reads, and :func:`tp_plan`."""

    descriptor_names = ("gpt_oss",)
    model_types = ("gpt_oss",)
    applied_fields = frozenset({*DENSE_FIELDS - {"ffn.intermediate_size"}, *MOE_FIELDS})
    automodel_needs_cuda = "its YaRN rotary embedding calls torch.cuda"

    def fix_descriptor(self, descriptor):
        return GptOssDescriptor if descriptor is GptOssModelDescriptor else descriptor

    def after_build(self, model: nn.Module) -> None:
        fit_experts_kernel(model)

    def owns(self, model: nn.Module) -> bool:
        return isinstance(model, GptOssForCausalLM)

    def tp_plan(self, model, tp_size, sequence_parallel, user_plan):
        if user_plan is not None:
            return super().tp_plan(model, tp_size, sequence_parallel, user_plan)
        return per_layer_tp_plan(model, tp_plan(sequence_parallel), tp_size, sequence_parallel)

    def install(self) -> None:
        """Give GPT-OSS the two attributes AutoModel's pipeline forward reads."""
        GptOssDecoderLayer.attention_type = property(_attention_type)
        GptOssModel.has_sliding_layers = property(_has_sliding_layers)

    def uninstall(self) -> None:
        for cls, name in ((GptOssDecoderLayer, "attention_type"), (GptOssModel, "has_sliding_layers")):
            if isinstance(cls.__dict__.get(name), property):
                delattr(cls, name)
