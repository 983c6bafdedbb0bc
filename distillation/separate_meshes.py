"""The teacher on its own ranks (``separate_meshes: true``), with the fused loss and hidden-state KD.

AutoModel 0.7.0's KD recipe splits the processes into a student mesh (``distributed``, the first ranks) and a teacher
mesh (``teacher_distributed``, the rest). Its ``KDMeshBridge`` broadcasts each student batch to a teacher replica
and, from the teacher replica's output rank, the teacher's full logits ``[B, S, V]`` back to the student replica.
This module changes what crosses:

* ``fused_linear_loss: true``: the teacher's final hidden states ``[B, S, H]`` (after its final norm, gathered
  whole on the teacher's output rank: a ``Shard(1)`` DTensor under sequence parallelism is all-gathered there),
  in the teacher's compute dtype. The student ranks hold the teacher's LM-head weights once, sent at setup by the
  teacher and kept as the rows of the student's own vocabulary shard (``[V/tp, H]``, the ``Shard(0)`` chunk of the
  student's ``tp`` rank), never trained. ``FusedLinearKDLoss`` then computes CE and KD from both sides' hidden
  states and rows, as it does with the teacher on the same ranks.
* ``hidden_kd``: also the outputs ``[B, S, H]`` of the teacher layers that ``hidden_kd.layers`` names, and no
  others (:class:`hidden_kd.TeacherLayerOutputs` records them on the teacher ranks;
  :meth:`hidden_kd.HiddenStateKD.receive` hands them to the student's hooks).
* ``fused_linear_loss: false`` without ``hidden_kd``: AutoModel's logits, unchanged.

Every student rank adds up the bytes of the tensors it receives in a step (``teacher_bytes`` in ``training.jsonl``):
``tokens x H x dtype bytes`` per shipped layer with the fused loss, ``tokens x V x dtype bytes`` through logits.

Supported here: a teacher mesh with data parallelism (FSDP2), TP, SP and PP (its last stage returns hidden states
for the fused loss and gathers the recorded layers from the other stages); a student mesh with FSDP2, TP, SP and PP.
Refused before any weights load (:func:`check_config`, one line): sizes that do not add up to the processes, a mesh
without an explicit ``dp_size``, context parallelism.
"""

import torch
import torch.distributed as dist
from nemo_automodel.components.utils.model_utils import get_lm_head_module
from torch import nn
from torch.distributed.tensor import DTensor

from common.errors import PreflightError
from distillation import fused_kd_forward

SIZES = ("dp_size", "tp_size", "pp_size", "cp_size")
STUDENT, TEACHER = "distributed", "teacher_distributed"


class SeparateMeshesError(PreflightError):
    """A ``separate_meshes`` setting that cannot work; the message names it and the fix."""


def enabled(cfg) -> bool:
    return bool(cfg.get("separate_meshes", False))


def check_config(cfg, world_size: int) -> dict[str, int]:
    """``{"distributed": processes, "teacher_distributed": processes}``; :class:`SeparateMeshesError` for a
    rank split that cannot work. Reads only ``cfg``."""
    if cfg.get(TEACHER, None) is None:
        raise SeparateMeshesError(
            "separate_meshes=true needs a teacher_distributed section giving the teacher's mesh: e.g. "
            "teacher_distributed.dp_size=1 teacher_distributed.tp_size=2")
    if cfg.get("teacher_cache.path", None) is not None:
        raise SeparateMeshesError("separate_meshes=true with teacher_cache.path: a cached run builds no teacher; "
                                  "set separate_meshes=false")
    processes = {}
    for section in (STUDENT, TEACHER):
        sizes = {}
        for name in SIZES:
            value = cfg.get(f"{section}.{name}", None if name == "dp_size" else 1)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                shown = "none" if value is None else repr(value)
                raise SeparateMeshesError(
                    f"{section}.{name}={shown}: with separate_meshes=true each mesh's sizes must be integers >= 1, "
                    f"dp_size included (the rank split must be explicit); set {section}.{name}")
            sizes[name] = value
        if sizes["cp_size"] > 1:
            raise SeparateMeshesError(f"{section}.cp_size={sizes['cp_size']} with separate_meshes=true is not "
                                      f"supported here: set {section}.cp_size=1")
        processes[section] = sizes["dp_size"] * sizes["tp_size"] * sizes["pp_size"] * sizes["cp_size"]
    if sum(processes.values()) != world_size:
        student, teacher = processes[STUDENT], processes[TEACHER]
        raise SeparateMeshesError(
            f"separate_meshes=true: the student mesh (distributed: dp*tp*pp*cp = {student}) and the teacher mesh "
            f"(teacher_distributed: {teacher}) take {student + teacher} processes, not the {world_size} launched: "
            f"launch {student + teacher} (torchrun --nproc_per_node) or change the dp_size values")
    return processes


def nbytes(tree) -> int:
    """Bytes of every tensor in a nested dict / list / tensor."""
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(nbytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(nbytes(v) for v in tree)
    return 0


def teacher_description(teacher: nn.Module, head_dtype: torch.dtype, with_lm_head: bool) -> dict:
    """What the student ranks need of the teacher, once: its width and depth and, ``with_lm_head``, its LM-head
    weights ``[V, H]`` (whole, detached, in ``head_dtype``: the dtype the head computes in). Collective over the
    teacher mesh when the weights are DTensors."""
    config = teacher.config.get_text_config()
    description = {"hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers}
    if with_lm_head:
        weight = get_lm_head_module(teacher).weight.detach()
        if isinstance(weight, DTensor):
            weight = weight.full_tensor()
        description["lm_head"] = weight.to(head_dtype).contiguous()
    return description


@torch.no_grad()
def final_hidden_states(teacher: nn.Module, batch: dict, device: torch.device) -> torch.Tensor:
    """The teacher's final hidden states ``[B, S, H]`` for a batch the student mesh sent (``labels`` ``[B, S]``
    included), whole on every teacher rank of the replica: no logits are computed."""
    sequence_length = batch["labels"].shape[1]
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items() if k != "labels"}
    hidden = fused_kd_forward.replicated_hidden_states(fused_kd_forward.final_hidden_states(teacher, inputs))
    return hidden.narrow(1, 0, sequence_length).contiguous()


def exchange_once(bridge, payload: "dict | None") -> "dict | None":
    """Send ``payload`` from each teacher replica's output rank to the student replicas it serves (every wave);
    returns it on the student ranks, None on the teacher ranks. Collective over both meshes."""
    received = None
    for wave in range(bridge.num_waves):
        got = bridge.send_logits(wave, payload if bridge.is_teacher else None)
        if got is not None:
            received = got
    return received


def vocab_rows(weight: torch.Tensor, tp_group) -> torch.Tensor:
    """This rank's rows ``[V/tp, H]`` of the whole ``[V, H]`` ``weight``: the chunk ``Shard(0)`` gives the student's
    ``tp`` rank (all rows without ``tp_group``)."""
    if tp_group is None:
        return weight
    return torch.chunk(weight, dist.get_world_size(tp_group))[dist.get_rank(tp_group)].contiguous()
