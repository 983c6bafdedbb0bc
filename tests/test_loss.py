"""Spec for ``loss.KDLoss``: every value and student gradient is checked against a float64 reference
written the obvious way (log-softmax and explicit KL sums), on one process and on 2 gloo ranks with
the vocabulary sharded (plain local shards + ``tp_group``, and DTensor ``Shard(-1)``)."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loss import KDLoss  # noqa: E402
from conftest import leave_rank, spawn_ranks  # noqa: E402

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
IGNORE = -100


# --------------------------------------------------------------------------- reference and helpers


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p || q) from log-probabilities, with 0 log 0 = 0.

    Equal to ``F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)`` for finite
    inputs; written out so that -inf entries give 0 instead of NaN (in value and gradient).
    """
    p = log_p.exp()
    return (p * torch.where(p > 0, log_p - log_q, 0.0)).sum(-1)


def reference(student, teacher, labels, *, temperature=1.0, divergence="forward_kl", beta=0.5, num_batch_labels=None):
    """float64 value and student gradient of the full, unsharded problem."""
    student = student.detach().double().requires_grad_()
    vocab = student.shape[-1]
    valid = labels.reshape(-1) != IGNORE
    log_p_s = F.log_softmax(student.reshape(-1, vocab)[valid] / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher.double().reshape(-1, vocab)[valid] / temperature, dim=-1)
    if divergence == "forward_kl":
        per_token = _kl_rows(log_p_t, log_p_s)
    elif divergence == "reverse_kl":
        per_token = _kl_rows(log_p_s, log_p_t)
    else:
        m = beta * log_p_t.exp() + (1 - beta) * log_p_s.exp()
        log_m = torch.where(m > 0, m, 1.0).log()
        per_token = beta * _kl_rows(log_p_t, log_m) + (1 - beta) * _kl_rows(log_p_s, log_m)
    denominator = num_batch_labels if num_batch_labels is not None else max(int(valid.sum()), 1)
    loss = per_token.sum() * temperature**2 / denominator
    loss.backward()
    return loss.detach(), student.grad


def run(loss_fn, student, teacher, labels, **kwargs):
    """Our value and student gradient (a fresh leaf, so gradients never accumulate across calls)."""
    student = student.detach().clone().requires_grad_()
    loss = loss_fn(student, teacher, labels, **kwargs)
    loss.backward()
    return loss.detach(), student.grad


def assert_close_to_reference(value, grad, ref_value, ref_grad, rtol=1e-5):
    assert not value.isnan() and not grad.isnan().any()
    torch.testing.assert_close(value.double(), ref_value, rtol=rtol, atol=rtol * 1e-3)
    # Gradient entries span many orders of magnitude; compare on the scale of the largest one.
    torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=rtol * ref_grad.abs().max().item())


def make_batch(*shape, vocab, seed=0, dtype=torch.float32, masked=True):
    """Random student/teacher logits of shape ``[*shape, vocab]`` and labels with a few ignored tokens."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(*shape, vocab, generator=gen).mul(2).to(dtype)
    teacher = torch.randn(*shape, vocab, generator=gen).mul(3).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=gen)
    if masked:
        labels.view(-1)[::3] = IGNORE
    return student, teacher, labels


# --------------------------------------------------------------------------- single process


@pytest.mark.parametrize("shape", [(3, 7), (21,)], ids=["BxSxV", "NxV"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_value_and_gradient_match_fp64_reference(divergence, temperature, shape):
    student, teacher, labels = make_batch(*shape, vocab=50)
    loss_fn = KDLoss(temperature=temperature, divergence=divergence, beta=0.3)
    value, grad = run(loss_fn, student, teacher, labels)
    ref = reference(student, teacher, labels, temperature=temperature, divergence=divergence, beta=0.3)
    assert grad.shape == student.shape
    assert_close_to_reference(value, grad, *ref)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_identical_logits_give_zero_loss_and_zero_gradient(divergence):
    student, _, labels = make_batch(4, 9, vocab=40)
    value, grad = run(KDLoss(divergence=divergence, temperature=2.0), student, student.clone(), labels)
    assert value.abs() < 1e-6
    assert grad.abs().max() < 1e-6


def test_forward_kl_is_kl_not_cross_entropy():
    # A confident, matching student has near-zero KL but a large cross-entropy (the teacher entropy).
    teacher = torch.zeros(2, 1000)
    value, _ = run(KDLoss(), teacher.clone(), teacher, torch.zeros(2, dtype=torch.long))
    assert value.abs() < 1e-6  # cross-entropy would be log(1000) = 6.9


def test_ignored_tokens_do_not_count_and_get_zero_gradient():
    student, teacher, labels = make_batch(4, 6, vocab=30)
    ignored = labels == IGNORE
    value, grad = run(KDLoss(), student, teacher, labels)
    assert_close_to_reference(value, grad, *reference(student, teacher, labels))
    assert (grad[ignored] == 0).all()
    scrambled = student.clone()
    scrambled[ignored] = torch.randn_like(scrambled[ignored]) * 10
    assert run(KDLoss(), scrambled, teacher, labels)[0] == value


@pytest.mark.parametrize("as_tensor", [False, True], ids=["int", "tensor"])
def test_num_batch_labels_divides_the_token_sum(as_tensor):
    student, teacher, labels = make_batch(2, 8, vocab=30)
    num_batch_labels = torch.tensor(37) if as_tensor else 37
    value, grad = run(KDLoss(temperature=2.0), student, teacher, labels, num_batch_labels=num_batch_labels)
    ref = reference(student, teacher, labels, temperature=2.0, num_batch_labels=37)
    assert_close_to_reference(value, grad, *ref)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_chunked_equals_unchunked(divergence):
    student, teacher, labels = make_batch(5, 9, vocab=33)
    chunk_sizes = (1, 4, 10_000, None)
    results = [run(KDLoss(divergence=divergence, chunk_size=c), student, teacher, labels) for c in chunk_sizes]
    ref = reference(student, teacher, labels, divergence=divergence)
    for value, grad in results:
        assert_close_to_reference(value, grad, *ref)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype, rtol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)], ids=["bf16", "fp16"])
def test_low_precision_logits_are_computed_in_fp32_and_return_gradient_in_input_dtype(dtype, rtol, divergence):
    student, teacher, labels = make_batch(3, 8, vocab=64, dtype=dtype)
    value, grad = run(KDLoss(divergence=divergence, temperature=2.0), student, teacher, labels)
    assert value.dtype == torch.float32 and grad.dtype == dtype
    # The reference sees the same rounded logits, so the value is fp32-accurate; the gradient is rounded once.
    ref_value, ref_grad = reference(student, teacher, labels, divergence=divergence, temperature=2.0)
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=rtol * ref_grad.abs().max().item())


def test_float64_logits_are_not_downcast():
    student, teacher, labels = make_batch(3, 5, vocab=20, dtype=torch.float64)
    value, grad = run(KDLoss(divergence="jsd"), student, teacher, labels)
    assert value.dtype == grad.dtype == torch.float64
    assert_close_to_reference(value, grad, *reference(student, teacher, labels, divergence="jsd"), rtol=1e-12)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_all_tokens_ignored_gives_a_connected_zero_with_zero_gradients(divergence):
    student, teacher, labels = make_batch(2, 5, vocab=16)
    labels.fill_(IGNORE)
    student.requires_grad_()
    loss = KDLoss(divergence=divergence)(student, teacher, labels)
    assert loss.requires_grad and loss.item() == 0.0
    loss.backward()
    assert (student.grad == 0).all()


def test_single_valid_token():
    student, teacher, labels = make_batch(3, 4, vocab=25)
    labels.fill_(IGNORE)
    labels[1, 2] = 7
    value, grad = run(KDLoss(temperature=1.5), student, teacher, labels)
    assert_close_to_reference(value, grad, *reference(student, teacher, labels, temperature=1.5))
    assert (grad.abs().sum(-1) > 0).sum() == 1


@pytest.mark.parametrize(
    "divergence, who",
    [
        ("forward_kl", "both"),
        ("forward_kl", "teacher"),
        ("reverse_kl", "both"),
        ("reverse_kl", "student"),
        ("jsd", "both"),
        ("jsd", "teacher"),
        ("jsd", "student"),
    ],
)
def test_minus_inf_logits_in_padded_vocab_entries_give_no_nan(divergence, who):
    # Only the combinations with a finite divergence: p_t > 0 where p_s = 0 makes forward KL infinite.
    student, teacher, labels = make_batch(3, 4, vocab=24)
    if who in ("both", "student"):
        student[..., -5:] = float("-inf")
    if who in ("both", "teacher"):
        teacher[..., -5:] = float("-inf")
    value, grad = run(KDLoss(divergence=divergence, chunk_size=5), student, teacher, labels)
    assert_close_to_reference(value, grad, *reference(student, teacher, labels, divergence=divergence))
    if who != "teacher":
        assert (grad[..., -5:] == 0).all()


def test_jsd_beta_endpoints_are_forward_and_reverse_kl():
    # The generalised JSD is identically 0 at beta in {0, 1}; like TRL's GKD those endpoints mean the two KLs.
    student, teacher, labels = make_batch(2, 6, vocab=20)
    for beta, divergence in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        value, grad = run(KDLoss(divergence="jsd", beta=beta), student, teacher, labels)
        assert_close_to_reference(value, grad, *reference(student, teacher, labels, divergence=divergence))


def test_matches_automodel_kdloss_for_forward_kl():
    from nemo_automodel.components.loss.kd_loss import KDLoss as AutoModelKDLoss

    student, teacher, labels = make_batch(3, 10, vocab=70)
    for kwargs in ({}, {"num_batch_labels": 50}):
        ours = run(KDLoss(temperature=2.0), student, teacher, labels, **kwargs)
        theirs = run(AutoModelKDLoss(temperature=2.0), student, teacher, labels, **kwargs)
        torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ours[1], theirs[1], rtol=1e-4, atol=1e-5 * theirs[1].abs().max().item())


def test_is_a_module_configured_like_automodel_kdloss():
    from nemo_automodel.components.loss.utils import _get_loss_ignore_index

    # The keys kd.yaml passes, plus AutoModel's own chunk_size=0 ("no chunking") which means automatic here.
    loss_fn = KDLoss(ignore_index=-1, temperature=2.0, fp32_upcast=True, tp_group=None, chunk_size=0)
    assert isinstance(loss_fn, torch.nn.Module)
    assert _get_loss_ignore_index(loss_fn) == -1 and loss_fn.temperature == 2.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"divergence": "kl"}, "unknown divergence 'kl'; valid choices: forward_kl, reverse_kl, jsd"),
        ({"divergence": "jsd", "beta": 1.5}, "beta=1.5 is outside [0, 1]"),
        ({"temperature": 0.0}, "temperature=0.0 must be > 0"),
        ({"temperature": -1}, "temperature=-1 must be > 0"),
        ({"chunk_size": -2}, "chunk_size=-2 is negative"),
    ],
)
def test_invalid_options_raise_a_one_line_value_error(kwargs, message):
    with pytest.raises(ValueError) as error:
        KDLoss(**kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_second_backward_through_the_same_loss_raises():
    student, teacher, labels = make_batch(2, 3, vocab=10)
    student.requires_grad_()
    loss = KDLoss()(student, teacher, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


# --------------------------------------------------------------------------- tensor parallel, 2 gloo ranks

TP_SIZE = 2
TP_VOCABS = {"even": 64, "uneven": 61}  # 61 splits 31 / 30, DTensor's torch.chunk layout
TP_CASES = {
    # name: (KDLoss kwargs, batch shape, forward kwargs, how to edit the batch)
    "forward_kl": ({}, (2, 6), {}, None),
    "forward_kl_NxV_chunked_T2": ({"temperature": 2.0, "chunk_size": 5}, (11,), {}, None),
    "reverse_kl_chunked_T1.5": ({"divergence": "reverse_kl", "temperature": 1.5, "chunk_size": 4}, (2, 6), {}, None),
    "jsd_beta0.3_chunked_T2": ({"divergence": "jsd", "beta": 0.3, "temperature": 2, "chunk_size": 3}, (2, 6), {}, None),
    "num_batch_labels": ({"divergence": "jsd"}, (2, 6), {"num_batch_labels": 50}, None),
    "one_valid_token": ({"divergence": "reverse_kl"}, (2, 6), {}, "one_valid"),
    "all_masked": ({}, (2, 6), {}, "all_masked"),
    # The last 40 entries are -inf: rank 1's whole shard and part of rank 0's.
    "padded_vocab_forward_kl": ({"chunk_size": 4}, (2, 6), {}, "pad"),
    "padded_vocab_reverse_kl": ({"divergence": "reverse_kl"}, (2, 6), {}, "pad"),
    "padded_vocab_jsd": ({"divergence": "jsd", "beta": 0.7}, (2, 6), {}, "pad"),
}


def _tp_batch(case: str, vocab: int):
    loss_kwargs, shape, _, edit = TP_CASES[case]
    student, teacher, labels = make_batch(*shape, vocab=vocab, seed=len(case))
    if edit == "one_valid":
        labels.fill_(IGNORE)
        labels.view(-1)[3] = 1
    elif edit == "all_masked":
        labels.fill_(IGNORE)
    elif edit == "pad":
        student[..., -40:] = teacher[..., -40:] = float("-inf")
    return student, teacher, labels


def _tp_worker(rank: int, port: int, out_dir: str):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=TP_SIZE)
    mesh = init_device_mesh("cpu", (TP_SIZE,))

    def gathering_is_forbidden(*args, **kwargs):
        raise AssertionError("KDLoss gathered the full vocabulary")

    DTensor.full_tensor = gathering_is_forbidden

    results = {}
    for vocab_name, vocab in TP_VOCABS.items():
        for kind in ("local", "dtensor"):
            for case, (loss_kwargs, _, forward_kwargs, _) in TP_CASES.items():
                student, teacher, labels = _tp_batch(case, vocab)
                math_kwargs = {k: v for k, v in loss_kwargs.items() if k != "chunk_size"}
                ref_value, ref_grad = reference(student, teacher, labels, **math_kwargs, **forward_kwargs)
                if kind == "local":
                    leaf = student.chunk(TP_SIZE, dim=-1)[rank].clone().requires_grad_()
                    local_teacher = teacher.chunk(TP_SIZE, dim=-1)[rank].clone()
                    loss_fn = KDLoss(tp_group=dist.group.WORLD, **loss_kwargs)
                    loss = loss_fn(leaf, local_teacher, labels, **forward_kwargs)
                else:
                    leaf = distribute_tensor(student, mesh, [Shard(-1)]).requires_grad_()
                    sharded_teacher = distribute_tensor(teacher, mesh, [Shard(-1)])
                    loss = KDLoss(**loss_kwargs)(leaf, sharded_teacher, labels, **forward_kwargs)
                loss.backward()
                grad = leaf.grad.to_local() if kind == "dtensor" else leaf.grad
                values = [torch.zeros(()) for _ in range(TP_SIZE)]
                dist.all_gather(values, loss.detach().float())
                ref_shard = ref_grad.chunk(TP_SIZE, dim=-1)[rank]
                try:
                    assert_close_to_reference(loss.detach(), grad, ref_value, ref_shard)
                    error = None
                except AssertionError as e:
                    error = str(e).splitlines()[0] + " ..."
                results[f"{kind}-{vocab_name}-{case}"] = {
                    "error": error,
                    "same_value_on_all_ranks": all(bool(v == values[0]) for v in values),
                    "plain_tensor_result": not isinstance(loss, DTensor),
                }
    leave_rank(rank, out_dir, results)


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    """Run every TP case once in a single 2-rank gloo group; a crashed rank fails every TP test."""
    return spawn_ranks(_tp_worker, tmp_path_factory.mktemp("tp"), TP_SIZE)


@pytest.mark.parametrize("case", list(TP_CASES))
@pytest.mark.parametrize("vocab", list(TP_VOCABS))
@pytest.mark.parametrize("kind", ["local", "dtensor"], ids=["local_shards+tp_group", "dtensor_Shard(-1)"])
def test_tensor_parallel_value_and_gradient_shard_match_single_process_reference(tp_results, kind, vocab, case):
    for rank, results in enumerate(tp_results):
        result = results[f"{kind}-{vocab}-{case}"]
        assert result["error"] is None, f"rank {rank}: {result['error']}"
        assert result["same_value_on_all_ranks"], f"rank {rank}: ranks disagree on the loss value"
        assert result["plain_tensor_result"]
