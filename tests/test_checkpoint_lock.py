"""One job per checkpoint_dir: a second job is refused in one line naming the holder; a dead holder's
lock is taken over; the holder's own ranks pass; a finished job leaves no lock behind."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from safety import checkpoint_lock
from safety.checkpoint_lock import CheckpointDirLock, CheckpointDirLockedError
from conftest import REPO, free_port, read_jsonl, tiny_overrides


def write_lock(directory, *, job="other-host:1234/none", host=None, pid=None, age_s=0.0):
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / checkpoint_lock.LOCK_NAME
    path.write_text(json.dumps({"job": job, "host": host or socket.gethostname(), "pid": pid or os.getpid(),
                                "started": "2026-11-27 03:00:00 UTC"}))
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


@pytest.fixture
def as_rank(monkeypatch):
    def set_rank(rank, port="29500"):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", port)
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    return set_rank


def test_a_live_holder_refuses_another_job_naming_host_pid_and_start(tmp_path, as_rank):
    as_rank(0)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        write_lock(tmp_path, pid=sleeper.pid)
        with pytest.raises(CheckpointDirLockedError) as e:
            CheckpointDirLock(tmp_path).acquire()
    finally:
        sleeper.kill()
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"checkpoint.checkpoint_dir={tmp_path} is in use by another job (host "
                              f"{socket.gethostname()}, pid {sleeper.pid}, started 2026-11-27 03:00:00 UTC, last seen")
    assert "give this job its own checkpoint.checkpoint_dir" in message


def test_every_rank_of_another_job_is_refused_not_only_rank_zero(tmp_path, as_rank):
    write_lock(tmp_path, host="node-a", pid=1)  # another node, recently seen
    as_rank(1)
    with pytest.raises(CheckpointDirLockedError):
        CheckpointDirLock(tmp_path).acquire()


def test_the_ranks_of_the_holding_job_pass(tmp_path, as_rank):
    as_rank(0)
    lock = CheckpointDirLock(tmp_path).acquire()
    as_rank(1)
    CheckpointDirLock(tmp_path).acquire()
    assert json.loads((tmp_path / checkpoint_lock.LOCK_NAME).read_text())["job"] == "127.0.0.1:29500/none"
    as_rank(0)
    lock.release()
    assert not (tmp_path / checkpoint_lock.LOCK_NAME).exists()


def test_a_lock_whose_process_is_gone_from_this_host_is_taken_over(tmp_path, as_rank):
    dead = subprocess.Popen(["true"])
    dead.wait()
    write_lock(tmp_path, pid=dead.pid)
    as_rank(0)
    CheckpointDirLock(tmp_path).acquire()
    holder = json.loads((tmp_path / checkpoint_lock.LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid() and holder["job"] == "127.0.0.1:29500/none"


def test_a_lock_from_another_node_without_heartbeat_is_stale(tmp_path, as_rank):
    write_lock(tmp_path, host="node-a", pid=1, age_s=checkpoint_lock.STALE_AFTER_S + 1)
    as_rank(0)
    CheckpointDirLock(tmp_path).acquire()
    assert json.loads((tmp_path / checkpoint_lock.LOCK_NAME).read_text())["host"] == socket.gethostname()


def test_the_holder_keeps_its_lock_fresh_while_it_runs(tmp_path, as_rank, monkeypatch):
    monkeypatch.setattr(checkpoint_lock, "HEARTBEAT_S", 0.05)
    as_rank(0)
    lock = CheckpointDirLock(tmp_path).acquire()
    path = tmp_path / checkpoint_lock.LOCK_NAME
    os.utime(path, (time.time() - 1000, time.time() - 1000))
    time.sleep(0.3)
    assert time.time() - path.stat().st_mtime < 1.0
    lock.release()


def test_a_second_torchrun_job_on_the_same_checkpoint_dir_stops_in_one_line_while_the_first_trains_on(
        ckpts, tmp_path):
    out = tmp_path / "shared"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

    def launch(*extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               "-m", "run", "--mode", "kd", *tiny_overrides(ckpts, "llama", out), *extra]
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    # Long enough to still be training when the second job gets there; stopped by the test.
    first = launch("step_scheduler.max_steps=100000", "step_scheduler.num_epochs=1000",
                   "step_scheduler.ckpt_every_steps=5")
    try:
        deadline = time.time() + 120
        while not (out / checkpoint_lock.LOCK_NAME).exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        holder = json.loads((out / checkpoint_lock.LOCK_NAME).read_text())
        second = launch()
        _, second_err = second.communicate(timeout=300)
        assert first.poll() is None, "the first job must still be training"
    finally:
        first.terminate()
        first.communicate(timeout=120)
    assert second.returncode != 0
    lines = [line for line in second_err.splitlines() if line.startswith("run.py: error:")]
    assert lines, second_err[-3000:]
    for line in lines:  # every rank says the same, up to when it last saw the holder
        assert f"is in use by another job (host {holder['host']}, pid {holder['pid']}" in line
    steps = [r["step"] for r in read_jsonl(out / "training.jsonl")]
    assert steps == list(range(len(steps))), "only the first job logged"
