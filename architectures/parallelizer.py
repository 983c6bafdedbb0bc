"""AutoModel's FSDP2 + TP parallelizer with each architecture's per-layer TP plan.

AutoModel builds a model and parallelizes it inside ``from_pretrained``, before the model can be handed to
anyone, and an import-path ``distributed.tp_plan`` is called without the model. So ``patch_automodel`` builds
AnyModel checkpoints under :func:`per_layer_tp_plans`, which hands them :class:`AnyModelParallelizer`; the
plan itself comes from the model's architecture (``registry.for_model(model).tp_plan``).
"""

from contextlib import contextmanager

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from nemo_automodel.components.distributed import model_parallelizer
from nemo_automodel.components.distributed.parallelizer import ModelParallelizer

from architectures import registry


class AnyModelParallelizer(ModelParallelizer):
    """AutoModel's FSDP2 + TP parallelizer, with the TP plan specialized layer by layer."""

    def _validate_tp_mesh(self, model: nn.Module, tp_mesh: DeviceMesh) -> None:
        """Skip AutoModel's check of the config's global head counts: the per-layer plan only
        shards the attention of layers whose own head counts divide the TP size."""

    def _apply(self, model: nn.Module, device_mesh: DeviceMesh, **kwargs) -> nn.Module:
        tp_size = device_mesh["tp"].size()
        if tp_size > 1:
            kwargs["tp_shard_plan"] = registry.for_model(model).tp_plan(
                model, tp_size, kwargs.get("sequence_parallel", False), kwargs.get("tp_shard_plan"))
        return super()._apply(model, device_mesh, **kwargs)


ANYMODEL_PARALLELIZER = AnyModelParallelizer()


@contextmanager
def per_layer_tp_plans():
    """Within the block, AutoModel parallelizes models that bring no parallelizer of their own (or one the
    architecture replaces) with :class:`AnyModelParallelizer` (``patch_automodel`` wraps each AnyModel build in it)."""
    original = model_parallelizer.get_model_parallelizer

    def get_model_parallelizer(model: nn.Module) -> ModelParallelizer:
        parallelizer = original(model)
        if type(parallelizer) is ModelParallelizer or registry.for_model(model).replaces_automodel_parallelizer:
            return ANYMODEL_PARALLELIZER
        return parallelizer

    model_parallelizer.get_model_parallelizer = get_model_parallelizer
    try:
        yield
    finally:
        model_parallelizer.get_model_parallelizer = original
