"""Filesystem faults on the paths a run or a tool reads and writes, found before any model is built.

Each check raises :class:`PreflightError` with one line that names the setting and the path, says what is
wrong (missing, a file where a directory belongs or the reverse, permission denied, a read-only filesystem,
no space left) and what to do. Nothing is created, written or removed here: a directory a run will create is
judged by its nearest existing parent, which must be a writable directory on a writable filesystem with room
for the first writes.

``run.py``'s preflight (``safety/preflight.py``) checks the checkpoint directory (its lock and logs live there),
the teacher cache, the model and teacher checkpoints, block configs and local datasets; ``tools.evaluate``,
``tools.plot_run``, ``tools.tournament`` and ``tools.demo`` check their own inputs and outputs with the same
functions.
"""

import os
from pathlib import Path

from common.errors import PreflightError

# Free bytes a directory's filesystem must hold before a run starts: the lock, the first log lines and a
# checkpoint's metadata; far less than a checkpoint, whose own writes are guarded where they happen.
MIN_FREE_BYTES = 1 << 20


def writable_dir(key: str, path: "str | os.PathLike") -> Path:
    """``path`` is a directory this process can write into, or one it can create; returns it.

    ``key`` names the setting in the message (``checkpoint.checkpoint_dir``, ``--out``).
    """
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise PreflightError(f"{key}={path} is a file, not a directory; pass a directory (or move the file away)")
    parent = _nearest_existing(target)
    if not parent.is_dir():
        raise PreflightError(f"{key}={path} cannot be created: {parent} is a file; pass a path under a directory")
    _check_writable(key, path, parent)
    return target


def writable_file(key: str, path: "str | os.PathLike") -> Path:
    """``path`` is a file this process can create or overwrite in an existing folder (an output such as a PNG);
    returns it."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise PreflightError(f"{key}={path} is a directory; pass a file name (e.g. {Path(path) / 'out.png'})")
    folder = target.absolute().parent
    if not folder.is_dir():
        raise PreflightError(f"{key}={path}: the folder {folder} does not exist; create it or pass another path")
    _check_writable(key, path, folder)
    if target.exists() and not os.access(target, os.W_OK):
        raise PreflightError(f"{key}={path}: permission denied: this user cannot overwrite it; pass another file "
                             "name or change its permissions")
    return target


def readable_dir(key: str, path: "str | os.PathLike", what: str = "an existing directory") -> Path:
    """``path`` is an existing directory this process can list and read; returns it. ``what`` says what to pass
    instead (``"the directory of a Hugging Face checkpoint"``)."""
    target = Path(path).expanduser()
    if not target.exists():
        raise PreflightError(f"{key}={path} does not exist; pass {what}")
    if not target.is_dir():
        raise PreflightError(f"{key}={path} is a file, not a directory; pass {what}")
    _check_readable(key, path, target)
    return target


def readable_file(key: str, path: "str | os.PathLike", what: str = "an existing file") -> Path:
    """``path`` is an existing file this process can read; returns it."""
    target = Path(path).expanduser()
    if not target.exists():
        raise PreflightError(f"{key}={path} does not exist; pass {what}")
    if target.is_dir():
        raise PreflightError(f"{key}={path} is a directory, not a file; pass {what}")
    _check_readable(key, path, target)
    return target


def readable(key: str, path: "str | os.PathLike", what: str = "an existing file or directory") -> Path:
    """``path`` is an existing file or directory this process can read (a dataset may be either)."""
    target = Path(path).expanduser()
    if not target.exists():
        raise PreflightError(f"{key}={path} does not exist; pass {what}")
    _check_readable(key, path, target)
    return target


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_readable(key: str, path, target: Path) -> None:
    if not os.access(target, os.R_OK | (os.X_OK if target.is_dir() else 0)):
        raise PreflightError(f"{key}={path}: permission denied: this user cannot read it; change its permissions "
                             "or pass a path you can read")


def _check_writable(key: str, path, directory: Path) -> None:
    stats = os.statvfs(directory)
    if stats.f_flag & os.ST_RDONLY:
        raise PreflightError(f"{key}={path} is on a read-only filesystem ({directory}); pass a directory on a "
                             "writable filesystem")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PreflightError(f"{key}={path}: permission denied: this user cannot write in {directory}; pass a "
                             "directory you can write, or change its permissions")
    free = stats.f_bavail * stats.f_frsize
    if free < MIN_FREE_BYTES:
        raise PreflightError(f"{key}={path}: no space left on the filesystem of {directory} ({free} bytes free); "
                             "free some space or pass a directory on another filesystem")


def check_run(cfg, mode: str) -> None:
    """The paths of a ``run.py`` job that preflight's other checks do not read: the checkpoint directory (the lock,
    ``training.jsonl`` and ``validation.jsonl`` live there, so it is checked even with checkpointing off), block
    configs, and the teacher cache (written by ``--mode teacher_cache``, read by ``--mode kd``)."""
    checkpoint_dir = cfg.get("checkpoint.checkpoint_dir", None)
    if checkpoint_dir is not None and mode != "teacher_cache":
        writable_dir("checkpoint.checkpoint_dir", checkpoint_dir)
    for section in ("model", "teacher_model"):
        block_configs = cfg.get(f"{section}.block_configs_path", None) if cfg.get(section, None) is not None else None
        if block_configs is not None:
            readable_file(f"{section}.block_configs_path", block_configs, "a block_configs.json file")
    cache = cfg.get("teacher_cache.path", None)
    if cache is not None and mode == "teacher_cache":
        writable_dir("teacher_cache.path", cache)
    elif cache is not None and mode == "kd":
        readable_dir("teacher_cache.path", cache, "a cache built with --mode teacher_cache")
