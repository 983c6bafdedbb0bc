"""Spec for ``fused_linear_kd.FusedLinearKDLoss``: the value and the gradients of the student's hidden states
and LM-head weight are checked against a float64 reference written the obvious way (logits = h @ W.T,
cross-entropy and log-softmax KL sums), against today's unfused path (``loss.KDLoss`` + AutoModel's
``MaskedCrossEntropy`` on materialised logits), on 2 gloo ranks with the vocabulary sharded, and for the
one thing the fusion is for: no ``[tokens, vocab]`` tensor is ever created."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distillation.fused_linear_kd import FusedLinearKDLoss  # noqa: E402
from conftest import leave_rank, spawn_ranks  # noqa: E402
from loss import KDLoss  # noqa: E402

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
IGNORE = -100


# --------------------------------------------------------------------------- reference and helpers


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p || q) from log-probabilities."""
    return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)


def reference_terms(h_s, w_s, h_t, w_t, labels, *, temperature=1.0, divergence="forward_kl", beta=0.5,
                    num_batch_labels=None):
    """float64 ``(ce, kd)`` of the full, unsharded problem, differentiable w.r.t. ``h_s`` and ``w_s``."""
    logits = (h_s.double() @ w_s.double().T).reshape(-1, w_s.shape[0])
    labels = labels.reshape(-1)
    valid = labels != IGNORE
    denominator = num_batch_labels if num_batch_labels is not None else max(int(valid.sum()), 1)
    ce = F.cross_entropy(logits[valid], labels[valid], reduction="sum") / denominator
    if h_t is None:
        return ce, torch.zeros((), dtype=torch.float64)
    teacher = (h_t.double() @ w_t.double().T).reshape(-1, w_t.shape[0])
    log_p_s = F.log_softmax(logits[valid] / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher[valid] / temperature, dim=-1)
    if divergence == "forward_kl":
        per_token = _kl_rows(log_p_t, log_p_s)
    elif divergence == "reverse_kl":
        per_token = _kl_rows(log_p_s, log_p_t)
    else:
        log_m = (beta * log_p_t.exp() + (1 - beta) * log_p_s.exp()).log()
        per_token = beta * _kl_rows(log_p_t, log_m) + (1 - beta) * _kl_rows(log_p_s, log_m)
    return ce, per_token.sum() * temperature**2 / denominator


def reference(h_s, w_s, h_t, w_t, labels, *, kd_ratio=0.5, **kwargs):
    """float64 ``(loss, ce, kd, grad_h_s, grad_w_s)``."""
    h_s = h_s.detach().double().requires_grad_()
    w_s = w_s.detach().double().requires_grad_()
    ce, kd = reference_terms(h_s, w_s, h_t if kd_ratio > 0 else None, w_t, labels, **kwargs)
    loss = (1 - kd_ratio) * ce + kd_ratio * kd
    loss.backward()
    ce = ce.detach() if kd_ratio < 1 else torch.zeros((), dtype=torch.float64)
    return loss.detach(), ce, kd.detach(), h_s.grad, w_s.grad


def run(loss_fn, h_s, w_s, h_t, w_t, labels, **kwargs):
    """Our ``(loss, ce, kd, grad_h_s, grad_w_s)``, on fresh leaves so gradients never accumulate across calls."""
    h_s = h_s.detach().clone().requires_grad_()
    w_s = w_s.detach().clone().requires_grad_()
    loss, ce, kd = loss_fn(h_s, w_s, h_t, w_t, labels, **kwargs)
    loss.backward()
    return loss.detach(), ce, kd, h_s.grad, w_s.grad


def assert_close(ours, ref, rtol=1e-5):
    """Values to ``rtol``; gradients on the scale of their largest entry (they span many orders of magnitude)."""
    for value, ref_value in zip(ours[:3], ref[:3]):
        assert not value.isnan()
        torch.testing.assert_close(value.double(), ref_value.double(), rtol=rtol, atol=rtol * 1e-3)
    for grad, ref_grad in zip(ours[3:], ref[3:]):
        assert grad.shape == ref_grad.shape and not grad.isnan().any()
        scale = max(ref_grad.abs().max().item(), 1e-30)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=rtol * scale)


def make_problem(*shape, vocab, hidden=8, teacher_hidden=6, seed=0, dtype=torch.float32, masked=True):
    """Hidden states ``[*shape, H]``, LM-head weights ``[vocab, H]`` and labels with every third token ignored."""
    gen = torch.Generator().manual_seed(seed)
    h_s = torch.randn(*shape, hidden, generator=gen).to(dtype)
    w_s = torch.randn(vocab, hidden, generator=gen).mul(0.6).to(dtype)
    h_t = torch.randn(*shape, teacher_hidden, generator=gen).to(dtype)
    w_t = torch.randn(vocab, teacher_hidden, generator=gen).mul(0.9).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=gen)
    if masked:
        labels.view(-1)[::3] = IGNORE
    return h_s, w_s, h_t, w_t, labels


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op returns (``out=`` buffers included) and every output shape."""

    def __init__(self):
        super().__init__()
        self.max_numel, self.shapes = 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
                self.shapes.add(tuple(t.shape))
        return out


# --------------------------------------------------------------------------- single process


@pytest.mark.parametrize("kd_ratio", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_value_and_gradients_match_fp64_reference(divergence, temperature, kd_ratio):
    problem = make_problem(13, vocab=37)  # 13 tokens in chunks of 4: the last chunk is partial
    options = {"temperature": temperature, "divergence": divergence, "beta": 0.3}
    ours = run(FusedLinearKDLoss(kd_ratio=kd_ratio, chunk_size=4, **options), *problem)
    assert_close(ours, reference(*problem, kd_ratio=kd_ratio, **options))


def test_batch_by_sequence_hidden_states_get_a_gradient_of_the_same_shape():
    problem = make_problem(3, 5, vocab=30)
    ours = run(FusedLinearKDLoss(temperature=2.0, chunk_size=4), *problem)
    assert ours[3].shape == (3, 5, 8)
    assert_close(ours, reference(*problem, temperature=2.0))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_chunk_sizes_that_do_not_divide_the_token_count_give_the_same_result(divergence):
    problem = make_problem(17, vocab=33)
    ref = reference(*problem, divergence=divergence, temperature=1.5)
    for chunk_size in (1, 3, 5, 7, 10_000, None):
        loss_fn = FusedLinearKDLoss(divergence=divergence, temperature=1.5, chunk_size=chunk_size)
        assert_close(run(loss_fn, *problem), ref)


def test_ignored_tokens_do_not_count_and_get_zero_hidden_gradient():
    h_s, w_s, h_t, w_t, labels = make_problem(4, 6, vocab=30)
    ignored = labels == IGNORE
    ours = run(FusedLinearKDLoss(chunk_size=5), h_s, w_s, h_t, w_t, labels)
    assert_close(ours, reference(h_s, w_s, h_t, w_t, labels))
    assert (ours[3][ignored] == 0).all() and (ours[3][~ignored] != 0).any()
    scrambled = h_s.clone()
    scrambled[ignored] = torch.randn_like(scrambled[ignored]) * 10
    assert run(FusedLinearKDLoss(chunk_size=5), scrambled, w_s, h_t, w_t, labels)[0] == ours[0]


@pytest.mark.parametrize("kd_ratio", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_all_tokens_ignored_gives_connected_zeros_with_zero_gradients(divergence, kd_ratio):
    h_s, w_s, h_t, w_t, labels = make_problem(2, 5, vocab=16)
    labels.fill_(IGNORE)
    h_s.requires_grad_(), w_s.requires_grad_()
    loss, ce, kd = FusedLinearKDLoss(divergence=divergence, kd_ratio=kd_ratio)(h_s, w_s, h_t, w_t, labels)
    assert loss.requires_grad and loss.item() == ce.item() == kd.item() == 0.0
    loss.backward()
    assert (h_s.grad == 0).all() and (w_s.grad == 0).all()


@pytest.mark.parametrize("as_tensor", [False, True], ids=["int", "tensor"])
def test_num_batch_labels_divides_both_terms(as_tensor):
    problem = make_problem(2, 8, vocab=30)
    num_batch_labels = torch.tensor(37) if as_tensor else 37
    ours = run(FusedLinearKDLoss(temperature=2.0, chunk_size=3), *problem, num_batch_labels=num_batch_labels)
    assert_close(ours, reference(*problem, temperature=2.0, num_batch_labels=37))


def test_num_batch_labels_zero_gives_zero_like_masked_cross_entropy():
    # The recipe's count covers the whole optimizer step; 0 means no rank has a label, and must not give NaN.
    h_s, w_s, h_t, w_t, labels = make_problem(6, vocab=12)
    labels.fill_(IGNORE)
    loss, ce, kd, grad_h, grad_w = run(FusedLinearKDLoss(), h_s, w_s, h_t, w_t, labels, num_batch_labels=0)
    assert loss.item() == ce.item() == kd.item() == 0.0
    assert (grad_h == 0).all() and (grad_w == 0).all()


def test_kd_ratio_zero_needs_no_teacher():
    h_s, w_s, _, _, labels = make_problem(11, vocab=25)
    ours = run(FusedLinearKDLoss(kd_ratio=0.0, chunk_size=4), h_s, w_s, None, None, labels)
    assert ours[2].item() == 0.0
    assert_close(ours, reference(h_s, w_s, None, None, labels, kd_ratio=0.0))


def test_kd_ratio_one_skips_cross_entropy_so_the_labels_only_mask():
    h_s, w_s, h_t, w_t, labels = make_problem(12, vocab=25)
    ours = run(FusedLinearKDLoss(kd_ratio=1.0), h_s, w_s, h_t, w_t, labels)
    relabelled = torch.where(labels == IGNORE, labels, (labels + 7) % 25)
    assert ours[1].item() == 0.0
    assert run(FusedLinearKDLoss(kd_ratio=1.0), h_s, w_s, h_t, w_t, relabelled)[0] == ours[0]


def test_tied_embedding_weight_gets_the_sum_of_both_gradients():
    vocab, hidden, tokens = 29, 8, 14
    gen = torch.Generator().manual_seed(3)
    embedding = torch.randn(vocab, hidden, generator=gen) * 0.6
    mix = torch.randn(hidden, hidden, generator=gen) * 0.5
    input_ids = torch.randint(0, vocab, (tokens,), generator=gen)
    _, _, h_t, w_t, labels = make_problem(tokens, vocab=vocab, seed=3)

    def student_hidden(weight):  # the same weight embeds the inputs and projects the outputs
        return torch.tanh(weight[input_ids] @ mix.to(weight.dtype))

    tied = torch.nn.Parameter(embedding.clone())
    loss, *_ = FusedLinearKDLoss(temperature=2.0, chunk_size=4)(student_hidden(tied), tied, h_t, w_t, labels)
    loss.backward()

    tied64 = embedding.double().requires_grad_()
    ce, kd = reference_terms(student_hidden(tied64), tied64, h_t, w_t, labels, temperature=2.0)
    (0.5 * ce + 0.5 * kd).backward()
    head_only = reference(student_hidden(embedding).detach(), embedding, h_t, w_t, labels, temperature=2.0)[4]
    assert not torch.allclose(tied64.grad, head_only, atol=1e-3)  # the embedding path does contribute
    torch.testing.assert_close(tied.grad.double(), tied64.grad, rtol=1e-5, atol=1e-5 * tied64.grad.abs().max().item())


@pytest.mark.parametrize("num_batch_labels", [None, 40], ids=["per_batch", "num_batch_labels"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_equals_unfused_kdloss_plus_automodel_masked_cross_entropy(divergence, num_batch_labels):
    from nemo_automodel.components.loss.masked_ce import MaskedCrossEntropy

    h_s, w_s, h_t, w_t, labels = make_problem(3, 7, vocab=41, seed=5)
    kd_ratio, options = 0.4, {"temperature": 2.0, "divergence": divergence, "beta": 0.3}
    # MaskedCrossEntropy without num_label_tokens returns the SUM; the recipe always passes the count.
    count = num_batch_labels if num_batch_labels is not None else int((labels != IGNORE).sum())

    leaf_h, leaf_w = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
    logits = leaf_h @ leaf_w.T
    kd = KDLoss(**options)(logits, h_t @ w_t.T, labels, num_batch_labels=num_batch_labels)
    ce = MaskedCrossEntropy()(logits, labels, num_label_tokens=count)
    ((1 - kd_ratio) * ce + kd_ratio * kd).backward()
    unfused = ((1 - kd_ratio) * ce + kd_ratio * kd).detach(), ce.detach(), kd.detach(), leaf_h.grad, leaf_w.grad

    ours = run(FusedLinearKDLoss(kd_ratio=kd_ratio, chunk_size=5, **options), h_s, w_s, h_t, w_t, labels,
               num_batch_labels=num_batch_labels)
    assert_close(ours, tuple(t.double() for t in unfused))


def test_jsd_beta_endpoints_are_forward_and_reverse_kl():
    problem = make_problem(12, vocab=20)
    for beta, divergence in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        ours = run(FusedLinearKDLoss(divergence="jsd", beta=beta, chunk_size=5), *problem)
        assert_close(ours, reference(*problem, divergence=divergence))


def test_bf16_inputs_are_computed_in_fp32_and_get_bf16_gradients():
    problem = make_problem(3, 8, vocab=64, dtype=torch.bfloat16)
    ours = run(FusedLinearKDLoss(divergence="jsd", temperature=2.0, chunk_size=5), *problem)
    assert all(t.dtype == torch.float32 for t in ours[:3]) and all(t.dtype == torch.bfloat16 for t in ours[3:])
    # The logits are rounded to bf16 as the LM head rounds them; the reference sees unrounded products.
    assert_close(ours, reference(*problem, divergence="jsd", temperature=2.0), rtol=2e-2)


def test_backward_only_scales_the_stored_gradients():
    h_s, w_s, h_t, w_t, labels = make_problem(9, vocab=21)
    h_s.requires_grad_(), w_s.requires_grad_()
    loss, ce, kd = FusedLinearKDLoss(chunk_size=4)(h_s, w_s, h_t, w_t, labels)
    # One node between the loss and the leaves (bar the reshape of the hidden states): no graph through the chunks.
    nodes, stack = [], [loss.grad_fn]
    while stack:
        node = stack.pop()
        nodes.append(type(node).__name__)
        stack.extend(f for f, _ in node.next_functions if f is not None)
    assert sorted(nodes) == ["AccumulateGrad", "AccumulateGrad", "ViewBackward0", "_FusedLinearKDFunctionBackward"]
    (2.5 * loss).backward()
    ref = reference(h_s, w_s, h_t, w_t, labels)
    assert_close((loss.detach(), ce, kd, h_s.grad / 2.5, w_s.grad / 2.5), ref)


def test_no_grad_gives_the_value_and_computes_no_gradient():
    problem = make_problem(10, vocab=24)
    with torch.no_grad():
        loss, ce, kd = FusedLinearKDLoss(divergence="reverse_kl", chunk_size=3)(*problem)
    ref = reference(*problem, divergence="reverse_kl")
    assert not loss.requires_grad
    assert_close((loss, ce, kd), ref[:3])


def test_second_backward_through_the_same_loss_raises():
    h_s, w_s, h_t, w_t, labels = make_problem(4, vocab=10)
    loss, *_ = FusedLinearKDLoss()(h_s.requires_grad_(), w_s, h_t, w_t, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_forward_and_backward_never_create_a_tokens_by_vocab_tensor():
    tokens, vocab, hidden, chunk = 4096, 8192, 16, 256
    gen = torch.Generator().manual_seed(0)
    h_s = torch.randn(tokens, hidden, generator=gen).requires_grad_()
    w_s = (torch.randn(vocab, hidden, generator=gen) * 0.3).requires_grad_()
    h_t, w_t = torch.randn(tokens, hidden, generator=gen), torch.randn(vocab, hidden, generator=gen) * 0.3
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    with LargestTensor() as seen:
        loss, *_ = FusedLinearKDLoss(temperature=2.0, chunk_size=chunk)(h_s, w_s, h_t, w_t, labels)
        loss.backward()
    assert seen.max_numel <= chunk * vocab < tokens * vocab // 4
    assert h_s.grad.shape == (tokens, hidden) and w_s.grad.shape == (vocab, hidden)


def test_label_outside_the_vocabulary_raises():
    h_s, w_s, h_t, w_t, labels = make_problem(5, vocab=10)
    labels[1] = 10
    with pytest.raises(ValueError, match=r"label 10 is outside the vocabulary \[0, 10\)"):
        FusedLinearKDLoss()(h_s, w_s, h_t, w_t, labels)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"divergence": "kl"}, "unknown divergence 'kl'; valid choices: forward_kl, reverse_kl, jsd"),
        ({"beta": 1.5}, "beta=1.5 is outside [0, 1]"),
        ({"kd_ratio": 1.2}, "kd_ratio=1.2 is outside [0, 1]"),
        ({"temperature": 0.0}, "temperature=0.0 must be > 0"),
        ({"chunk_size": -2}, "chunk_size=-2 is negative"),
    ],
)
def test_invalid_options_raise_a_one_line_value_error(kwargs, message):
    with pytest.raises(ValueError) as error:
        FusedLinearKDLoss(**kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)


# --------------------------------------------------------------------------- tensor parallel, 2 gloo ranks

TP_SIZE = 2
TP_VOCABS = {"even_18_18": 36, "uneven_19_18": 37}  # torch.chunk's layout
TP_CASES = {
    # name: (FusedLinearKDLoss kwargs, token shape, forward kwargs, how to edit the problem)
    **{
        f"{d}_T{t}_kd{r}": (
            {"divergence": d, "temperature": t, "kd_ratio": r, "beta": 0.3, "chunk_size": c}, (13,), {}, None
        )
        for d in DIVERGENCES
        for t, r, c in ((1.0, 0.5, 4), (2.0, 0.5, None), (2.0, 1.0, 5))
    },
    "ce_only_no_teacher": ({"kd_ratio": 0.0, "chunk_size": 3}, (13,), {}, "no_teacher"),
    "BxS_num_batch_labels": (
        {"divergence": "jsd", "temperature": 1.5, "chunk_size": 4}, (2, 7), {"num_batch_labels": 40}, None
    ),
    "all_masked": ({"chunk_size": 4}, (2, 7), {}, "all_masked"),
}


def _tp_problem(case: str, vocab: int):
    _, shape, _, edit = TP_CASES[case]
    h_s, w_s, h_t, w_t, labels = make_problem(*shape, vocab=vocab, seed=len(case))
    if edit == "all_masked":
        labels.fill_(IGNORE)
    if edit == "no_teacher":
        h_t = w_t = None
    return h_s, w_s, h_t, w_t, labels


def _tp_worker(rank: int, port: int, out_dir: str):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=TP_SIZE)
    results = {}
    for vocab_name, vocab in TP_VOCABS.items():
        for case, (loss_kwargs, _, forward_kwargs, _) in TP_CASES.items():
            h_s, w_s, h_t, w_t, labels = _tp_problem(case, vocab)
            math_kwargs = {k: v for k, v in loss_kwargs.items() if k != "chunk_size"}
            ref = reference(h_s, w_s, h_t, w_t, labels, **math_kwargs, **forward_kwargs)
            rows = w_s.chunk(TP_SIZE, dim=0)[rank]
            w_t_shard = None if w_t is None else w_t.chunk(TP_SIZE, dim=0)[rank].clone()
            loss_fn = FusedLinearKDLoss(tp_group=dist.group.WORLD, **loss_kwargs)
            with LargestTensor() as seen:
                ours = run(loss_fn, h_s, rows.clone(), h_t, w_t_shard, labels, **forward_kwargs)
            values = [torch.zeros(3, dtype=ours[0].dtype) for _ in range(TP_SIZE)]
            dist.all_gather(values, torch.stack(ours[:3]))
            # This rank's rows of the weight gradient; the hidden-state gradient is the full one.
            ref_shard = (*ref[:4], ref[4].chunk(TP_SIZE, dim=0)[rank])
            try:
                assert_close(ours, ref_shard)
                error = None
            except AssertionError as e:
                error = str(e).splitlines()[0] + " ..."
            results[f"{vocab_name}-{case}"] = {
                "error": error,
                "same_values_on_all_ranks": all(bool((v == values[0]).all()) for v in values),
                "full_vocab_shapes": sorted(s for s in seen.shapes if vocab in s),
            }
    leave_rank(rank, out_dir, results)


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    """Run every TP case once in a single 2-rank gloo group; a crashed rank fails every TP test."""
    return spawn_ranks(_tp_worker, tmp_path_factory.mktemp("tp"), TP_SIZE)


@pytest.mark.parametrize("case", list(TP_CASES))
@pytest.mark.parametrize("vocab", list(TP_VOCABS))
def test_tensor_parallel_loss_hidden_gradient_and_weight_shard_match_full_reference(tp_results, vocab, case):
    for rank, results in enumerate(tp_results):
        result = results[f"{vocab}-{case}"]
        assert result["error"] is None, f"rank {rank}: {result['error']}"
        assert result["same_values_on_all_ranks"], f"rank {rank}: ranks disagree on the loss values"
        assert result["full_vocab_shapes"] == [], f"rank {rank} created full-vocabulary tensors"
