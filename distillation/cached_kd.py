"""KD against a cached teacher: a sparse teacher distribution per label token instead of the teacher's logits.

Two kinds of entries, both at the KD temperature ``T`` (``p = softmax(teacher_logits / T)``):

``sampled``
    ``k`` distinct ids per label token with weights ``w``, and the teacher's exact ``sum_v p log p`` (minus its
    entropy). The KD value ``T**2 (sum_v p log p - sum_j w_j log q(id_j))`` and its gradient
    ``T (q - sum_j w_j e_{id_j})`` with respect to the student logits are unbiased estimates of forward KL's
    (``E[w] = p``; "Sparse Logit Sampling", ACL 2025). The ids are a sample of fixed size ``k`` drawn with
    inclusion probabilities ``min(1, c p)`` (``c`` such that they add up to ``k``): the ``h`` tokens likely enough to
    be certain (the head) are kept with their exact ``p``, and ``k - h`` systematic draws on the CDF of the rest
    (evenly spaced points, one uniform offset) each weigh the rest's mass over ``k - h``; no token is drawn twice.
    Against ``k`` systematic draws over the whole vocabulary (counts, cache format 2), the head has no error at
    all and the slots its repeated draws took go to the tail: on the demo's teacher, ``E|w - p|^2`` is 19 % lower.
    Weights are stored as multiples of ``1 / 255`` (uint8), rounded systematically (down or up, so that a row still
    adds up to 1 and each weight keeps its expectation); that rounding adds at most ``k / (4 * 255**2)`` to
    ``E|w - p|^2``, 0.1 % of the sampling's on the demo's teacher.
``topk``
    The ``k`` most likely ids with their probabilities ``w_j = p(id_j)``, and the mass left out, ``m``. The
    KD term is the exact forward KL between the two ``k + 1``-bucket distributions (each top id, and the
    rest): ``T**2 (sum_j w_j log(w_j / q_j) + m log(m / (1 - S)))`` with ``S = sum_j q(id_j)``; its gradient
    pulls the student's top ids to ``w`` and spreads ``m`` over the rest in the student's own proportions,
    ``T (q_v - m q_v / (1 - S))`` off the top. With ``k`` equal to the vocabulary it is forward KL itself; below,
    a biased estimate of it.

Only forward KL can be computed from either kind; preflight refuses the other divergences with a cache.

Shapes and sharding contract (:class:`SparseTargets`, one row per label token, in the order of
``labels != ignore_index`` over the flattened ``[B, S]`` batch)::

    ids           [tokens, k] int64    global vocabulary ids; sampled rows are padded with id 0 and weight 0
    weights       [tokens, k] fp32     w_j
    neg_entropy   [tokens]    fp32     sum over buckets of (mass) log (mass): the constant that makes the value a KL
    tail          [tokens]    fp32     topk: m; None for sampled

Under TP the student logits are vocabulary-sharded (``[tokens, vocab/tp]``, contiguous row blocks in rank
order); every rank holds all the targets and reads the ids in its own rows.
"""

import hashlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

KINDS = ("sampled", "topk")
WEIGHT_UNITS = 255  # sampled weights are multiples of 1 / WEIGHT_UNITS (stored as uint8)


@dataclass
class SparseTargets:
    """A sparse teacher distribution per label token (see the module docstring for the contract)."""

    ids: torch.Tensor
    weights: torch.Tensor
    neg_entropy: torch.Tensor
    tail: "torch.Tensor | None" = None

    def __len__(self) -> int:
        return self.ids.shape[0]

    def select(self, rows: torch.Tensor) -> "SparseTargets":
        """The entries of ``rows`` (indices into the label tokens)."""
        return SparseTargets(self.ids[rows], self.weights[rows], self.neg_entropy[rows],
                             None if self.tail is None else self.tail[rows])

    def to(self, device, dtype) -> "SparseTargets":
        """Ids on ``device``, values in ``dtype`` (the loss's compute dtype)."""
        return SparseTargets(self.ids.to(device), self.weights.to(device, dtype), self.neg_entropy.to(device, dtype),
                             None if self.tail is None else self.tail.to(device, dtype))

    @staticmethod
    def cat(parts: list["SparseTargets"]) -> "SparseTargets":
        """Rows of ``parts`` one after the other (all of one kind and width)."""
        tail = None if parts[0].tail is None else torch.cat([p.tail for p in parts])
        return SparseTargets(torch.cat([p.ids for p in parts]), torch.cat([p.weights for p in parts]),
                             torch.cat([p.neg_entropy for p in parts]), tail)


def topk_targets(logits: torch.Tensor, k: int, temperature: float) -> SparseTargets:
    """The ``k`` most likely ids of ``softmax(logits / T)`` per row, their probabilities and the rest's mass.

    ``logits``: ``[tokens, vocab]``, the whole vocabulary (gather a vocab-sharded row first); computed in fp32 or
    wider.
    """
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)
    top_logp, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    rest = logp.scatter(1, ids, float("-inf"))
    log_tail = rest.logsumexp(-1)
    weights, tail = top_logp.exp(), log_tail.exp()
    neg_entropy = (weights * top_logp).sum(-1) + torch.where(tail > 0, tail * log_tail, torch.zeros_like(tail))
    return SparseTargets(ids, weights, neg_entropy, tail)


def sampled_targets(logits: torch.Tensor, k: int, temperature: float, offsets: torch.Tensor,
                    rounding: torch.Tensor) -> SparseTargets:
    """A fixed-size sample of ``k`` distinct ids per row of ``softmax(logits / T)`` with unbiased weights: the head
    (tokens whose inclusion probability ``c p`` reaches 1) with its exact probabilities, then ``k - h`` systematic
    draws over the rest of the vocabulary, each weighing the rest's mass over ``k - h`` (see the module docstring).
    Weights are multiples of ``1 / WEIGHT_UNITS`` adding up to 1.

    ``logits``: ``[tokens, vocab]``, the whole vocabulary. ``offsets`` and ``rounding``: ``[tokens, 1]`` uniforms in
    ``[0, 1)`` that decide each row's draws and the rounding of its weights (:func:`draw_offsets`); a row's entry
    depends on its own logits and uniforms only, so any split of the rows gives the same entries.
    """
    # Two [tokens, vocab] buffers and no other: at a 201,088 vocabulary on CPU, the fresh temporaries of a
    # log-softmax, its exp and an elementwise entropy cost 14 s of page faults per 1,024 tokens.
    shifted = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    shifted.sub_(shifted.amax(-1, keepdim=True)).clamp_(min=torch.finfo(shifted.dtype).min)  # -inf: 0 * -inf below
    mass = shifted.exp()  # unnormalised p
    total = mass.sum(-1, keepdim=True)
    # sum p log p, with p = mass / total and log p = shifted - log total (shifted is not needed after this).
    neg_entropy = shifted.mul_(mass).sum(-1) / total[:, 0] - total[:, 0].log()
    top, top_ids = mass.topk(min(k, mass.shape[-1]), dim=-1)
    slots = torch.arange(top.shape[1], device=top.device, dtype=top.dtype)
    # The i-th most likely token is certain when (k - i - 1) of the remaining slots would each weigh no more
    # than it: (k - i - 1) p_i >= the mass after it. Probabilities descend, so the head is a prefix.
    after = total - top.cumsum(-1)
    head = ((k - slots - 1) * top >= after).long().cumprod(-1).bool()
    h = head.sum(-1, keepdim=True)
    rest = k - h
    cdf = mass.scatter_(1, top_ids, torch.where(head, torch.zeros_like(top), top)).cumsum_(-1)
    rest_mass = cdf[:, -1:]
    slot = torch.arange(k, device=cdf.device)[None, :] - h  # < 0: a head slot; else the draw's number
    points = (offsets.to(cdf.dtype) + slot.clamp(min=0)) / rest.clamp(min=1) * rest_mass
    draws = torch.searchsorted(cdf, points, right=True).clamp_(max=cdf.shape[-1] - 1)
    in_head = slot < 0
    ids = torch.where(in_head, _pad(top_ids, k), draws)
    weights = torch.where(in_head, _pad(top, k), (rest_mass / rest.clamp(min=1)).expand(-1, k))
    weights = weights.masked_fill_(~in_head & (rest_mass <= 0), 0.0) / total
    return SparseTargets(ids, _systematic_round(weights, rounding), neg_entropy)


def _pad(values: torch.Tensor, k: int) -> torch.Tensor:
    """``[n, j]`` -> ``[n, k]`` with zeros after (a vocabulary smaller than ``k``)."""
    return torch.nn.functional.pad(values, (0, k - values.shape[1]))


def _systematic_round(weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Each row's weights on the grid ``1 / WEIGHT_UNITS``, rounded down or up so that the row still adds up to 1
    exactly and each weight keeps its expectation (the cumulative sums are rounded at the row's uniform offset)."""
    cumulative = weights.double().cumsum(-1)
    cumulative = cumulative / cumulative[:, -1:] * WEIGHT_UNITS
    units = (cumulative + offsets.double()).floor_()
    units = torch.diff(units, dim=-1, prepend=torch.zeros_like(units[:, :1]))
    return (units / WEIGHT_UNITS).to(weights.dtype)


def draw_offsets(generator: torch.Generator, rows: int, dtype=torch.float32,
                 device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(offsets, rounding)`` for :func:`sampled_targets`: ``[rows, 1]`` uniforms in ``dtype``, then ``[rows, 1]``
    in float64, drawn from ``generator`` in that order (the cache draws a sample's rows at once)."""
    offsets = torch.rand(rows, 1, generator=generator, device=device, dtype=dtype)
    return offsets, torch.rand(rows, 1, generator=generator, device=device, dtype=torch.float64)


def sample_generator(key: bytes, seed: int, device="cpu") -> torch.Generator:
    """A generator on ``device`` seeded from a sample's cache key and the cache's seed."""
    digest = hashlib.blake2b(key, digest_size=8, key=seed.to_bytes(8, "little", signed=False)).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def ce_and_cached_kl(w, ce_targets: "torch.Tensor | None", targets: SparseTargets, cfg):
    """One chunk's per-token CE (``None`` without CE) and ``T**2`` KD values, and the gradient of
    ``ce_scale * CE + kd_scale * KD`` w.r.t. the chunk's student logits (``None`` unless ``cfg.needs_grad``).

    ``w.a``: the student logits, ``[n, vocab/tp]`` (this rank's rows, from ``cfg.vocab_offset``), overwritten;
    ``w.ea``: a second such buffer, used only for CE at ``T != 1``. ``ce_targets``: the labels minus the vocab
    offset; ``targets``: the chunk's ``n`` entries in the compute dtype. At ``T == 1`` CE and KD share one softmax,
    so the chunk costs one exp and one scaling pass over the logits, as CE alone does. Under TP: one
    all-reduce(MAX) of the row maxima and one all-reduce(SUM) of the softmax denominators and of the logits at
    the label and the cached ids, which only their owners add.
    """
    vocab, t = w.a.shape[1], cfg.temperature
    row_max = w.a.amax(-1)
    if cfg.group is not None:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=cfg.group)
    shifted = w.a.sub_(row_max[:, None])
    local = targets.ids - cfg.vocab_offset
    owned = (local >= 0) & (local < vocab)
    column = local.clamp(0, vocab - 1)
    sums = [shifted.gather(1, column).masked_fill_(~owned, 0.0) / t]
    if ce_targets is not None:
        ce_owned = (ce_targets >= 0) & (ce_targets < vocab)
        ce_column = ce_targets.clamp(0, vocab - 1)[:, None]
        sums.append(shifted.gather(1, ce_column).masked_fill_(~ce_owned[:, None], 0.0))
    # exp(a / T) for KD, and exp(a) for CE: the same tensor at T == 1.
    if ce_targets is not None and t != 1.0:
        kd_exp, ce_exp = torch.mul(shifted, 1.0 / t, out=w.ea).exp_(), shifted.exp_()
        sums.append(ce_exp.sum(-1, keepdim=True))
    else:
        kd_exp = (shifted if t == 1.0 else shifted.mul_(1.0 / t)).exp_()
        ce_exp = kd_exp if ce_targets is not None else None
    sums.append(kd_exp.sum(-1, keepdim=True))
    stats = torch.cat(sums, dim=1)
    if cfg.group is not None:
        dist.all_reduce(stats, group=cfg.group)
    k = targets.ids.shape[1]
    log_z = stats[:, -1].log()
    log_q = stats[:, :k] - log_z[:, None]
    ce_per_token = None
    if ce_targets is not None:
        z_ce = stats[:, -2] if ce_exp is not kd_exp else stats[:, -1]
        ce_per_token = z_ce.log() - stats[:, k]
    kd_per_token = targets.neg_entropy - (targets.weights * log_q).sum(-1)
    ratio = None
    if targets.tail is not None:
        q_top = log_q.exp()
        # 1 - S, kept above 0 where rounding would reach it (a tail the student has all but emptied).
        log_rest = torch.log1p(-q_top.sum(-1).clamp(max=1.0 - torch.finfo(q_top.dtype).eps))
        has_tail = targets.tail > 0
        kd_per_token = kd_per_token - torch.where(has_tail, targets.tail * log_rest, torch.zeros_like(log_rest))
        ratio = torch.where(has_tail, targets.tail * torch.exp(-log_rest), torch.zeros_like(log_rest))
    kd_per_token = kd_per_token * t * t
    if not cfg.needs_grad:
        return ce_per_token, kd_per_token, None
    # KD: kd_scale T (q - target), target being w at the cached ids and, for topk, m q / (1 - S) everywhere else.
    # CE: ce_scale (p - onehot(label)).
    kd_row = cfg.kd_scale * t * torch.exp(-log_z)
    if ratio is not None:
        kd_row = kd_row * (1.0 - ratio)
    if ce_exp is None:
        grad = kd_exp.mul_(kd_row[:, None])
    elif ce_exp is kd_exp:
        grad = kd_exp.mul_((kd_row + cfg.ce_scale / stats[:, -1])[:, None])
    else:
        grad = ce_exp.mul_((cfg.ce_scale / stats[:, -2])[:, None]).addcmul_(kd_exp, kd_row[:, None])
    correction = -targets.weights
    if ratio is not None:
        correction = correction + q_top * ratio[:, None]
    grad.scatter_add_(1, column, correction.masked_fill_(~owned, 0.0) * (cfg.kd_scale * t))
    if ce_targets is not None:
        grad.scatter_add_(1, ce_column, ce_owned.to(grad.dtype)[:, None] * -cfg.ce_scale)
    return ce_per_token, kd_per_token, grad
