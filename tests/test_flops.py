"""common/flops.py: model FLOPs follow each layer's own shapes (hand-counted for the tiny heterogeneous student)."""

import pytest

from common import flops
from tools.build_checkpoints import TINY, build_student_model, build_tokenizer, make_config, student_block_configs


@pytest.fixture(scope="module")
def student():
    tokenizer = build_tokenizer()
    blocks = student_block_configs(TINY["num_hidden_layers"], TINY["num_key_value_heads"], TINY["intermediate_size"])
    return build_student_model(make_config("llama", len(tokenizer), tokenizer), "llama", blocks, seed=0)


def test_forward_flops_per_token_are_counted_layer_by_layer(student):
    vocab = student.config.vocab_size
    # hidden 64, head_dim 16; layers: (4 KV heads, FFN 192), (2, 96), (no attention, 192), (1, 64).
    q_and_o = 2 * (2 * 64 * 64)
    attention_projections = sum(q_and_o + 2 * (2 * 64 * kv * 16) for kv in (4, 2, 1))
    mlps = 2 * 3 * 64 * (192 + 96 + 192 + 64)
    lm_head = 2 * 64 * vocab
    linear, attention = flops.forward_flop_coefficients([student])
    assert linear == attention_projections + mlps + lm_head == 286720 + 128 * vocab
    # Scores and values of the three layers that keep attention: 4 * seq * (4 heads * 16).
    assert attention == 3 * 4 * 64


def test_kd_step_counts_student_forward_backward_and_teacher_forward():
    student, teacher = (100.0, 2.0), (1000.0, 8.0)
    tokens, seq = 10, 5
    assert flops.kd_step_flops(student, teacher, tokens, seq) == 3 * 10 * (100 + 2 * 5) + 10 * (1000 + 8 * 5)
