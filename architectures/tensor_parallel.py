"""Tensor-parallel plans for heterogeneous (Puzzletron "AnyModel") decoder stacks.

AutoModel's TP plans shard every decoder layer the same way, with wildcard keys such as
``model.layers.*.self_attn.k_proj``. A Puzzletron student breaks that: one layer keeps a single
KV head, which cannot be split over two ranks, another has no attention at all. This module
turns AutoModel's own plan for the architecture into a per-layer plan. Each attention and MLP
block of each layer gets one of three treatments on the ``tp`` mesh:

``sharded``
    The block's head count (attention: query and KV heads) or width (MLP: intermediate size)
    divides ``tp_size``: AutoModel's entries apply unchanged. Column-parallel projections
    (``q/k/v_proj``, ``gate/up_proj``) hold ``Shard(0)`` weights, row-parallel ones (``o_proj``,
    ``down_proj``) ``Shard(1)``; Qwen3's ``q_norm``/``k_norm`` stay whole and sum their partial
    gradients, as in AutoModel's Qwen plan.
``kv_replicated``
    An attention block whose query heads divide ``tp_size`` but whose KV heads are fewer, ``tp_size`` a
    multiple of them (Puzzletron keeps 1 or 2 KV heads in some layers): split by query heads as Megatron
    does. ``q_proj``/``o_proj`` (and their norms, Qwen3's ``q_norm``/``k_norm``) take AutoModel's entries;
    ``k_proj``/``v_proj`` stay whole on every rank, and :class:`KVHeadOfRank` computes only the KV head the
    rank's query heads read. That head's gradient on a rank is its own query heads' part, so the KV
    weights' gradients and the block input's are summed over TP.
``replicated``
    The block splits in none of these ways: it gets no entries, so its parameters are whole (``Replicate``)
    on every TP rank, every rank computes the full block, and :class:`ReplicateOnTP` marks the
    parameters for ``synchronize_tp_replica_gradients`` (called by the KD recipe before the
    grad norm) to mean-reduce their identical gradients. Under sequence parallelism the block
    takes the full sequence (its layer norm's all-gather stays in the plan) and its output is
    re-sharded on the sequence dimension to rejoin the residual stream.
``no_op``
    Puzzletron removed the block (``MatchingZeros``, and its norm is ``Same``): no entries,
    not even the sequence-parallel norm, so nothing is gathered for a block that adds zeros.

Entries that are not per layer (embedding, final norm, ``lm_head``) are kept as they are.

Also here: the pieces the architectures' own parallel styles share (:class:`LocalParameters`,
:class:`SumGradientsOverTP`). ``parallelizer.py`` applies the plans.
"""

from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ParallelStyle

from nemo_automodel.components.distributed.tp_replicas import mark_tp_replica_gradient_reduction

BlockMode = Literal["sharded", "kv_replicated", "replicated", "no_op"]
LAYER_WILDCARD = ".*."
# The first name of a per-layer plan key, mapped to the block it belongs to. Norms feed their
# block; under sequence parallelism they all-gather its input, which a replicated block needs too.
BLOCK_OF = {"self_attn": "self_attn", "input_layernorm": "self_attn", "mlp": "mlp", "post_attention_layernorm": "mlp"}
NORMS = ("input_layernorm", "post_attention_layernorm")
KV_PROJECTIONS = ("self_attn.k_proj", "self_attn.v_proj")
SEQUENCE_DIM = 1  # activations are [batch, sequence, hidden]


def expert_width(mlp: nn.Module) -> int | None:
    """Intermediate channels per expert of a fused-experts block (``experts.down_proj [E, I, hidden]``, GPT-OSS's
    layout); None for a block without one."""
    experts = getattr(mlp, "experts", None)
    return experts.down_proj.shape[1] if experts is not None and hasattr(experts, "down_proj") else None


class LocalParameters:
    """Forward hooks that hand a module the local shards of some of its DTensor parameters.

    GPT-OSS reads ``self.sinks`` and the expert tensors directly inside its forward (no ``nn.Linear``
    that DTensor could dispatch), so for the duration of the forward each named parameter is replaced
    by ``transform(local shard)``; autograd carries the gradient back to the DTensor parameter.
    """

    def __init__(self, module: nn.Module, transforms: dict):
        self.transforms, self.saved = transforms, {}
        module.register_forward_pre_hook(self.swap_in)
        module.register_forward_hook(self.swap_out)

    def swap_in(self, module, args):
        for name, transform in self.transforms.items():
            param = module._parameters[name]
            self.saved[name] = param
            module._parameters[name] = transform(param.to_local() if isinstance(param, DTensor) else param)

    def swap_out(self, module, args, output):
        module._parameters.update(self.saved)
        self.saved = {}


class SumGradientsOverTP(torch.autograd.Function):
    """Identity forward; backward all-reduces the gradient: the input of a column-parallel block."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def attention_mode(attn: nn.Module, tp_size: int) -> BlockMode:
    """How a layer's ``self_attn`` is split: by heads when both head counts divide ``tp_size``; by query heads
    when only theirs does and each rank's query heads read one KV head (``tp_size`` a multiple of the KV heads)."""
    if not hasattr(attn, "q_proj"):
        return "no_op"
    num_heads = attn.q_proj.out_features // attn.head_dim
    num_kv_heads = attn.k_proj.out_features // attn.head_dim
    if num_heads % tp_size:
        return "replicated"
    if num_kv_heads % tp_size == 0:
        return "sharded"
    return "kv_replicated" if tp_size % num_kv_heads == 0 else "replicated"


def mlp_mode(mlp: nn.Module, tp_size: int) -> BlockMode:
    """How a layer's ``mlp`` is split: by intermediate columns (of every expert, for GPT-OSS's MoE)
    when their count divides ``tp_size``."""
    width = mlp.down_proj.in_features if hasattr(mlp, "down_proj") else expert_width(mlp)
    if width is None:
        return "no_op"
    return "sharded" if width % tp_size == 0 else "replicated"


def layer_modes(layer: nn.Module, tp_size: int) -> dict[str, BlockMode]:
    """``{"self_attn": mode, "mlp": mode}`` for one decoder layer."""
    return {"self_attn": attention_mode(layer.self_attn, tp_size), "mlp": mlp_mode(layer.mlp, tp_size)}


class ReplicateOnTP(ParallelStyle):
    """Keep a block whole on every TP rank and mean-reduce its gradients across them.

    Every rank runs the full block on the same input, so each rank's gradient is the full one;
    the mean keeps replicas from drifting apart (e.g. under a nondeterministic kernel).

    Args:
        sequence_parallel: The residual stream is sharded on the sequence dimension. The block's
            input arrives gathered (``Replicate`` DTensor from the sequence-parallel norm) and is
            handed over as a plain tensor; the output leaves as a ``Shard(1)`` DTensor. Gradients
            follow the same path back: the output gradient is all-gathered, the input gradient is
            this rank's sequence chunk.
    """

    def __init__(self, sequence_parallel: bool = False):
        super().__init__()
        self.sequence_parallel = sequence_parallel

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        # The reduction is read per module from its direct parameters, so mark the whole subtree.
        for submodule in module.modules():
            mark_tp_replica_gradient_reduction(submodule, "mean")
        if self.sequence_parallel:
            module.register_forward_pre_hook(_gather_inputs, with_kwargs=True)
            module.register_forward_hook(lambda mod, args, output: _shard_output(output, device_mesh))
        return module


class KVHeadOfRank(ParallelStyle):
    """``k_proj`` or ``v_proj`` of a ``kv_replicated`` attention: the weight stays whole (``Replicate``) on every
    TP rank, and each rank's forward computes only KV head ``rank * kv_heads // tp_size``, the one its query heads
    ``[rank * heads / tp_size, (rank + 1) * heads / tp_size)`` read; the attention's ``num_key_value_groups``
    becomes the rank's query heads per that one KV head.

    Output ``[batch, sequence, head_dim]`` on each rank. Backward: the weight's gradient holds this rank's query
    heads' part in that head's rows (zeros elsewhere), marked for ``synchronize_tp_replica_gradients`` to sum;
    the input's gradient is summed over the ranks here, as a column-parallel layer's is. Under sequence
    parallelism the input arrives gathered (a ``Replicate`` DTensor) and is used as the plain tensor it holds.
    """

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.attention = attention

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        tp, rank, head_dim = device_mesh.size(), device_mesh.get_local_rank(), self.attention.head_dim
        num_heads = self.attention.q_proj.out_features // head_dim
        kv_heads = module.out_features // head_dim
        rows = slice(rank * kv_heads // tp * head_dim, (rank * kv_heads // tp + 1) * head_dim)
        LocalParameters(module, {name: lambda t: t[rows] for name in ("weight", "bias")
                                 if module._parameters.get(name) is not None})
        mark_tp_replica_gradient_reduction(module, "sum")
        group = device_mesh.get_group()
        module.register_forward_pre_hook(lambda mod, args: (SumGradientsOverTP.apply(_full(args[0]), group), *args[1:]))
        self.attention.num_key_value_groups = num_heads // tp
        return module


def _full(value):
    return value.full_tensor() if isinstance(value, DTensor) else value


def _gather_inputs(module, args, kwargs):
    return tuple(_full(a) for a in args), {k: _full(v) for k, v in kwargs.items()}


def _shard_output(output, device_mesh: DeviceMesh):
    def shard(tensor: torch.Tensor) -> DTensor:
        # Every rank holds the same full tensor, so declaring it Replicate is exact and keeping
        # this rank's chunk needs no communication.
        replicated = DTensor.from_local(tensor, device_mesh, [Replicate()], run_check=False)
        return replicated.redistribute(device_mesh, [Shard(SEQUENCE_DIM)])

    if isinstance(output, tuple):  # attention returns (hidden_states, attn_weights)
        return (shard(output[0]), *output[1:])
    return shard(output)


def _has_submodule(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def per_layer_tp_plan(model: nn.Module, base_plan: dict[str, ParallelStyle], tp_size: int,
                      sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """Expand ``base_plan``'s ``<layers>.*.<name>`` entries into one entry per existing layer module.

    Args:
        model: The model to parallelize (meta or materialized).
        base_plan: AutoModel's plan for the architecture (or the user's ``distributed.tp_plan``).
        tp_size: Size of the ``tp`` mesh.
        sequence_parallel: Whether ``base_plan`` is the sequence-parallel variant; passed on to
            :class:`ReplicateOnTP` for replicated blocks.

    Returns:
        A plan without layer wildcards: for each layer, the base entries of its sharded blocks, those of
        its ``kv_replicated`` attention with :class:`KVHeadOfRank` for ``k_proj``/``v_proj``, the norm
        entries of its replicated blocks, and ``<layer>.<block>: ReplicateOnTP`` for each replicated block
        (see the module docstring).
    """
    plan = {key: style for key, style in base_plan.items() if LAYER_WILDCARD not in key}
    for layers_name in dict.fromkeys(key.partition(LAYER_WILDCARD)[0] for key in base_plan if LAYER_WILDCARD in key):
        for index, layer in model.get_submodule(layers_name).named_children():
            prefix = f"{layers_name}.{index}"
            modes = layer_modes(layer, tp_size)
            for key, style in base_plan.items():
                head, _, name = key.partition(LAYER_WILDCARD)
                if head != layers_name or not _has_submodule(layer, name):
                    continue
                mode = modes.get(BLOCK_OF.get(name.split(".")[0]), "sharded")
                if mode == "kv_replicated" and name in KV_PROJECTIONS:
                    plan[f"{prefix}.{name}"] = KVHeadOfRank(layer.self_attn)
                elif mode in ("sharded", "kv_replicated") or (mode == "replicated" and name in NORMS):
                    plan[f"{prefix}.{name}"] = style
            for block, mode in modes.items():
                if mode == "replicated":
                    plan[f"{prefix}.{block}"] = ReplicateOnTP(sequence_parallel)
    return plan
