"""The logits path keeps the positions some row has a label at, and only where every model can take them.

The losses and gradients of a step cut this way against one at every position are in ``test_recipe.py``
(``test_logits_path_makes_logits_only_where_labels_are_with_the_same_losses_and_gradients``); the parity matrix there
runs the cut under FSDP2 and TP and compares it with the fused loss, which never makes logits.
"""

import torch
from nemo_automodel.components.loss.linear_ce import FusedLinearCrossEntropy
from nemo_automodel.components.loss.masked_ce import MaskedCrossEntropy
from transformers import LlamaConfig, LlamaForCausalLM

from distillation.label_positions import keep_label_positions, supported

IGNORE = -100


def test_positions_are_those_any_row_has_a_label_at_and_only_labels_are_cut():
    labels = torch.tensor([[IGNORE, 5, IGNORE, IGNORE, 9], [IGNORE, IGNORE, 7, IGNORE, IGNORE]])
    ids = torch.arange(10).view(2, 5)
    out = keep_label_positions({"input_ids": ids, "labels": labels}, IGNORE)
    assert out["logits_to_keep"].tolist() == [1, 2, 4]
    assert out["labels"].tolist() == [[5, IGNORE, 9], [IGNORE, 7, IGNORE]]
    assert out["input_ids"] is ids


def test_a_batch_without_labels_keeps_position_0_whose_label_is_ignored():
    out = keep_label_positions({"labels": torch.full((2, 4), IGNORE)}, IGNORE)
    assert out["logits_to_keep"].tolist() == [0]
    assert out["labels"].tolist() == [[IGNORE], [IGNORE]]


def tiny_llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))


class NoLogitsToKeep(torch.nn.Module):
    def forward(self, input_ids, **kwargs):
        return input_ids


def test_the_cut_applies_only_with_whole_sequences_logits_based_ce_and_models_that_take_positions():
    models, ce = [tiny_llama(), tiny_llama()], MaskedCrossEntropy()
    assert supported({}, models, ce)
    assert supported({}, [models[0], None], ce)  # a teacher cache: no teacher model
    for key in ("fused_linear_loss", "separate_meshes", "distributed.sequence_parallel"):
        assert not supported({key: True}, models, ce), key
    for size in ("distributed.pp_size", "distributed.cp_size"):
        assert not supported({size: 2}, models, ce), size
    assert not supported({}, models, FusedLinearCrossEntropy())
    assert not supported({}, [models[0], NoLogitsToKeep()], ce)
