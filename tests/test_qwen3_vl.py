"""Qwen3-VL-MoE (``anymodel_descriptor=qwen3_vl``): its language model distills on text with the vision tower
frozen, and the same under FSDP2 (dp=2) and TP=2 with sequence parallelism as in one process (2 CPU ranks,
gloo, fp32); pipeline parallelism is refused before any weights load.

The student (``tools/build_checkpoints.py --arch qwen3_vl``) differs from its homogeneous teacher per layer in
KV heads (2, none, 1, 4 of 4), expert count (4, 3, 2, 4) and expert width (32, 16, 32, 24). Under TP=2 layer 2's
single KV head keeps its attention whole, and layer 1's 3 experts split 2 + 1. The runs train at lr 1e-3 so
that later steps see weights the earlier ones changed.
"""

import json

import pytest
import torch

from safety import preflight
import run
from conftest import HIDDEN_KD, HIDDEN_KD_KEYS, checkpoint_tensors, read_jsonl, run_job, tiny_overrides
from tools.build_checkpoints import build, qwen3_vl_block_configs, write_squad_like_data

STEPS = 4
# name: (mode, processes, overrides); all with global batch 4, local batch 4 unless dp=2.
RUNS = {
    "single_process": ("kd", 1, ["checkpoint.save_consolidated=final"]),
    "fsdp2_dp2": ("kd", 2, ["step_scheduler.local_batch_size=2"]),
    "tp2_sequence_parallel": ("kd", 2, ["distributed.tp_size=2", "distributed.sequence_parallel=true"]),
    "pretrain_fsdp2_dp2": ("pretrain", 2, ["step_scheduler.local_batch_size=2"]),
}


def overrides(ckpts, out_dir, *extra, mode="kd"):
    kd = ["teacher_model.anymodel_descriptor=qwen3_vl", *HIDDEN_KD] if mode == "kd" else []
    return [*tiny_overrides(ckpts, "qwen3_vl", out_dir, steps=STEPS, teacher=mode == "kd"), *kd,
            "optimizer.lr=1e-3", "step_scheduler.local_batch_size=4", "step_scheduler.ckpt_every_steps=100", *extra]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3_vl")
    return {"qwen3_vl": build(root / "pair", "qwen3_vl"), "data": write_squad_like_data(root / "data")}


@pytest.fixture(scope="module")
def runs(ckpts, tmp_path_factory):
    """``{name: (training rows, validation rows, checkpoint_dir)}`` for every entry of RUNS."""
    out = {}
    for name, (mode, nproc, extra) in RUNS.items():
        out_dir = tmp_path_factory.mktemp(f"qwen3_vl_{name}")
        result = run_job(["-m", "run", "--mode", mode, *overrides(ckpts, out_dir, *extra, mode=mode)], nproc=nproc)
        assert result.returncode == 0, f"{name}: {result.stderr[-4000:]}"
        out[name] = (read_jsonl(out_dir / "training.jsonl"), read_jsonl(out_dir / "validation.jsonl"), out_dir)
    return out


@pytest.mark.parametrize("name", ["fsdp2_dp2", "tp2_sequence_parallel"])
def test_kd_matches_one_process_under_fsdp2_and_tp_with_sequence_parallelism(runs, name):
    (got_train, got_val, _), (ref_train, ref_val, _) = runs[name], runs["single_process"]
    assert [r["step"] for r in got_train] == list(range(STEPS))
    for g, r in zip(got_train, ref_train, strict=True):
        for key in HIDDEN_KD_KEYS:
            assert g[key] == pytest.approx(r[key], rel=1e-4), (g["step"], key)
    assert got_val and [v["val_loss"] for v in got_val] == pytest.approx([v["val_loss"] for v in ref_val], rel=1e-4)
    assert ref_train[0]["kd_loss"] > 0 and ref_train[-1]["loss"] < ref_train[0]["loss"]  # a real KD run that learns


def test_pretrain_under_fsdp2_starts_at_the_kd_runs_cross_entropy(runs):
    """Same student, first batch and weights: ``--mode pretrain``'s step-0 loss is the KD run's step-0 CE."""
    pretrain, kd = runs["pretrain_fsdp2_dp2"][0], runs["single_process"][0]
    assert [r["step"] for r in pretrain] == list(range(STEPS))
    assert pretrain[0]["loss"] == pytest.approx(kd[0]["ce_loss"], rel=1e-4)
    assert pretrain[-1]["loss"] < pretrain[0]["loss"]  # lr 1e-3: it learns


def test_tensor_parallelism_splits_heads_and_whole_experts_layer_by_layer(ckpts, tmp_path):
    """Attention by heads where they divide (layer 2's single KV head stays whole), every MoE block by whole
    experts (``Shard(0)``, 3 experts as 2 + 1), routers and the vision tower whole; weights equal the files."""
    result = run_job(["-m", "tests.dist_build_check", str(tmp_path), "--mode", "kd",
                      *overrides(ckpts, tmp_path / "ck", "distributed.tp_size=2")])
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in range(2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["student"]["max_abs_diff"] == report["teacher"]["max_abs_diff"] == 0.0
        tp, layer = report["student"]["tp"], "model.language_model.layers.{}."
        assert tp[layer.format(0) + "self_attn.q_proj.weight"] == ["S(0)", [32, 64]]
        assert tp[layer.format(0) + "self_attn.k_proj.weight"] == ["S(0)", [16, 64]]
        assert tp[layer.format(0) + "self_attn.o_proj.weight"] == ["S(1)", [64, 32]]
        assert tp[layer.format(2) + "self_attn.k_proj.weight"] == ["none", [16, 64]]
        assert tp[layer.format(0) + "mlp.experts.gate_up_proj"] == ["S(0)", [2, 64, 64]]
        assert tp[layer.format(0) + "mlp.experts.down_proj"] == ["S(0)", [2, 64, 32]]
        assert tp[layer.format(1) + "mlp.experts.down_proj"] == ["S(0)", [[2, 1][rank], 64, 16]]
        assert tp[layer.format(3) + "mlp.experts.gate_up_proj"] == ["S(0)", [2, 48, 64]]
        assert all(tp[layer.format(i) + "mlp.gate.weight"][0] == "none" for i in range(4))
        assert tp["lm_head.weight"] == ["S(0)", [256, 64]]
        assert {placement for name, (placement, _) in tp.items() if name.startswith("model.visual.")} == {"none"}


def test_student_builds_per_block_config_with_its_vision_tower_frozen(ckpts, patched):
    from nemo_automodel import NeMoAutoModelForCausalLM

    model = NeMoAutoModelForCausalLM.from_pretrained(str(ckpts["qwen3_vl"]["student"]), anymodel_descriptor="auto",
                                                     torch_dtype=torch.float32)
    assert type(model).__name__ == "Qwen3VLMoeForConditionalGeneration"
    layers = model.model.language_model.layers
    for layer, block in zip(layers, qwen3_vl_block_configs(), strict=True):
        moe = block["ffn"]["moe"]
        assert tuple(layer.mlp.experts.down_proj.shape) == (moe["num_local_experts"], 64, moe["expert_intermediate_dim"])
        assert tuple(layer.mlp.gate.weight.shape) == (moe["num_local_experts"], 64)
        if block["attention"]["no_op"]:
            assert not hasattr(layer.self_attn, "k_proj")
        else:
            assert layer.self_attn.k_proj.out_features == 16 * block["attention"]["num_key_value_heads"]
    trainable = {name.startswith("model.visual.") for name, p in model.named_parameters() if p.requires_grad}
    frozen = {name.startswith("model.visual.") for name, p in model.named_parameters() if not p.requires_grad}
    assert trainable == {False} and frozen == {True}


def test_consolidated_checkpoint_reloads_with_the_vision_tower_unchanged_and_the_language_model_trained(
        ckpts, runs, patched):
    from nemo_automodel import NeMoAutoModelForCausalLM

    saved = runs["single_process"][2] / "LATEST" / "model" / "consolidated"
    original, trained = checkpoint_tensors(ckpts["qwen3_vl"]["student"]), checkpoint_tensors(saved)
    assert set(trained) == set(original)
    vision = [k for k in original if k.startswith("model.visual.")]
    assert vision and all(torch.equal(original[k], trained[k]) for k in vision)
    assert all(not torch.equal(original[k], trained[k]) for k in original if k not in vision)
    model = NeMoAutoModelForCausalLM.from_pretrained(str(saved), anymodel_descriptor="qwen3_vl",
                                                     torch_dtype=torch.float32)
    assert [layer.mlp.experts.down_proj.shape[0] for layer in model.model.language_model.layers] == [4, 3, 2, 4]


def kd_config(ckpts, tmp_path, *extra):
    return run.load_config(run.HERE / run.MODES["kd"],
                           [tuple(o.split("=", 1)) for o in overrides(ckpts, tmp_path / "ck", *extra)])


def test_pipeline_parallelism_is_refused_in_one_line_before_any_weights_load(ckpts, tmp_path):
    with pytest.raises(preflight.PreflightError) as e:
        preflight.check(kd_config(ckpts, tmp_path, "distributed.pp_size=2"), "kd", world_size=2)
    assert str(e.value) == (
        "distributed.pp_size=2: model is a Qwen3-VL-MoE (qwen3_vl_moe) model, whose pipeline split AutoModel "
        "0.7.0 refuses (it pipelines only the image-text models gemma4 and mistral3); set distributed.pp_size=1 and "
        "split it with FSDP2 and distributed.tp_size (sequence_parallel works too)")


def test_teacher_without_a_descriptor_is_refused_naming_the_one_to_set(ckpts, tmp_path):
    teacher = ckpts["qwen3_vl"]["teacher"]
    with pytest.raises(preflight.PreflightError) as e:
        preflight.check(kd_config(ckpts, tmp_path, "teacher_model.anymodel_descriptor=null"), "kd", world_size=1)
    assert str(e.value) == (
        f"teacher_model.pretrained_model_name_or_path={teacher} is a qwen3_vl_moe (image-text) checkpoint without "
        "teacher_model.anymodel_descriptor, which AutoModel 0.7.0's NeMoAutoModelForCausalLM cannot build; set "
        "teacher_model.anymodel_descriptor=qwen3_vl (also for a homogeneous model)")


def test_a_per_layer_top_k_the_descriptor_would_ignore_is_refused(ckpts, tmp_path):
    student = ckpts["qwen3_vl"]["student"]
    blocks = json.loads((student / "config.json").read_text())["block_configs"]
    moe_layer = next(i for i, b in enumerate(blocks) if b["ffn"].get("moe"))
    blocks[moe_layer]["ffn"]["moe"]["num_experts_per_tok"] = 3
    path = tmp_path / "blocks.json"
    path.write_text(json.dumps(blocks))
    with pytest.raises(preflight.PreflightError) as e:
        preflight.check(kd_config(ckpts, tmp_path, f"model.block_configs_path={path}"), "kd", world_size=1)
    assert str(e.value) == (
        f"model: {path}: layer {moe_layer} sets ffn.moe.num_experts_per_tok=3, but the qwen3_vl descriptor builds "
        "every layer with the model's num_experts_per_tok=2; set it to 2 or leave it out")
