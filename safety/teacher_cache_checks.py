"""Preflight for the teacher cache: what ``--mode teacher_cache`` builds and what ``--mode kd`` reads.

Every refusal is one line naming the setting or file and the fix, before any process group or weights.
A KD run reads a cache only when it was built for exactly this run's teacher weights, tokenizer, datasets
(with their preprocessing and sequence length), KD temperature, kind, ``k`` and seed
(``teacher_cache.build_settings``), and every shard the manifest lists is there, whole.
"""

import os
from pathlib import Path

from common.errors import PreflightError
from distillation import cached_kd, teacher_cache
from safety.checkpoint_lock import LOCK_NAME

KEY = "teacher_cache.path"


def check_options(cfg) -> None:
    """``kind`` and ``k`` the cache can hold."""
    kind, k = cfg.get("teacher_cache.kind", "sampled"), cfg.get("teacher_cache.k", 12)
    if kind not in cached_kd.KINDS:
        raise PreflightError(f"teacher_cache.kind={kind!r} is not one of {', '.join(cached_kd.KINDS)}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise PreflightError(f"teacher_cache.k={k!r} must be an integer >= 1 (12 is the usual choice for sampled)")


def check_build(cfg, teacher) -> dict:
    """``--mode teacher_cache``: a path that is new, empty or a cache of these very settings (which the build
    resumes), a layout the builder runs and a vocabulary the cache's ids can hold. Returns the settings the manifest
    will hold."""
    check_options(cfg)
    path = cfg.get(KEY)
    vocab = teacher.get("vocab_size") if teacher.config is not None else None
    if vocab is not None and vocab > teacher_cache.MAX_VOCAB:
        raise PreflightError(f"teacher_model has vocab_size={vocab}; the cache stores ids in 3 bytes (at most "
                             f"{teacher_cache.MAX_VOCAB} tokens): distill this teacher online")
    k = cfg.get("teacher_cache.k", 12)
    if vocab is not None and cfg.get("teacher_cache.kind", "sampled") == "topk" and k > vocab:
        raise PreflightError(f"teacher_cache.k={k} is more than the vocabulary's {vocab} tokens; set teacher_cache.k "
                             f"<= {vocab} ({vocab}: the whole distribution)")
    cp_size = cfg.get("distributed.cp_size", 1) or 1
    if cp_size > 1:
        raise PreflightError(f"--mode teacher_cache with distributed.cp_size={cp_size}: the cache builder runs the "
                             "teacher with FSDP2, TP and PP; set it to 1 (the cache serves a KD run at any layout)")
    settings = teacher_cache.build_settings(cfg)
    manifest = teacher_cache.read_manifest(path)
    if manifest is None:
        # A lock a killed build left is not content (the lock itself knows whether it is stale).
        if os.path.isdir(path) and any(p.name != LOCK_NAME for p in Path(path).iterdir()):
            raise PreflightError(f"{KEY}={path} is a directory with other files and no {teacher_cache.MANIFEST}; "
                                 "pass a new or empty directory for the cache")
        return settings
    differing = _differing(manifest, settings)
    if differing:
        raise PreflightError(f"{KEY}={path} holds a cache built with other {', '.join(differing)}; pass another "
                             "teacher_cache.path, or delete that cache to rebuild it")
    return settings


def check_read(cfg) -> None:
    """``--mode kd`` with ``teacher_cache.path``: a complete cache built for this run, whole on disk, and settings
    the cached KD path computes (fused loss, forward KL, no hidden-state KD, no CP)."""
    check_options(cfg)
    path = cfg.get(KEY)
    if not cfg.get("fused_linear_loss", False):
        raise PreflightError("teacher_cache.path with fused_linear_loss=false: KD from a cache is computed by the "
                             "fused loss only; set fused_linear_loss=true")
    divergence = cfg.get("kd_loss_fn.divergence", "forward_kl")
    if divergence != "forward_kl":
        raise PreflightError(f"kd_loss_fn.divergence={divergence} with teacher_cache.path: a sparse teacher cache "
                             "gives forward KL only; set kd_loss_fn.divergence=forward_kl")
    if (cfg.get("hidden_kd.weight", 0.0) or 0.0) > 0:
        raise PreflightError("hidden_kd.weight > 0 with teacher_cache.path: hidden-state KD needs the teacher's "
                             "layer outputs, which the cache does not hold; set hidden_kd.weight=0 or distill online")
    cp_size = cfg.get("distributed.cp_size", 1) or 1
    if cp_size > 1:
        raise PreflightError(f"distributed.cp_size={cp_size} with teacher_cache.path is not supported (the cached "
                             "entries are not split over the sequence); set distributed.cp_size=1")
    manifest = teacher_cache.read_manifest(path) if os.path.isdir(path) else None
    if manifest is None:
        raise PreflightError(f"{KEY}={path} is not a teacher cache (no {teacher_cache.MANIFEST}); build one with "
                             "--mode teacher_cache and the same config")
    if not manifest.get("complete"):
        raise PreflightError(f"{KEY}={path} is a cache whose build did not finish; rerun --mode teacher_cache with "
                             "the same config to complete it")
    _check_shards(path, manifest)
    teacher = cfg.get("teacher_model.pretrained_model_name_or_path", None)
    differing = _differing(manifest, teacher_cache.build_settings(cfg, "model", with_teacher=teacher is not None))
    if "teacher weights" in differing:
        raise PreflightError(f"teacher_model.pretrained_model_name_or_path={teacher} is not the teacher the cache at "
                             f"{path} was built from; point both at the same teacher, or leave teacher_model unset")
    if differing:
        raise PreflightError(f"{KEY}={path} was built for other {', '.join(differing)} than this run's; rebuild it "
                             "with --mode teacher_cache and this config, or pass the cache built for it")


def _differing(manifest: dict, settings: dict) -> list[str]:
    names = {"datasets": "datasets (or their preprocessing)", "tokenizer": "tokenizer", "teacher": "teacher weights",
             "temperature": "kd_loss_fn.temperature", "kind": "teacher_cache.kind", "k": "teacher_cache.k",
             "seed": "teacher_cache.seed", "format": "cache format"}
    return [names.get(key, key) for key, value in settings.items() if manifest.get(key) != value]


def _check_shards(path: str, manifest: dict) -> None:
    for name, size in sorted(manifest.get("shards", {}).items()):
        file = Path(path) / name
        if not file.is_file():
            raise PreflightError(f"{KEY}={path}: shard {name} is missing; copy the whole cache directory again or "
                                 "rebuild it")
        if file.stat().st_size != size:
            raise PreflightError(f"{KEY}={path}: shard {name} has {file.stat().st_size} bytes, the manifest says "
                                 f"{size}: it is damaged or partly copied; copy it again or rebuild the cache")
