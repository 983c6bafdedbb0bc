"""The KD step without ``[tokens, vocab]`` logits: what the models hand to ``FusedLinearKDLoss``, per parallelism.

With ``fused_linear_loss: true`` (kd.yaml) the recipe runs student and teacher through their decoder
stacks only and gives the final hidden states and the LM-head weights to
:class:`fused_linear_kd.FusedLinearKDLoss`, which computes ``(1 - kd_ratio) * CE + kd_ratio * KD`` one
chunk of tokens at a time. This module holds the pieces between the models and that loss; ``recipe.py``
calls them. All of them are AutoModel's own hooks for its fused cross-entropy (``train_ft.py``):

* Forward: ``logits_to_keep=1`` and ``output_hidden_states=True``; the final hidden states are read
  with ``model_output_utils.get_final_hidden_states`` (the models still project one position per row,
  ``[B, 1, V]``, which nothing uses). Under PP the last stages return their hidden states instead of
  logits (``_pp_return_hidden_states``, set by :func:`return_hidden_states_from_last_stage`).
* Hidden states (:func:`lm_head_inputs`): ``[B, S, H]``, identical on every TP rank. Under sequence
  parallelism they arrive as a ``Shard(1)`` DTensor and are all-gathered once; their gradient, identical on
  the TP ranks, goes back as this rank's sequence chunk.
* LM-head weights (:func:`lm_head_inputs`), hidden states and weights both in the dtype the LM head computes
  in (as the logits path casts its input):

  - a plain tensor (one process, or FSDP2's gathered head, which AutoModel keeps unsharded from forward
    to backward): used as it is; FSDP2 reduce-scatters its gradient with the other parameters';
  - a ``DTensor`` sharded by FSDP2 only: gathered with AutoModel's
    ``LinearCrossEntropy.materialize_lm_weight``, whose backward reduce-scatters the gradient into the
    shard (as the mean over data-parallel ranks, which the recipe's ``loss * dp_size`` cancels);
  - a ``DTensor`` ``Shard(0)`` over ``tp`` (vocabulary rows): this rank's rows (``to_local()``, so the
    gradient lands in this rank's shard) and the ``tp`` group, for the loss to reduce row statistics over.

  A tied LM head is the embedding's weight, so its gradient is added to the embedding's by autograd.
* Loss options (:func:`build_loss`): ``kd_ratio`` and the instantiated ``kd_loss_fn`` (``loss.KDLoss``:
  ``temperature``, ``divergence``, ``beta``, ``chunk_size``). Labels are mapped to ``loss_fn``'s
  ``ignore_index`` as AutoModel's KD recipe does (``_normalize_kd_labels``), so KD counts exactly the
  tokens CE counts, and both are divided by the recipe's ``num_label_tokens``.

Refused before any weights load (:func:`check_config`, one line, ``run.py`` exit code 2): a
``kd_loss_fn`` other than ``loss.KDLoss`` or a ``loss_fn`` other than a sum-reduced
``MaskedCrossEntropy`` (the fused loss implements exactly those) and context parallelism (GPU-only here and
not tested with the fused loss). With ``separate_meshes`` the teacher's hidden states cross between the meshes
(``separate_meshes.py``).
"""

import torch
import torch.distributed as dist
from nemo_automodel.components.loss.linear_ce_base import LinearCrossEntropy
from nemo_automodel.components.loss.masked_ce import MaskedCrossEntropy
from nemo_automodel.components.loss.utils import _get_loss_ignore_index, _normalize_loss_labels
from nemo_automodel.components.training.model_output_utils import get_final_hidden_states
from nemo_automodel.components.utils.model_utils import (
    _supports_logits_to_keep,
    filter_forward_kwargs,
    get_lm_head_module,
)
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard

import loss
from common.errors import PreflightError
from distillation.fused_linear_kd import FusedLinearKDLoss

# AutoModel's linear-CE forward: project one position per row, return the final hidden states.
HIDDEN_STATES_ONLY = {"logits_to_keep": 1, "output_hidden_states": True}
TP_MESH_DIM = "tp"
FIX = "or set fused_linear_loss=false"


class FusedLinearLossError(PreflightError):
    """A setting the fused KD loss cannot serve; the message names it and the fix."""


def check_config(cfg) -> None:
    """Raise :class:`FusedLinearLossError` for a setting ``fused_linear_loss: true`` cannot run; reads only ``cfg``."""
    kd_target = cfg.get("kd_loss_fn._target_", None)
    if not (isinstance(kd_target, type) and issubclass(kd_target, loss.KDLoss)):
        raise FusedLinearLossError(
            f"fused_linear_loss: kd_loss_fn._target_ is {_name(kd_target)}; the fused loss computes loss.KDLoss's "
            f"divergences from its options: set kd_loss_fn._target_=loss.KDLoss {FIX}")
    ce_target = cfg.get("loss_fn._target_", None)
    reduction = cfg.get("loss_fn.reduction", "sum")
    if not (isinstance(ce_target, type) and issubclass(ce_target, MaskedCrossEntropy)) or reduction != "sum":
        raise FusedLinearLossError(
            f"fused_linear_loss: loss_fn is {_name(ce_target)} (reduction={reduction}); the fused loss computes "
            f"MaskedCrossEntropy with reduction=sum: set loss_fn._target_ to it {FIX}")
    if (cfg.get("distributed.cp_size", 1) or 1) > 1:
        raise FusedLinearLossError(
            f"fused_linear_loss: distributed.cp_size={cfg.get('distributed.cp_size')} is not supported (context "
            f"parallelism needs CUDA and is untested with the fused loss): set distributed.cp_size=1 {FIX}")


def _name(target) -> str:
    return f"{target.__module__}.{target.__qualname__}" if isinstance(target, type) else repr(target)


def check_model(model: nn.Module, role: str) -> None:
    """Raise :class:`FusedLinearLossError` unless ``model`` (a non-PP model) can skip its full logits."""
    if not _supports_logits_to_keep(model):
        raise FusedLinearLossError(
            f"fused_linear_loss: the {role} ({type(model).__name__}) has no logits_to_keep argument, so its forward "
            f"would still compute [tokens, vocab] logits: {FIX}")


def build_loss(kd_loss_fn: loss.KDLoss, loss_fn: nn.Module, kd_ratio: float, tp_group) -> FusedLinearKDLoss:
    """The recipe's mixed loss as one module: ``kd_ratio``, ``kd_loss_fn``'s options, ``loss_fn``'s ignore index."""
    return FusedLinearKDLoss(
        ignore_index=_get_loss_ignore_index(loss_fn),
        temperature=kd_loss_fn.temperature,
        kd_ratio=kd_ratio,
        divergence=kd_loss_fn.divergence,
        beta=kd_loss_fn.beta,
        chunk_size=kd_loss_fn.chunk_size,
        tp_group=tp_group,
    )


def loss_labels(labels: torch.Tensor, loss_fn: nn.Module) -> torch.Tensor:
    """``[B, S]`` labels with the dataset's ``-100`` mapped to ``loss_fn``'s ignore index (as CE and KD see them)."""
    return _normalize_loss_labels(labels, _get_loss_ignore_index(loss_fn))


def final_hidden_states(model: nn.Module, batch: dict):
    """Run ``model`` (a non-PP model) on ``batch`` without its full logits; its ``[B, S, H]`` final hidden states
    (a ``Shard(1)`` DTensor under sequence parallelism)."""
    output = model(**filter_forward_kwargs(model, {**batch, **HIDDEN_STATES_ONLY}))
    hidden = get_final_hidden_states(output)
    if hidden is None:
        raise FusedLinearLossError(f"fused_linear_loss: {type(model).__name__} returned no hidden states: {FIX}")
    return hidden


def replicated_hidden_states(hidden) -> torch.Tensor:
    """A plain ``[B, S, H]`` tensor: sequence-parallel (``Shard(1)`` DTensor) hidden states all-gathered once."""
    return hidden.full_tensor() if isinstance(hidden, DTensor) else hidden


def vocab_shard_group(student: nn.Module, teacher: "nn.Module | None") -> "dist.ProcessGroup | None":
    """The ``tp`` group both LM heads' vocabulary rows are split over (the student's alone for a cached teacher,
    ``teacher`` None); None when every rank holds all rows.

    Raises :class:`FusedLinearLossError` when one head is split and the other is not (the loss pairs rows).
    """
    if teacher is None:
        return _tp_group(get_lm_head_module(student).weight)
    student_group, teacher_group = (_tp_group(get_lm_head_module(m).weight) for m in (student, teacher))
    if (student_group is None) != (teacher_group is None):
        layouts = [getattr(get_lm_head_module(m).weight, "placements", "whole") for m in (student, teacher)]
        raise FusedLinearLossError(
            f"fused_linear_loss: the student's LM head is {layouts[0]} and the teacher's {layouts[1]}; the fused "
            f"loss needs both split over tp alike or both whole: {FIX}")
    return student_group


def _tp_group(weight: torch.Tensor) -> "dist.ProcessGroup | None":
    if not isinstance(weight, DTensor):
        return None
    mesh = weight.device_mesh
    for dim, name in enumerate(mesh.mesh_dim_names or ()):
        if name == TP_MESH_DIM and mesh.size(dim) > 1:
            return mesh.get_group(dim)
    return None


def lm_head_inputs(model: nn.Module, hidden, grad_reduce_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden [B, S, H], rows [vocab/tp, H])``: what ``FusedLinearKDLoss`` takes for ``model``'s LM head.

    Args:
        model: The model, or under PP the last stage's part, that owns the LM head.
        hidden: Its final hidden states, a tensor or a sequence-parallel ``Shard(1)`` DTensor.
        grad_reduce_group: The data-parallel group whose ranks contribute gradients to an FSDP2-sharded
            weight (the recipe's dp group); None for a frozen teacher, in evaluation, or without data parallelism.

    Both come in the dtype the LM head computes in (FSDP2's mixed-precision ``param_dtype`` for a head that is
    its own FSDP unit, else the weight's dtype), as the logits path casts its input. The rows are differentiable
    with respect to the parameter when it requires grad (a frozen teacher's are detached). Layouts and where
    their gradients go: module docstring.
    """
    weight = get_lm_head_module(model).weight
    dtype = lm_head_dtype(model)
    if isinstance(weight, DTensor):
        mesh, placements = weight.device_mesh, weight.placements
        if _tp_group(weight) is None:
            weight = LinearCrossEntropy.materialize_lm_weight(weight, grad_reduce_group=grad_reduce_group)
        else:
            tp_dim = list(mesh.mesh_dim_names).index(TP_MESH_DIM)
            others_whole = all(mesh.size(d) == 1 for d in range(mesh.ndim) if d != tp_dim)
            if not (others_whole and placements[tp_dim] == Shard(0)):
                # FSDP2 keeps a TP head gathered over dp from forward to backward (AutoModel's parallelizer);
                # a head still sharded over dp here would need a dp gather with reduce-scattered gradients.
                raise FusedLinearLossError(
                    f"fused_linear_loss: {type(model).__name__}'s LM-head weight is laid out as {placements} over "
                    f"{mesh}; only vocab rows sharded over tp (Shard(0)) are supported under TP: {FIX}")
            weight = weight.to_local()
    if not weight.requires_grad:
        weight = weight.detach()  # a teacher offloaded after its forward keeps these rows where they were
    return replicated_hidden_states(hidden).to(dtype), weight.to(dtype)


def lm_head_dtype(model: nn.Module) -> torch.dtype:
    """The dtype ``model``'s LM head computes in: FSDP2's mixed-precision ``param_dtype`` for a head that is its own
    FSDP unit, else its weight's."""
    lm_head = get_lm_head_module(model)
    if isinstance(lm_head, FSDPModule):
        return lm_head._get_fsdp_state()._mp_policy.param_dtype or lm_head.weight.dtype
    return lm_head.weight.dtype


def last_stage_part(model_parts, stages) -> "nn.Module | None":
    """The model part of this rank's last pipeline stage; None on ranks without it."""
    for part, stage in zip(model_parts, stages):
        if stage.is_last:
            return part
    return None


def return_hidden_states_from_last_stage(part: nn.Module) -> None:
    """Make a last pipeline stage return ``[mb, S, H]`` hidden states instead of logits (AutoModel's PP flag for
    linear-CE losses; read when the stage's shapes are set, so before the first batch)."""
    if not getattr(part, "_pp_return_hidden_states_supported", False):
        raise FusedLinearLossError(
            f"fused_linear_loss: the pipeline stage {type(part).__name__} cannot return hidden states: {FIX}")
    part._pp_return_hidden_states = True
