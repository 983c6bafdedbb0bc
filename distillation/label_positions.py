"""The logits path's LM heads run only at the positions a loss reads.

CE and KD count label tokens only. With prompt-masked data (instruction tuning, SQuAD-style question answering) most
positions carry no label, yet AutoModel's KD step computes student and teacher logits ``[B, S, V]`` at all of them
and its losses pass over all of them. Hugging Face causal LMs take ``logits_to_keep``, a 1-D tensor of sequence
positions (the same for every row): with it the two LM heads run on the positions where some row of the batch has a
label, and the labels are cut to match, ``[B, S] -> [B, S']``. The losses are the same sums over the same label
tokens; the decoder layers still see the whole sequence.
"""

import inspect

from nemo_automodel.components.loss.linear_ce_base import LinearCrossEntropy


def supported(cfg, models, loss_fn) -> bool:
    """Whether the logits path (``fused_linear_loss`` off) can cut positions here: every model's ``forward`` names
    ``logits_to_keep`` (others would ignore it, or fail on it), CE reads the logits (``LinearCrossEntropy`` reads
    every position's hidden states), and each rank holds whole sequences (no sequence, context or pipeline
    parallelism, no teacher on other ranks sending logits of every position)."""
    if isinstance(loss_fn, LinearCrossEntropy):
        return False
    if any(cfg.get(key, False) for key in ("fused_linear_loss", "separate_meshes", "distributed.sequence_parallel")):
        return False
    if any((cfg.get(f"distributed.{size}", 1) or 1) > 1 for size in ("pp_size", "cp_size")):
        return False
    return all("logits_to_keep" in inspect.signature(type(model).forward).parameters
               for model in models if model is not None)


def keep_label_positions(batch: dict, ignore_index: int) -> dict:
    """``batch`` with ``labels`` ``[B, S]`` cut to the positions where any row has a label, ``[B, S']``, and those
    positions as ``logits_to_keep`` ``[S']``. A batch without labels keeps position 0 (its label is ignored)."""
    labels = batch["labels"]
    positions = (labels != ignore_index).any(dim=0).nonzero().flatten()
    if positions.numel() == 0:
        positions = positions.new_zeros(1)
    return {**batch, "labels": labels[:, positions], "logits_to_keep": positions}
