"""Knowledge distillation into heterogeneous (AnyModel) students, on AutoModel 0.7.0's KD recipe."""

import logging
import math
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from nemo_automodel.components.distributed.context_parallel import ContextParallelSharder
from nemo_automodel.components.distributed.utils import get_sync_ctx
from nemo_automodel.components.loggers.metric_logger import MetricsSample
from nemo_automodel.components.training.rng import ScopedRNG
from nemo_automodel.components.training.utils import ScopedModuleOffloading
from nemo_automodel.recipes.llm import kd
from nemo_automodel.recipes.llm.train_ft import TrainFinetuneRecipeForNextTokenPrediction

from common import flops
from distillation import fused_kd_forward, hidden_kd, label_positions, separate_meshes, teacher_cache


class NonFiniteLossError(RuntimeError):
    """A training step whose loss, CE or KD term is NaN or infinite; the message names the step and term."""


class KnowledgeDistillationRecipeForNextTokenPrediction(kd.KnowledgeDistillationRecipeForNextTokenPrediction):
    """AutoModel's KD recipe (its loop, teacher handling, logging and checkpointing), plus:

    - Non-finite loss guard: a step whose ``loss``, ``ce_loss`` or ``kd_loss`` is NaN/inf stops the run with
      :class:`NonFiniteLossError` (step and term named) before it is logged or checkpointed. Always on.
    - Heterogeneous students: built through ``patch_automodel`` (``model.anymodel_descriptor``,
      ``model.block_configs_path``) so they get the recipe's FSDP2/TP/PP ``distributed_setup``.
    - PP with ordinary variable-length batches (``distributed.pp_size > 1``): torch's pipeline
      schedule calls the loss once more while inferring gradient shapes; that call no longer
      consumes a teacher microbatch or enters the logged losses.
    - PP teacher under ``no_grad`` instead of ``inference_mode``, which FSDP2 rejects.
    - Validation under PP: ``val_loss``, ``ce_loss``, ``kd_loss`` every ``step_scheduler.val_every_steps``,
      written to ``<checkpoint_dir>/validation.jsonl`` as without PP.
    - ``mfu`` in every training record: student forward + backward and teacher forward FLOPs counted
      layer by layer (``common/flops.py``), over the GPU's peak (or ``mfu_peak_tflops``); null where no peak
      is known. The console line shows every logged metric, ``grad_norm`` and ``tps_per_gpu`` included.
    - ``kd_loss_fn: loss.KDLoss`` by default: forward KL on vocab-sharded logits (see ``loss.py``). On the logits
      path both LM heads run only where the batch has labels (``distillation/label_positions.py``).
    - Fused linear KD (``fused_linear_loss: true``, kd.yaml's default; ``false`` or absent: AutoModel's logits
      path): student and teacher stop at their final hidden states and ``FusedLinearKDLoss`` computes CE and KD
      from them and the LM-head weights, chunk by chunk, so no ``[tokens, vocab]`` logits exist; same losses,
      logs and normalisation, under FSDP2, TP, SP and PP (``distillation/fused_kd_forward.py``). At ``kd_ratio: 0`` KD is
      not computed (``kd_loss`` is logged as 0, as ``ce_loss`` is at ``kd_ratio: 1``) and, without PP and
      without ``hidden_kd``, the teacher does not run.
    - Hidden-state KD (``hidden_kd.weight > 0``, ``distillation/hidden_kd.py``): ``weight * H`` added to the loss, each student
      layer's term entering the backward at that layer (under PP, in its own stage); ``hidden_loss`` logged in
      ``training.jsonl``, ``validation.jsonl`` and on the console, and ``loss`` / ``val_loss`` include the term.
    - KD from a teacher cache (``teacher_cache.path``, built by ``--mode teacher_cache``): no teacher is built;
      each batch's sparse teacher entries are looked up by sample (``distillation/teacher_cache.py``) and the
      fused loss computes forward KL from them (``distillation/cached_kd.py``), in training and validation.
    - The teacher on its own ranks (``separate_meshes: true``) with the fused loss and hidden-state KD: the teacher
      ranks send final hidden states and the named layers' outputs instead of logits, the student ranks hold the
      teacher's LM-head rows (``distillation/separate_meshes.py``); ``teacher_bytes`` received per step is logged.
    """

    def setup(self):
        """The parent's setup (preflight has checked the ``fused_linear_loss`` settings), or with
        ``teacher_cache.path`` its student side only."""
        self.fused_linear_loss = bool(self.cfg.get("fused_linear_loss", False))
        self.hidden_kd = None
        self.teacher_cache = None
        if self.cfg.get("teacher_cache.path", None) is None:
            super().setup()
            if self.separate_meshes:
                self._setup_separate_meshes()
            return
        TrainFinetuneRecipeForNextTokenPrediction.setup(self)
        self.teacher_model = self.teacher_pp = None
        self._offload_teacher_model = False
        self.teacher_cache = teacher_cache.TeacherCache(self.cfg.get("teacher_cache.path"))
        self._setup_kd_state()
        if self.pp_enabled:
            self.pp.info.schedule._loss_fn = self._make_pp_kd_loss_wrapper()

    def _setup_kd_state(self) -> None:
        """The parent's KD state (``kd_loss_fn``, ``kd_ratio``, loss buffers), plus the fused loss built from them.

        Runs after student and teacher are built (with ``separate_meshes``, before the teacher: the rest is done by
        :meth:`_setup_separate_meshes`). Under PP it also makes both last stages return hidden states.
        """
        super()._setup_kd_state()
        self._teacher_rows = self._teacher_layer_outputs = None
        self._teacher_bytes = 0
        if getattr(self, "separate_meshes", False):
            return
        self._label_positions_only = label_positions.supported(self.cfg, [self.model_parts[0], self.teacher_model],
                                                               self.loss_fn)
        if hidden_kd.enabled(self.cfg):
            teacher_parts = self.teacher_model.parts if self.pp_enabled else [self.teacher_model]
            config = teacher_parts[0].config.get_text_config()
            self._setup_hidden_kd(teacher_parts, config.hidden_size, config.num_hidden_layers)
        if self.fused_linear_loss:
            self._setup_fused_loss()

    def _setup_fused_loss(self) -> None:
        """``FusedLinearKDLoss`` and the parts whose LM heads it reads (the teacher's: None on a separate mesh or
        from a cache)."""
        if self.pp_enabled:
            student = fused_kd_forward.last_stage_part(self.model_parts, self.pp.info.stages)
            teacher = None if self.teacher_pp is None else fused_kd_forward.last_stage_part(
                self.teacher_model.parts, self.teacher_pp.info.stages)
            for part in (student, teacher):
                if part is not None:
                    fused_kd_forward.return_hidden_states_from_last_stage(part)
        else:
            student, teacher = self.model_parts[0], self.teacher_model
            for model, role in ((student, "student"), (teacher, "teacher")):
                if model is not None:
                    fused_kd_forward.check_model(model, role)
        # PP ranks without the last stage never call the loss.
        tp_group = None if student is None else fused_kd_forward.vocab_shard_group(student, teacher)
        self.fused_kd_loss = fused_kd_forward.build_loss(self.kd_loss_fn, self.loss_fn, self.kd_ratio, tp_group)
        self._fused_lm_head_parts = (student, teacher)

    def _setup_hidden_kd(self, teacher_parts, teacher_width: int, teacher_depth: int) -> None:
        """Hooks for ``hidden_kd`` on the student's decoder layers and, unless ``teacher_parts`` is None (a teacher
        on other ranks), the teacher's (all of them, or this rank's pipeline stages)."""
        weight, kind, layers = hidden_kd.settings(self.cfg)
        config = self.model_parts[0].config.get_text_config()
        hidden_kd.check_widths(config.hidden_size, teacher_width)  # preflight could not, for hub ids
        mesh = self.device_mesh
        tp = mesh["tp"] if mesh is not None and "tp" in mesh.mesh_dim_names else None
        self.hidden_kd = hidden_kd.HiddenStateKD(
            self.model_parts, teacher_parts, weight, kind,
            hidden_kd.layer_pairs(layers, config.num_hidden_layers, teacher_depth),
            tp_group=tp.get_group() if tp is not None and tp.size() > 1 else None,
            pp_group=mesh["pp"].get_group() if self.pp_enabled else None)
        if self.pp_enabled:
            teacher_stages = [] if self.teacher_pp is None else self.teacher_pp.info.stages
            self.hidden_kd.pause_during_shape_inference([*self.pp.info.stages, *teacher_stages])

    def _setup_separate_meshes(self) -> None:
        """With the teacher on its own ranks: each side sends the other what it needs once (the student its depth;
        the teacher its width, depth, forward FLOPs for ``mfu`` and, for the fused loss, its LM head), then the
        student builds its losses and the teacher its layer recorder (``distillation/separate_meshes.py``)."""
        hidden = hidden_kd.enabled(self.cfg)
        bridge = self.kd_mesh_bridge
        student = None
        if bridge.is_student:
            student = {"num_hidden_layers": self.model_parts[0].config.get_text_config().num_hidden_layers}
        for wave in range(bridge.num_waves):  # the bridge hands a batch to teacher ranks only
            student = bridge.send_batch(wave, student) or student
        if bridge.is_teacher:
            teacher = self.teacher_model
            if self.teacher_pp is not None:  # only the last stage sends (and has an LM head)
                teacher = fused_kd_forward.last_stage_part(teacher.parts, self.teacher_pp.info.stages)
                if teacher is not None and self.fused_linear_loss:
                    fused_kd_forward.return_hidden_states_from_last_stage(teacher)
            pp_group = None if self.teacher_pp is None else self.device_mesh["pp"].get_group()
            parts = getattr(self.teacher_model, "parts", [self.teacher_model])
            forward_flops = flops.forward_flop_coefficients(parts, pp_group)
            description = None if teacher is None else separate_meshes.teacher_description(
                teacher, fused_kd_forward.lm_head_dtype(teacher), self.fused_linear_loss) | {"flops": forward_flops}
            if hidden:
                depth = parts[0].config.get_text_config().num_hidden_layers
                pairs = hidden_kd.layer_pairs(hidden_kd.settings(self.cfg)[2], student["num_hidden_layers"], depth)
                stages = [] if self.teacher_pp is None else self.teacher_pp.info.stages
                self._teacher_layer_outputs = hidden_kd.TeacherLayerOutputs(parts, [t for _, t in pairs], pp_group,
                                                                            stages)
            separate_meshes.exchange_once(bridge, description)
            return
        teacher = separate_meshes.exchange_once(bridge, None)
        self._teacher_forward_flops = teacher["flops"]
        if hidden:
            self._setup_hidden_kd(None, teacher["hidden_size"], teacher["num_hidden_layers"])
        if self.fused_linear_loss:
            self._setup_fused_loss()
            self._teacher_rows = separate_meshes.vocab_rows(teacher["lm_head"], self.fused_kd_loss.tp_group)

    def _begin_hidden_kd(self, labels: torch.Tensor, microbatch_size: int | None, grad_scale: float) -> None:
        """Hand ``hidden_kd`` this batch's label mask (``[B, S]``, split into pipeline microbatches)."""
        if self.hidden_kd is None:
            return
        mask = fused_kd_forward.loss_labels(labels, self.loss_fn) != kd._get_loss_ignore_index(self.loss_fn)
        mask = mask.to(self.dist_env.device)
        self.hidden_kd.begin(list(mask.split(microbatch_size)) if microbatch_size else [mask], grad_scale)

    def _hidden_kd_loss(self, num_label_tokens: int) -> float:
        """``H`` over every rank since the last call (a step or a validation pass). Collective."""
        sums = self.hidden_kd.take_sums(lambda t: self._dp_allreduce(t, include_cp=True))
        return self.hidden_kd.hidden_loss(sums, num_label_tokens)

    def _forward_backward_step(self, idx, batch, *, num_label_tokens, num_batches, is_train: bool = True):
        """The parent's non-PP microbatch; with ``fused_linear_loss`` the same losses from hidden states.

        ``batch``: ``input_ids``, ``labels`` ``[local_batch, seq]``. Returns the detached
        ``(loss, kd_loss, ce_loss)`` of this microbatch, each divided by ``num_label_tokens`` (the step's count,
        all-reduced over data-parallel ranks), as the parent does. ``hidden_kd``'s term is not in them (it is
        summed by its hooks), but its gradient is in the backward.
        """
        self._begin_hidden_kd(batch["labels"], None,
                              self._get_dp_group_size(include_cp=True) / max(num_label_tokens, 1) if is_train else 0.0)
        if not self.fused_linear_loss:
            if getattr(self, "_label_positions_only", False):  # not set with separate meshes
                batch = label_positions.keep_label_positions(batch, kd._get_loss_ignore_index(self.loss_fn))
            return super()._forward_backward_step(
                idx, batch, num_label_tokens=num_label_tokens, num_batches=num_batches, is_train=is_train)
        teacher_targets = separate_hidden = None
        if self.teacher_cache is not None and self.kd_ratio > 0:
            teacher_targets = self.teacher_cache.batch_targets(batch)
        if getattr(self, "separate_meshes", False):
            separate_hidden = self._get_separate_teacher_logits(batch)
        batch = {k: v.to(self.dist_env.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                 for k, v in batch.items()}
        labels = batch.pop("labels")
        student, teacher = self._fused_lm_head_parts
        train_ctx, batch = ContextParallelSharder(student, self.device_mesh, batch, loss_mask=labels,
                                                  invoke_pre_embed=False).shard(batch)
        labels = fused_kd_forward.loss_labels(labels, self.loss_fn)
        sync_ctx = nullcontext()
        if is_train:
            defer = getattr(self.distributed_config, "defer_fsdp_grad_sync", True)
            sync_ctx = get_sync_ctx(student, idx == num_batches - 1, defer_fsdp_grad_sync=defer)
        with train_ctx(), sync_ctx:
            teacher_inputs = (None, None)
            if separate_hidden is not None and self.kd_ratio > 0:
                teacher_inputs = self._teacher_lm_head_inputs(teacher, separate_hidden)
            elif teacher is not None and (self.kd_ratio > 0 or self.hidden_kd is not None):
                with ScopedModuleOffloading(teacher, enabled=self._offload_teacher_model), torch.no_grad():
                    teacher_hidden = fused_kd_forward.final_hidden_states(teacher, batch)
                    if self.kd_ratio > 0:
                        teacher_inputs = fused_kd_forward.lm_head_inputs(teacher, teacher_hidden)
            student_inputs = fused_kd_forward.lm_head_inputs(
                student, fused_kd_forward.final_hidden_states(student, batch),
                grad_reduce_group=self._get_dp_group(include_cp=True) if is_train else None)
            loss, ce_loss, kd_loss = self.fused_kd_loss(
                *student_inputs, *teacher_inputs, labels, num_batch_labels=num_label_tokens,
                teacher_targets=teacher_targets)
            if is_train:
                (loss * self._get_dp_group_size(include_cp=True)).backward()
        return loss.detach(), kd_loss, ce_loss

    def _teacher_lm_head_inputs(self, teacher, hidden) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden [B, S, H], rows [V/tp, H])`` of the teacher's LM head for the fused loss, its rows held here when
        the teacher runs on other ranks."""
        if self._teacher_rows is None:
            return fused_kd_forward.lm_head_inputs(teacher, hidden)
        return hidden.to(self._teacher_rows.dtype), self._teacher_rows

    def _get_separate_teacher_logits(self, batch):
        """The parent's request to the teacher ranks; what they send is counted in ``teacher_bytes`` and, with
        ``hidden_kd``, its layer outputs go to the student's hooks. Returns the logits or final hidden states."""
        received = super()._get_separate_teacher_logits(batch)
        self._teacher_bytes += separate_meshes.nbytes(received)
        if not isinstance(received, dict):
            return received
        if self.hidden_kd is not None:
            self.hidden_kd.receive(received["layers"], self.pipeline_config.pp_microbatch_size
                                   if self.pp_enabled else None)
        return received["output"]

    @torch.no_grad()
    def _teacher_forward_separate(self, batch):
        """On the teacher ranks: the parent's logits, or with ``fused_linear_loss`` the final hidden states
        ``[B, S, H]`` (a pipelined teacher's last stage returns those instead of logits, so the parent's capture
        holds them); with ``hidden_kd``, ``{"output": either, "layers": {t: [B, S, H]}}``."""
        if self.fused_linear_loss and self.teacher_pp is None:
            output = separate_meshes.final_hidden_states(self.teacher_model, batch, self.dist_env.device)
        else:
            output = super()._teacher_forward_separate(batch)
        if self._teacher_layer_outputs is None:
            return output
        return {"output": output, "layers": self._teacher_layer_outputs.take(batch["labels"].shape[1])}

    def _run_train_optim_step(self, batches, max_grad_norm: float | None = None):
        """The parent's step; raises :class:`NonFiniteLossError` when a logged loss term is NaN or infinite.

        The terms are all-reduced over data-parallel ranks, so every rank raises at the same step.
        """
        self._teacher_bytes = 0
        sample = super()._run_train_optim_step(batches, max_grad_norm)
        if getattr(self, "separate_meshes", False):
            sample.metrics["teacher_bytes"] = self._teacher_bytes
        if self.hidden_kd is not None:
            sample.metrics["hidden_loss"] = self._hidden_kd_loss(sample.metrics["num_label_tokens"])
            sample.metrics["loss"] += self.hidden_kd.weight * sample.metrics["hidden_loss"]
        for term in ("kd_loss", "ce_loss", "hidden_loss", "loss"):
            value = sample.metrics.get(term, 0.0)
            if not math.isfinite(value):
                # training.jsonl buffers records; keep the losses that led up to this step.
                self.metric_logger_train.flush()
                raise NonFiniteLossError(
                    f"step {sample.step}: {term} is {value} (loss={sample.metrics['loss']}, "
                    f"ce_loss={sample.metrics['ce_loss']}, kd_loss={sample.metrics['kd_loss']}); "
                    "stopped before logging or checkpointing it: check the teacher and student weights "
                    "(NaN/inf) and lower optimizer.lr")
        sample.metrics["mfu"] = self._mfu(batches, sample.metrics)
        return sample

    def _mfu(self, batches, metrics) -> float | None:
        """Model FLOPs utilisation of the step just taken, in percent; None without a known peak rate."""
        peak = self.cfg.get("mfu_peak_tflops", None) or flops.device_peak_tflops()
        if peak is None or metrics["tps"] <= 0:
            return None
        if not hasattr(self, "_flop_coefficients"):
            pp_group = self.device_mesh["pp"].get_group() if self.pp_enabled else None
            teacher = self.teacher_model
            teacher_parts = [] if teacher is None else getattr(teacher, "parts", [teacher])  # none with a cache
            teacher_flops = getattr(self, "_teacher_forward_flops", None)  # a teacher on its own ranks
            self._flop_coefficients = (flops.forward_flop_coefficients(self.model_parts, pp_group),
                                       teacher_flops or flops.forward_flop_coefficients(teacher_parts, pp_group))
        seq_len = max(batch["input_ids"].shape[-1] for batch in batches)
        tokens = metrics["num_tokens_per_step"]
        step_flops = flops.kd_step_flops(*self._flop_coefficients, tokens=tokens, seq_len=seq_len)
        seconds = tokens / metrics["tps"]
        world = dist.get_world_size() if dist.is_initialized() else 1
        return 100.0 * step_flops / seconds / (world * peak * 1e12)

    def log_train_metrics(self, log_data) -> None:
        """Record the step in ``training.jsonl`` (and W&B) and print one line with every metric."""
        if not self.dist_env.is_main:
            return
        if self.step_scheduler.is_remote_logging_step and kd._HAS_WANDB and kd.wandb.run is not None:
            kd.wandb.log(log_data.to_dict(), step=log_data.step)
        self.metric_logger_train.log(log_data)
        m = log_data.metrics
        mfu = "n/a" if m.get("mfu") is None else f"{m['mfu']:.2f}%"
        hidden = f" | hidden_loss {m['hidden_loss']:.4f}" if "hidden_loss" in m else ""
        hidden += f" | teacher_bytes {m['teacher_bytes']}" if "teacher_bytes" in m else ""
        logging.info(
            f"step {log_data.step} | epoch {log_data.epoch} | loss {m['loss']:.4f} | ce_loss {m['ce_loss']:.4f} | "
            f"kd_loss {m['kd_loss']:.4f}{hidden} | grad_norm {m['grad_norm']:.4f} | lr {m['lr']:.2e} | "
            f"mem {m['mem']:.2f} GiB | tps {m['tps']:.1f} | tps_per_gpu {m['tps_per_gpu']:.1f} | mfu {mfu} | "
            f"tokens {m['num_tokens_per_step']} | label_tokens {m['num_label_tokens']} | "
            f"kd_ratio {m['kd_ratio']:.2f} | temperature {m['temperature']:.2f}"
        )
        torch.cuda.reset_peak_memory_stats()

    def _make_pp_kd_loss_wrapper(self):
        """The parent's PP loss (CE + KD per microbatch) or the fused one, minus the shape-inference call."""
        kd_loss = self._make_pp_fused_kd_loss() if self.fused_linear_loss else super()._make_pp_kd_loss_wrapper()
        schedule = self.pp.info.schedule

        def pp_kd_loss_fn(logits, target, **kwargs):
            if _inferring_gradient_shapes(schedule):
                # Any loss that depends on the logits works here; a real one would consume a teacher
                # microbatch. It happens on the first step and again after every validation.
                return logits.sum() * 0.0
            return kd_loss(logits, target, **kwargs)

        return pp_kd_loss_fn

    def _make_pp_fused_kd_loss(self):
        """The last stage's loss with ``fused_linear_loss``: the parent's PP loss computed from hidden states.

        Both last stages return hidden states, so what the teacher's capture hands over in
        ``_current_teacher_logits`` are its ``[mb, S, H]`` hidden states. Like the parent's, it returns token
        sums (CE with ``num_label_tokens=None``, KD with ``num_batch_labels=1``) and buffers CE and KD; the
        recipe divides by the step's label count afterwards. The LM-head parts are read per call: with
        ``separate_meshes`` the parent installs this loss before they are known.
        """

        def pp_fused_kd_loss_fn(hidden, target, **kwargs):
            student, teacher = self._fused_lm_head_parts
            teacher_inputs, teacher_targets = (None, None), None
            if self.teacher_cache is not None:
                teacher_targets = self._current_teacher_targets.pop(0) if self.kd_ratio > 0 else None
            else:
                teacher_inputs = self._teacher_lm_head_inputs(teacher, self._current_teacher_logits.pop(0))
            student_inputs = fused_kd_forward.lm_head_inputs(
                student, hidden, grad_reduce_group=self._get_dp_group(include_cp=True))
            labels = fused_kd_forward.loss_labels(target, self.loss_fn)
            loss, ce_loss, kd_loss = self.fused_kd_loss(*student_inputs, *teacher_inputs, labels, num_batch_labels=1,
                                                        teacher_targets=teacher_targets)
            self._ce_loss_buffer.append(ce_loss)
            self._kd_loss_buffer.append(kd_loss)
            return loss

        return pp_fused_kd_loss_fn

    def _forward_backward_step_pp(self, idx, batch, **kwargs):
        """The parent's PP step, with stage shapes set for this batch's length and the teacher under ``no_grad``.

        ``batch["input_ids"]``: ``[local_batch, seq]``; ``seq`` may change from batch to batch.
        """
        # Pipeline stages fix their send/receive buffer shapes; AutoModel's CE recipe resets them
        # per batch, its KD recipe does not, so the second length seen breaks the P2P exchange.
        seq_len = batch["input_ids"].shape[1]
        self._begin_hidden_kd(batch["labels"], self.pipeline_config.pp_microbatch_size,
                              1.0 if kwargs.get("is_train", True) else 0.0)
        self.pp.update_seq_len(seq_len)
        if self.teacher_cache is not None:
            return self._cached_forward_backward_step_pp(batch, **kwargs)
        if self.teacher_pp is not None:
            self.teacher_pp.update_seq_len(seq_len)
        with _inference_mode_as_no_grad():
            return super()._forward_backward_step_pp(idx, batch, **kwargs)

    def _cached_forward_backward_step_pp(self, batch, *, loss_buffer, num_label_tokens, num_batches, is_train=True):
        """The parent's PP step with the teacher's run replaced by the cache: the last stage's loss takes one
        microbatch's entries per call (``_current_teacher_targets``), in schedule order."""
        if self.pp.info.has_last_stage and self.kd_ratio > 0:
            self._current_teacher_targets = self.teacher_cache.batch_targets(
                batch, self.pipeline_config.pp_microbatch_size)
        batch = {k: v.to(self.dist_env.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                 for k, v in batch.items()}
        labels, input_ids = batch.pop("labels"), batch.pop("input_ids")
        rest = {k: v for k, v in batch.items() if v is not None and not (isinstance(v, dict) and not v)}
        targets = labels.clone() if self.pp.info.has_last_stage else None
        losses = [] if self.pp.info.has_last_stage else None
        schedule = self.pp.info.schedule
        inputs = (input_ids,) if self.pp.info.has_first_stage else ()
        (schedule.step if is_train else schedule.eval)(*inputs, target=targets, losses=losses, **rest)
        loss_buffer.append(torch.stack(losses).sum().detach() if self.pp.info.has_last_stage
                           else torch.tensor(0.0, device=self.dist_env.device))

    def _run_student_train_validation_loop(self):
        """AutoModel's training loop, validation included, whatever the parallelism."""
        return TrainFinetuneRecipeForNextTokenPrediction.run_train_validation_loop(self)

    @torch.no_grad()
    def _run_validation_epoch(self, val_dataloader):
        """Validation losses per label token (``hidden_loss`` too, with ``hidden_kd``, and in ``val_loss``)."""
        if self.pp_enabled:
            sample = self._run_pp_validation_epoch(val_dataloader)
        else:
            sample = super()._run_validation_epoch(val_dataloader)
        if self.hidden_kd is not None:
            sample.metrics["hidden_loss"] = self._hidden_kd_loss(sample.metrics["num_label_tokens"])
            sample.metrics["val_loss"] += self.hidden_kd.weight * sample.metrics["hidden_loss"]
        return sample

    def log_val_metrics(self, val_name, log_data, metric_logger=None):
        """Record the pass in ``validation.jsonl`` (and W&B) and print one line with every loss term."""
        if not self.dist_env.is_main or log_data is None:
            return
        if kd._HAS_WANDB and kd.wandb.run is not None:
            kd.wandb.log(log_data.to_dict() | {"val_name": val_name}, step=log_data.step)
        if metric_logger is not None:
            metric_logger.log(log_data)
        m = log_data.metrics
        terms = " | ".join(f"{k} {m[k]:.4f}" for k in ("val_loss", "ce_loss", "kd_loss", "hidden_loss") if k in m)
        logging.info(f"[val] {val_name} | step {log_data.step} | epoch {log_data.epoch} | {terms} | "
                     f"lr {m['lr']:.2e} | num_label_tokens {m['num_label_tokens']}")

    def _run_pp_validation_epoch(self, val_dataloader):
        """Validation under PP: the last stage computes the losses and broadcasts them."""
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


def _inferring_gradient_shapes(schedule) -> bool:
    """True while torch's schedule calls the loss to infer gradient shapes (training mode only)."""
    # torch 2.13 keeps this flag on single-stage schedules and its plural on multi-stage ones.
    initialized = getattr(schedule, "_stage_backward_initialized",
                          getattr(schedule, "_stages_backward_initialized", True))
    return schedule._has_backward and not initialized


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
