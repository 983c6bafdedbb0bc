"""Knowledge distillation into heterogeneous (AnyModel) students, on AutoModel 0.7.0's KD recipe."""

from nemo_automodel.recipes.llm import kd


class KDConfigError(ValueError):
    """A KD setting that cannot train; the message names the key and the fix."""


class KnowledgeDistillationRecipeForNextTokenPrediction(kd.KnowledgeDistillationRecipeForNextTokenPrediction):
    """AutoModel's KD recipe (its loop, PP teacher, logging and checkpointing), plus:

    - Config checks before any weights load: ``kd_ratio`` in [0, 1] and ``kd_loss_fn.temperature > 0``,
      so a typo costs seconds instead of a model load.
    - The student and teacher are built through ``patch_automodel`` (``model.anymodel_descriptor``,
      ``model.block_configs_path``), so heterogeneous Puzzletron checkpoints get the recipe's
      FSDP2/TP/PP ``distributed_setup`` like any Hugging Face model.
    - ``kd_loss_fn: loss.KDLoss`` by default: forward KL on vocab-sharded logits (see ``loss.py``).
    """

    def setup(self):
        """Validate the KD settings, then build everything as AutoModel does."""
        check_kd_config(self.cfg)
        super().setup()


def check_kd_config(cfg) -> None:
    """Raise :class:`KDConfigError` for a KD setting that cannot train."""
    kd_ratio = cfg.get("kd_ratio", 0.5)
    if not isinstance(kd_ratio, (int, float)) or not 0.0 <= float(kd_ratio) <= 1.0:
        raise KDConfigError(f"kd_ratio={kd_ratio!r} must be a number in [0, 1] (0: CE only, 1: KD only)")
    temperature = cfg.get("kd_loss_fn.temperature", 1.0)
    if not isinstance(temperature, (int, float)) or float(temperature) <= 0.0:
        raise KDConfigError(f"kd_loss_fn.temperature={temperature!r} must be a number > 0 (1.0 is the usual choice)")
