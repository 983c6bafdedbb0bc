"""Spec for filesystem faults on the paths a run or a tool reads and writes (``safety/paths.py``): each fault ends
in one line that names the path, says what is wrong and what to do, with exit code 2, before any model is built,
and leaves what was there untouched. Read-only filesystems and full disks are real mounts (skipped where this
user may not mount); a permission fault runs as the unprivileged user ``nobody`` where the tests run as root."""

import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import run
from common.errors import PreflightError
from conftest import REPO, tiny_overrides, torchrun
from safety import paths

pytestmark = pytest.mark.usefixtures("unpatch_automodel_after_module")


def refusal(ckpts, tmp_path, *extra: str, mode: str = "kd") -> str:
    """The one line ``run.py`` would print for this command (the same checks, in process)."""
    with pytest.raises(PreflightError) as error:
        run.prepare(["--mode", mode, *tiny_overrides(ckpts, "llama", tmp_path / "ck", teacher=mode != "pretrain"),
                     *extra])
    return str(error.value)


def listing(directory: Path) -> dict:
    """Every file under ``directory`` with its bytes: what a refused run must leave as it was."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def mount(*args: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a read-only or a full filesystem needs root")
    result = subprocess.run(["mount", *args], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"this machine refuses mount {' '.join(args)}: {result.stderr.strip()}")


@contextlib.contextmanager
def read_only(directory: Path):
    """``directory`` bind-mounted read-only onto itself."""
    mount("--bind", str(directory), str(directory))
    try:
        mount("-o", "remount,ro,bind", str(directory))
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)


@contextlib.contextmanager
def full_filesystem(directory: Path):
    """A 64 KiB tmpfs at ``directory``, filled up."""
    directory.mkdir()
    mount("-t", "tmpfs", "-o", "size=64k", "tmpfs", str(directory))
    try:
        with open(directory / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)


# --------------------------------------------------------------------------- run.py, two ranks


def test_a_checkpoint_dir_that_is_a_file_stops_both_ranks_with_one_line_and_leaves_the_file(ckpts, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("a file the user keeps")
    result = torchrun(["-m", "run", "--mode", "kd", *tiny_overrides(ckpts, "llama", tmp_path / "unused"),
                       f"checkpoint.checkpoint_dir={target}"], timeout=180)
    line = (f"run.py: error: checkpoint.checkpoint_dir={target} is a file, not a directory; pass a directory (or "
            "move the file away)")
    assert line in result.stderr.splitlines()
    assert "exitcode  : 2" in result.stderr[result.stderr.rindex("Root Cause"):]
    assert target.read_text() == "a file the user keeps"


def test_a_checkpoint_dir_on_a_read_only_filesystem_stops_both_ranks_and_keeps_its_checkpoints(ckpts, tmp_path):
    shared = tmp_path / "shared"
    (shared / "run" / "epoch_0_step_9").mkdir(parents=True)
    (shared / "run" / "LATEST").write_text("epoch_0_step_9")
    before = listing(shared)
    with read_only(shared):
        result = torchrun(["-m", "run", "--mode", "kd", *tiny_overrides(ckpts, "llama", shared / "run")], timeout=180)
    line = (f"run.py: error: checkpoint.checkpoint_dir={shared / 'run'} is on a read-only filesystem "
            f"({shared / 'run'}); pass a directory on a writable filesystem")
    assert line in result.stderr.splitlines()
    assert "exitcode  : 2" in result.stderr[result.stderr.rindex("Root Cause"):]
    assert listing(shared) == before


# --------------------------------------------------------------------------- run.py, every path it writes or reads


def test_a_checkpoint_dir_under_a_file_cannot_be_created(ckpts, tmp_path):
    (tmp_path / "file").write_text("x")
    assert refusal(ckpts, tmp_path, f"checkpoint.checkpoint_dir={tmp_path / 'file' / 'run'}") == (
        f"checkpoint.checkpoint_dir={tmp_path / 'file' / 'run'} cannot be created: {tmp_path / 'file'} is a file; "
        "pass a path under a directory")


def test_a_checkpoint_dir_on_a_full_filesystem_is_refused(ckpts, tmp_path):
    with full_filesystem(tmp_path / "disk") as disk:
        text = refusal(ckpts, tmp_path, f"checkpoint.checkpoint_dir={disk / 'run'}")
        assert not (disk / "run").exists()
    assert text.startswith(f"checkpoint.checkpoint_dir={disk / 'run'}: no space left on the filesystem of {disk} (")
    assert text.endswith("bytes free); free some space or pass a directory on another filesystem")


def test_a_teacher_cache_build_into_a_read_only_directory_is_refused(ckpts, tmp_path):
    (tmp_path / "caches").mkdir()
    with read_only(tmp_path / "caches") as caches:
        text = refusal(ckpts, tmp_path, f"teacher_cache.path={caches / 'k12'}", mode="teacher_cache")
    assert text == (f"teacher_cache.path={caches / 'k12'} is on a read-only filesystem ({caches}); pass a directory "
                    "on a writable filesystem")


def test_a_teacher_cache_to_read_that_does_not_exist_is_refused(ckpts, tmp_path):
    assert refusal(ckpts, tmp_path, f"teacher_cache.path={tmp_path / 'nope'}",
                   "teacher_model.pretrained_model_name_or_path=null") == (
        f"teacher_cache.path={tmp_path / 'nope'} does not exist; pass a cache built with --mode teacher_cache")


def test_block_configs_that_are_missing_or_a_directory_are_refused(ckpts, tmp_path):
    assert refusal(ckpts, tmp_path, f"model.block_configs_path={tmp_path / 'blocks.json'}") == (
        f"model.block_configs_path={tmp_path / 'blocks.json'} does not exist; pass a block_configs.json file")
    assert refusal(ckpts, tmp_path, f"model.block_configs_path={tmp_path}") == (
        f"model.block_configs_path={tmp_path} is a directory, not a file; pass a block_configs.json file")


def test_a_directory_this_user_cannot_write_is_permission_denied():
    """Root writes anywhere, so the check runs as ``nobody`` where the tests run as root."""
    base = Path(tempfile.mkdtemp(dir="/tmp"))
    base.chmod(0o755)
    locked = base / "locked"
    locked.mkdir(mode=0o555)
    locked.chmod(0o555)
    code = f"from safety import paths; paths.writable_dir('checkpoint.checkpoint_dir', {str(locked / 'run')!r})"
    cmd = [sys.executable, "-c", code]
    if os.geteuid() == 0:
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        f"common.errors.PreflightError: checkpoint.checkpoint_dir={locked / 'run'}: permission denied: this user "
        f"cannot write in {locked}; pass a directory you can write, or change its permissions")


# --------------------------------------------------------------------------- the tools' own outputs


def tool(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_demo_refuses_an_output_folder_that_is_a_file(tmp_path):
    (tmp_path / "out").write_text("x")
    result = tool("tools.demo", "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"demo: error: --out={tmp_path / 'out'} is a file, not a directory; pass a "
                                     "directory (or move the file away)")
    assert (tmp_path / "out").read_text() == "x"


def test_plot_run_refuses_a_picture_on_a_read_only_filesystem(tmp_path):
    (tmp_path / "figures").mkdir()
    with read_only(tmp_path / "figures") as figures:
        result = tool("tools.plot_run", str(tmp_path), "--out", str(figures / "curves.png"))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"plot_run: error: --out={figures / 'curves.png'} is on a read-only filesystem "
                                     f"({figures}); pass a directory on a writable filesystem")


def test_the_tournament_refuses_an_output_folder_that_is_a_file(ckpts, tmp_path):
    from tools import tournament

    (tmp_path / "cache").mkdir()
    (tmp_path / "out").write_text("x")
    with pytest.raises(PreflightError, match=r"^--out=.*out is a file, not a directory; pass a directory"):
        tournament.check(tournament.parse_args(["--cache", str(tmp_path / "cache"), "--candidate", "a=x", "--steps",
                                                "1", "--out", str(tmp_path / "out"), "--data", "rows.jsonl"]))


def test_paths_judge_a_directory_to_create_by_its_nearest_existing_parent(tmp_path):
    assert paths.writable_dir("--out", tmp_path / "a" / "b" / "c") == tmp_path / "a" / "b" / "c"
    assert not (tmp_path / "a").exists()  # nothing is created by the check
