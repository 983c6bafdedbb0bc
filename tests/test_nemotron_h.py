"""Nemotron-H (``nemotron_h``: Mamba-2, attention, MoE) and Nemotron-H v2 (``nemotron_h_v2``: Mamba-2, attention,
MLP) students build the layers their block configs ask for and distill the same under every parallelism
(2 CPU ranks, gloo, fp32) as in one process; bf16 trains.

The checkpoints (``tools/build_checkpoints.py --arch nemotron_h[_v2]``) are in NVIDIA's remote-code layout
(``backbone.*``, ``auto_map`` and the modeling file beside the weights). 6 layers, patterns ``M*EM*E`` and
``M*-M*-``; the student keeps 2 and 1 of 2 KV heads in layers 1 and 4, has no layer 3 (a Mamba-2 layer
removed: attention and FFN no-op) and narrower FFNs in layers 2 and 5 (MoE: 3 experts 32 wide, 4 experts 48
wide of 4 x 64; MLP: 96 and 33 of 192 channels). Under TP=2 layer 1's attention and layer 2's MLP are split,
layer 4's single KV head and layer 5's 33 channels are not, Mamba-2 and MoE mixers are replicated.
"""

import json
import shutil

import pytest
import torch

import run
from architectures import descriptors, nemotron_h, nemotron_h_parallel
from common.errors import AnyModelError
from safety import preflight
from conftest import (HIDDEN_KD_KEYS, assert_same_training, checkpoint_tensors, parity_run, run_job,
                      tiny_overrides)
from tools.build_checkpoints import build, write_squad_like_data

ARCHS = ("nemotron_h", "nemotron_h_v2")
STEPS = 4
PP = ["distributed.pp_size=2", "distributed.pipeline.pp_microbatch_size=2"]
BF16 = ["model.torch_dtype=bfloat16", "teacher_model.torch_dtype=bfloat16", "distributed.mp_policy.param_dtype=bfloat16"]
# name: (arch, mode, processes, overrides); global batch 4, local batch 4 unless dp=2.
RUNS = {
    "nemotron_h/single_process": ("nemotron_h", "kd", 1, []),
    "nemotron_h/fsdp2_dp2": ("nemotron_h", "kd", 2, ["step_scheduler.local_batch_size=2"]),
    "nemotron_h/tp2": ("nemotron_h", "kd", 2, ["distributed.tp_size=2"]),
    "nemotron_h/tp2_sequence_parallel": ("nemotron_h", "kd", 2, ["distributed.tp_size=2", "distributed.sequence_parallel=true"]),
    "nemotron_h/pp2": ("nemotron_h", "kd", 2, PP),
    "nemotron_h/bf16_fsdp2_dp2": ("nemotron_h", "kd", 2, ["step_scheduler.local_batch_size=2", *BF16]),
    "nemotron_h/pretrain_pp2": ("nemotron_h", "pretrain", 2, PP),
    "nemotron_h_v2/single_process": ("nemotron_h_v2", "kd", 1, []),
    "nemotron_h_v2/fsdp2_dp2": ("nemotron_h_v2", "kd", 2, ["step_scheduler.local_batch_size=2"]),
    "nemotron_h_v2/tp2": ("nemotron_h_v2", "kd", 2, ["distributed.tp_size=2"]),
    "nemotron_h_v2/tp2_sequence_parallel": ("nemotron_h_v2", "kd", 2, ["distributed.tp_size=2", "distributed.sequence_parallel=true"]),
    "nemotron_h_v2/pp2": ("nemotron_h_v2", "kd", 2, PP),
    "nemotron_h_v2/bf16_fsdp2_dp2": ("nemotron_h_v2", "kd", 2, ["step_scheduler.local_batch_size=2", *BF16]),
    "nemotron_h_v2/pretrain_single_process": ("nemotron_h_v2", "pretrain", 1, []),
    "nemotron_h_v2/pretrain_pp2": ("nemotron_h_v2", "pretrain", 2, PP),
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """``{"nemotron_h": {"teacher", "student"}, "nemotron_h_v2": {...}, "data": dir}``."""
    root = tmp_path_factory.mktemp("nemotron_h_ckpts")
    out = {arch: build(root / arch, arch) for arch in ARCHS}
    out["data"] = write_squad_like_data(root / "data")
    return out


def overrides(ckpts, arch, out_dir, teacher=True) -> list[str]:
    """``conftest.tiny_overrides`` with the teacher built through the same descriptor (same implementation)."""
    return [*tiny_overrides(ckpts, arch, out_dir, steps=STEPS, teacher=teacher),
            *([f"teacher_model.anymodel_descriptor={arch}"] if teacher else [])]


@pytest.fixture(scope="module")
def runs(ckpts, tmp_path_factory):
    """``{name: (training rows, validation rows)}`` for every entry of RUNS."""
    out = {}
    for name, (arch, mode, nproc, extra) in RUNS.items():
        teacher = [f"teacher_model.anymodel_descriptor={arch}"] if mode == "kd" else []
        out[name] = parity_run(ckpts, arch, tmp_path_factory.mktemp(name.replace("/", "_")), mode, nproc,
                               [*teacher, *extra], STEPS)
    return out


@pytest.mark.parametrize("name", [name for name, (_, mode, nproc, _) in RUNS.items()
                                  if mode == "kd" and nproc == 2 and "/bf16" not in name])
def test_nemotron_h_kd_matches_one_process_in_every_parallelism(runs, name):
    arch = name.split("/")[0]
    assert_same_training(runs[name], runs[f"{arch}/single_process"], HIDDEN_KD_KEYS, STEPS)


def test_nemotron_h_v2_pretrain_under_pipeline_parallelism_matches_one_process(runs):
    assert_same_training(runs["nemotron_h_v2/pretrain_pp2"], runs["nemotron_h_v2/pretrain_single_process"],
                         ("loss", "grad_norm"), STEPS)


def test_nemotron_h_pretrain_under_pipeline_parallelism_starts_at_the_kd_runs_cross_entropy(runs):
    """Same student, first batch and weights: ``--mode pretrain``'s step-0 loss is the KD run's step-0 CE."""
    pretrain, kd = runs["nemotron_h/pretrain_pp2"][0], runs["nemotron_h/single_process"][0]
    assert [r["step"] for r in pretrain] == list(range(STEPS))
    assert pretrain[0]["loss"] == pytest.approx(kd[0]["ce_loss"], rel=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_nemotron_h_trains_in_bf16_with_finite_losses_that_are_not_the_fp32_ones(runs, arch):
    bf16, fp32 = runs[f"{arch}/bf16_fsdp2_dp2"], runs[f"{arch}/single_process"]
    rows = [*bf16[0], *bf16[1]]
    assert [r["step"] for r in bf16[0]] == list(range(STEPS))
    assert all(torch.isfinite(torch.tensor(r[k])) for r in rows for k in ("loss", "ce_loss", "kd_loss") if k in r)
    assert bf16[0][-1]["loss"] != fp32[0][-1]["loss"]  # bf16 compute, not fp32 under another name
    assert bf16[0][-1]["loss"] == pytest.approx(fp32[0][-1]["loss"], rel=1e-2)


def test_nemotron_h_v2_tensor_parallelism_splits_attention_and_mlp_where_they_divide(ckpts, tmp_path):
    """Layer 1's attention (4 heads, 2 KV heads) and layer 2's MLP (96) are split; layer 4 (1 KV head), layer 5
    (33 channels) and the Mamba-2 layer 0 are whole on both ranks; the removed layer 3 has no parameters.
    Every parameter equals the checkpoint on disk, student and teacher."""
    result = run_job(["-m", "tests.dist_build_check", str(tmp_path), "--mode", "kd",
                      *overrides(ckpts, "nemotron_h_v2", tmp_path / "ckpt"), "distributed.tp_size=2"])
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in range(2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        student, teacher = report["student"], report["teacher"]
        assert student["max_abs_diff"] == teacher["max_abs_diff"] == 0.0
        tp, layer = student["tp"], "backbone.layers.{}."
        assert tp[layer.format(1) + "mixer.q_proj.weight"] == ["S(0)", [32, 64]]
        assert tp[layer.format(1) + "mixer.k_proj.weight"] == ["S(0)", [16, 64]]
        assert tp[layer.format(1) + "mixer.o_proj.weight"] == ["S(1)", [64, 32]]
        assert tp[layer.format(2) + "mixer.up_proj.weight"] == ["S(0)", [48, 64]]
        assert tp[layer.format(2) + "mixer.down_proj.weight"] == ["S(1)", [64, 48]]
        assert tp[layer.format(4) + "mixer.k_proj.weight"] == ["none", [16, 64]]
        assert tp[layer.format(5) + "mixer.down_proj.weight"] == ["none", [64, 33]]
        assert tp[layer.format(0) + "mixer.in_proj.weight"] == ["none", [196, 64]]
        assert not any(name.startswith(layer.format(3)) for name in tp)
        assert tp["lm_head.weight"] == ["S(0)", [256, 64]]
        assert teacher["tp"][layer.format(4) + "mixer.k_proj.weight"] == ["S(0)", [16, 64]]
        assert teacher["tp"][layer.format(5) + "mixer.down_proj.weight"] == ["S(1)", [64, 96]]


def load(path, arch, **kwargs):
    from nemo_automodel import NeMoAutoModelForCausalLM

    return NeMoAutoModelForCausalLM.from_pretrained(str(path), anymodel_descriptor=arch, torch_dtype=torch.float32,
                                                    **kwargs)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_nemotron_h_layer_has_the_shapes_its_block_config_asks_for_and_the_weights_on_disk(ckpts, arch, patched):
    student = ckpts[arch]["student"]
    model = load(student, arch)
    config = json.loads((student / "config.json").read_text())
    assert type(model.backbone.layers[0]).__module__.startswith("transformers_modules.")  # the remote-code class
    kinds = [nemotron_h_parallel.block_kind(block) for block in model.backbone.layers]
    assert kinds == {"nemotron_h": ["mamba", "attention", "moe", "no_op", "attention", "moe"],
                     "nemotron_h_v2": ["mamba", "attention", "mlp", "no_op", "attention", "mlp"]}[arch]
    for block, spec in zip(model.backbone.layers, config["block_configs"], strict=True):
        attention, ffn, mixer = spec["attention"], spec["ffn"], block.mixer
        if nemotron_h_parallel.block_kind(block) == "attention":
            assert mixer.k_proj.out_features == mixer.v_proj.out_features == attention["num_key_value_heads"] * 16
            assert mixer.q_proj.out_features == 4 * 16
        elif nemotron_h_parallel.block_kind(block) == "mlp":
            assert mixer.up_proj.out_features == mixer.down_proj.in_features == ffn["intermediate_size"]
        elif nemotron_h_parallel.block_kind(block) == "moe":
            moe = ffn["moe"]
            assert len(mixer.experts) == moe["num_local_experts"] == mixer.gate.weight.shape[0]
            assert {e.up_proj.out_features for e in mixer.experts} == {moe["expert_intermediate_dim"]}
            assert mixer.gate.top_k == moe["num_experts_per_tok"]
        elif nemotron_h_parallel.block_kind(block) == "no_op":
            assert attention["no_op"] and ffn["no_op"] and not list(block.parameters())
    on_disk, params = checkpoint_tensors(student), model.state_dict()
    assert set(params) == set(on_disk)
    assert all(torch.equal(params[name], tensor) for name, tensor in on_disk.items())


def test_a_removed_nemotron_h_block_passes_its_input_through_in_bf16(ckpts, patched):
    """ModelOpt's ``Same`` norm has an fp32 ``weight``; the block must not turn a bf16 stream into fp32."""
    model = load(ckpts["nemotron_h"]["student"], "nemotron_h").to(torch.bfloat16)
    hidden = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    assert torch.equal(model.backbone.layers[3](hidden), hidden)
    logits = model(input_ids=torch.randint(0, 500, (2, 12))).logits
    assert torch.isfinite(logits).all()


def test_auto_picks_nemotron_h_v2_for_a_dense_checkpoint_and_preflight_accepts_both(ckpts, tmp_path):
    from modelopt.torch.puzzletron.anymodel import ModelDescriptorFactory

    for arch in ARCHS:
        assert descriptors.resolve_descriptor("auto", ckpts[arch]["student"]) is ModelDescriptorFactory.get(arch)
    cfg = run.load_config(run.HERE / "kd.yaml", [tuple(o.split("=", 1)) for o in
                                                 overrides(ckpts, "nemotron_h_v2", tmp_path / "ck")])
    cfg.set_by_dotted("model.anymodel_descriptor", "nemotron_h")  # the MoE descriptor builds a dense one too
    preflight.check(cfg, "kd", world_size=2)


def preflight_error(ckpts, tmp_path, arch, *extra) -> str:
    cfg = run.load_config(run.HERE / "kd.yaml", [tuple(o.split("=", 1)) for o in
                                                 [*overrides(ckpts, arch, tmp_path / "ck"), *extra]])
    with pytest.raises(preflight.PreflightError) as e:
        preflight.check(cfg, "kd", world_size=2)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_context_parallelism_is_refused_in_one_line_naming_the_mamba_limit(ckpts, tmp_path):
    message = preflight_error(ckpts, tmp_path, "nemotron_h", "distributed.cp_size=2")
    assert "distributed.cp_size=2 with model.anymodel_descriptor=nemotron_h" in message
    assert "no context parallelism for Mamba-2 layers" in message and "set distributed.cp_size=1" in message


def test_a_nemotron_h_teacher_without_descriptor_on_cpu_is_refused_in_one_line(ckpts, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("AutoModel's own Nemotron-H runs where CUDA is")
    message = preflight_error(ckpts, tmp_path, "nemotron_h", "teacher_model.anymodel_descriptor=null")
    assert "teacher_model.anymodel_descriptor=nemotron_h" in message and "mamba_ssm" in message


def test_a_checkpoint_without_remote_code_is_refused_before_any_weights(ckpts, tmp_path, patched):
    copy = shutil.copytree(ckpts["nemotron_h_v2"]["student"], tmp_path / "native")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "auto_map"}))
    with pytest.raises(AnyModelError, match="config.json has no auto_map with AutoConfig"):
        load(copy, "nemotron_h_v2")


def _blocks(ckpts, arch):
    return json.loads((ckpts[arch]["student"] / "config.json").read_text())["block_configs"]


@pytest.mark.parametrize("arch, layer, change, message", [
    ("nemotron_h_v2", 0, {"ffn": {"no_op": False, "intermediate_size": 64}},
     r"layer 0 \(mamba, 'M' in the pattern\): a mamba layer has ffn.no_op=false"),
    ("nemotron_h_v2", 2, {"attention": {"no_op": False, "num_key_value_heads": 1}},
     r"layer 2 \(mlp, '-' in the pattern\): a mlp layer has attention.no_op=false"),
    ("nemotron_h", 2, {"ffn": {"no_op": False, "moe": {"num_local_experts": 4, "num_experts_per_tok": 1,
                                                       "expert_intermediate_dim": 64}}},
     r"layer 2 \(moe, 'E' in the pattern\) sets ffn.moe.num_experts_per_tok=1, which the Nemotron-H descriptors "
     r"do not apply \(the layer keeps num_experts_per_tok=2\)"),
    ("nemotron_h", 2, {"ffn": {"no_op": False, "intermediate_size": 32}},
     r"layer 2 \(moe, 'E' in the pattern\) sets ffn.intermediate_size=32, which a moe layer does not have"),
    ("nemotron_h_v2", 0, {"attention": {"no_op": False, "mamba": {"state_dim": 8, "num_heads": 4, "head_dim": 16,
                                                                  "num_groups": 2}}},
     r"sets attention.mamba.state_dim=8, which the Nemotron-H descriptors do not apply \(the layer keeps ssm_state_size=16\)"),
])
def test_block_configs_a_nemotron_h_build_would_not_follow_are_refused_before_any_weights(
        ckpts, tmp_path, patched, arch, layer, change, message):
    blocks = _blocks(ckpts, arch)
    blocks[layer] = {**blocks[layer], **change}
    path = tmp_path / "blocks.json"
    path.write_text(json.dumps(blocks))
    with pytest.raises(AnyModelError, match=message):
        load(ckpts[arch]["student"], arch, block_configs_path=str(path))


def test_the_shipped_nemotron_h_block_configs_pass_every_check(ckpts):
    from transformers import AutoConfig

    from modelopt.torch.puzzletron.block_config import maybe_cast_block_configs

    for arch in ARCHS:
        student = ckpts[arch]["student"]
        assert descriptors.load_block_configs(student, None, 6, descriptor=arch, num_attention_heads=4)
        config = AutoConfig.from_pretrained(student, trust_remote_code=True)
        nemotron_h.check_block_configs(maybe_cast_block_configs(_blocks(ckpts, arch)), config)
