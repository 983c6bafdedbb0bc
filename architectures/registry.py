"""The one table of architectures: which module serves each ModelOpt descriptor.

To add a descriptor: write ``architectures/<name>.py`` with a subclass of ``interface.Architecture`` (or use
``interface.Dense`` for a dense decoder ModelOpt builds correctly), and list it in :data:`ARCHITECTURES`. Nothing
else imports an architecture module; everything asks the functions below (``docs/adding_an_architecture.md``).
"""

from functools import cache

from torch import nn

from architectures.gpt_oss import GptOss
from architectures.interface import Architecture, Dense
from architectures.nemotron_h import NemotronH
from architectures.qwen3_vl import Qwen3VL

ARCHITECTURES: tuple[Architecture, ...] = (
    Dense("llama"), Dense("qwen2"), Dense("qwen3"), Dense("mistral_small"),
    GptOss(), NemotronH(), Qwen3VL(),
)
_BY_DESCRIPTOR = {name: arch for arch in ARCHITECTURES for name in arch.descriptor_names}
_BY_MODEL_TYPE = {model_type: arch for arch in ARCHITECTURES for model_type in arch.model_types}
# Models no architecture claims (a dense student, a plain teacher) get the interface's defaults.
_DEFAULT = Architecture()


@cache
def for_descriptor(name: str) -> Architecture:
    """The architecture serving a ModelOpt descriptor name; a descriptor ModelOpt registers and this table does
    not list gets the interface's defaults (its block configs unchecked), under its own name."""
    return _BY_DESCRIPTOR.get(name) or Architecture(name)


def for_model_type(model_type: str | None) -> Architecture | None:
    """The architecture that claims a ``config.json`` ``model_type``; None where none does."""
    return _BY_MODEL_TYPE.get(model_type)


def for_model(model: nn.Module) -> Architecture:
    """The architecture of a built model (or pipeline stage), the defaults where none claims it."""
    return next((arch for arch in ARCHITECTURES if arch.owns(model)), _DEFAULT)


def image_text_model_types() -> dict[str, str]:
    """Image-text ``model_type`` -> the descriptor this example builds it with."""
    return {model_type: arch.descriptor_names[0] for arch in ARCHITECTURES if arch.image_text
            for model_type in arch.model_types}


def install() -> None:
    """Every architecture's process-wide patches. Idempotent."""
    for arch in ARCHITECTURES:
        arch.install()


def uninstall() -> None:
    for arch in ARCHITECTURES:
        arch.uninstall()
