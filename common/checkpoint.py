"""A model section's checkpoint as the checks read it from disk, and a hash of what a checkpoint is."""

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

SAMPLES_PER_FILE = 16
SAMPLE_BYTES = 4096
# config.json fields that say where and with what a checkpoint was saved, not what it is.
VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "name_or_path")


@dataclass
class Checkpoint:
    """A model section's checkpoint as seen on disk. ``config`` is None for a hub id."""

    section: str
    path: str
    config: dict | None

    @property
    def key(self) -> str:
        return f"{self.section}.pretrained_model_name_or_path"

    def get(self, name: str):
        """A field of ``config.json``, or of its ``text_config`` for multimodal checkpoints."""
        return self.config.get("text_config", self.config).get(name, self.config.get(name))


def fingerprint(path: str | os.PathLike, block_configs: list | None) -> str:
    """A hash of what the checkpoint at ``path`` is, wherever it lies: its ``config.json`` (minus where it was
    saved from), its ``block_configs`` (as loaded, from whichever source) and its weight files (each file's name
    and size, and 16 samples of 4 KiB spread over it, the safetensors header first)."""
    root = Path(path)
    digest = hashlib.sha256()
    config = json.loads((root / "config.json").read_text())
    digest.update(json.dumps({k: v for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS},
                             sort_keys=True).encode())
    digest.update(json.dumps(block_configs, sort_keys=True).encode())
    for file in _weight_files(root):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(root)}:{size}".encode())
        with open(file, "rb") as f:
            for i in range(SAMPLES_PER_FILE):
                f.seek(i * max(size - SAMPLE_BYTES, 0) // max(SAMPLES_PER_FILE - 1, 1))
                digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def _weight_files(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        return [root / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return sorted(root.glob("*.safetensors"))
