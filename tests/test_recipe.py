"""The KD recipe gives the same training whatever the parallelism (2 CPU ranks, gloo, fp32).

One process is the reference. Every run sees the same map-style data in the same order with the
same global batch of 4, so the step-0 loss and grad norm, the loss after 5 steps and the
validation losses must agree. Validation runs after step 3 and after step 5, so the runs also
train on after a validation pass (the case that used to break pipeline parallelism).
"""

import math

import pytest
from transformers import AutoConfig

import flops
from conftest import FP32_COMPUTE, checkpoint_tensors, read_jsonl, tiny_overrides, torchrun
from tools.build_checkpoints import TINY

STEPS = 5
PEAK_TFLOPS = 0.001  # a made-up CPU peak, so that mfu is logged
# name: (processes, overrides); all with global batch 4.
RUNS = {
    "single_process": (1, ["step_scheduler.local_batch_size=4", f"mfu_peak_tflops={PEAK_TFLOPS}"]),
    "single_process_grad_accumulation": (1, ["step_scheduler.local_batch_size=2"]),
    "fsdp2_dp2": (2, ["step_scheduler.local_batch_size=2"]),
    "tp2": (2, ["distributed.tp_size=2", "step_scheduler.local_batch_size=4"]),
    "tp2_sequence_parallel": (2, ["distributed.tp_size=2", "distributed.sequence_parallel=true",
                                  "step_scheduler.local_batch_size=4"]),
    "pp2": (2, ["distributed.pp_size=2", "distributed.pipeline.pp_microbatch_size=2",
                "step_scheduler.local_batch_size=4"]),
}


def kd_run(ckpts, out_dir, nproc, extra, mode="kd"):
    args = [*tiny_overrides(ckpts, "llama", out_dir, steps=STEPS, teacher=mode == "kd"), *FP32_COMPUTE,
            "step_scheduler.val_every_steps=3", "step_scheduler.ckpt_every_steps=100", *extra]
    result = torchrun(["-m", "run", "--mode", mode, *args], nproc=nproc)
    assert result.returncode == 0, result.stderr[-4000:]
    return read_jsonl(out_dir / "training.jsonl"), read_jsonl(out_dir / "validation.jsonl")


def saved_tensor_names(model_dir) -> set[str]:
    from safetensors import safe_open

    names = set()
    for f in model_dir.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            names |= set(st.keys())
    return names


@pytest.fixture(scope="module")
def runs(ckpts, tmp_path_factory):
    """``{name: (training rows, validation rows, checkpoint dir)}`` for every entry of RUNS."""
    out = {}
    for name, (nproc, extra) in RUNS.items():
        out_dir = tmp_path_factory.mktemp(name)
        out[name] = (*kd_run(ckpts, out_dir, nproc, extra), out_dir)
    return out


def test_the_reference_run_trains_logs_every_step_and_validates(runs):
    train, val, _ = runs["single_process"]
    assert [r["step"] for r in train] == list(range(STEPS))
    for r in train:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["kd_loss"] >= 0
        assert r["loss"] == pytest.approx((1 - r["kd_ratio"]) * r["ce_loss"] + r["kd_ratio"] * r["kd_loss"], rel=1e-5)
        assert r["mem"] > 0, "mem must be real on CPU (peak RSS)"
    assert [v["step"] for v in val] == [2, 4]
    assert train[-1]["loss"] < train[0]["loss"]


@pytest.mark.parametrize("name", [n for n in RUNS if n != "single_process"])
def test_step0_loss_and_grad_norm_match_one_process(runs, name):
    ref, got = runs["single_process"][0][0], runs[name][0][0]
    for key in ("loss", "ce_loss", "kd_loss", "grad_norm"):
        assert got[key] == pytest.approx(ref[key], rel=1e-4), key


@pytest.mark.parametrize("name", [n for n in RUNS if n != "single_process"])
def test_loss_after_five_steps_matches_one_process(runs, name):
    ref, got = runs["single_process"][0], runs[name][0]
    assert [r["step"] for r in got] == list(range(STEPS))
    assert got[-1]["loss"] == pytest.approx(ref[-1]["loss"], rel=1e-3)
    assert got[-1]["num_label_tokens"] == ref[-1]["num_label_tokens"]


@pytest.mark.parametrize("name", [n for n in RUNS if n != "single_process"])
def test_validation_losses_match_one_process_pipeline_parallel_included(runs, name):
    ref, got = runs["single_process"][1], runs[name][1]
    assert [v["step"] for v in got] == [v["step"] for v in ref]
    for r, g in zip(ref, got):
        for key in ("val_loss", "ce_loss", "kd_loss"):
            assert g[key] == pytest.approx(r[key], rel=1e-4), (g["step"], key)


def test_mfu_is_kd_step_flops_over_time_and_peak_and_null_without_a_peak(runs, ckpts):
    train = runs["single_process"][0]
    vocab = AutoConfig.from_pretrained(ckpts["llama"]["teacher"]).vocab_size
    hidden, layers = TINY["hidden_size"], TINY["num_hidden_layers"]
    student = (286720.0 + 128 * vocab, 3 * 4 * hidden)  # hand-counted in test_flops.py
    teacher = (layers * 2 * (4 * hidden * hidden + 3 * hidden * TINY["intermediate_size"]) + 2 * hidden * vocab,
               layers * 4 * hidden)
    for r in train:
        flops_per_second = r["mfu"] / 100 * PEAK_TFLOPS * 1e12
        per_token = flops_per_second * (r["num_tokens_per_step"] / r["tps"]) / r["num_tokens_per_step"]
        # The attention term depends on the step's padded length, between 1 and the longest sample.
        shortest = flops.kd_step_flops(student, teacher, tokens=1, seq_len=1)
        longest = flops.kd_step_flops(student, teacher, tokens=1, seq_len=TINY["max_position_embeddings"])
        assert shortest < per_token < longest
    assert all(r["mfu"] is None for r in runs["fsdp2_dp2"][0]), "no peak is known for a CPU"


def test_checkpoints_hold_the_student_only(runs, ckpts):
    out_dir = runs["fsdp2_dp2"][2]
    saved = sorted(out_dir.glob("epoch_*_step_*/model"))
    assert saved, "no checkpoint written"
    assert set(saved_tensor_names(saved[-1])) == set(checkpoint_tensors(ckpts["llama"]["student"]))


def test_kd_ratio_zero_is_plain_cross_entropy_training(ckpts, runs, tmp_path):
    kd, _ = kd_run(ckpts, tmp_path / "kd0", 1, ["step_scheduler.local_batch_size=4", "kd_ratio=0"])
    ce, _ = kd_run(ckpts, tmp_path / "ce", 1, ["step_scheduler.local_batch_size=4"], mode="pretrain")
    for k, c in zip(kd, ce, strict=True):
        assert k["loss"] == pytest.approx(c["loss"], rel=1e-5)
        assert k["grad_norm"] == pytest.approx(c["grad_norm"], rel=1e-5)


def test_kd_ratio_one_trains_on_the_kd_term_alone(ckpts, runs, tmp_path):
    kd, _ = kd_run(ckpts, tmp_path / "kd1", 1, ["step_scheduler.local_batch_size=4", "kd_ratio=1"])
    for r in kd:
        assert r["ce_loss"] == 0.0
        assert r["loss"] == pytest.approx(r["kd_loss"], rel=1e-6)
    # Same step 0 KD term as the mixed run: the teacher and student start from the same weights.
    assert kd[0]["kd_loss"] == pytest.approx(runs["single_process"][0][0]["kd_loss"], rel=1e-5)
