"""Knowledge distillation into heterogeneous (AnyModel) students, on AutoModel 0.7.0's KD recipe."""

from contextlib import contextmanager

import torch
from nemo_automodel.components.loggers.metric_logger import MetricsSample
from nemo_automodel.components.training.rng import ScopedRNG
from nemo_automodel.recipes.llm import kd
from nemo_automodel.recipes.llm.train_ft import TrainFinetuneRecipeForNextTokenPrediction


class KDConfigError(ValueError):
    """A KD setting that cannot train; the message names the key and the fix."""


class KnowledgeDistillationRecipeForNextTokenPrediction(kd.KnowledgeDistillationRecipeForNextTokenPrediction):
    """AutoModel's KD recipe (its loop, teacher handling, logging and checkpointing), plus:

    - Config checks before any weights load: ``kd_ratio`` in [0, 1] and ``kd_loss_fn.temperature > 0``.
    - Heterogeneous students: built through ``patch_automodel`` (``model.anymodel_descriptor``,
      ``model.block_configs_path``) so they get the recipe's FSDP2/TP/PP ``distributed_setup``.
    - PP with ordinary variable-length batches (``distributed.pp_size > 1``): torch's pipeline
      schedule calls the loss once more while inferring gradient shapes; that call no longer
      consumes a teacher microbatch or enters the logged losses.
    - PP teacher under ``no_grad`` instead of ``inference_mode``, which FSDP2 rejects.
    - Validation under PP: ``val_loss``, ``ce_loss``, ``kd_loss`` every ``step_scheduler.val_every_steps``,
      written to ``<checkpoint_dir>/validation.jsonl`` as without PP.
    - ``kd_loss_fn: loss.KDLoss`` by default: forward KL on vocab-sharded logits (see ``loss.py``).
    """

    def setup(self):
        """Validate the KD settings, then build everything as AutoModel does."""
        check_kd_config(self.cfg)
        super().setup()

    def _make_pp_kd_loss_wrapper(self):
        """The parent's PP loss (CE + KD per microbatch), minus the schedule's shape-inference call."""
        kd_loss = super()._make_pp_kd_loss_wrapper()
        schedule = self.pp.info.schedule

        def pp_kd_loss_fn(logits, target, **kwargs):
            if not _backward_initialized(schedule):
                # Gradient-shape inference on the first step: any loss that depends on the logits works.
                return logits.sum() * 0.0
            return kd_loss(logits, target, **kwargs)

        return pp_kd_loss_fn

    def _forward_backward_step_pp(self, idx, batch, **kwargs):
        """The parent's PP step, with stage shapes set for this batch's length and the teacher under ``no_grad``.

        ``batch["input_ids"]``: ``[local_batch, seq]``; ``seq`` may change from batch to batch.
        """
        # Pipeline stages fix their send/receive buffer shapes; AutoModel's CE recipe resets them
        # per batch, its KD recipe does not, so the second length seen breaks the P2P exchange.
        seq_len = batch["input_ids"].shape[1]
        self.pp.update_seq_len(seq_len)
        if self.teacher_pp is not None:
            self.teacher_pp.update_seq_len(seq_len)
        with _inference_mode_as_no_grad():
            return super()._forward_backward_step_pp(idx, batch, **kwargs)

    def _run_student_train_validation_loop(self):
        """AutoModel's training loop, validation included, whatever the parallelism."""
        return TrainFinetuneRecipeForNextTokenPrediction.run_train_validation_loop(self)

    @torch.no_grad()
    def _run_validation_epoch(self, val_dataloader):
        """Validation losses per label token; under PP the last stage computes them and broadcasts."""
        if not self.pp_enabled:
            return super()._run_validation_epoch(val_dataloader)

        ignore_index = kd._get_loss_ignore_index(self.loss_fn)
        # Token sums of the mixed loss, CE and KD; only the last stage's are non-zero.
        sums = torch.zeros(3, dtype=torch.float64, device=self.dist_env.device)
        num_label_tokens = 0
        with ScopedRNG(seed=1, ranked=True):
            for mp in self.model_parts:
                mp.eval()
            for batch in val_dataloader:
                num_label_tokens += kd._count_label_tokens(batch["labels"], ignore_index)
                self._ce_loss_buffer.clear()
                self._kd_loss_buffer.clear()
                loss_buffer = []
                self._forward_backward_step_pp(
                    0, batch, loss_buffer=loss_buffer, num_label_tokens=None, num_batches=1, is_train=False
                )
                if self.pp.info.has_last_stage:
                    sums += torch.stack([
                        torch.stack(loss_buffer).sum(),
                        torch.stack(self._ce_loss_buffer).sum(),
                        torch.stack(self._kd_loss_buffer).sum(),
                    ]).to(sums)
            self._ce_loss_buffer.clear()
            self._kd_loss_buffer.clear()

        sums = self._broadcast_from_last_pp_stage(self._dp_allreduce(sums, include_cp=True))
        num_label_tokens = self._dp_allreduce(torch.tensor(num_label_tokens, dtype=torch.long)).item()
        val_loss, ce_loss, kd_loss = (sums / max(num_label_tokens, 1)).tolist()
        return MetricsSample(
            step=self.step_scheduler.step,
            epoch=self.step_scheduler.epoch,
            metrics={
                "val_loss": val_loss,
                "ce_loss": ce_loss,
                "kd_loss": kd_loss,
                "lr": self.optimizer[0].param_groups[0]["lr"],
                "num_label_tokens": num_label_tokens,
                "mem": torch.cuda.max_memory_allocated() / 1024**3,
            },
        )


def check_kd_config(cfg) -> None:
    """Raise :class:`KDConfigError` for a KD setting that cannot train."""
    kd_ratio = cfg.get("kd_ratio", 0.5)
    if not isinstance(kd_ratio, (int, float)) or not 0.0 <= float(kd_ratio) <= 1.0:
        raise KDConfigError(f"kd_ratio={kd_ratio!r} must be a number in [0, 1] (0: CE only, 1: KD only)")
    if (cfg.get("distributed.pp_size", 1) or 1) > 1 and (cfg.get("distributed.cp_size", 1) or 1) > 1:
        raise KDConfigError("distributed.pp_size > 1 with distributed.cp_size > 1 is not supported for KD; set one of them to 1")
    temperature = cfg.get("kd_loss_fn.temperature", 1.0)
    if not isinstance(temperature, (int, float)) or float(temperature) <= 0.0:
        raise KDConfigError(f"kd_loss_fn.temperature={temperature!r} must be a number > 0 (1.0 is the usual choice)")


def _backward_initialized(schedule) -> bool:
    # torch 2.13 keeps this flag on single-stage schedules and its plural on multi-stage ones.
    return getattr(schedule, "_stage_backward_initialized", getattr(schedule, "_stages_backward_initialized", True))


@contextmanager
def _inference_mode_as_no_grad():
    # The parent runs the PP teacher under torch.inference_mode(); FSDP2 then fails with
    # "Inference tensors do not track version counter". no_grad saves the same memory.
    inference_mode = torch.inference_mode
    torch.inference_mode = lambda mode=True: torch.no_grad()
    try:
        yield
    finally:
        torch.inference_mode = inference_mode
