"""The ranks of a ``python -m run`` job, forked from an interpreter that has already imported the stack.

A tiny job spends about 13 of its 15 seconds importing torch, transformers, AutoModel and ModelOpt, and the
suite starts well over a hundred of them. ``launch`` forks each rank from a multiprocessing ``forkserver`` that
imported those once (and applied nothing: ``run.py`` patches AutoModel in each rank as in a fresh process),
gives it the environment torchrun gives a worker (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``; rank 0 hosts the TCP store), and runs the module as ``python -m`` would. As torchrun does, the
other ranks are stopped when one fails, and the job's exit code is 1 then. Tests of the launcher itself
(signals, elastic restarts, rendezvous, two jobs at once) use the real ``torchrun``.
"""

import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
PRELOAD = ["torch", "torch.distributed", "transformers", "nemo_automodel", "nemo_automodel.recipes.llm.train_ft",
           "patch_automodel", "recipe", "distillation.teacher_cache_build", "common.cpu_support", "run"]
# After one rank fails, how long the others get to report their own error before they are stopped.
GRACE_S = 10

_context = None


def _forkserver():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _rank(rank: int, nproc: int, port: int, argv: list[str], env: dict, out: str, err: str) -> None:
    os.environ.clear()
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                      LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", ROLE_RANK=str(rank), ROLE_WORLD_SIZE=str(nproc),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    import torch

    # The server was started with one thread; a rank follows its own OMP_NUM_THREADS as a fresh process would.
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS") or os.cpu_count()))
    os.chdir(REPO)
    sys.argv = [argv[1], *argv[2:]]
    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)


def launch(args: list[str], nproc: int, port: int, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run ``python -m <module> ...`` (``args = ["-m", module, ...]``) on ``nproc`` ranks from the repo root;
    stdout and stderr are the ranks' own, concatenated in rank order."""
    if args[0] != "-m":
        raise ValueError(f"preloaded ranks run a module (-m NAME ...), not {args[:2]}")
    context = _forkserver()
    with tempfile.TemporaryDirectory(prefix="ranks_") as logs:
        files = [(f"{logs}/{r}.out", f"{logs}/{r}.err") for r in range(nproc)]
        ranks = [context.Process(target=_rank, args=(r, nproc, port, args, env, *files[r])) for r in range(nproc)]
        with mock.patch.dict(os.environ, {"OMP_NUM_THREADS": "1"}):  # read once, by the server, when it starts
            for process in ranks:
                process.start()
        returncode = _wait(ranks, timeout, args)
        stdout, stderr = ("".join(Path(f[i]).read_text(errors="replace") for f in files) for i in (0, 1))
    return subprocess.CompletedProcess(args, returncode, stdout, stderr)


def _wait(ranks, timeout, args) -> int:
    deadline, stop_at = time.monotonic() + timeout, None
    while any(p.exitcode is None for p in ranks):
        now = time.monotonic()
        if now > deadline:
            _stop(ranks)
            raise subprocess.TimeoutExpired(args, timeout)
        if stop_at is None and any(p.exitcode not in (None, 0) for p in ranks):
            stop_at = now + GRACE_S
        if stop_at is not None and now > stop_at:
            _stop(ranks)
        time.sleep(0.05)
    return 0 if all(p.exitcode == 0 for p in ranks) else 1


def _stop(ranks) -> None:
    for process in ranks:
        if process.exitcode is None:
            os.kill(process.pid, signal.SIGTERM)
    for process in ranks:
        process.join(5)
        if process.exitcode is None:
            process.kill()
            process.join()
