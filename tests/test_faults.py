"""Faults in a real 2-rank KD run: a rank SIGKILLed while a checkpoint is being written, and NaN losses.

What AutoModel 0.7.0 already does and these tests pin for our recipe: a checkpoint directory is
created with an ``.incomplete`` marker that is only cleared once every rank has written its part,
and auto-resume (no ``restore_from``) skips marked directories.
"""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from conftest import REPO, free_port, read_jsonl, tiny_overrides, torchrun
from test_preflight import copy_checkpoint

STEPS, CKPT_EVERY = 4, 2  # checkpoints after steps 1 and 3 (0-based)
LOSSES = ("loss", "ce_loss", "kd_loss")


def kd_args(ckpts, out_dir):
    # A 10-minute collective timeout: a job that ends sooner was ended by torchrun, not by the timeout.
    return ["-m", "run", "--mode", "kd", *tiny_overrides(ckpts, "llama", out_dir, steps=STEPS),
            f"step_scheduler.ckpt_every_steps={CKPT_EVERY}", "dist_env.timeout_minutes=10"]


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """``{rank: pid}`` of the workers torchrun started."""
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    ranks = {}
    for pid in map(int, children):
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next((int(e.split(b"=", 1)[1]) for e in env if e.startswith(b"RANK=")), None)
        if rank is not None:
            ranks[rank] = pid
    return ranks


def launch(args, log_dir: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log_dir / "stdout", "w"),
                            stderr=open(log_dir / "stderr", "w"))


def max_relative_difference(rows, reference, steps) -> float:
    by_step = {r["step"]: r for r in reference}
    return max(abs(r[k] - by_step[s][k]) / abs(by_step[s][k]) for s, r in zip(steps, rows) for k in LOSSES)


def test_rank_killed_while_saving_ends_the_job_and_the_rerun_resumes_with_identical_losses(ckpts, tmp_path):
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference_dir.mkdir()
    killed_dir.mkdir()
    # The uninterrupted reference runs alongside the job that gets killed, to save wall time.
    reference_job = launch(kd_args(ckpts, reference_dir), reference_dir)

    # Kill rank 1 the moment the last checkpoint's directory appears: it is being written.
    job = launch(kd_args(ckpts, killed_dir), killed_dir)
    half_written = killed_dir / f"epoch_0_step_{STEPS - 1}"
    deadline = time.monotonic() + 300
    while not half_written.is_dir():
        assert job.poll() is None and time.monotonic() < deadline, "the run ended before its last checkpoint"
        time.sleep(0.002)
    os.kill(worker_pids(job.pid)[1], signal.SIGKILL)
    killed_at = time.monotonic()
    job.wait(timeout=120)
    seconds_to_end = time.monotonic() - killed_at
    assert job.returncode != 0
    assert seconds_to_end < 60, f"the job took {seconds_to_end:.1f} s to end after the kill"
    assert (half_written / ".incomplete").exists(), "the kill landed after the save finished"
    assert (killed_dir / "LATEST").resolve() == (killed_dir / f"epoch_0_step_{CKPT_EVERY - 1}").resolve()
    assert reference_job.wait(timeout=300) == 0, (reference_dir / "stderr").read_text()[-4000:]
    reference = read_jsonl(reference_dir / "training.jsonl")
    assert [r["step"] for r in reference] == list(range(STEPS))

    # The same command again: resumes from the last complete checkpoint, not the half-written one.
    rows_before = len(read_jsonl(killed_dir / "training.jsonl")) if (killed_dir / "training.jsonl").exists() else 0
    result = torchrun(kd_args(ckpts, killed_dir))
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"Loading checkpoint from {killed_dir}/epoch_0_step_{CKPT_EVERY - 1}" in result.stdout + result.stderr
    resumed = read_jsonl(killed_dir / "training.jsonl")[rows_before:]
    resumed_steps = list(range(CKPT_EVERY, STEPS))
    assert [r["step"] for r in resumed] == resumed_steps
    diff = max_relative_difference(resumed, reference, resumed_steps)
    print(f"SIGKILL after {seconds_to_end:.1f} s to end; resumed losses max relative difference {diff:.2e}")
    assert diff <= 1e-5
    assert not (half_written / ".incomplete").exists(), "the rerun did not rewrite the half-written checkpoint"


def nan_teacher(src: Path, dst: Path) -> Path:
    """A copy of the teacher whose final norm weights are NaN: every teacher logit is NaN."""
    copy_checkpoint(src, dst)
    tensors = load_file(dst / "model.safetensors")
    tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], math.nan)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_nan_teacher_logits_stop_every_rank_at_step_0_naming_kd_loss(ckpts, tmp_path):
    teacher = nan_teacher(ckpts["llama"]["teacher"], tmp_path / "nan_teacher")
    out = tmp_path / "out"
    result = torchrun(["-m", "run", "--mode", "kd", *tiny_overrides(ckpts, "llama", out, steps=2),
                       f"teacher_model.pretrained_model_name_or_path={teacher}"])
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("run.py: error:")]
    assert errors and errors[0].startswith("run.py: error: step 0: kd_loss is nan (loss=nan, ce_loss=")
    assert "Root Cause" in result.stderr and f"traceback : {errors[0]}" in result.stderr
    assert not list(out.glob("epoch_*")), "a checkpoint was written after a non-finite loss"
    assert not read_jsonl(out / "training.jsonl"), "a non-finite step was logged"
