"""Hidden-state distillation (Puzzle's global KD): decoder layer ``s`` of the student learns the output of layer ``t``
of the teacher, under every parallelism.

Configured by kd.yaml's ``hidden_kd`` section (off at ``weight: 0``)::

    hidden_kd: {weight: 0.0, loss: cosine, layers: all}

The recipe's loss becomes ``(1 - kd_ratio) * CE + kd_ratio * KD + weight * H`` with

    H = 1/P * sum over the P layer pairs (s, t) of [sum over label tokens of loss(h_s, h_t)] / num_label_tokens

``loss`` per token: ``cosine`` (1 - cosine similarity), ``mse`` (mean over channels of the squared difference) or
``normalized_mse`` (the squared distance over the teacher's squared norm, so every layer weighs alike whatever its
scale). ``layers``: ``all`` (every layer with its namesake: the student keeps its teacher's depth), a list of layer
indices, or a list of ``[student, teacher]`` pairs (which also serve a student of another depth). Label tokens and
``num_label_tokens`` are the KD term's, so ``H`` is normalised exactly as KD is.

How it works, the same way for every parallelism: forward hooks on the decoder layers. The teacher's layers record
their outputs; when the student's layer ``s`` runs, its hook computes the per-token loss against the recorded teacher
output (which is then dropped), adds the value to the step's sums, and registers a gradient hook on the layer's
output that adds ``weight / P * dH/dh_s`` (computed then, in closed form, in fp32 or wider) to whatever gradient
reaches it. So the term's gradient enters the backward pass at the layer it belongs to:

* FSDP2 and data parallelism: local sums, all-reduced over data-parallel ranks like the KD term's.
* TP: a layer output is whole on every TP rank, and so is its gradient; each rank adds the same one.
  Sequence parallelism: the output is a ``Shard(1)`` DTensor; each rank takes its sequence chunk (and the labels'
  chunk under the same placement) and the sums are added over the TP group.
* PP: each stage's hooks serve the layers it holds, student and teacher stages alike (AutoModel splits both the same
  way, so layer ``s`` and ``t`` must be on the same rank, checked at setup); the gradient enters that stage's
  backward. Microbatches reach each layer in order, teacher before student (the recipe runs the teacher's schedule
  first); the forwards torch runs to infer stage shapes are ignored.

Activation checkpointing re-runs layers inside the backward pass; the hooks ignore those re-runs.

Memory: per pair, one ``[mb, S, H]`` teacher output from the teacher's forward to the student layer that uses it,
then one injected gradient of that size until the backward reaches the layer (under PP: for every microbatch of the
step in flight, as the teacher's logits are). With ``layers: all`` that is about two more layer outputs per layer.

Separate meshes (the teacher on its own ranks, ``separate_meshes.py``): :class:`TeacherLayerOutputs` records the
named teacher layers' outputs on the teacher ranks, which send them with the batch's other teacher output; the
student's :class:`HiddenStateKD` has no teacher hooks and takes them in :meth:`HiddenStateKD.receive`.

Context parallelism is refused before any weights load, as is a pair whose hidden sizes differ (this module
learns no projection).
"""

from collections import deque
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from common.checkpoint import Checkpoint
from common.errors import PreflightError

LOSSES = ("cosine", "mse", "normalized_mse")
# Where the decoder layers live: Llama-like models, Nemotron-H's remote-code layout, Qwen3-VL's language model.
LAYER_CONTAINERS = ("model.layers", "backbone.layers", "model.language_model.layers")
EPS = 1e-8


class HiddenKDError(PreflightError):
    """A ``hidden_kd`` setting that cannot work; the message names it and the fix."""


def settings(cfg) -> tuple[float, str, object]:
    """``(weight, loss, layers)`` from the config's ``hidden_kd`` section (weight 0 when absent)."""
    return (cfg.get("hidden_kd.weight", 0.0) or 0.0, cfg.get("hidden_kd.loss", "cosine"),
            cfg.get("hidden_kd.layers", "all"))


def enabled(cfg) -> bool:
    """Whether the config turns hidden-state KD on (``hidden_kd.weight > 0``)."""
    weight = settings(cfg)[0]
    return isinstance(weight, (int, float)) and weight > 0


def check_config(cfg, student: Checkpoint, teacher: Checkpoint) -> None:
    """Raise :class:`HiddenKDError` for a ``hidden_kd`` section that cannot run; reads only configs, no weights."""
    weight, kind, layers = settings(cfg)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
        raise HiddenKDError(f"hidden_kd.weight={weight!r} must be a number >= 0 (0 turns hidden-state KD off)")
    if weight == 0:
        return
    if kind not in LOSSES:
        raise HiddenKDError(f"hidden_kd.loss={kind!r} is not one of {', '.join(LOSSES)}")
    if (cfg.get("distributed.cp_size", 1) or 1) > 1:
        raise HiddenKDError(f"hidden_kd: distributed.cp_size={cfg.get('distributed.cp_size')} is not supported "
                            "(context parallelism is untested with hidden-state KD): set distributed.cp_size=1 or "
                            "hidden_kd.weight=0")
    if student.config is None or teacher.config is None:
        return  # hub ids: checked against the built models at setup
    depths = (_depth_on_disk(student), _depth_on_disk(teacher))
    check_widths(student.get("hidden_size"), teacher.get("hidden_size"))
    layer_pairs(layers, *depths)


def check_widths(student_width: int, teacher_width: int) -> None:
    """:class:`HiddenKDError` unless both models have the same ``hidden_size`` (no projection is learned)."""
    if student_width != teacher_width:
        raise HiddenKDError(f"hidden_kd: the student's hidden_size is {student_width} and the teacher's "
                            f"{teacher_width}; hidden-state KD compares them channel by channel (no projection is "
                            "learned): set hidden_kd.weight=0 or use a teacher of the student's width")


def _depth_on_disk(ckpt: Checkpoint) -> int:
    """Decoder layers per ``config.json`` (Nemotron-H lists its layers' kinds instead of a count)."""
    return ckpt.get("num_hidden_layers") or len(ckpt.get("layers_block_type") or ())


def layer_pairs(layers, student_depth: int, teacher_depth: int) -> list[tuple[int, int]]:
    """``[(student layer, teacher layer), ...]`` for ``hidden_kd.layers``; :class:`HiddenKDError` when it cannot be."""
    if layers == "all":
        if student_depth != teacher_depth:
            raise HiddenKDError(
                f"hidden_kd.layers=all pairs each layer with its namesake, but the student has {student_depth} layers "
                f"and the teacher {teacher_depth}: list the pairs, e.g. hidden_kd.layers=[[0,0],[1,2]]")
        if not student_depth:
            raise HiddenKDError("hidden_kd.layers=all: the student's config gives no number of layers; list them, "
                                "e.g. hidden_kd.layers=[0,1,2,3]")
        return [(i, i) for i in range(student_depth)]
    if not isinstance(layers, (list, tuple)) or not layers:
        raise HiddenKDError(f"hidden_kd.layers={layers!r} must be all, a list of layer indices or a list of "
                            "[student, teacher] pairs, e.g. hidden_kd.layers=[1,3] or hidden_kd.layers=[[0,0],[1,2]]")
    pairs = []
    for item in layers:
        if _is_index(item):
            if student_depth != teacher_depth:
                raise HiddenKDError(
                    f"hidden_kd.layers={list(layers)} names single layers, but the student has {student_depth} layers "
                    f"and the teacher {teacher_depth}: give [student, teacher] pairs instead")
            pair = (item, item)
        elif isinstance(item, (list, tuple)) and len(item) == 2 and all(_is_index(i) for i in item):
            pair = tuple(item)
        else:
            raise HiddenKDError(f"hidden_kd.layers: {item!r} is neither a layer index nor a [student, teacher] pair")
        for index, depth, role in ((pair[0], student_depth, "student"), (pair[1], teacher_depth, "teacher")):
            if not 0 <= index < depth:
                raise HiddenKDError(f"hidden_kd.layers: layer {index} is not one of the {role}'s {depth} layers "
                                    f"(0..{depth - 1})")
        if pair in pairs:
            raise HiddenKDError(f"hidden_kd.layers: {list(pair)} is listed twice")
        pairs.append(pair)
    return pairs


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def per_token_loss(kind: str, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, H]`` student and teacher hidden states -> ``([N] loss per token, [N, H] its gradient w.r.t. student)``.

    Closed form, no autograd: run inside a checkpointed layer, an autograd graph here would add saved tensors that
    the checkpoint's recomputation (which skips this) does not have. Norms below ``EPS`` count as ``EPS``.
    """
    diff = student - teacher
    if kind == "mse":
        return diff.square().mean(-1), diff * (2.0 / student.shape[-1])
    if kind == "normalized_mse":
        scale = teacher.square().sum(-1, keepdim=True).clamp_min(EPS**2)
        return (diff.square().sum(-1, keepdim=True) / scale).squeeze(-1), 2.0 * diff / scale
    student_norm = student.norm(dim=-1, keepdim=True).clamp_min(EPS)
    teacher_norm = teacher.norm(dim=-1, keepdim=True).clamp_min(EPS)
    cosine = (student * teacher).sum(-1, keepdim=True) / (student_norm * teacher_norm)
    grad = cosine * student / student_norm.square() - teacher / (student_norm * teacher_norm)
    return (1.0 - cosine).squeeze(-1), grad


def decoder_layers(model: nn.Module) -> dict[int, nn.Module]:
    """``{global layer index: layer}`` of a model or of one pipeline stage's part (AutoModel keeps a stage's layers
    in a ``ModuleDict`` keyed by their index in the whole model)."""
    modules = dict(model.named_modules())
    for name in LAYER_CONTAINERS:
        container = modules.get(name)
        if isinstance(container, nn.ModuleDict):
            return {int(key): layer for key, layer in container.items()}
        if isinstance(container, nn.ModuleList):
            return dict(enumerate(container))
    raise HiddenKDError(f"hidden_kd: found no decoder layers in {type(model).__name__} (looked for "
                        f"{', '.join(LAYER_CONTAINERS)}): set hidden_kd.weight=0")


class HiddenStateKD:
    """The hidden-state term ``weight * H``: hooks on the student's and teacher's decoder layers, and its step sums.

    Args:
        student_parts: The student's model parts (one, or this rank's pipeline stages).
        teacher_parts: The teacher's, split the same way; None when the teacher runs on other ranks (its layer
            outputs then come through :meth:`receive`).
        weight, kind, pairs: ``hidden_kd.weight``, ``.loss`` and :func:`layer_pairs`.
        tp_group: The tensor-parallel group (sequence-parallel sums are added over it), or None.
        pp_group: The pipeline group (each stage sums its own pairs), or None.

    Per microbatch the recipe calls :meth:`begin` before the teacher's forward; per step (or validation pass)
    :meth:`take_sums` returns the per-pair token sums over every rank.
    """

    def __init__(self, student_parts, teacher_parts, weight: float, kind: str, pairs: list[tuple[int, int]],
                 tp_group=None, pp_group=None):
        self.weight, self.kind, self.pairs = float(weight), kind, pairs
        self.tp_group, self.pp_group = tp_group, pp_group
        self.remote_teacher = teacher_parts is None
        student_layers = {i: m for part in student_parts for i, m in decoder_layers(part).items()}
        teacher_layers = {i: m for part in teacher_parts or [] for i, m in decoder_layers(part).items()}
        self._check_pairs_are_local(student_layers, teacher_layers)
        self._teacher_outputs = [deque() for _ in pairs]  # per pair: one [B, S, H] per microbatch not yet used
        self._microbatch = [0] * len(pairs)
        self._masks: list[torch.Tensor] = []
        self._grad_scale = 0.0
        self._paused = False
        # Token sums per pair: whole-sequence ones (identical on TP ranks) and sequence-chunk ones (added over TP).
        self._sums = torch.zeros(2, len(pairs), dtype=torch.float64, device=_collective_device())
        self._handles = []
        for t in sorted({t for _, t in pairs}):
            if t in teacher_layers:
                self._handles.append(teacher_layers[t].register_forward_hook(self._teacher_hook(t)))
        for s in sorted({s for s, _ in pairs}):
            if s in student_layers:
                self._handles.append(student_layers[s].register_forward_hook(self._student_hook(s)))

    def remove(self) -> None:
        """Take the hooks off both models."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _check_pairs_are_local(self, student_layers: dict, teacher_layers: dict) -> None:
        """Every pair's two layers on one rank; raised on every rank alike (the layouts are gathered first)."""
        local = (sorted(student_layers), sorted(teacher_layers))
        layouts = [local]
        if self.pp_group is not None:
            layouts = [None] * dist.get_world_size(self.pp_group)
            dist.all_gather_object(layouts, local, group=self.pp_group)
        for s, t in self.pairs:
            holders = [rank for rank, (students, teachers) in enumerate(layouts) if s in students]
            if not holders:
                raise HiddenKDError(f"hidden_kd.layers: the student has no layer {s}: set hidden_kd.layers to its "
                                    "layers")
            if not self.remote_teacher and not any(t in layouts[rank][1] for rank in holders):
                raise HiddenKDError(
                    f"hidden_kd.layers: student layer {s} and teacher layer {t} are in different pipeline stages, "
                    f"so the stage that trains {s} never sees {t}: pair layers the pipeline split keeps together, "
                    "or set distributed.pp_size=1")

    def begin(self, masks: list[torch.Tensor], grad_scale: float) -> None:
        """Start a forward of the microbatches ``masks`` (``[mb, S]`` bool, True at label tokens, in schedule order).

        ``grad_scale`` multiplies ``weight / P * dH_sum/dh`` into the gradient (the recipe's scale of token sums:
        ``dp_size / num_label_tokens`` without PP, 1 under PP, whose step scales gradients afterwards); 0 in
        evaluation.
        """
        self._masks = masks
        self._microbatch = [0] * len(self.pairs)
        for queue in self._teacher_outputs:
            queue.clear()
        self._grad_scale = grad_scale * self.weight / len(self.pairs)

    def receive(self, outputs: dict, microbatch_size: "int | None" = None) -> None:
        """The teacher's layer outputs for the batch just begun, from the teacher ranks: ``{t: [B, S, H]}``, whole
        (split into pipeline microbatches of ``microbatch_size``). Call after :meth:`begin`."""
        for p, (_, t) in enumerate(self.pairs):
            hidden = outputs[t]
            self._teacher_outputs[p].extend(hidden.split(microbatch_size) if microbatch_size else [hidden])

    @contextmanager
    def paused(self):
        """Hooks do nothing inside (torch's pipeline shape inference runs the stages on uninitialised inputs)."""
        was_paused = self._paused
        self._paused = True
        try:
            yield
        finally:
            self._paused = was_paused

    def pause_during_shape_inference(self, stages) -> None:
        """Wrap each pipeline stage's forward metadata inference in :meth:`paused`."""
        _pause_during_shape_inference(stages, self.paused)

    def _teacher_hook(self, layer: int):
        targets = [p for p, (_, t) in enumerate(self.pairs) if t == layer]

        def record(module, args, output):
            if self._paused or _recomputing():
                return
            hidden = _hidden(output).detach()
            for p in targets:
                self._teacher_outputs[p].append(hidden)

        return record

    def _student_hook(self, layer: int):
        sources = [p for p, (s, _) in enumerate(self.pairs) if s == layer]

        def distill(module, args, output):
            if self._paused or _recomputing():
                return
            hidden = _hidden(output)
            injected = None
            for p in sources:
                grad = self._add_pair(p, hidden)
                if grad is not None:
                    injected = grad if injected is None else injected + grad
            if injected is not None:
                if isinstance(hidden, DTensor):
                    injected = DTensor.from_local(injected, hidden.device_mesh, hidden.placements, run_check=False,
                                                  shape=hidden.shape, stride=hidden.stride())
                hidden.register_hook(lambda grad: grad + injected)

        return distill

    def _add_pair(self, p: int, hidden) -> "torch.Tensor | None":
        """Add pair ``p``'s token sum for this microbatch (computed in fp32 at least); its scaled gradient (local
        layout, the hidden states' dtype) when training."""
        s, t = self.pairs[p]
        if not self._teacher_outputs[p]:
            raise RuntimeError(f"hidden_kd: student layer {s} ran before teacher layer {t} recorded its output "
                               "(the teacher must run first on the same microbatch)")
        teacher = self._teacher_outputs[p].popleft()
        mask = self._masks[self._microbatch[p]]
        self._microbatch[p] += 1
        student, teacher, mask, chunked = _local_views(hidden, teacher, mask)
        train = self._grad_scale != 0.0 and torch.is_grad_enabled() and hidden.requires_grad
        with torch.no_grad():
            dtype = torch.promote_types(student.dtype, torch.float32)
            # Only label tokens: padding's hidden states take no part, not even as 0 * NaN.
            loss, grad = per_token_loss(self.kind, student[mask].to(dtype), teacher[mask].to(dtype))
            self._sums[int(chunked), p] += loss.sum().double().to(self._sums.device)
            if not train:
                return None
            full = torch.zeros_like(student)
            full[mask] = (grad * self._grad_scale).to(student.dtype)
            return full

    def take_sums(self, dp_allreduce) -> torch.Tensor:
        """``[P]`` float64 token sums per pair since the last call, over every rank; resets them. Collective.

        ``dp_allreduce``: the recipe's sum over data-parallel (and context-parallel) ranks.
        """
        whole, chunked = self._sums.clone()
        self._sums.zero_()
        if self.tp_group is not None:
            dist.all_reduce(chunked, group=self.tp_group)
        sums = dp_allreduce(whole + chunked).to(self._sums.device)
        if self.pp_group is not None:
            dist.all_reduce(sums, group=self.pp_group)
        return sums.cpu()

    def hidden_loss(self, sums: torch.Tensor, num_label_tokens: int) -> float:
        """``H`` from :meth:`take_sums`' sums and the step's (or validation pass's) label-token count."""
        return float(sums.sum() / len(self.pairs) / max(num_label_tokens, 1))


def _pause_during_shape_inference(stages, paused) -> None:
    """Wrap each pipeline stage's forward metadata inference in the context ``paused()``."""
    for stage in stages:
        infer = getattr(stage, "_forward_metadata_inference", None)
        if infer is None:
            raise HiddenKDError(f"hidden_kd: torch {torch.__version__}'s pipeline stages have no forward metadata "
                                "inference to pause (written for torch 2.13): set hidden_kd.weight=0 or "
                                "distributed.pp_size=1")

        def paused_inference(*args, _infer=infer, **kwargs):
            with paused():
                return _infer(*args, **kwargs)

        stage._forward_metadata_inference = paused_inference


class TeacherLayerOutputs:
    """On the ranks of a teacher that runs apart from its student: the outputs ``[B, S, H]`` of the teacher layers
    ``layers`` in its last forward, whole (a sequence-parallel ``Shard(1)`` output all-gathered), for
    :meth:`HiddenStateKD.receive` on the student ranks.

    Under PP (``pp_group``, ``stages``: this rank's pipeline stages) each stage records the layers it holds,
    microbatch by microbatch, and :meth:`take` broadcasts each layer's ``[B, S, H]`` from its stage over the
    pipeline group, so that the last stage, which sends, holds them all.
    """

    def __init__(self, teacher_parts, layers, pp_group=None, stages=()):
        self.pp_group = pp_group
        self._outputs: dict[int, list] = {}
        self._paused = False
        found = {i: m for part in teacher_parts for i, m in decoder_layers(part).items()}
        wanted = sorted(set(layers))
        self._handles = [found[t].register_forward_hook(self._record(t)) for t in wanted if t in found]
        self._owners = {}
        if pp_group is not None:
            held = [None] * dist.get_world_size(pp_group)
            dist.all_gather_object(held, [t for t in wanted if t in found], group=pp_group)
            self._owners = {t: dist.get_global_rank(pp_group, next(i for i, h in enumerate(held) if t in h))
                            for t in wanted}
            _pause_during_shape_inference(stages, self.paused)

    @contextmanager
    def paused(self):
        """Record nothing inside (torch's pipeline shape inference runs the stages on uninitialised inputs)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def _record(self, layer: int):
        def record(module, args, output):
            if self._paused:
                return
            hidden = _hidden(output).detach()
            self._outputs.setdefault(layer, []).append(hidden.full_tensor() if isinstance(hidden, DTensor) else hidden)

        return record

    def take(self, sequence_length: int) -> dict:
        """``{t: [B, sequence_length, H]}`` of the last forward; forgets them. Collective over ``pp_group``."""
        outputs, self._outputs = self._outputs, {}
        whole = {t: torch.cat(parts).narrow(1, 0, sequence_length).contiguous() for t, parts in outputs.items()}
        for t, owner in self._owners.items():
            spec = [(tuple(whole[t].shape), whole[t].dtype) if t in whole else None]
            dist.broadcast_object_list(spec, src=owner, group=self.pp_group, device=_collective_device())
            if t not in whole:
                whole[t] = torch.empty(spec[0][0], dtype=spec[0][1], device=_collective_device())
            dist.broadcast(whole[t], src=owner, group=self.pp_group)
        return whole


def _recomputing() -> bool:
    """True inside a backward pass. Hugging Face's ``GradientCheckpointingLayer`` checkpoints the whole call, forward
    hooks included; torch's early stop usually ends the recomputation before the hooks, but where it does not, a
    re-run layer must not record or distil again (the forward's gradient hook already carries the term)."""
    return torch._C._current_graph_task_id() != -1


def _hidden(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _local_views(hidden, teacher, mask: torch.Tensor):
    """``(student [.., H], teacher [.., H], mask [..], chunked)`` on this rank, aligned token by token.

    Under sequence parallelism ``hidden`` is a ``Shard(1)`` DTensor: this rank's chunk of it, and the teacher's and
    the mask's chunk under the same placements (``chunked`` True: its sums are partial over TP).
    """
    if isinstance(hidden, DTensor):
        mesh, placements = hidden.device_mesh, hidden.placements

        def like_student(x):
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, mesh, [Replicate()] * mesh.ndim, run_check=False)
            return x.redistribute(mesh, placements).to_local()

        chunked = any(isinstance(p, Shard) for p in placements)
        return hidden.to_local(), like_student(teacher), like_student(mask.to(hidden.device)), chunked
    if isinstance(teacher, DTensor):
        teacher = teacher.full_tensor()
    if hidden.shape[:-1] != mask.shape:
        raise HiddenKDError(f"hidden_kd: a student layer output is {tuple(hidden.shape)} for labels "
                            f"{tuple(mask.shape)}; this layout is not supported: set hidden_kd.weight=0")
    return hidden, teacher, mask.to(hidden.device), False


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
