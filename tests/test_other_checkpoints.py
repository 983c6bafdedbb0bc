"""Checkpoints of other sizes and other per-layer choices than ``tools/build_checkpoints.py``'s distill the
same under TP + SP and PP as in one process, and build the layers their block configs ask for.

Built here, straight with transformers and ModelOpt (``deci_x_patcher``, ``save_checkpoint``): hidden 96, 6 heads
of 16, a 384-token tokenizer. Per layer the students take choices the tools' builder never makes: 3 KV heads
(which do not split over 2 TP ranks), a layer with neither attention nor FFN; Qwen3 also a layer with attention
and no FFN, FFN widths of 37 and 100, and tied embeddings (so no PP: preflight refuses it, as AutoModel's
pipeline split cannot keep the tie); GPT-OSS also 6 experts cut to 5 and 4, top-k 3, expert widths 24, 40 and
56, and a sliding window of 8 on layers 0, 2 and 3; Nemotron-H 7 layers ``ME*M*EM`` (its remote-code layout,
with ``tools/nemotron_h_remote`` standing in for NVIDIA's modeling file) with a Mamba-2 layer removed, 6 Mamba
heads in 3 groups, and 6 experts cut to 5 of width 24.
"""

import copy
import json
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from architectures import nemotron_h_parallel
from safety import preflight
import run
from conftest import (HIDDEN_KD_KEYS, assert_layer_follows_block_config, assert_same_training, parity_run,
                      tiny_overrides)
from modelopt.torch.puzzletron.anymodel import ModelDescriptorFactory, deci_x_patcher
from modelopt.torch.puzzletron.block_config import maybe_cast_block_configs
from modelopt.torch.puzzletron.tools.checkpoint_utils_hf import force_cache_dynamic_modules, save_checkpoint
from nemo_automodel import NeMoAutoModelForCausalLM
from architectures.descriptors import build_descriptor
from tools.build_checkpoints import NEMOTRON_H_AUTO_MAP, NEMOTRON_H_REMOTE_CODE, build_tokenizer, write_squad_like_data

STEPS = 3
SHAPE = dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=6, head_dim=16, max_position_embeddings=256)
CONFIGS = {
    "qwen3": dict(num_hidden_layers=6, intermediate_size=160, tie_word_embeddings=True),
    "gpt_oss": dict(num_hidden_layers=6, intermediate_size=80, tie_word_embeddings=False, num_local_experts=6,
                    num_experts_per_tok=2, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
                                 "full_attention", "full_attention"]),
    "nemotron_h": dict(num_hidden_layers=7, hybrid_override_pattern="ME*M*EM", tie_word_embeddings=False,
                       mamba_num_heads=6, mamba_head_dim=16, ssm_state_size=8, n_groups=3, conv_kernel=4,
                       chunk_size=16, n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=40,
                       moe_shared_expert_intermediate_size=48, n_group=1, topk_group=1, intermediate_size=160,
                       layer_norm_epsilon=1e-5, use_cache=False, model_type="nemotron_h",
                       architectures=["NemotronHForCausalLM"], auto_map=NEMOTRON_H_AUTO_MAP),
}
NO_OP = {"no_op": True}


def attention(kv_heads):
    return {"no_op": False, "num_key_value_heads": kv_heads}


def moe(experts, top_k, width):
    return {"no_op": False, "moe": {"num_local_experts": experts, "num_experts_per_tok": top_k,
                                    "expert_intermediate_dim": width}}


def mlp(width):
    return {"no_op": False, "intermediate_size": width}


MAMBA = {"no_op": False, "mamba": {"state_dim": 8, "num_heads": 6, "head_dim": 16, "num_groups": 3}}
NEMOTRON_MOE = {"num_experts_per_tok": 2, "shared_expert_intermediate_dim": 48}
BLOCKS = {
    "qwen3": [(attention(3), mlp(100)), (NO_OP, mlp(160)), (attention(6), NO_OP), (attention(1), mlp(37)),
              (NO_OP, NO_OP), (attention(2), mlp(160))],
    "gpt_oss": [(attention(3), moe(6, 2, 40)), (NO_OP, moe(4, 3, 80)), (attention(6), moe(5, 1, 24)),
                (attention(1), moe(6, 2, 56)), (NO_OP, NO_OP), (attention(2), moe(4, 2, 40))],
    "nemotron_h": [(MAMBA, NO_OP),
                   (NO_OP, {"no_op": False, "moe": {"num_local_experts": 5, "expert_intermediate_dim": 24,
                                                     **NEMOTRON_MOE}}),
                   (attention(1), NO_OP), (NO_OP, NO_OP), (attention(3), NO_OP),
                   (NO_OP, {"no_op": False, "moe": {"num_local_experts": 6, "expert_intermediate_dim": 40,
                                                     **NEMOTRON_MOE}}),
                   (MAMBA, NO_OP)],
}
PP = ["distributed.pp_size=2", "distributed.pipeline.pp_microbatch_size=2"]
RUNS = {"single_process": (1, []),
        "tp2_sequence_parallel": (2, ["distributed.tp_size=2", "distributed.sequence_parallel=true"]),
        "pp2": (2, PP)}
PARITY = [("qwen3", "tp2_sequence_parallel"), ("gpt_oss", "tp2_sequence_parallel"), ("gpt_oss", "pp2"),
          ("nemotron_h", "tp2_sequence_parallel"), ("nemotron_h", "pp2")]


def build_pair(out, arch):
    tokenizer = build_tokenizer(vocab_size=384)
    fields = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, **SHAPE, **CONFIGS[arch])
    remote = arch == "nemotron_h"
    if remote:  # a remote-code checkpoint: config.json and the modeling file first, as on the hub
        (out / "teacher").mkdir(parents=True)
        (out / "teacher" / "config.json").write_text(json.dumps({**fields, "torch_dtype": "float32"}))
        for source in NEMOTRON_H_REMOTE_CODE.glob("*.py"):
            shutil.copy(source, out / "teacher" / source.name)
        config = AutoConfig.from_pretrained(out / "teacher", trust_remote_code=True)
        force_cache_dynamic_modules(config, out / "teacher", trust_remote_code=True)
    else:
        config = AutoConfig.for_model(arch, **fields)
    torch.manual_seed(10)
    teacher = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32, trust_remote_code=remote)
    teacher.save_pretrained(out / "teacher")
    blocks = [{"attention": a, "ffn": f} for a, f in BLOCKS[arch]]
    descriptor = build_descriptor(ModelDescriptorFactory.get(arch))
    if remote:  # the remote-code classes read the block configs from the config they are built with
        config = copy.deepcopy(config)
        config.block_configs = maybe_cast_block_configs(blocks)
    torch.manual_seed(11)
    with deci_x_patcher(descriptor, blocks):
        student = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32, trust_remote_code=remote)
    student.config.block_configs = blocks
    save_checkpoint(student, out / "student", descriptor)
    for role in ("teacher", "student"):
        tokenizer.save_pretrained(out / role)
        if remote:
            for source in NEMOTRON_H_REMOTE_CODE.glob("*.py"):
                shutil.copy(source, out / role / source.name)
    return {"teacher": out / "teacher", "student": out / "student"}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("other_checkpoints")
    return {**{arch: build_pair(root / arch, arch) for arch in BLOCKS}, "data": write_squad_like_data(root / "data")}


@pytest.fixture(scope="module")
def runs(ckpts, tmp_path_factory):
    """``{(arch, name): (training rows, validation rows)}``: KD with hidden-state KD on every layer."""
    out = {}
    for arch, name in [(arch, "single_process") for arch in BLOCKS] + PARITY:
        nproc, extra = RUNS[name]
        teacher = ["teacher_model.anymodel_descriptor=nemotron_h"] if arch == "nemotron_h" else []
        out[arch, name] = parity_run(ckpts, arch, tmp_path_factory.mktemp(f"{arch}_{name}"), "kd", nproc,
                                     [*teacher, *extra], STEPS)
    return out


@pytest.mark.parametrize("arch, name", PARITY)
def test_other_checkpoints_distill_as_in_one_process(runs, arch, name):
    assert_same_training(runs[arch, name], runs[arch, "single_process"], HIDDEN_KD_KEYS, STEPS)


@pytest.mark.parametrize("mode", ["kd", "pretrain"])
def test_pipeline_parallelism_with_tied_embeddings_is_refused_in_one_line_before_any_weights(ckpts, tmp_path, mode):
    overrides = [*tiny_overrides(ckpts, "qwen3", tmp_path, teacher=mode == "kd"), *PP, "step_scheduler.local_batch_size=4"]
    cfg = run.load_config(run.HERE / run.MODES[mode], [tuple(o.split("=", 1)) for o in overrides])
    with pytest.raises(preflight.PreflightError) as e:
        preflight.check(cfg, mode, world_size=2)
    assert str(e.value) == (
        f"distributed.pp_size=2 with a model whose tie_word_embeddings is true ({ckpts['qwen3']['student']}): "
        "AutoModel 0.7.0 keeps the first stage's embedding and the last stage's LM head as two copies that would "
        "train apart; train this model with FSDP2 and/or TP (distributed.pp_size=1)")


@pytest.mark.parametrize("arch", ["qwen3", "gpt_oss"])
def test_other_checkpoints_build_every_layer_their_block_configs_ask_for(ckpts, arch, patched):
    student = ckpts[arch]["student"]
    model = NeMoAutoModelForCausalLM.from_pretrained(str(student), anymodel_descriptor=arch, torch_dtype=torch.float32)
    blocks = json.loads((student / "config.json").read_text())["block_configs"]
    for layer, block in zip(model.model.layers, blocks, strict=True):
        assert_layer_follows_block_config(layer, block, model.config)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == CONFIGS[arch]["tie_word_embeddings"]


def test_other_nemotron_h_checkpoint_builds_every_layer_its_block_configs_ask_for(ckpts, patched):
    student = ckpts["nemotron_h"]["student"]
    model = NeMoAutoModelForCausalLM.from_pretrained(str(student), anymodel_descriptor="nemotron_h",
                                                     torch_dtype=torch.float32)
    layers = model.backbone.layers
    assert [nemotron_h_parallel.block_kind(layer) for layer in layers] == [
        "mamba", "moe", "attention", "no_op", "attention", "moe", "mamba"]
    assert [layers[i].mixer.k_proj.out_features for i in (2, 4)] == [1 * 16, 3 * 16]
    assert [len(layers[i].mixer.experts) for i in (1, 5)] == [5, 6]
    assert [layers[i].mixer.experts[0].up_proj.out_features for i in (1, 5)] == [24, 40]
    assert layers[0].mixer.in_proj.out_features == 2 * 96 + 2 * 3 * 8 + 6  # z, x, B, C, dt
    assert not list(layers[3].parameters())
