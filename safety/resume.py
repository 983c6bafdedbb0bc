"""Resume what a job left in its ``checkpoint_dir``: the same student wherever it now lies, on any layout.

AutoModel 0.7.0 resumes from the newest complete checkpoint of ``checkpoint_dir``, with two gaps that
clusters hit:

* **The student is recognised by its path string.** The same checkpoint staged to node-local disk, or
  spelled with a trailing slash, "is incompatible", so the run restarts from step 0 and dies at its
  first save (``FileExistsError``). Here a student is recognised by what it is: :func:`fingerprint`
  hashes its ``config.json`` (minus where it was saved from), its block configs and its weight files
  (every safetensors header, and 64 KiB samples of every file). ``run.py`` records the fingerprint in
  ``<checkpoint_dir>/student.json``; :func:`check_same_student` (preflight) refuses, in one line naming
  both, a different student when there is a checkpoint to resume, and :func:`restore_target` tells the
  recipe to restore the same student's checkpoint whatever its path is now.
* **The data position is per data-parallel rank.** Each rank reloads ``dataloader_dp_rank_<r>.pt``
  whatever the new data-parallel size, so a resume onto another layout trains on other batches.
  :func:`install` makes the checkpointer read every saved rank's position instead and hands each new rank the
  position an uninterrupted run would have: batches are a fixed order of samples split over the ranks
  (``StatefulDistributedSampler``), so after ``n`` samples in all, rank ``r`` of ``dp`` ranks has
  yielded ``n / dp``. Model and optimizer already reshard through DCP. Per-rank RNG states that the old
  layout did not have are left as seeded (``rng.ranked``). :func:`install` puts both into AutoModel's
  ``Checkpointer``, so the KD and the pretrain recipe resume the same way.
"""

import glob
import json
import logging
import os
import re
from pathlib import Path

from common import checkpoint
from common.errors import PreflightError

STUDENT_FILE = "student.json"


def fingerprint(path: str | os.PathLike, block_configs_path: str | os.PathLike | None = None) -> str:
    """A hash of what the checkpoint at ``path`` is: config, block configs, weights (see the module docstring)."""
    from architectures.descriptors import load_block_configs

    return checkpoint.fingerprint(path, load_block_configs(path, block_configs_path, None))


def _student(cfg) -> tuple[str, str | None]:
    return str(cfg.get("model.pretrained_model_name_or_path")), cfg.get("model.block_configs_path", None)


def _resumable(cfg) -> str | None:
    """The checkpoint auto-resume would load (no ``restore_from``, checkpointing on), if any."""
    from nemo_automodel.components.checkpoint.utils import find_latest_checkpoint

    if not cfg.get("checkpoint.enabled", True) or cfg.get("checkpoint.restore_from", None):
        return None
    directory = cfg.get("checkpoint.checkpoint_dir", None)
    latest = find_latest_checkpoint(directory) if directory and os.path.isdir(directory) else None
    return None if latest is None else str(latest)


def check_same_student(cfg) -> None:
    """Refuse to resume a ``checkpoint_dir`` whose checkpoints trained another student (one line, both named)."""

    latest = _resumable(cfg)
    record = Path(cfg.get("checkpoint.checkpoint_dir", ".")) / STUDENT_FILE
    path, block_configs_path = _student(cfg)
    if latest is None or not record.is_file() or not os.path.isdir(path):
        return
    saved = json.loads(record.read_text())
    if saved["fingerprint"] != fingerprint(path, block_configs_path):
        raise PreflightError(
            f"checkpoint.checkpoint_dir={cfg.get('checkpoint.checkpoint_dir')} holds checkpoints (newest: "
            f"{Path(latest).name}) of another student, {saved['path']}, not model.pretrained_model_name_or_path="
            f"{path} (their config, block configs or weights differ); resume with that student, or give this one "
            "its own checkpoint.checkpoint_dir")


def record_student(cfg) -> None:
    """Write ``<checkpoint_dir>/student.json`` (rank 0), unless it describes the student of existing checkpoints."""
    path, block_configs_path = _student(cfg)
    directory = cfg.get("checkpoint.checkpoint_dir", None)
    if int(os.environ.get("RANK", "0")) != 0 or not directory or not os.path.isdir(path):
        return
    record = Path(directory) / STUDENT_FILE
    if record.is_file() and _resumable(cfg) is not None:
        return  # check_same_student has shown it is this student
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"path": path, "fingerprint": fingerprint(path, block_configs_path)}))


def restore_target(cfg) -> str | None:
    """The checkpoint to restore explicitly because it is this student's, whatever its path string was."""
    latest = _resumable(cfg)
    return latest if latest is not None and (Path(cfg.get("checkpoint.checkpoint_dir")) / STUDENT_FILE).is_file() \
        else None


def _saved_ranks(state_dir: str, name: str) -> dict[int, str]:
    pattern = re.compile(rf"{re.escape(name)}_(?:dp|global)_rank_(\d+)\.pt$")
    return {int(m.group(1)): f for f in glob.glob(os.path.join(state_dir, "*.pt")) if (m := pattern.search(f))}


def _resharded_dataloader_state(states: list[dict], dp_rank: int, dp_size: int, batch_size: int) -> dict:
    """Rank ``dp_rank``'s position, of ``dp_size`` ranks, after all the samples the saved ranks yielded."""
    total = sum(s["_sampler_iter_state"]["samples_yielded"] for s in states)
    if total % (dp_size * batch_size):
        raise RuntimeError(f"resume: {total} samples were consumed, which {dp_size} data-parallel ranks with local "
                           f"batches of {batch_size} cannot continue from exactly; resume with the old layout")
    samples = total // dp_size
    state = json.loads(json.dumps(states[0], default=lambda o: None))  # a deep copy of plain values
    state["_sampler_iter_state"]["samples_yielded"] = samples
    state["_sampler_iter_state"]["sampler_state"]["yielded"] = samples
    state["_sampler_iter_yielded"] = state["_num_yielded"] = samples // batch_size
    return state


_original: dict[str, object] = {}


def _load_on_dp_ranks(self, state, state_name: str, path: str) -> None:
    """AutoModel's ``Checkpointer.load_on_dp_ranks``, for a dataloader saved by another number of ranks."""
    from nemo_automodel.components.checkpoint.checkpointing import load_torch_ckpt
    from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

    sampler = getattr(state, "sampler", None)
    saved = _saved_ranks(os.path.join(path, state_name), state_name)
    if not isinstance(sampler, StatefulDistributedSampler) or len(saved) in (0, sampler.num_replicas):
        return _original["load_on_dp_ranks"](self, state, state_name, path)
    logging.info("resume: %s was saved by %d data-parallel ranks, this run has %d; continuing at the same global "
                 "sample", state_name, len(saved), sampler.num_replicas)
    states = [load_torch_ckpt(saved[r], weights_only=False) for r in sorted(saved)]
    state.load_state_dict(_resharded_dataloader_state(states, sampler.rank, sampler.num_replicas, state.batch_size))


def _load_on_global_ranks(self, state, state_name: str, path: str) -> None:
    """AutoModel's ``Checkpointer.load_on_global_ranks``; a rank the saving layout did not have keeps its state."""
    if os.path.exists(os.path.join(path, state_name, f"{state_name}_global_rank_{_global_rank()}.pt")):
        return _original["load_on_global_ranks"](self, state, state_name, path)
    logging.info("resume: no %s state for rank %d in %s; keeping its seeded state", state_name, _global_rank(), path)


def install() -> None:
    """Make AutoModel's checkpointer resume data positions and per-rank state across layouts. Idempotent."""
    from nemo_automodel.components.checkpoint.checkpointing import Checkpointer

    if _original:
        return
    for name, replacement in (("load_on_dp_ranks", _load_on_dp_ranks), ("load_on_global_ranks", _load_on_global_ranks)):
        _original[name] = getattr(Checkpointer, name)
        setattr(Checkpointer, name, replacement)


def uninstall() -> None:
    from nemo_automodel.components.checkpoint.checkpointing import Checkpointer

    for name, original in _original.items():
        setattr(Checkpointer, name, original)
    _original.clear()


def _global_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0

