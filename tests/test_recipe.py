"""The KD recipe gives the same training whatever the parallelism (2 CPU ranks, gloo, fp32).

One process is the reference. Every run sees the same map-style data in the same order with the
same global batch of 4, so the step-0 loss and grad norm, the loss after 5 steps and the
validation losses must agree. Validation runs after step 3 and after step 5, so the runs also
train on after a validation pass (the case that used to break pipeline parallelism).

Every run is made twice: with ``fused_linear_loss=true`` (kd.yaml's default: losses from hidden
states, no logits) and ``false`` (AutoModel's path through full logits); the two must agree too.

Every run also distils hidden states (:data:`HIDDEN_KD`): student layers 0, 2 and 3 learn teacher layers 1, 3 and
3, so under PP=2 each stage computes its own pairs and the grad norm checks that stage 0's layers get their part.
"""

import json
import math
import os
import subprocess
import sys

import pytest
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from common import flops
from conftest import (REPO, assert_same_training, checkpoint_tensors, free_port, read_jsonl, run_job,
                      tiny_overrides, torchrun)
from tools.build_checkpoints import TINY

STEPS = 5
PEAK_TFLOPS = 0.001  # a made-up CPU peak, so that mfu is logged
HIDDEN_KD_WEIGHT = 0.5
HIDDEN_KD = [f"hidden_kd.weight={HIDDEN_KD_WEIGHT}", "hidden_kd.layers=[[0,1],[2,3],[3,3]]"]
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
    "pp2_activation_checkpointing": (2, ["distributed.pp_size=2", "distributed.pipeline.pp_microbatch_size=2",
                                         "step_scheduler.local_batch_size=4",
                                         "distributed.activation_checkpointing=true"]),
}


def kd_run(ckpts, out_dir, nproc, extra, mode="kd"):
    args = [*tiny_overrides(ckpts, "llama", out_dir, steps=STEPS, teacher=mode == "kd"),
            "step_scheduler.val_every_steps=3", "step_scheduler.ckpt_every_steps=100", *extra]
    result = run_job(["-m", "run", "--mode", mode, *args], nproc=nproc)
    assert result.returncode == 0, result.stderr[-4000:]
    return read_jsonl(out_dir / "training.jsonl"), read_jsonl(out_dir / "validation.jsonl")


def saved_tensor_names(model_dir) -> set[str]:
    from safetensors import safe_open

    names = set()
    for f in model_dir.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            names |= set(st.keys())
    return names


def run_all(ckpts, tmp_path_factory, fused: bool) -> dict:
    """``{name: (training rows, validation rows, checkpoint dir)}`` for every entry of RUNS."""
    out = {}
    for name, (nproc, extra) in RUNS.items():
        out_dir = tmp_path_factory.mktemp(f"{name}_fused_{fused}")
        out[name] = (*kd_run(ckpts, out_dir, nproc, [*extra, *HIDDEN_KD, f"fused_linear_loss={str(fused).lower()}"]),
                     out_dir)
    return out


@pytest.fixture(scope="module")
def runs(ckpts, tmp_path_factory):
    """RUNS with the fused linear KD loss (kd.yaml's default)."""
    return run_all(ckpts, tmp_path_factory, fused=True)


@pytest.fixture(scope="module")
def logits_runs(ckpts, tmp_path_factory):
    """RUNS through full logits (``fused_linear_loss=false``, AutoModel's KD path)."""
    return run_all(ckpts, tmp_path_factory, fused=False)


def test_the_reference_run_trains_logs_every_step_and_validates(runs):
    train, val, _ = runs["single_process"]
    assert [r["step"] for r in train] == list(range(STEPS))
    for r in train:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["kd_loss"] >= 0
        assert r["hidden_loss"] > 0
        assert r["loss"] == pytest.approx((1 - r["kd_ratio"]) * r["ce_loss"] + r["kd_ratio"] * r["kd_loss"]
                                          + HIDDEN_KD_WEIGHT * r["hidden_loss"], rel=1e-5)
        assert r["mem"] > 0, "mem must be real on CPU (peak RSS)"
    assert [v["step"] for v in val] == [2, 4]
    assert train[-1]["loss"] < train[0]["loss"]


@pytest.mark.parametrize("name", [n for n in RUNS if n != "single_process"])
def test_step0_loss_and_grad_norm_match_one_process(runs, name):
    ref, got = runs["single_process"][0][0], runs[name][0][0]
    for key in ("loss", "ce_loss", "kd_loss", "hidden_loss", "grad_norm"):
        assert got[key] == pytest.approx(ref[key], rel=1e-4), key


@pytest.mark.parametrize("name", [n for n in RUNS if n != "single_process"])
def test_loss_after_five_steps_matches_one_process(runs, name):
    ref, got = runs["single_process"][0], runs[name][0]
    assert [r["step"] for r in got] == list(range(STEPS))
    assert got[-1]["loss"] == pytest.approx(ref[-1]["loss"], rel=1e-3)
    assert got[-1]["hidden_loss"] == pytest.approx(ref[-1]["hidden_loss"], rel=1e-3)
    assert got[-1]["num_label_tokens"] == ref[-1]["num_label_tokens"]


@pytest.mark.parametrize("name", [n for n in RUNS if n != "single_process"])
def test_validation_losses_match_one_process_pipeline_parallel_included(runs, name):
    ref, got = runs["single_process"][1], runs[name][1]
    assert [v["step"] for v in got] == [v["step"] for v in ref]
    for r, g in zip(ref, got):
        for key in ("val_loss", "ce_loss", "kd_loss", "hidden_loss"):
            assert g[key] == pytest.approx(r[key], rel=1e-4), (g["step"], key)


@pytest.mark.parametrize("name", list(RUNS))
def test_fused_linear_loss_trains_as_the_logits_path_does(runs, logits_runs, name):
    (ref, ref_val, _), (got, got_val, _) = logits_runs[name], runs[name]
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(STEPS))
    for key in ("loss", "ce_loss", "kd_loss", "hidden_loss", "grad_norm"):
        assert got[0][key] == pytest.approx(ref[0][key], rel=1e-4), key
    for r, g in zip(ref, got):
        assert g["loss"] == pytest.approx(r["loss"], rel=1e-4), g["step"]
        assert g["num_label_tokens"] == r["num_label_tokens"]
    assert [v["step"] for v in got_val] == [v["step"] for v in ref_val]
    for r, g in zip(ref_val, got_val):
        for key in ("val_loss", "ce_loss", "kd_loss"):
            assert g[key] == pytest.approx(r[key], rel=1e-4), (g["step"], key)


# One process, in a fresh interpreter: build the recipe as run.py does, then take one microbatch step three ways:
# as configured (fused), through logits at the positions that have labels (the logits path), and through logits at
# every position (AutoModel's step), recording every newly allocated [..., vocab] tensor (views and out= results
# share an input's storage and do not count) and the student's gradients.
STEP_PROBE = """
import json, sys
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
import run

class VocabWideRows(TorchDispatchMode):
    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.rows = vocab, 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab \\
                    and t.untyped_storage().data_ptr() not in inputs:
                self.rows = max(self.rows, t.numel() // self.vocab)
        return out

Recipe, cfg = run.prepare(sys.argv[1:])
recipe = Recipe(cfg)
recipe.setup()
student = recipe.model_parts[0]
batch = next(iter(recipe.dataloader))
labelled = batch["labels"] != -100
out = {"tokens": batch["labels"].numel(), "loss_fn": type(recipe.fused_kd_loss).__name__,
       "chunk_size": recipe.fused_kd_loss.chunk_size,
       "label_position_rows": labelled.shape[0] * int(labelled.any(dim=0).sum()),
       "tied": student.lm_head.weight is student.model.embed_tokens.weight}
grads = {}
for way, fused, cut in (("fused", True, False), ("logits", False, True), ("all_logits", False, False)):
    recipe.fused_linear_loss, recipe._label_positions_only = fused, cut
    student.zero_grad(set_to_none=True)
    with VocabWideRows(student.config.vocab_size) as seen:
        loss, kd_loss, ce_loss = recipe._forward_backward_step(0, batch, num_label_tokens=int(labelled.sum()),
                                                               num_batches=1)
    out[way] = {"rows": seen.rows, "loss": loss.item(), "ce_loss": ce_loss.item(), "kd_loss": kd_loss.item()}
    grads[way] = {name: p.grad.clone() for name, p in student.named_parameters()}
for way in ("fused", "logits"):
    out[way]["grad_rel_diff"] = max(((grads[way][n] - g).abs().max() / g.abs().max()).item()
                                    for n, g in grads["all_logits"].items())
out["embedding_grad_norm"] = grads["fused"]["model.embed_tokens.weight"].norm().item()
print("PROBE " + json.dumps(out))
"""


PROBE_CHUNK = 8


@pytest.fixture(scope="module")
def step_probe(ckpts, tmp_path_factory):
    """STEP_PROBE on a student whose LM head is its embedding (what AutoModel would refuse to flip at load time),
    with the fused loss in chunks of ``chunk_size`` rows."""
    tmp_path = tmp_path_factory.mktemp("step_probe")
    teacher = ckpts["llama"]["teacher"]
    config = AutoConfig.from_pretrained(teacher)
    config.tie_word_embeddings = True
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "tied")
    AutoTokenizer.from_pretrained(teacher).save_pretrained(tmp_path / "tied")
    args = [*tiny_overrides(ckpts, "llama", tmp_path / "out"),
            f"model.pretrained_model_name_or_path={tmp_path / 'tied'}", "model.anymodel_descriptor=null",
            "step_scheduler.local_batch_size=4", "checkpoint.enabled=false", "fused_linear_loss=true",
            f"kd_loss_fn.chunk_size={PROBE_CHUNK}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    result = subprocess.run([sys.executable, "-c", STEP_PROBE, "--mode", "kd", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.split("PROBE ", 1)[1])


def test_fused_step_makes_no_logits_and_gives_their_gradients_to_a_tied_head(step_probe):
    probe = step_probe
    assert probe["tied"] and probe["loss_fn"] == "FusedLinearKDLoss" and probe["chunk_size"] == PROBE_CHUNK
    # Fused: at most a chunk of rows per [., vocab] buffer (the models' own [B, 1, vocab] last-position logits are
    # fewer). Through all logits: a whole [B, S, vocab] tensor, which this probe must see.
    assert probe["fused"]["rows"] <= PROBE_CHUNK < probe["tokens"] <= probe["all_logits"]["rows"]
    for key in ("loss", "ce_loss", "kd_loss"):
        assert probe["fused"][key] == pytest.approx(probe["all_logits"][key], rel=1e-5), key
    # Every student gradient, the tied embedding's (its CE/KD part reaches it through the LM head) included.
    assert probe["fused"]["grad_rel_diff"] < 1e-5 and probe["embedding_grad_norm"] > 0


def test_logits_path_makes_logits_only_where_labels_are_with_the_same_losses_and_gradients(step_probe):
    probe = step_probe
    # The SQuAD-style rows mask their prompts: fewer positions than tokens carry a label.
    assert probe["label_position_rows"] < probe["tokens"]
    assert probe["logits"]["rows"] == probe["label_position_rows"]
    for key in ("loss", "ce_loss", "kd_loss"):
        assert probe["logits"][key] == pytest.approx(probe["all_logits"][key], rel=1e-6), key
    assert probe["logits"]["grad_rel_diff"] < 1e-6


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


def test_hidden_state_kd_from_the_students_own_checkpoint_is_zero(ckpts, tmp_path):
    student = ckpts["llama"]["student"]
    train, val = kd_run(ckpts, tmp_path / "self", 1, [
        "step_scheduler.local_batch_size=4", f"teacher_model.pretrained_model_name_or_path={student}",
        "teacher_model.anymodel_descriptor=llama", "hidden_kd.weight=1", "hidden_kd.loss=normalized_mse"])
    assert train[0]["hidden_loss"] == pytest.approx(0.0, abs=1e-12)
    assert train[0]["kd_loss"] == pytest.approx(0.0, abs=1e-6)
    # Training moves the student away from its frozen copy.
    assert train[-1]["hidden_loss"] > 0 and val[-1]["hidden_loss"] > 0


def test_fsdp2_and_tp_together_on_four_ranks_match_one_process(runs, ckpts, tmp_path):
    """dp=2 x TP=2: FSDP2 shards what TP split, the LM head the fused loss reads included."""
    got = kd_run(ckpts, tmp_path / "dp2_tp2", 4, ["distributed.tp_size=2", "step_scheduler.local_batch_size=2",
                                                  *HIDDEN_KD])
    train, val, _ = runs["single_process"]
    assert_same_training(got, (train, val), ("loss", "ce_loss", "kd_loss", "hidden_loss", "grad_norm"), STEPS)
