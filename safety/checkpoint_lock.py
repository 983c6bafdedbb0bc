"""One job per ``checkpoint_dir``: a lock file that names its holder, beats while the job lives, and is
taken over once its holder is gone.

AutoModel 0.7.0 assumes a checkpoint directory belongs to one job: a save deletes any
``.incomplete`` directory as left behind by an interrupted save, and ``LATEST`` points at whatever
was published last. Two jobs sharing a directory (``kd.yaml``'s default ``checkpoints/`` is relative,
so two jobs launched from one place share it) then publish a checkpoint with one job's weights and the
other's optimizer state, without a word. :func:`acquire` refuses the second job in one line, before
the process group starts or anything is written.

The lock is ``<checkpoint_dir>/.job.lock``, a JSON file with the holder's host, pid, job id and start
time, created whole (a hard link to a finished draft, which fails if the lock exists) by global rank 0. A job is identified by its torchrun rendezvous
(``MASTER_ADDR:MASTER_PORT`` and ``TORCHELASTIC_RUN_ID``; host and pid for a plain ``python -m run``),
so every rank of the holding job passes, and the ranks of another job all refuse. While the job runs,
rank 0 touches the file every :data:`HEARTBEAT_S` seconds. A lock is stale, and taken over, when its
holder is a process of this host that no longer exists, or when nobody has touched it for
:data:`STALE_AFTER_S` seconds (a job killed on another node). The finished job removes it.
"""

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path

LOCK_NAME = ".job.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 120.0


class CheckpointDirLockedError(RuntimeError):
    """Another live job holds the checkpoint directory; the message names it and what to do."""


def job_id() -> str:
    """The same string on every rank of one job, and a different one for another job."""
    if "MASTER_PORT" in os.environ:
        return f"{os.environ.get('MASTER_ADDR', 'localhost')}:{os.environ['MASTER_PORT']}/" \
               f"{os.environ.get('TORCHELASTIC_RUN_ID', 'none')}"
    return f"{socket.gethostname()}:{os.getpid()}"


def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _holder_is_gone(holder: dict, age_s: float) -> bool:
    if age_s > STALE_AFTER_S:
        return True
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, ValueError):
        return False
    return False


def _read(path: Path) -> tuple[dict, float] | None:
    """The holder's record and the seconds since the lock was last touched; None if there is no lock."""
    try:
        return json.loads(path.read_text() or "{}"), time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        # Not written by this module (which creates it whole): judge it by its age alone.
        return {}, time.time() - path.stat().st_mtime


class CheckpointDirLock:
    """The lock on one checkpoint directory, held by this job (see the module docstring)."""

    def __init__(self, checkpoint_dir: str | os.PathLike):
        self.path = Path(checkpoint_dir) / LOCK_NAME
        self.job = job_id()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> "CheckpointDirLock":
        """Check (every rank) and take (rank 0) the lock; raises :class:`CheckpointDirLockedError`."""
        found = _read(self.path)
        if found is not None:
            holder, age = found
            if holder.get("job") != self.job and not _holder_is_gone(holder, age):
                raise CheckpointDirLockedError(
                    f"checkpoint.checkpoint_dir={self.path.parent} is in use by another job (host "
                    f"{holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}, "
                    f"last seen {age:.0f} s ago); give this job its own checkpoint.checkpoint_dir, or, if that job "
                    f"is dead, wait {STALE_AFTER_S:.0f} s after it was last seen or delete {self.path}")
        if _is_rank_zero():
            record = {"job": self.job, "host": socket.gethostname(), "pid": os.getpid(),
                      "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
            draft = self.path.with_name(f"{LOCK_NAME}.{socket.gethostname()}.{os.getpid()}")
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                if found is not None:
                    self.path.unlink(missing_ok=True)
                draft.write_text(json.dumps(record))
                # A hard link appears whole or not at all: the other ranks never read a half-written lock.
                os.link(draft, self.path)
            except FileExistsError:
                # Another job took it between our read and our write: judge that one instead.
                draft.unlink(missing_ok=True)
                return self.acquire()
            except OSError:
                # A checkpoint_dir that is a file or read-only: AutoModel's own check reports it.
                with contextlib.suppress(OSError):
                    draft.unlink()
                return self
            draft.unlink()
            self._beat = threading.Thread(target=self._heartbeat, name="checkpoint-dir-lock", daemon=True)
            self._beat.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def release(self) -> None:
        """Stop the heartbeat and, on rank 0, remove the lock if it is still this job's."""
        self._stop.set()
        if not _is_rank_zero():
            return
        found = _read(self.path)
        if found is not None and found[0].get("job") == self.job:
            self.path.unlink(missing_ok=True)
