"""The teacher on its own ranks (``separate_meshes: true``) trains the student exactly as one process does.

One process (teacher and student together, fused loss and hidden-state KD) is the reference. Each run below puts
the teacher on its own ranks, hidden-state KD on in all:

* 1 + 1 processes, and a student with dp=2 beside a teacher with TP=2 (4 processes; SP too on the fused path), each
  through the fused loss (the teacher ships hidden states) and through logits (AutoModel's path);
* a pipelined student (PP=2) and a tensor- and sequence-parallel one (TP=2, SP) beside a one-rank teacher;
* a one-rank student beside a pipelined teacher (PP=2), whose stages hold different pairs' layers.

Losses, ``hidden_loss`` and grad norms at every step and the validation losses must match, and the bytes that
crossed per step must be hidden-state sized.
"""

import pytest

from conftest import FP32_COMPUTE, assert_same_training, read_jsonl, run_job, tiny_overrides
from test_hidden_kd import teacher_with
from test_preflight import error
from tools.build_checkpoints import TINY

STEPS = 4
HIDDEN_KD = ["hidden_kd.weight=0.5", "hidden_kd.layers=[[0,1],[2,3],[3,3]]"]
TEACHER_LAYERS_SHIPPED = 2  # teacher layers 1 and 3
KEYS = ("loss", "ce_loss", "kd_loss", "hidden_loss", "grad_norm")
PEAK_TFLOPS = 0.001  # a made-up CPU peak, so that mfu is logged
# The teacher mesh has its own FSDP2 mixed precision (bf16 compute by default).
SEPARATE = ["separate_meshes=true", *(o.replace("distributed.", "teacher_distributed.", 1) for o in FP32_COMPUTE)]
ONE_PLUS_ONE = [*SEPARATE, "distributed.dp_size=1", "teacher_distributed.dp_size=1"]
# name: (processes, overrides); all with global batch 4.
RUNS = {
    "one_process": (1, ["fused_linear_loss=true"]),
    "1+1_fused": (2, [*ONE_PLUS_ONE, "fused_linear_loss=true"]),
    "1+1_logits": (2, [*ONE_PLUS_ONE, "fused_linear_loss=false"]),
    # The fused run's teacher is also sequence-parallel: its outputs arrive as Shard(1) DTensors and are gathered.
    "dp2+tp2_fused": (4, [*SEPARATE, "distributed.dp_size=2", "step_scheduler.local_batch_size=2",
                          "teacher_distributed.dp_size=1", "teacher_distributed.tp_size=2",
                          "teacher_distributed.sequence_parallel=true", "fused_linear_loss=true"]),
    "dp2+tp2_logits": (4, [*SEPARATE, "distributed.dp_size=2", "step_scheduler.local_batch_size=2",
                           "teacher_distributed.dp_size=1", "teacher_distributed.tp_size=2",
                           "fused_linear_loss=false"]),
    "pp2+1_fused": (3, [*SEPARATE, "distributed.dp_size=1", "distributed.pp_size=2",
                        "distributed.pipeline.pp_microbatch_size=2", "teacher_distributed.dp_size=1",
                        "fused_linear_loss=true"]),
    # The student's LM head split over TP: each rank holds the teacher's rows of its own vocabulary shard.
    "tp2sp+1_fused": (3, [*ONE_PLUS_ONE, "distributed.tp_size=2", "distributed.sequence_parallel=true",
                          "fused_linear_loss=true"]),
    # Teacher layers 1 (stage 0) and 3 (stage 1) are recorded on different ranks.
    "1+pp2_fused": (3, [*ONE_PLUS_ONE, "teacher_distributed.pp_size=2",
                        "teacher_distributed.pipeline.pp_microbatch_size=2", "fused_linear_loss=true"]),
}


@pytest.fixture(scope="module")
def runs(ckpts, tmp_path_factory):
    out = {}
    for name, (nproc, extra) in RUNS.items():
        out_dir = tmp_path_factory.mktemp(name.replace("+", "_"))
        args = [*tiny_overrides(ckpts, "llama", out_dir, steps=STEPS), "step_scheduler.local_batch_size=4",
                "step_scheduler.val_every_steps=2", "step_scheduler.ckpt_every_steps=100",
                f"mfu_peak_tflops={PEAK_TFLOPS}", *HIDDEN_KD, *extra]
        result = run_job(["-m", "run", "--mode", "kd", *args], nproc=nproc)
        assert result.returncode == 0, f"{name}: {result.stderr[-4000:]}"
        out[name] = read_jsonl(out_dir / "training.jsonl"), read_jsonl(out_dir / "validation.jsonl")
    return out


@pytest.mark.parametrize("name", [n for n in RUNS if n != "one_process"])
def test_a_teacher_on_its_own_ranks_trains_the_student_as_one_process_does(runs, name):
    assert_same_training(runs[name], runs["one_process"], KEYS, STEPS)
    for got, ref in zip(runs[name][1], runs["one_process"][1], strict=True):
        assert got["hidden_loss"] == pytest.approx(ref["hidden_loss"], rel=1e-4)


@pytest.mark.parametrize("layout", ["1+1", "dp2+tp2"])
def test_the_fused_loss_receives_hidden_states_not_logits(runs, layout):
    """Per token, the fused path receives the final hidden states and two layer outputs (3 x H floats); the
    logits path the logits and the same two layer outputs (V + 2 x H). Both runs see the same batches. A token is
    a position of the padded ``[B, S]`` batch, so at least the step's real tokens (all of them with one replica)."""
    fused, logits = (runs[f"{layout}_{path}"][0] for path in ("fused", "logits"))
    hidden, vocab = TINY["hidden_size"], 512
    for f, g in zip(fused, logits, strict=True):
        tokens = f["teacher_bytes"] / (4 * hidden * (1 + TEACHER_LAYERS_SHIPPED))
        assert tokens == int(tokens) > 0
        assert layout != "1+1" or f["num_tokens_per_step"] <= tokens
        assert g["teacher_bytes"] == 4 * tokens * (vocab + TEACHER_LAYERS_SHIPPED * hidden)


@pytest.mark.parametrize("name, processes", [("1+1_fused", 2), ("1+1_logits", 2), ("1+pp2_fused", 3)])
def test_mfu_counts_the_teacher_forward_run_on_the_teacher_ranks(runs, name, processes):
    """``mfu`` is a step's FLOPs over its time and every process's peak: the FLOPs it implies are one process's,
    where both models run on the same rank (one data-parallel replica, so the same padded batches)."""
    def step_flops(row, world):
        return row["mfu"] / 100 * world * PEAK_TFLOPS * 1e12 * row["num_tokens_per_step"] / row["tps"]

    for got, ref in zip(runs[name][0], runs["one_process"][0], strict=True):
        assert step_flops(got, processes) == pytest.approx(step_flops(ref, 1), rel=1e-6)


def test_a_pipelined_teacher_sends_what_a_one_rank_teacher_does(runs):
    """Its last stage sends the final hidden states and both layers, one of them recorded by the other stage."""
    assert [r["teacher_bytes"] for r in runs["1+pp2_fused"][0]] == [r["teacher_bytes"] for r in runs["1+1_fused"][0]]


@pytest.mark.parametrize("extra, world_size, message", [
    (["separate_meshes=true", "teacher_distributed.dp_size=1"], 2,
     "distributed.dp_size=none: with separate_meshes=true each mesh's sizes must be integers >= 1, dp_size included "
     "(the rank split must be explicit); set distributed.dp_size"),
    (["separate_meshes=true", "distributed.dp_size=1", "teacher_distributed.dp_size=1",
      "teacher_distributed.tp_size=2"], 2,
     "separate_meshes=true: the student mesh (distributed: dp*tp*pp*cp = 1) and the teacher mesh (teacher_distributed: "
     "2) take 3 processes, not the 2 launched: launch 3 (torchrun --nproc_per_node) or change the dp_size values"),
    (["separate_meshes=true", "distributed.dp_size=1"], 2,
     "separate_meshes=true needs a teacher_distributed section giving the teacher's mesh: e.g. "
     "teacher_distributed.dp_size=1 teacher_distributed.tp_size=2"),
    (["separate_meshes=true", "distributed.dp_size=1", "teacher_distributed.dp_size=1",
      "teacher_distributed.tp_size=8"], 9,
     "teacher_distributed.tp_size=8 does not divide teacher_model's num_attention_heads=4"),
    (["separate_meshes=true", "distributed.dp_size=1", "teacher_distributed.dp_size=1", "hidden_kd.weight=0.5",
      "hidden_kd.layers=[[0,4]]"], 2, "hidden_kd.layers"),
])
def test_a_rank_split_that_cannot_work_is_one_line_before_any_weights_load(ckpts, tmp_path, extra, world_size,
                                                                           message):
    assert message in error(ckpts, tmp_path, *extra, world_size=world_size)


def test_hidden_state_kd_from_a_teacher_of_another_width_is_one_line_before_any_weights_load(ckpts, tmp_path):
    wider = teacher_with(ckpts, tmp_path, hidden_size=128)
    assert error(ckpts, tmp_path, wider, *ONE_PLUS_ONE, "hidden_kd.weight=1", "hidden_kd.layers=[[0,0]]",
                 world_size=2).startswith("hidden_kd: the student's hidden_size is 64 and the teacher's 128")
