"""Fused LM-head + distillation loss: CE and KD from hidden states, without ``[tokens, vocab]`` logits.

``FusedLinearKDLoss`` computes what the KD recipe computes from logits, ``(1 - kd_ratio) * CE +
kd_ratio * KD`` with CE as AutoModel's ``MaskedCrossEntropy(num_label_tokens=...)`` and KD as
``loss.KDLoss``, but it takes the final hidden states and the LM-head weights instead of the logits.
Tokens are processed one chunk at a time: the chunk's student (and teacher) logits are projected
into ``[chunk, vocab/tp]`` fp32 workspaces, the value and the closed-form gradient with respect to
those logits are computed there, and the gradient is pushed through the projection at once
(``grad_hidden[chunk] = g @ W``, ``grad_W += g^T @ hidden[chunk]``). The workspace does not grow
with the sequence length; the only full-size results are the two gradients themselves.

Shapes and sharding contract::

    student_hidden  [tokens, H_s] or [B, S, H_s]   identical (replicated) on every TP rank
    student_weight  [vocab/tp, H_s]                 this rank's rows of the student LM head (all rows without TP)
    teacher_hidden  [tokens, H_t] or [B, S, H_t]   replicated; None allowed when kd_ratio == 0 (no gradient)
    teacher_weight  [vocab/tp, H_t]                 same vocabulary rows as student_weight (no gradient)
    labels          [tokens] or [B, S]              identical on every TP rank, already aligned with the
                                                    hidden positions (shifted, as the recipe's labels are)
    returns         (loss, ce_loss, kd_loss), fp32 scalars (fp64 for fp64 inputs), identical on every TP rank;
                    ce_loss and kd_loss are detached, for logging
    gradients       student_hidden: the full gradient, already all-reduced over tp_group (as a column-parallel
                    linear's input gradient is); student_weight: this rank's vocab rows only. Both in the
                    dtype of the input they belong to.

Each TP rank holds a contiguous block of vocabulary rows, in rank order (``torch.chunk`` along dim 0
gives such blocks; uneven splits are fine). Pass plain local tensors and ``tp_group``; DTensors are
refused rather than silently gathered.

Definitions, over the tokens whose label is not ``ignore_index``, with ``N = num_batch_labels`` or, when
it is None, the number of such tokens (at least 1):

* ``CE = sum_tokens -log softmax(student_logits)[label] / N`` at temperature 1 (``MaskedCrossEntropy``
  with ``reduction="sum"`` and ``num_label_tokens=N``; ``N == 0`` gives 0, as there).
* ``KD = sum_tokens T**2 D(p_teacher, p_student) / N`` at temperature ``T``: ``loss.KDLoss``'s term,
  with its divergences (``forward_kl``, ``reverse_kl``, ``jsd`` with ``beta``; ``beta`` 0 and 1 mean
  forward and reverse KL) and its closed-form gradients, whose kernels this module reuses.

With ``teacher_targets`` (a cached teacher, ``cached_kd.SparseTargets``, one entry per label token) in place
of the teacher's hidden states and weight, CE and KD come from ``cached_kd.ce_and_cached_kl``: forward KL only.

At ``kd_ratio == 1`` CE is skipped (``ce_loss`` is 0); at ``kd_ratio == 0`` the teacher is not projected
at all (``kd_loss`` is 0). Logits are computed in the inputs' dtype, as the LM head would, and upcast to
at least fp32 for the math; the weight gradient is accumulated over chunks in that compute dtype.

Under TP, per chunk: one all-reduce(MAX) of the row maxima (student and teacher together), one
all-reduce(SUM) of the CE row sums (the softmax denominator and the target logit, which only the
rank owning the label's row contributes), and the KD kernel's one or two all-reduce(SUM)s of row
sums. Once per call: one all-gather of the shard sizes (for the vocabulary offsets) and one
all-reduce(SUM) of the hidden-state gradient. No rank ever holds a full-vocabulary row, and nothing
is reduced through autograd: the loss is never all-reduced, so nothing is counted twice.

The forward pass computes the gradients; backward only scales them by ``grad_output`` (no
recomputation, no graph through the chunks). Tied embeddings need nothing special: the weight
gradient returned here is added by autograd to the embedding's own.
"""

from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn

from distillation.cached_kd import SparseTargets, ce_and_cached_kl
from loss import _AUTO_CHUNK_ELEMENTS, _KERNELS, DIVERGENCES, DTensor, _all_reduce, _shift_by_global_max

# Fewest tokens per chunk when chunk_size is automatic. Unlike loss.py's chunks, each of these re-reads both
# LM-head weights and adds into the whole weight gradient; those weight-sized passes are paid once per chunk, so a
# chunk must be long enough to amortise them. On CPU at vocab 201,088, hidden 256, 1,024 tokens, fp32 (forward +
# backward, benchmarks/fused_linear_loss.py, 2026-12-07): 4.98 s in 64-token chunks, 3.95 s in 256-token ones,
# 4.45 s in 512 (the four bare LM-head products: 3.36 s); at 32,000 the same held (0.78 / 0.62 / 0.64 s). On a GPU,
# 256 tokens keep a bf16 projection compute-bound (its FLOPs per weight byte grow with the chunk's tokens).
_MIN_AUTO_CHUNK_TOKENS = 256


class FusedLinearKDLoss(nn.Module):
    """``(1 - kd_ratio) * CE + kd_ratio * KD`` from hidden states and LM-head weights, chunked over tokens.

    Args:
        ignore_index: Label marking tokens that count in neither term.
        temperature: KD softmax temperature ``T > 0`` (KD is scaled by ``T**2``); CE always uses 1.
        kd_ratio: Weight of the KD term, in ``[0, 1]``; the recipe's ``kd_ratio``.
        divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"`` (see ``loss.py``).
        beta: Teacher weight of the ``jsd`` mixture, in ``[0, 1]``.
        chunk_size: Tokens per chunk; the workspace is 2 (CE only) to 7 (JSD with CE, bf16 weights)
            buffers of ``[chunk_size, vocab/tp]``. ``None`` or 0 picks about 1M elements per buffer on
            CPU, 16M on accelerators (loss.py's rule, with the widest shard under TP), but at least 256
            tokens (see ``_MIN_AUTO_CHUNK_TOKENS``).
        tp_group: Process group over which the vocabulary rows of both weights are sharded; None or a
            group of size 1 means whole weights.

    ``forward(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, num_batch_labels=None,
    teacher_targets=None)`` returns ``(loss, ce_loss, kd_loss)``; shapes and placements are in the module docstring. An all-masked
    batch gives zeros and zero gradients, still connected to the graph.
    """

    def __init__(
        self,
        ignore_index: int = -100,
        temperature: float = 1.0,
        kd_ratio: float = 0.5,
        *,
        divergence: str = "forward_kl",
        beta: float = 0.5,
        chunk_size: int | None = None,
        tp_group: "dist.ProcessGroup | None" = None,
    ):
        super().__init__()
        name = type(self).__name__
        if divergence not in DIVERGENCES:
            raise ValueError(f"{name}: unknown divergence {divergence!r}; valid choices: {', '.join(DIVERGENCES)}")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"{name}: beta={beta!r} is outside [0, 1]; valid choices: 0 <= beta <= 1")
        if not 0.0 <= kd_ratio <= 1.0:
            raise ValueError(f"{name}: kd_ratio={kd_ratio!r} is outside [0, 1]; valid choices: 0 <= kd_ratio <= 1")
        if not temperature > 0:
            raise ValueError(f"{name}: temperature={temperature!r} must be > 0; valid choices: any positive number")
        if chunk_size is not None and chunk_size < 0:
            raise ValueError(
                f"{name}: chunk_size={chunk_size!r} is negative; valid choices: a token count > 0, 0/None for automatic"
            )
        self.ignore_index = ignore_index
        self.temperature = float(temperature)
        self.kd_ratio = float(kd_ratio)
        self.divergence = divergence
        self.beta = float(beta)
        self.chunk_size = chunk_size or None
        self.tp_group = tp_group

    def extra_repr(self) -> str:
        return (
            f"kd_ratio={self.kd_ratio}, divergence={self.divergence}, temperature={self.temperature}, "
            f"beta={self.beta}, chunk_size={self.chunk_size}"
        )

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_hidden: "torch.Tensor | None",
        teacher_weight: "torch.Tensor | None",
        labels: torch.Tensor,
        num_batch_labels: "int | torch.Tensor | None" = None,
        teacher_targets: "SparseTargets | None" = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        name = type(self).__name__
        use_ce, use_kd = self.kd_ratio < 1.0, self.kd_ratio > 0.0
        for tensor in (student_hidden, student_weight, teacher_hidden, teacher_weight, labels):
            if DTensor is not None and isinstance(tensor, DTensor):
                raise TypeError(f"{name}: got a DTensor; pass local shards (.to_local()) and tp_group")

        hidden_shape = student_hidden.shape
        h_s = student_hidden.reshape(-1, hidden_shape[-1])
        labels = labels.reshape(-1)
        _check_pair(name, "student", h_s, student_weight)
        if labels.numel() != h_s.shape[0]:
            raise ValueError(f"{name}: {labels.numel()} labels for {h_s.shape[0]} tokens of student hidden states")
        h_t = w_t = None
        cached = use_kd and teacher_targets is not None
        if cached and self.divergence != "forward_kl":
            raise ValueError(f"{name}: a cached teacher gives forward KL only, not {self.divergence}")
        if use_kd and not cached:
            if teacher_hidden is None or teacher_weight is None:
                raise ValueError(f"{name}: kd_ratio={self.kd_ratio} needs teacher_hidden and teacher_weight")
            h_t = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
            w_t = teacher_weight.detach()
            _check_pair(name, "teacher", h_t, w_t)
            if h_t.shape[0] != h_s.shape[0] or w_t.shape[0] != student_weight.shape[0]:
                raise ValueError(
                    f"{name}: teacher hidden {tuple(h_t.shape)} / weight {tuple(w_t.shape)} do not match student "
                    f"hidden {tuple(h_s.shape)} / weight {tuple(student_weight.shape)} in tokens and vocab rows"
                )

        group = self.tp_group
        if group is not None and dist.get_world_size(group) == 1:
            group = None
        vocab_offset, global_vocab, widest_shard = _vocab_layout(student_weight, group)

        valid = labels != self.ignore_index
        if use_ce:
            # A label outside the vocabulary would be owned by no rank and silently count as logit 0.
            out_of_range = valid & ((labels < 0) | (labels >= global_vocab))
            if out_of_range.any():
                bad = labels[out_of_range][0].item()
                raise ValueError(f"{name}: label {bad} is outside the vocabulary [0, {global_vocab})")
        rows = valid.nonzero().squeeze(1)
        if cached and len(teacher_targets) != rows.numel():
            raise ValueError(f"{name}: {len(teacher_targets)} cached teacher entries for {rows.numel()} label tokens")
        denominator = float(num_batch_labels) if num_batch_labels is not None else float(max(rows.numel(), 1))

        compute_dtype = torch.promote_types(student_weight.dtype, torch.float32)
        if use_kd and not cached:
            compute_dtype = torch.promote_types(compute_dtype, w_t.dtype)
        divergence, beta = self.divergence, self.beta
        if divergence == "jsd" and beta in (0.0, 1.0):
            divergence = "forward_kl" if beta == 0.0 else "reverse_kl"
        grad_enabled = torch.is_grad_enabled()
        # N == 0 means no token of the step counts: 0, as MaskedCrossEntropy gives, rather than 0 / 0.
        term_scale = 1.0 / denominator if denominator else 0.0

        loss, ce_loss, kd_loss = _FusedLinearKDFunction.apply(
            h_s,
            student_weight,
            h_t,
            w_t,
            rows,
            labels.index_select(0, rows) - vocab_offset,
            teacher_targets.to(h_s.device, compute_dtype) if cached else None,
            SimpleNamespace(
                use_ce=use_ce,
                use_kd=use_kd,
                cached=cached,
                vocab_offset=vocab_offset,
                kd_ratio=self.kd_ratio,
                term_scale=term_scale,
                ce_scale=(1.0 - self.kd_ratio) * term_scale,  # of each term's token sum in the returned loss
                kd_scale=self.kd_ratio * term_scale,
                divergence=divergence,
                beta=beta,
                temperature=self.temperature,
                chunk_size=self.chunk_size or _auto_chunk_size(_device_kind(h_s), widest_shard),
                compute_dtype=compute_dtype,
                group=group,
                grad_hidden=grad_enabled and student_hidden.requires_grad,
                grad_weight=grad_enabled and student_weight.requires_grad,
            ),
        )
        return loss, ce_loss, kd_loss


def _check_pair(name, who, hidden, weight):
    if hidden.shape[-1] != weight.shape[-1] or weight.ndim != 2:
        raise ValueError(
            f"{name}: {who} hidden states {tuple(hidden.shape)} and weight {tuple(weight.shape)} disagree on the "
            "hidden size (weight must be [vocab/tp, hidden])"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(f"{name}: {who} hidden states are {hidden.dtype} but the weight is {weight.dtype}")


def _auto_chunk_size(kind: str, widest_shard: int) -> int:
    return max(_MIN_AUTO_CHUNK_TOKENS, _AUTO_CHUNK_ELEMENTS[kind] // widest_shard)


def _device_kind(tensor):
    return "cpu" if tensor.device.type == "cpu" else "accelerator"


def _vocab_layout(weight, group):
    """``(first vocab row of this rank, global vocab size, widest shard)``; one all-gather under TP."""
    local = weight.shape[0]
    if group is None:
        return 0, local, max(local, 1)
    sizes = torch.empty(dist.get_world_size(group), dtype=torch.long, device=weight.device)
    dist.all_gather_into_tensor(sizes, torch.tensor([local], dtype=torch.long, device=weight.device), group=group)
    sizes = sizes.tolist()
    rank = dist.get_rank(group)
    return sum(sizes[:rank]), sum(sizes), max(max(sizes), 1)


class _FusedLinearKDFunction(torch.autograd.Function):
    """Mixed loss over ``rows``; the gradients of hidden states and weight are computed in the forward.

    ``local_targets`` are the labels of ``rows`` minus this rank's vocab offset (this rank owns a row's
    target when it lies in ``[0, vocab/tp)``). The stored gradients are those of the returned loss, so
    backward only scales them by ``grad_output`` (in place: they are consumed).
    """

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, rows, local_targets, teacher_targets, cfg):
        n_tokens, dt = h_s.shape[0], cfg.compute_dtype
        cfg.needs_grad = cfg.grad_hidden or cfg.grad_weight  # read by loss.py's kernels
        grad_h = grad_w = grad_w_acc = None
        if cfg.grad_hidden:
            make = torch.empty if rows.numel() == n_tokens else torch.zeros
            grad_h = make(h_s.shape, dtype=h_s.dtype, device=h_s.device)
        if cfg.grad_weight:
            grad_w = grad_w_acc = torch.zeros_like(w_s)
            if w_s.dtype != dt:  # accumulating bf16 partial products over many chunks would lose bits
                grad_w_acc = torch.zeros(w_s.shape, dtype=dt, device=w_s.device)

        ce_tokens = torch.zeros(rows.numel() if cfg.use_ce else 0, dtype=dt, device=h_s.device)
        kd_tokens = torch.zeros(rows.numel() if cfg.use_kd else 0, dtype=dt, device=h_s.device)
        chunk = min(cfg.chunk_size, max(rows.numel(), 1))
        work = _Workspace(chunk, cfg, w_s, w_t)
        kd_kernel = _KERNELS[cfg.divergence]
        for start in range(0, rows.numel(), chunk):
            idx = rows[start : start + chunk]
            n = idx.numel()
            w = work.views(n)
            hs_chunk = h_s.index_select(0, idx)
            work.project(hs_chunk, w_s, w.a)
            chunk_labels = local_targets[start : start + n]
            grad = None
            if cfg.cached:
                ce_per_token, kd_per_token, grad = ce_and_cached_kl(
                    w, chunk_labels if cfg.use_ce else None, teacher_targets.select(slice(start, start + n)), cfg)
                if cfg.use_ce:
                    ce_tokens[start : start + n] = ce_per_token
                kd_tokens[start : start + n] = kd_per_token
            else:
                if cfg.use_kd:
                    work.project(h_t.index_select(0, idx), w_t, w.b)
                    _shift_by_global_max(w, cfg)  # a, b <- (logits - row max) / T; ea, eb <- their exps
                if cfg.use_ce:  # before the KD kernel, which overwrites a and ea
                    ce_tokens[start : start + n], grad = _cross_entropy(w, chunk_labels, cfg)
                if cfg.use_kd:
                    kd_tokens[start : start + n], kd_grad = kd_kernel(w, cfg)
                    if cfg.needs_grad:
                        kd_grad.mul_(cfg.kd_scale)
                        grad = kd_grad if grad is None else kd_grad.add_(grad)

            if cfg.needs_grad:
                if grad_h is not None:
                    torch.mm(work.in_weight_dtype(grad, n), w_s, out=w.grad_h)
                    grad_h.index_copy_(0, idx, w.grad_h)
                if grad_w_acc is not None:
                    grad_w_acc.addmm_(grad.t(), hs_chunk.to(dt))

        if grad_h is not None:
            # Each rank holds its vocab shard's contribution; a column-parallel linear's input gradient sums them.
            _all_reduce(grad_h, cfg.group)
        if grad_w is not None and grad_w_acc is not grad_w:
            grad_w.copy_(grad_w_acc)
        ctx.grads = (grad_h, grad_w)

        ce_loss = ce_tokens.sum() * cfg.term_scale
        kd_loss = kd_tokens.sum() * cfg.term_scale
        loss = ce_loss * (1.0 - cfg.kd_ratio) + kd_loss * cfg.kd_ratio
        ctx.mark_non_differentiable(ce_loss, kd_loss)
        return loss, ce_loss, kd_loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError(
                "FusedLinearKDLoss: backward ran twice through one loss; the first consumed its stored gradients"
            )
        grad_h, grad_w = (None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads)
        return grad_h, grad_w, None, None, None, None, None, None


def _cross_entropy(w, targets, cfg):
    """Per-token ``-log softmax(logits)[target]`` at temperature 1 and its gradient ``ce_scale (p - onehot)``.

    Without KD, ``w.a`` holds the raw logits; with KD it already holds ``(logits - row max) / T``. The
    target logit is read only on the rank whose shard holds it; the others add 0.
    """
    vocab = w.a.shape[1]
    if cfg.use_kd:
        shifted = w.c.copy_(w.a) if cfg.temperature == 1.0 else torch.mul(w.a, cfg.temperature, out=w.c)
    else:
        shifted = w.a
        row_max = _all_reduce(shifted.amax(-1), cfg.group, dist.ReduceOp.MAX)
        shifted.sub_(row_max[:, None])
    owned = (targets >= 0) & (targets < vocab)
    column = targets.clamp(0, vocab - 1)[:, None]
    target_logit = shifted.gather(1, column).squeeze(1).masked_fill_(~owned, 0.0)
    probs = shifted.exp_()
    z, target_logit = _all_reduce(torch.stack([probs.sum(-1), target_logit], dim=1), cfg.group).unbind(1)
    per_token = z.log() - target_logit
    if not cfg.needs_grad:
        return per_token, None
    probs.mul_((cfg.ce_scale / z)[:, None]).scatter_add_(1, column, owned.to(probs.dtype)[:, None] * -cfg.ce_scale)
    return per_token, probs


class _Workspace:
    """``[chunk, vocab/tp]`` buffers reused by every chunk (fresh multi-MiB tensors per chunk cost page faults).

    ``a`` (student logits), plus ``b``, ``ea``, ``eb`` (and ``m`` for jsd) with KD, ``c`` for CE next to KD
    (with a cached teacher only ``ea``, for CE next to KD at ``T != 1``), a staging buffer per low-precision
    weight dtype (the matmul's output before the upcast, and the gradient cast back for ``g @ W``), and a
    ``[chunk, H_s]`` buffer for the chunk's hidden-state gradient.
    """

    def __init__(self, chunk, cfg, w_s, w_t):
        dt, vocab, device = cfg.compute_dtype, w_s.shape[0], w_s.device

        def buf(dtype=dt, width=vocab):
            return torch.empty(chunk, width, dtype=dtype, device=device)

        self.a = buf()
        self.b = self.ea = self.eb = self.m = self.c = self.grad_h = None
        if cfg.cached:  # the cached teacher's entries need no teacher logits; CE shares KD's softmax at T == 1
            self.ea = buf() if cfg.use_ce and cfg.temperature != 1.0 else None
        elif cfg.use_kd:
            self.ea, self.b, self.eb = buf(), buf(), buf()
            self.m = buf() if cfg.divergence == "jsd" else None
            self.c = buf() if cfg.use_ce else None
        self.stage = {t.dtype: None for t in (w_s, w_t) if t is not None and t.dtype != dt}
        self.stage = {dtype: buf(dtype) for dtype in self.stage}
        self.weight_dtype = w_s.dtype
        if cfg.grad_hidden:
            self.grad_h = buf(w_s.dtype, w_s.shape[1])

    def views(self, n) -> SimpleNamespace:
        names = ("a", "b", "ea", "eb", "m", "c", "grad_h")
        return SimpleNamespace(**{k: None if getattr(self, k) is None else getattr(self, k)[:n] for k in names})

    def project(self, hidden, weight, out):
        """``out <- hidden @ weight.T`` computed in the weight's dtype, as the LM head would, stored upcast."""
        if weight.dtype == out.dtype:
            torch.mm(hidden, weight.t(), out=out)
        else:
            out.copy_(torch.mm(hidden, weight.t(), out=self.stage[weight.dtype][: out.shape[0]]))

    def in_weight_dtype(self, grad, n):
        if grad.dtype == self.weight_dtype:
            return grad
        return self.stage[self.weight_dtype][:n].copy_(grad)
