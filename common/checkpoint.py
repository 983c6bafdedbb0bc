"""A model section's checkpoint as the checks read it from disk, shared by preflight and the features it asks."""

from dataclasses import dataclass


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
