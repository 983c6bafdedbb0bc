"""The offline teacher cache on disk: a manifest and shards of sparse teacher entries, keyed by sample.

Layout of ``teacher_cache.path``::

    manifest.json                      what the cache is valid for (see :func:`build_settings`), and once
                                       complete, every shard with its size in bytes
    <split>/r<rank>-<seq>.safetensors  one shard: the entries of some samples, written whole or not at all

A sample's key is a 16-byte hash of its unpadded token ids and labels (:func:`row_keys`), so a cache built at
one layout (dp size, batch size, process count) serves any other, and a sample the cache does not hold is
found missing rather than matched to another's entries. Per sample, a shard keeps one entry per label token,
in position order (the rows the fused loss selects).

Shard tensors (``n`` samples, ``T`` label tokens in all, ``k`` slots)::

    keys     [n, 16] uint8    lengths  [n] int32 (label tokens per sample)
    ids      [T, k, 3] uint8  (little-endian 24-bit vocabulary ids: vocabularies up to 16,777,216 tokens)
    sampled: weights [T, k] uint8 (units of 1 / 255), neg_entropy [T] fp32  ->  4k + 4 bytes a label token
             (52 at k = 12)
    topk:    probs  [T, k] fp32, tail        [T] fp32  ->  7k + 4 bytes a label token

A shard is written to ``<name>.tmp``, flushed to disk and renamed, so a killed build never leaves a partial
shard under a shard's name; :class:`CacheWriter` deletes such leftovers and resumes after the samples whose
shards exist.
"""

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from distillation.cached_kd import WEIGHT_UNITS, SparseTargets

MANIFEST = "manifest.json"
DATASET_SECTIONS = ("dataset", "validation_dataset")
FORMAT = 3  # sampled entries: 3 the head exact and the rest drawn, 2 systematic draws as counts, 1 independent ones
KEY_BYTES = 16
ID_BYTES = 3
MAX_VOCAB = 1 << (8 * ID_BYTES)
SHARD_SUFFIX = ".safetensors"


def row_keys(input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: "torch.Tensor | None") -> list[bytes]:
    """One key per row of a ``[B, S]`` batch: a hash of the row's real tokens (``attention_mask``; all without it)
    and their labels, whatever padding the batch added."""
    keys = []
    for b in range(input_ids.shape[0]):
        real = slice(None) if attention_mask is None else attention_mask[b].bool()
        digest = hashlib.blake2b(digest_size=KEY_BYTES)
        digest.update(input_ids[b][real].to(torch.int64).cpu().numpy().tobytes())
        digest.update(b"|")
        digest.update(labels[b][real].to(torch.int64).cpu().numpy().tobytes())
        keys.append(digest.digest())
    return keys


def entry_bytes(kind: str, k: int) -> int:
    """Bytes a label token takes in a shard (the per-sample key and length aside)."""
    return (ID_BYTES + 1) * k + 4 if kind == "sampled" else (ID_BYTES + 4) * k + 4


def tokenizer_digest(path: str | os.PathLike) -> str:
    """A hash of the tokenizer at ``path`` as token ids go: its vocabulary and its special tokens' ids."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    specials = {name: getattr(tokenizer, name, None) for name in ("pad_token_id", "bos_token_id", "eos_token_id")}
    content = json.dumps([sorted(tokenizer.get_vocab().items()), specials], sort_keys=True)
    return hashlib.sha256(content.encode()).hexdigest()


def build_settings(cfg, model_section: str = "teacher_model", with_teacher: bool = True) -> dict:
    """What a cache built from ``cfg`` is valid for: the teacher's weights (``with_teacher``), the tokenizer, both
    datasets with their preprocessing (the sequence length included), the KD temperature, the kind, ``k`` and the
    seed. The tokenizer is ``dataset.tokenizer``'s, else ``model_section``'s checkpoint's: the teacher's for a build,
    the student's for a KD run reading the cache."""
    own = str(cfg.get(f"{model_section}.pretrained_model_name_or_path"))
    tokenizer = cfg.get("dataset.tokenizer.pretrained_model_name_or_path", None) or own
    settings = {
        "format": FORMAT,
        "kind": cfg.get("teacher_cache.kind", "sampled"),
        "k": cfg.get("teacher_cache.k", 12),
        "seed": cfg.get("teacher_cache.seed", 0),
        "temperature": float(cfg.get("kd_loss_fn.temperature", 1.0)),
        "tokenizer": tokenizer_digest(tokenizer),
        "datasets": dataset_settings(cfg),
    }
    if with_teacher:
        settings["teacher"] = teacher_fingerprint(cfg)
    return settings


def teacher_fingerprint(cfg) -> str:
    """``common.checkpoint.fingerprint`` of ``teacher_model``: what its weights, config and block configs are."""
    from architectures.descriptors import load_block_configs
    from common.checkpoint import fingerprint

    teacher = str(cfg.get("teacher_model.pretrained_model_name_or_path"))
    return fingerprint(teacher, load_block_configs(teacher, cfg.get("teacher_model.block_configs_path", None), None))


def dataset_settings(cfg) -> dict:
    """The ``dataset`` and ``validation_dataset`` sections as plain data: which data, and how it is preprocessed."""
    return {section: _plain(cfg.get(section, None)) for section in DATASET_SECTIONS}


def _plain(node):
    """A config section as plain data (``_target_`` by its dotted name), to compare and to store as JSON."""
    if node is None:
        return None
    return json.loads(json.dumps(node.to_yaml_dict(use_orig_values=True), default=str, sort_keys=True))


def read_manifest(path: str | os.PathLike) -> dict | None:
    """The manifest of the cache at ``path``; None where there is none."""
    file = Path(path) / MANIFEST
    return json.loads(file.read_text()) if file.is_file() else None


def write_json_atomically(file: Path, data: dict) -> None:
    tmp = file.with_name(file.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, file)


def shard_files(path: str | os.PathLike) -> list[Path]:
    """Every complete shard under the cache (``.tmp`` leftovers excluded), sorted by name."""
    return sorted(p for p in Path(path).glob(f"*/r*{SHARD_SUFFIX}") if p.is_file())


class CacheWriter:
    """Writes one rank's entries of one split as shards of about ``flush_tokens`` label tokens each.

    ``add(key, entries)`` takes a sample's :class:`SparseTargets` (its label tokens in position order);
    ``close()`` writes what is left. Shard names carry the writing rank and a sequence number that starts after
    the rank's existing shards, so a resumed build never overwrites one.
    """

    def __init__(self, path: str | os.PathLike, split: str, rank: int, kind: str, flush_tokens: int = 1 << 16):
        self.dir = Path(path) / split
        self.dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.kind, self.flush_tokens = f"r{rank:04d}-", kind, flush_tokens
        existing = [int(p.stem.split("-")[1]) for p in self.dir.glob(f"{self.prefix}*{SHARD_SUFFIX}")]
        self.seq = max(existing, default=-1) + 1
        self.keys, self.entries, self.tokens, self.bytes_written = [], [], 0, 0

    def add(self, key: bytes, entries: SparseTargets) -> None:
        self.keys.append(key)
        self.entries.append(entries)
        self.tokens += len(entries)
        if self.tokens >= self.flush_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.keys:
            return
        entries = SparseTargets.cat(self.entries)
        tensors = {
            "keys": torch.frombuffer(bytearray(b"".join(self.keys)), dtype=torch.uint8).reshape(-1, KEY_BYTES),
            "lengths": torch.tensor([len(e) for e in self.entries], dtype=torch.int32),
            "ids": _pack_ids(entries.ids),
        }
        if self.kind == "sampled":
            units = (entries.weights.double() * WEIGHT_UNITS).round()  # exact: weights lie on that grid
            tensors["weights"] = units.to(torch.uint8)
            tensors["neg_entropy"] = entries.neg_entropy.float()
        else:
            tensors["probs"] = entries.weights.float()
            tensors["tail"] = entries.tail.float()
        file = self.dir / f"{self.prefix}{self.seq:06d}{SHARD_SUFFIX}"
        tmp = file.with_name(file.name + ".tmp")
        save_file({name: t.contiguous() for name, t in tensors.items()}, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, file)
        self.bytes_written += file.stat().st_size
        self.seq += 1
        self.keys, self.entries, self.tokens = [], [], 0

    def close(self) -> None:
        self.flush()


def start_manifest(path: str | os.PathLike, settings: dict) -> None:
    """Write the manifest of a build that has not finished (``complete: false``) unless one is there."""
    Path(path).mkdir(parents=True, exist_ok=True)
    if read_manifest(path) is None:
        write_json_atomically(Path(path) / MANIFEST, {**settings, "complete": False})


def done_keys(path: str | os.PathLike) -> set[bytes]:
    """The keys of every sample in a complete shard of the cache at ``path``."""
    keys = set()
    for file in shard_files(path):
        with safe_open(str(file), framework="pt") as f:
            keys.update(_chunks(f.get_tensor("keys")))
    return keys


def complete_manifest(path: str | os.PathLike, settings: dict) -> dict:
    """List every shard with its size, count samples and label tokens per split, and mark the cache complete."""
    root = Path(path)
    shards, splits = {}, {}
    for file in shard_files(root):
        shards[str(file.relative_to(root))] = file.stat().st_size
        with safe_open(str(file), framework="pt") as f:
            lengths = f.get_tensor("lengths")
        split = splits.setdefault(file.parent.name, {"samples": 0, "label_tokens": 0})
        split["samples"] += lengths.numel()
        split["label_tokens"] += int(lengths.sum())
    label_tokens = sum(s["label_tokens"] for s in splits.values())
    manifest = {**settings, "complete": True, "shards": shards, "splits": splits,
                "samples": sum(s["samples"] for s in splits.values()), "label_tokens": label_tokens,
                "bytes_per_label_token": sum(shards.values()) / max(label_tokens, 1)}
    write_json_atomically(root / MANIFEST, manifest)
    return manifest


def remove_partial_shards(path: str | os.PathLike) -> None:
    """Delete the ``.tmp`` files a killed build left (never readable as shards)."""
    for tmp in Path(path).glob("*/*.tmp"):
        tmp.unlink(missing_ok=True)


class TeacherCache:
    """Reads a complete cache: ``lookup(keys)`` gives the entries of those samples, concatenated in that order.

    The index (key -> shard and rows) holds every shard's keys; the entries stay in the shard files (memory-mapped
    by safetensors) until looked up.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.manifest = read_manifest(path)
        self.kind, self.k = self.manifest["kind"], self.manifest["k"]
        self.index: dict[bytes, tuple[int, int, int]] = {}
        self.shards = [self.path / name for name in sorted(self.manifest["shards"])]
        self._open = {}
        for number, file in enumerate(self.shards):
            with safe_open(str(file), framework="pt") as f:
                keys, lengths = f.get_tensor("keys"), f.get_tensor("lengths").tolist()
            start = 0
            for key, length in zip(_chunks(keys), lengths):
                self.index[key] = (number, start, length)
                start += length

    def batch_targets(self, batch: dict, microbatch_size: int | None = None) -> "SparseTargets | list[SparseTargets]":
        """The entries of a ``[B, S]`` batch's rows (``input_ids``, ``labels``, ``attention_mask`` as the data loader
        gives them), in the fused loss's row order; with ``microbatch_size``, one per pipeline microbatch of rows."""
        keys = row_keys(batch["input_ids"], batch["labels"], batch.get("attention_mask"))
        if microbatch_size is None:
            return self.lookup(keys)
        return [self.lookup(keys[i:i + microbatch_size]) for i in range(0, len(keys), microbatch_size)]

    def lookup(self, keys: list[bytes]) -> SparseTargets:
        """The entries of ``keys``' samples, one after the other; ``KeyError`` names a sample the cache lacks."""
        parts = []
        for key in keys:
            if key not in self.index:
                raise KeyError(f"sample {key.hex()} is not in the teacher cache at {self.path}: it was built from "
                               "other data or preprocessing; rebuild it with --mode teacher_cache")
            number, start, length = self.index[key]
            parts.append(self._read(number, start, start + length))
        return SparseTargets.cat(parts)

    def _read(self, number: int, start: int, end: int) -> SparseTargets:
        f = self._open.get(number)
        if f is None:
            f = self._open[number] = safe_open(str(self.shards[number]), framework="pt")
        ids = _unpack_ids(f.get_slice("ids")[start:end])
        if self.kind == "sampled":
            weights = f.get_slice("weights")[start:end].to(torch.float32) / WEIGHT_UNITS
            return SparseTargets(ids, weights, f.get_slice("neg_entropy")[start:end])
        probs, tail = f.get_slice("probs")[start:end], f.get_slice("tail")[start:end]
        neg_entropy = torch.where(probs > 0, probs * probs.log(), torch.zeros_like(probs)).sum(-1)
        neg_entropy += torch.where(tail > 0, tail * tail.log(), torch.zeros_like(tail))
        return SparseTargets(ids, probs, neg_entropy, tail)


def _pack_ids(ids: torch.Tensor) -> torch.Tensor:
    """``[T, k]`` ids -> ``[T, k, 3]`` uint8, the low three bytes of each (little-endian)."""
    return ids.to(torch.int32).contiguous().view(torch.uint8).reshape(*ids.shape, 4)[..., :ID_BYTES].contiguous()


def _unpack_ids(packed: torch.Tensor) -> torch.Tensor:
    """``[T, k, 3]`` uint8 -> ``[T, k]`` int64."""
    padded = torch.zeros(*packed.shape[:-1], 4, dtype=torch.uint8)
    padded[..., :ID_BYTES] = packed
    return padded.view(torch.int32).squeeze(-1).long()


def _chunks(keys: torch.Tensor) -> list[bytes]:
    raw = keys.numpy().tobytes()
    return [raw[i:i + KEY_BYTES] for i in range(0, len(raw), KEY_BYTES)]
