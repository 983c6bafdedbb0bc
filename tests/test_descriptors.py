"""Every descriptor builds the layers its block configs ask for, and distills the same under every
parallelism (2 CPU ranks, gloo, fp32) as in one process: GPT-OSS in each, Qwen2, Qwen3 and Mistral-Small under
TP+SP and PP.

The GPT-OSS student (``tools/build_checkpoints.py --arch gpt_oss``) differs from its teacher per layer in
KV heads, attention (layer 1 has none), expert count, top-k and expert width (33 channels in layer 3,
which neither splits over 2 TP ranks nor fits torch's grouped-GEMM alignment), and its sliding-window
layers (0 and 2) attend to 16 tokens of rows that are longer.
"""

import json
import shutil

import pytest
import torch

from architectures import descriptors
from common.errors import AnyModelError
from conftest import (HIDDEN_KD_KEYS, assert_layer_follows_block_config, assert_same_training, parity_run,
                      run_job, tiny_overrides)
from nemo_automodel import NeMoAutoModelForCausalLM
from tools.build_checkpoints import build

STEPS = 4
PP = ["distributed.pp_size=2", "distributed.pipeline.pp_microbatch_size=2"]
TP_SP = ["distributed.tp_size=2", "distributed.sequence_parallel=true"]
# name: (mode, processes, overrides, checkpoints); all with global batch 4, local batch 4 unless dp=2.
GPT_OSS_RUNS = {
    "single_process": ("kd", 1, [], "window_16"),
    "fsdp2_dp2": ("kd", 2, ["step_scheduler.local_batch_size=2"], "window_16"),
    "tp2": ("kd", 2, ["distributed.tp_size=2"], "window_16"),
    "tp2_sequence_parallel": ("kd", 2, TP_SP, "window_16"),
    "pp2": ("kd", 2, PP, "window_16"),
    "single_process_window_512": ("kd", 1, [], "window_512"),
    "pretrain_single_process": ("pretrain", 1, [], "window_16"),
    "pretrain_pp2": ("pretrain", 2, PP, "window_16"),
}
# The dense descriptors share Llama's code paths (architectures/tensor_parallel.py, AutoModel's pipeline split); a data-parallel
# run, one with every split of a layer (TP + SP) and one pipeline run each show their models take them.
DENSE_RUNS = {"single_process": ("kd", 1, []), "fsdp2_dp2": ("kd", 2, ["step_scheduler.local_batch_size=2"]),
              "tp2_sequence_parallel": ("kd", 2, TP_SP), "pp2": ("kd", 2, PP), "pretrain_pp2": ("pretrain", 2, PP)}


def train(ckpts, arch, out_dir, mode, nproc, extra):
    return parity_run(ckpts, arch, out_dir, mode, nproc, extra, STEPS)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return build(tmp_path_factory.mktemp("qwen2"), "qwen2")


@pytest.fixture(scope="module")
def gpt_oss(ckpts, tmp_path_factory):
    """The session's GPT-OSS pair, and a copy of it whose sliding window (512) covers every row."""
    wide = tmp_path_factory.mktemp("gpt_oss_window_512")
    for role in ("teacher", "student"):
        shutil.copytree(ckpts["gpt_oss"][role], wide / role)
        config = json.loads((wide / role / "config.json").read_text())
        (wide / role / "config.json").write_text(json.dumps({**config, "sliding_window": 512}))
    return {"window_16": ckpts, "window_512": {**ckpts, "gpt_oss": {r: wide / r for r in ("teacher", "student")}}}


@pytest.fixture(scope="module")
def runs(gpt_oss, tmp_path_factory):
    """``{name: (training rows, validation rows)}`` for every entry of GPT_OSS_RUNS."""
    return {name: train(gpt_oss[pair], "gpt_oss", tmp_path_factory.mktemp(f"gpt_oss_{name}"), mode, nproc, extra)
            for name, (mode, nproc, extra, pair) in GPT_OSS_RUNS.items()}


@pytest.fixture(scope="module")
def mistral_small(tmp_path_factory):
    return build(tmp_path_factory.mktemp("mistral_small"), "mistral_small")


@pytest.fixture(scope="module")
def dense_runs(ckpts, qwen2, mistral_small, tmp_path_factory):
    """``{arch: {name: (training rows, validation rows)}}`` for qwen2, qwen3 and mistral_small (its tekken.json
    tokenizer, 131,072 tokens) and every entry of DENSE_RUNS."""
    ckpts = {**ckpts, "qwen2": qwen2, "mistral_small": mistral_small}
    return {arch: {name: train(ckpts, arch, tmp_path_factory.mktemp(f"{arch}_{name}"), mode, nproc, extra)
                   for name, (mode, nproc, extra) in DENSE_RUNS.items()}
            for arch in ("qwen2", "qwen3", "mistral_small")}


@pytest.mark.parametrize("name", ["fsdp2_dp2", "tp2", "tp2_sequence_parallel", "pp2"])
def test_gpt_oss_kd_matches_one_process_in_every_parallelism(runs, name):
    assert_same_training(runs[name], runs["single_process"], HIDDEN_KD_KEYS, STEPS)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral_small"])
@pytest.mark.parametrize("name", ["fsdp2_dp2", "tp2_sequence_parallel", "pp2"])
def test_dense_descriptors_kd_matches_one_process_under_fsdp2_tp_sp_and_pp(dense_runs, arch, name):
    runs = dense_runs[arch]
    assert_same_training(runs[name], runs["single_process"], HIDDEN_KD_KEYS, STEPS)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral_small"])
def test_dense_descriptors_pretrain_under_pipeline_parallelism_starts_at_the_kd_runs_cross_entropy(dense_runs, arch):
    """Same student, first batch and weights: ``--mode pretrain``'s step-0 loss is the KD run's step-0 CE."""
    pretrain, kd = dense_runs[arch]["pretrain_pp2"][0], dense_runs[arch]["single_process"][0]
    assert [r["step"] for r in pretrain] == list(range(STEPS))
    assert pretrain[0]["loss"] == pytest.approx(kd[0]["ce_loss"], rel=1e-4)
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() for r in pretrain)


def test_gpt_oss_pretrain_under_pipeline_parallelism_matches_one_process(runs):
    assert_same_training(runs["pretrain_pp2"], runs["pretrain_single_process"], ("loss", "grad_norm"), STEPS)


def test_gpt_oss_sliding_window_shapes_the_losses_so_pipeline_parity_proves_it_is_honoured(runs):
    """Stages that dropped the window would attend like the 512-token window; the PP run matches 16."""
    narrow, wide = runs["single_process"][0][0], runs["single_process_window_512"][0][0]
    assert abs(narrow["loss"] - wide["loss"]) > 1e-3 * narrow["loss"]
    assert abs(narrow["grad_norm"] - wide["grad_norm"]) > 1e-2 * narrow["grad_norm"]


def tp_report(ckpts, tmp_path, extra=()):
    result = run_job(["-m", "tests.dist_build_check", str(tmp_path), "--mode", "kd",
                      *tiny_overrides(ckpts, "gpt_oss", tmp_path / "ckpt"), "distributed.tp_size=2", *extra])
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def test_gpt_oss_tensor_parallelism_splits_heads_sinks_and_expert_channels_per_layer(ckpts, tmp_path):
    """Layer 0 (4 heads, 2 KV heads, experts 32 wide) is split; layer 2 (1 KV head) by its query heads and
    their sinks, its K/V projection whole on both ranks; layer 3's 33 channels are not, so its experts stay whole.
    Routers are whole everywhere."""
    for rank in tp_report(ckpts, tmp_path):
        student, teacher = rank["student"], rank["teacher"]
        assert student["max_abs_diff"] == teacher["max_abs_diff"] == 0.0
        tp = student["tp"]
        layer = "model.layers.{}."
        assert tp[layer.format(0) + "self_attn.q_proj.weight"] == ["S(0)", [32, 64]]
        assert tp[layer.format(0) + "self_attn.k_proj.bias"] == ["S(0)", [16]]
        assert tp[layer.format(0) + "self_attn.o_proj.weight"] == ["S(1)", [64, 32]]
        assert tp[layer.format(0) + "self_attn.sinks"] == ["S(0)", [2]]
        assert tp[layer.format(0) + "mlp.experts.gate_up_proj"] == ["S(2)", [4, 64, 32]]
        assert tp[layer.format(0) + "mlp.experts.gate_up_proj_bias"] == ["S(1)", [4, 32]]
        assert tp[layer.format(0) + "mlp.experts.down_proj"] == ["S(1)", [4, 16, 64]]
        assert tp[layer.format(0) + "mlp.experts.down_proj_bias"] == ["none", [4, 64]]
        assert tp[layer.format(2) + "self_attn.sinks"] == ["S(0)", [2]]
        assert tp[layer.format(2) + "self_attn.q_proj.weight"] == ["S(0)", [32, 64]]
        assert tp[layer.format(2) + "self_attn.k_proj.weight"] == ["none", [16, 64]]
        assert tp[layer.format(2) + "mlp.experts.down_proj"] == ["S(1)", [2, 24, 64]]
        assert tp[layer.format(3) + "mlp.experts.gate_up_proj"] == ["none", [4, 64, 66]]
        assert all(tp[layer.format(i) + "mlp.router.weight"][0] == "none" for i in range(4))
        for i in range(4):  # the homogeneous teacher splits every layer
            assert teacher["tp"][layer.format(i) + "self_attn.sinks"] == ["S(0)", [2]]
            assert teacher["tp"][layer.format(i) + "mlp.experts.down_proj"] == ["S(1)", [4, 32, 64]]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral_small", "gpt_oss"])
def test_every_layer_has_the_shapes_its_block_config_asks_for(ckpts, arch, patched, request):
    student = (request.getfixturevalue(arch) if arch in ("qwen2", "mistral_small") else ckpts[arch])["student"]
    model = NeMoAutoModelForCausalLM.from_pretrained(str(student), anymodel_descriptor=arch, torch_dtype=torch.float32)
    blocks = json.loads((student / "config.json").read_text())["block_configs"]
    for layer, block in zip(model.model.layers, blocks, strict=True):
        assert_layer_follows_block_config(layer, block, model.config)


def test_gpt_oss_expert_layers_too_narrow_for_grouped_gemm_run_the_eager_loop(ckpts, patched):
    model = NeMoAutoModelForCausalLM.from_pretrained(str(ckpts["gpt_oss"]["student"]), anymodel_descriptor="gpt_oss",
                                                     torch_dtype=torch.float32)
    kernels = [layer.mlp.experts.config._experts_implementation for layer in model.model.layers]
    assert kernels == ["grouped_mm", "grouped_mm", "grouped_mm", "eager"]


@pytest.mark.parametrize("arch, field, value, message", [
    ("gpt_oss", "ffn", {"no_op": False, "intermediate_size": 64},
     r"layer 0 sets ffn.intermediate_size=64, which the gpt_oss descriptor does not apply"),
    ("llama", "ffn", {"no_op": False, "moe": {"num_local_experts": 2, "num_experts_per_tok": 1,
                                              "expert_intermediate_dim": 8}},
     r"layer 0 sets ffn.moe.num_local_experts=2, which the llama descriptor does not apply"),
    ("llama", "attention", {"no_op": False, "num_key_value_heads": 2, "replace_with_linear": True},
     r"layer 0 sets attention.replace_with_linear=True, which the llama descriptor does not apply"),
    ("llama", "attention", {"no_op": False, "num_key_value_heads": 3},
     r"layer 0 has num_key_value_heads=3, which does not divide num_attention_heads=4"),
    ("qwen3", "ffn", {"no_op": False, "intermediate_size": 0}, r"layer 0 has ffn.intermediate_size=0; it must be >= 1"),
])
def test_block_config_fields_the_build_would_not_follow_are_refused_before_any_weights(
        ckpts, tmp_path, arch, field, value, message):
    blocks = json.loads((ckpts[arch]["student"] / "config.json").read_text())["block_configs"]
    blocks[0] = {**blocks[0], field: value}
    path = tmp_path / "blocks.json"
    path.write_text(json.dumps(blocks))
    with pytest.raises(AnyModelError, match=message):
        descriptors.load_block_configs(ckpts[arch]["student"], path, 4, descriptor=arch, num_attention_heads=4)


def test_the_shipped_block_configs_of_every_built_student_are_accepted(ckpts):
    for arch in ("llama", "qwen3", "gpt_oss"):
        assert descriptors.load_block_configs(ckpts[arch]["student"], None, 4, descriptor=arch, num_attention_heads=4)
