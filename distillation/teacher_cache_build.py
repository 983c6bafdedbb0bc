"""``--mode teacher_cache``: run the KD config's teacher once over its data and write the teacher cache.

Every data-parallel rank takes every ``dp``-th sample of the training and of the validation dataset (all of
them, none dropped: a KD run at any layout may ask for any sample), batched as the KD run batches them, runs
the teacher without its full logits (final hidden states, then the LM head a chunk of label tokens at a time,
under TP each rank gathers the vocabulary shards of a share of the rows and computes their entries),
and writes one sparse entry per label token (``cached_kd.sampled_targets`` or ``topk_targets``) through
``teacher_cache.CacheWriter``. Under PP the batch goes through the pipeline schedule's ``eval`` and the last
stage, which returns hidden states instead of logits, computes and writes the entries. Samples already in a shard
are skipped, so a killed build resumes where it stopped. Rank 0 then lists the shards in the manifest and marks it
complete.
"""

import copy
import logging
import time

import torch
import torch.distributed as dist
from nemo_automodel.components.loss.utils import _get_loss_ignore_index
from nemo_automodel.recipes.llm.train_ft import TrainFinetuneRecipeForNextTokenPrediction

from distillation import cached_kd, fused_kd_forward, teacher_cache

# Label tokens whose full-vocabulary teacher rows are held at once (fp32: 1 GiB at a 201,088 vocabulary).
ROWS_ELEMENTS = 1 << 28
PROGRESS_EVERY_S = 10.0


class TeacherCacheRecipe(TrainFinetuneRecipeForNextTokenPrediction):
    """AutoModel's fine-tuning recipe, used for its setup (process group, sharded model, data), plus:

    - The model it builds is ``teacher_model`` (frozen, eval mode), sharded by ``distributed`` as a KD run
      shards its teacher (FSDP2, TP, SP, PP); checkpointing is off (it trains nothing).
    - Under PP, the schedule's loss keeps the last stage's hidden states per microbatch instead of a loss.
    - :meth:`build` in place of the training loop: the cache at ``teacher_cache.path`` for ``dataset`` and
      ``validation_dataset``, with a progress line (samples, label tokens/s, bytes per label token).
    """

    def __init__(self, cfg, settings: dict):
        cfg = copy.deepcopy(cfg)
        cfg.__dict__["model"] = cfg.teacher_model
        cfg.set_by_dotted("checkpoint.enabled", False)
        super().__init__(cfg)
        self.settings = settings
        self.path = cfg.get("teacher_cache.path")

    def setup(self):
        super().setup()
        for part in self.model_parts:
            part.eval()
            part.requires_grad_(False)
        self.dp_group = self._get_dp_group()
        tp = self.device_mesh["tp"] if self.device_mesh is not None else None
        self.tp_group = tp.get_group() if tp is not None and tp.size() > 1 else None
        if self.pp_enabled and self._head_part() is not None:
            fused_kd_forward.return_hidden_states_from_last_stage(self._head_part())
        if self.pp_enabled:
            self._stage_hidden = []
            self.pp.info.schedule._loss_fn = self._keep_hidden_states
        self.writes = self._head_part() is not None and (tp is None or tp.get_local_rank() == 0)

    def _head_part(self):
        """The model part with the LM head: the last pipeline stage's (None on other stages' ranks) under PP."""
        if self.pp_enabled:
            return fused_kd_forward.last_stage_part(self.model_parts, self.pp.info.stages)
        return self.model_parts[0]

    def run_train_validation_loop(self):
        self.build()

    @torch.no_grad()
    def build(self) -> None:
        """Write every split's entries, then (rank 0) the complete manifest."""
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank == 0:
            teacher_cache.start_manifest(self.path, self.settings)
            teacher_cache.remove_partial_shards(self.path)
        _barrier()
        done = teacher_cache.done_keys(self.path)
        splits = {"train": self.dataloader, **{f"validation_{n}": d for n, d in self.val_dataloaders.items()}}
        for split, loader in splits.items():
            writer = teacher_cache.CacheWriter(self.path, split, rank, self.settings["kind"]) if self.writes else None
            self._build_split(split, loader, writer, done)
            if writer is not None:
                writer.close()
        _barrier()
        if rank == 0:
            manifest = teacher_cache.complete_manifest(self.path, self.settings)
            logging.info(f"teacher_cache: complete: {manifest['samples']} samples, {manifest['label_tokens']} label "
                         f"tokens, {manifest['bytes_per_label_token']:.1f} bytes per label token in {self.path}")

    def _build_split(self, split: str, loader, writer, done: set) -> None:
        dataset, collate = loader.dataset, loader.collate_fn
        dp_rank = dist.get_rank(self.dp_group) if self.dp_group is not None else 0
        dp_size = dist.get_world_size(self.dp_group) if self.dp_group is not None else 1
        indices = list(range(dp_rank, len(dataset), dp_size))
        # A pipeline schedule splits exactly its own batch size into microbatches.
        batch_size = self.pipeline_config.pp_batch_size if self.pp_enabled else (loader.batch_size or 1)
        started, last_report, tokens = time.time(), time.time(), 0
        per_token = teacher_cache.entry_bytes(self.settings["kind"], self.settings["k"])
        batches = -(-len(indices) // batch_size)
        # FSDP2 gathers parameters in every forward: each rank runs as many forwards as the rank with the most
        # batches (repeating one of its samples, unwritten), and a batch is skipped only where every rank skips it.
        device = self.dist_env.device
        for step in range(_max_over_ranks(batches, device)):
            real = step < batches
            chunk = indices[step * batch_size:(step + 1) * batch_size] if real else (indices or [0])[:1]
            rows = len(chunk)
            if self.pp_enabled:  # filled up with its first sample, whose copies are not written
                chunk = chunk + chunk[:1] * (batch_size - rows)
            batch = collate([dataset[i] for i in chunk])
            keys = teacher_cache.row_keys(batch["input_ids"], batch["labels"], batch.get("attention_mask"))[:rows]
            if not _max_over_ranks(int(real and not all(key in done for key in keys)), device):
                continue
            labels = fused_kd_forward.loss_labels(batch["labels"], self.loss_fn)
            entries = self._teacher_entries(batch, keys)
            if not real:
                continue
            tokens += int((labels[:rows] != _get_loss_ignore_index(self.loss_fn)).sum())
            for key, sample_entries in zip(keys, entries or ()):
                if writer is not None and key not in done:
                    writer.add(key, sample_entries)
                done.add(key)  # a sample the data holds twice is written once
            if time.time() - last_report > PROGRESS_EVERY_S or step + 1 == batches:
                last_report = time.time()
                logging.info(f"teacher_cache: {split} {min((step + 1) * batch_size, len(indices))}/{len(indices)} "
                             f"samples on this rank | {tokens / max(last_report - started, 1e-9):.1f} label tokens/s | "
                             f"{per_token} bytes per label token")

    def _teacher_entries(self, batch: dict, keys: list[bytes]) -> "list[cached_kd.SparseTargets] | None":
        """One :class:`SparseTargets` per key (the first rows of ``batch``): its label tokens' teacher entries, in
        position order. None on a pipeline rank without the last stage."""
        device = self.dist_env.device
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        labels = fused_kd_forward.loss_labels(batch.pop("labels"), self.loss_fn)
        if self.pp_enabled:
            hidden = self._pipeline_hidden_states(batch, labels)
            if hidden is None:
                return None
        else:
            hidden = fused_kd_forward.final_hidden_states(self._head_part(), batch)
        hidden, weight = fused_kd_forward.lm_head_inputs(self._head_part(), hidden)
        valid = labels != _get_loss_ignore_index(self.loss_fn)
        per_row = valid.sum(1).tolist()
        rows = hidden[valid]
        widths = self._shard_widths(weight)
        chunk = max(1, ROWS_ELEMENTS // sum(widths))
        kind, seed = self.settings["kind"], self.settings["seed"]
        entries, start = [], 0
        for key, count in zip(keys, per_row):
            # A sample's uniforms are drawn at once, so its entries do not depend on how its rows are chunked or split.
            uniforms = cached_kd.draw_offsets(cached_kd.sample_generator(key, seed, rows.device), count,
                                              device=rows.device) if kind == "sampled" else None
            parts = []
            for first in range(0, count, chunk):
                block = slice(first, min(first + chunk, count))
                parts.append(self._chunk_entries(rows[start + block.start:start + block.stop], weight, widths,
                                                 None if uniforms is None else [u[block] for u in uniforms]))
            entries.append(cached_kd.SparseTargets.cat(parts).to("cpu", torch.float32) if parts else
                           _empty(kind, self.settings["k"]))
            start += count
        return entries

    def _chunk_entries(self, hidden: torch.Tensor, weight: torch.Tensor, widths: list[int],
                       uniforms: "list[torch.Tensor] | None") -> cached_kd.SparseTargets:
        """The entries of ``n`` label tokens' ``[n, H]`` final hidden states. Under TP each rank takes a contiguous
        share of the rows, receives their full-vocabulary logits and computes their entries (the draws are most of
        a build's time); the shares' entries are then all-gathered."""
        kind, k, temperature = self.settings["kind"], self.settings["k"], self.settings["temperature"]
        size = 1 if self.tp_group is None else dist.get_world_size(self.tp_group)
        rank = 0 if self.tp_group is None else dist.get_rank(self.tp_group)
        bounds = [hidden.shape[0] * r // size for r in range(size + 1)]
        mine = slice(bounds[rank], bounds[rank + 1])
        logits = self._full_vocab_rows(hidden, weight, widths, bounds)
        if kind == "topk":
            local = cached_kd.topk_targets(logits, k, temperature)
        else:
            local = cached_kd.sampled_targets(logits, k, temperature, *(u[mine] for u in uniforms))
        if size == 1:
            return local
        return _all_gather_rows(local, [hi - lo for lo, hi in zip(bounds, bounds[1:])], self.tp_group)

    def _pipeline_hidden_states(self, batch: dict, labels: torch.Tensor) -> "torch.Tensor | None":
        """``[B, S, H]`` final hidden states of ``batch`` run through the pipeline; None off the last stage."""
        input_ids = batch.pop("input_ids")
        self.pp.update_seq_len(input_ids.shape[1])
        rest = {k: v for k, v in batch.items() if v is not None and not (isinstance(v, dict) and not v)}
        last = self._head_part() is not None
        self._stage_hidden = []
        inputs = (input_ids,) if self.pp.info.has_first_stage else ()
        self.pp.info.schedule.eval(*inputs, target=labels if last else None, losses=[] if last else None, **rest)
        return torch.cat(self._stage_hidden) if last else None

    def _keep_hidden_states(self, hidden: torch.Tensor, target: torch.Tensor, **kwargs) -> torch.Tensor:
        """The pipeline's loss: keeps one microbatch's ``[mb, S, H]`` hidden states (microbatches come in order)."""
        self._stage_hidden.append(hidden.detach())
        return torch.zeros((), device=target.device)

    def _shard_widths(self, weight: torch.Tensor) -> list[int]:
        """Vocabulary rows of every tp rank's LM-head shard, in rank order (uneven splits included)."""
        if self.tp_group is None:
            return [weight.shape[0]]
        local = torch.tensor([weight.shape[0]], device=weight.device)
        widths = [torch.zeros_like(local) for _ in range(dist.get_world_size(self.tp_group))]
        dist.all_gather(widths, local, group=self.tp_group)
        return [int(w) for w in widths]

    def _full_vocab_rows(self, hidden: torch.Tensor, weight: torch.Tensor, widths: list[int],
                         bounds: list[int]) -> torch.Tensor:
        """``[rows of this rank's share, vocab]`` fp32 teacher logits; under TP each share's vocabulary shards are
        gathered on the rank that owns it (tp rounds of a gather: each rank receives its rows only)."""
        if self.tp_group is None:
            return (hidden @ weight.T).float()
        rank, longest = dist.get_rank(self.tp_group), max(hi - lo for lo, hi in zip(bounds, bounds[1:]))
        mine = None
        for owner, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
            local = (hidden[lo:hi] @ weight.T).float()
            padded = local.new_zeros(longest, max(widths))
            padded[:hi - lo, :local.shape[1]] = local
            shards = [torch.empty_like(padded) for _ in widths] if owner == rank else None
            dist.gather(padded, shards, dst=dist.get_global_rank(self.tp_group, owner), group=self.tp_group)
            if owner == rank:
                mine = torch.cat([shard[:hi - lo, :width] for shard, width in zip(shards, widths)], dim=1)
        return mine


def _empty(kind: str, k: int) -> cached_kd.SparseTargets:
    """The entries of a sample without label tokens."""
    return cached_kd.SparseTargets(torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k), torch.zeros(0),
                                   torch.zeros(0) if kind == "topk" else None)


def _all_gather_rows(local: cached_kd.SparseTargets, counts: list[int], group) -> cached_kd.SparseTargets:
    """Every rank's ``counts[rank]`` entries, concatenated in rank order (sent as one float64 tensor per rank:
    ids up to 2**53 and fp32 values are exact in it)."""
    k = local.ids.shape[1]
    columns = [local.ids.double(), local.weights.double(), local.neg_entropy.double()[:, None]]
    if local.tail is not None:
        columns.append(local.tail.double()[:, None])
    packed = torch.cat(columns, dim=1)
    padded = packed.new_zeros(max(counts), packed.shape[1])
    padded[:packed.shape[0]] = packed
    shards = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(shards, padded, group=group)
    rows = torch.cat([shard[:count] for shard, count in zip(shards, counts)])
    dtype = local.weights.dtype
    return cached_kd.SparseTargets(rows[:, :k].long(), rows[:, k:2 * k].to(dtype), rows[:, 2 * k].to(dtype),
                                   None if local.tail is None else rows[:, 2 * k + 1].to(dtype))


def _max_over_ranks(value: int, device) -> int:
    """The largest ``value`` any rank holds (every rank calls this at the same point)."""
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
