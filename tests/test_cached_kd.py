"""Spec for KD against a cached teacher (``distillation/cached_kd.py`` inside ``FusedLinearKDLoss``): a ``topk``
entry covering the whole vocabulary is forward KL itself; a shorter one is the exact KL of its k+1 buckets;
``sampled`` entries give an unbiased gradient (checked statistically over many seeds) where a ``topk`` entry of
the same size on disk does not; values and gradients match on 2 gloo ranks with the vocabulary sharded."""

import pytest
import torch
import torch.nn.functional as F

from conftest import leave_rank, spawn_ranks
from distillation.cached_kd import (WEIGHT_UNITS, SparseTargets, draw_offsets, sample_generator, sampled_targets,
                                    topk_targets)
from distillation.fused_linear_kd import FusedLinearKDLoss
from test_fused_linear_kd import IGNORE, assert_close, make_problem, reference, run

TP_SIZE = 2


def teacher_logits(h_t, w_t, labels):
    """``[label tokens, vocab]`` teacher logits, in the loss's row order."""
    logits = (h_t.reshape(-1, h_t.shape[-1]) @ w_t.T)
    return logits[labels.reshape(-1) != IGNORE]


def bucket_reference(h_s, w_s, targets: SparseTargets, labels, *, temperature, kd_ratio):
    """float64 ``(loss, ce, kd, grad_h_s, grad_w_s)`` with KD written out: the KL of the k+1 buckets (top ids, rest)."""
    h_s = h_s.detach().double().requires_grad_()
    w_s = w_s.detach().double().requires_grad_()
    logits = (h_s @ w_s.T).reshape(-1, w_s.shape[0])
    valid = labels.reshape(-1) != IGNORE
    n = max(int(valid.sum()), 1)
    ce = F.cross_entropy(logits[valid], labels.reshape(-1)[valid], reduction="sum") / n
    log_q = F.log_softmax(logits[valid] / temperature, dim=-1)
    w = targets.weights.double()
    q_top = log_q.gather(1, targets.ids).exp()
    kl = (w * (w.log() - q_top.log())).sum(-1)
    tail = targets.tail.double()
    kl = kl + torch.where(tail > 0, tail * (tail.log() - torch.log1p(-q_top.sum(-1))), torch.zeros_like(tail))
    kd = kl.sum() * temperature**2 / n
    loss = (1 - kd_ratio) * ce + kd_ratio * kd
    loss.backward()
    ce = ce.detach() if kd_ratio < 1 else torch.zeros((), dtype=torch.float64)  # skipped at kd_ratio 1
    return loss.detach(), ce, kd.detach(), h_s.grad, w_s.grad


def cached_run(h_s, w_s, targets, labels, *, temperature, kd_ratio, chunk_size=4, tp_group=None):
    loss_fn = FusedLinearKDLoss(temperature=temperature, kd_ratio=kd_ratio, chunk_size=chunk_size, tp_group=tp_group)
    return run(loss_fn, h_s, w_s, None, None, labels, teacher_targets=targets)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_over_the_whole_vocabulary_equals_online_forward_kl(temperature):
    h_s, w_s, h_t, w_t, labels = make_problem(3, 7, vocab=24, dtype=torch.float64)
    targets = topk_targets(teacher_logits(h_t, w_t, labels), 24, temperature)
    assert targets.tail.abs().max() < 1e-15
    ours = cached_run(h_s, w_s, targets, labels, temperature=temperature, kd_ratio=0.5)
    assert_close(ours, reference(h_s, w_s, h_t, w_t, labels, temperature=temperature, kd_ratio=0.5), rtol=1e-10)


@pytest.mark.parametrize("temperature", [1.0, 1.5])
@pytest.mark.parametrize("kd_ratio", [0.5, 1.0])
@pytest.mark.parametrize("k", [1, 5])
def test_topk_below_the_vocabulary_is_the_kl_of_its_buckets(k, kd_ratio, temperature):
    h_s, w_s, h_t, w_t, labels = make_problem(2, 9, vocab=30, dtype=torch.float64)
    targets = topk_targets(teacher_logits(h_t, w_t, labels), k, temperature)
    assert (targets.weights.sum(-1) + targets.tail - 1).abs().max() < 1e-12
    ours = cached_run(h_s, w_s, targets, labels, temperature=temperature, kd_ratio=kd_ratio, chunk_size=5)
    reference = bucket_reference(h_s, w_s, targets, labels, temperature=temperature, kd_ratio=kd_ratio)
    assert_close(ours, reference, rtol=1e-10)


def sampled(logits: torch.Tensor, k: int, seed: int, temperature: float = 1.0) -> SparseTargets:
    """``sampled_targets`` with the uniforms of ``torch.Generator().manual_seed(seed)``."""
    uniforms = draw_offsets(torch.Generator().manual_seed(seed), logits.shape[0], logits.dtype)
    return sampled_targets(logits, k, temperature, *uniforms)


def test_sampled_entries_are_k_distinct_ids_whose_weights_add_up_to_one_on_the_uint8_grid():
    logits = torch.randn(50, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    targets = sampled(logits, 12, seed=2)
    units = targets.weights * WEIGHT_UNITS
    assert torch.equal(units, units.round())
    assert torch.equal(units.sum(-1), torch.full((50,), float(WEIGHT_UNITS), dtype=torch.float64))
    for ids, w in zip(targets.ids, targets.weights):
        assert ids.unique().numel() == 12
    p = logits.softmax(-1)
    torch.testing.assert_close(targets.neg_entropy, (p * p.log()).sum(-1))


def head_size(p: torch.Tensor, k: int) -> int:
    """Tokens of one row that a size-k sample with inclusion probabilities min(1, c p) keeps for certain, counted
    one at a time from the most likely: the i-th is certain when (k - i - 1) p_i is at least the mass after it."""
    ordered = p.sort(descending=True).values.tolist()
    h, rest = 0, 1.0
    while h < k and (k - h - 1) * ordered[h] >= rest - ordered[h]:
        rest -= ordered[h]
        h += 1
    return h


def test_sampled_head_keeps_exact_probabilities_and_each_draw_weighs_the_rest_over_the_remaining_slots():
    """The certain tokens carry their own p, each of the other k - h slots (the rest's mass) / (k - h), to the
    uint8 grid; over seeds every token's mean weight is its p."""
    logits = torch.randn(30, 40, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 2
    p = logits.softmax(-1)
    samples = [sampled(logits, 12, seed) for seed in range(2000)]
    grid = 1.0 / WEIGHT_UNITS
    heads = [head_size(row, 12) for row in p]
    assert 0 < sum(heads) < 12 * len(heads)  # the case has heads and draws
    for targets in samples[:20]:
        for row, ids, w, h in zip(p, targets.ids, targets.weights, heads):
            top = row.topk(h).indices
            assert torch.equal(ids[:h], top)
            torch.testing.assert_close(w[:h], row[top], rtol=0, atol=grid)
            rest = 1.0 - row[top].sum()
            torch.testing.assert_close(w[h:], torch.full((12 - h,), float(rest) / (12 - h), dtype=w.dtype),
                                       rtol=0, atol=grid)
    dense = torch.stack([torch.zeros_like(p).scatter_add_(1, t.ids, t.weights) for t in samples])
    torch.testing.assert_close(dense.mean(0), p, rtol=0, atol=0.004)


def test_a_sampled_row_depends_on_its_own_logits_and_uniforms_only():
    """The cache builder splits a batch's rows over TP ranks: any split must give the same entries."""
    logits = torch.randn(9, 40, generator=torch.Generator().manual_seed(5)) * 2
    offsets, rounding = draw_offsets(torch.Generator().manual_seed(6), 9)
    whole = sampled_targets(logits, 12, 1.0, offsets, rounding)
    parts = [sampled_targets(logits[rows], 12, 1.0, offsets[rows], rounding[rows])
             for rows in (slice(0, 4), slice(4, 9))]
    for name in ("ids", "weights", "neg_entropy"):
        assert torch.equal(getattr(whole, name), torch.cat([getattr(p, name) for p in parts]))


def test_sample_generator_depends_on_the_key_and_seed_only():
    def draws(key, seed):
        return torch.randint(0, 1000, (8,), generator=sample_generator(key, seed))

    assert torch.equal(draws(b"sample-a", 0), draws(b"sample-a", 0))
    assert not torch.equal(draws(b"sample-a", 0), draws(b"sample-b", 0))
    assert not torch.equal(draws(b"sample-a", 0), draws(b"sample-a", 1))


def test_sampled_gradient_is_unbiased_where_topk_of_the_same_size_is_not():
    """Over 400 seeds the mean sampled (k=12) gradient lies within 5 standard errors of online KD's in every entry;
    topk at the same bytes per token (k=7: 8 bytes a slot against 5) is off by more than 20 of them somewhere."""
    h_s, w_s, h_t, w_t, labels = make_problem(2, 5, vocab=40, dtype=torch.float64, seed=3)
    w_t = w_t * 0.5  # a flat teacher: its top 7 tokens leave much of the mass out
    logits_t = teacher_logits(h_t, w_t, labels)
    online = reference(h_s, w_s, h_t, w_t, labels, temperature=1.0, kd_ratio=1.0)[4]
    grads = torch.stack([
        cached_run(h_s, w_s, sampled(logits_t, 12, seed), labels,
                   temperature=1.0, kd_ratio=1.0)[4]
        for seed in range(400)])
    stderr = grads.std(0) / 400**0.5 + 1e-12
    assert ((grads.mean(0) - online).abs() / stderr).max() < 5.0
    topk = cached_run(h_s, w_s, topk_targets(logits_t, 7, 1.0), labels, temperature=1.0, kd_ratio=1.0)[4]
    assert ((topk - online).abs() / stderr).max() > 20.0


def test_other_divergences_are_refused_with_a_cached_teacher():
    h_s, w_s, h_t, w_t, labels = make_problem(2, 3, vocab=10)
    targets = topk_targets(teacher_logits(h_t, w_t, labels), 3, 1.0)
    with pytest.raises(ValueError, match="a cached teacher gives forward KL only, not reverse_kl"):
        FusedLinearKDLoss(divergence="reverse_kl")(h_s, w_s, None, None, labels, teacher_targets=targets)


def test_an_entry_count_that_differs_from_the_label_tokens_is_refused():
    h_s, w_s, h_t, w_t, labels = make_problem(2, 3, vocab=10)
    targets = topk_targets(teacher_logits(h_t, w_t, labels)[:-1], 3, 1.0)
    with pytest.raises(ValueError, match="3 cached teacher entries for 4 label tokens"):
        FusedLinearKDLoss()(h_s, w_s, None, None, labels, teacher_targets=targets)


# --------------------------------------------------------------------------- two ranks, vocabulary sharded

# case: (kind, k, temperature); at T == 1 CE and KD share one softmax, elsewhere each has its own.
TP_CASES = {"topk_whole_vocab": ("topk", 26, 2.0), "topk_6": ("topk", 6, 2.0), "sampled_12": ("sampled", 12, 2.0),
            "topk_6_t1": ("topk", 6, 1.0), "sampled_12_t1": ("sampled", 12, 1.0)}


def _tp_case(kind: str, k: int, temperature: float):
    h_s, w_s, h_t, w_t, labels = make_problem(3, 5, vocab=26, seed=k)
    logits_t = teacher_logits(h_t, w_t, labels)
    if kind == "topk":
        return h_s, w_s, topk_targets(logits_t, k, temperature), labels
    return h_s, w_s, sampled(logits_t, k, seed=k, temperature=temperature), labels


def _tp_worker(rank: int, port: int, out_dir: str):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=TP_SIZE)
    results = {}
    for case, (kind, k, temperature) in TP_CASES.items():
        h_s, w_s, targets, labels = _tp_case(kind, k, temperature)
        whole = [t.double() for t in cached_run(h_s, w_s, targets, labels, temperature=temperature, kd_ratio=0.5)]
        ours = cached_run(h_s, w_s.chunk(TP_SIZE)[rank].clone(), targets, labels, temperature=temperature,
                          kd_ratio=0.5, tp_group=dist.group.WORLD)
        try:
            assert_close(ours, (*whole[:4], whole[4].chunk(TP_SIZE)[rank]))
            results[case] = None
        except AssertionError as e:
            results[case] = str(e).splitlines()[0]
    leave_rank(rank, out_dir, results)


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    return spawn_ranks(_tp_worker, tmp_path_factory.mktemp("cached_tp"), TP_SIZE)


@pytest.mark.parametrize("case", list(TP_CASES))
def test_tensor_parallel_cached_kd_matches_one_process(tp_results, case):
    assert [results[case] for results in tp_results] == [None] * TP_SIZE
