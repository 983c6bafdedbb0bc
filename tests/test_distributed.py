"""The real recipe on 2 CPU processes (gloo): how models are built, and end-to-end training runs."""

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO, checkpoint_tensors, read_jsonl, run_job, tiny_overrides, torchrun

PARALLELISMS = {
    "fsdp2_dp2": [],
    "tp2": ["distributed.tp_size=2"],
    "pp2": ["distributed.pp_size=2", "distributed.pipeline.pp_microbatch_size=1",
            "step_scheduler.local_batch_size=2", "step_scheduler.global_batch_size=2"],
}


def build_report(ckpts, arch, tmp_path, extra):
    result = run_job(["-m", "tests.dist_build_check", str(tmp_path), "--mode", "kd",
                      *tiny_overrides(ckpts, arch, tmp_path / "ckpt"), *extra])
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_fsdp2_student_and_teacher_are_sharded_and_hold_the_checkpoint_weights(ckpts, arch, tmp_path):
    for rank in build_report(ckpts, arch, tmp_path, PARALLELISMS["fsdp2_dp2"]):
        for model in ("student", "teacher"):
            assert rank[model]["all_dtensor"], f"{model} was not sharded by the recipe's distributed_setup"
            assert rank[model]["placements"] == ["(Shard(dim=0),)"]
            assert rank[model]["max_abs_diff"] == 0.0
        assert not rank["student"]["frozen"]
        assert rank["teacher"]["frozen"] and rank["teacher"]["eval"]


def test_tp_splits_the_query_heads_of_a_layer_with_fewer_kv_heads_than_ranks(ckpts, tmp_path):
    """The student's layer 3 keeps 1 KV head of 4 query heads: under TP=2 each rank holds half of its Q and O
    projections, and the whole (one-head) K and V projections, of which it computes the head its queries read."""
    ranks = build_report(ckpts, "llama", tmp_path, PARALLELISMS["tp2"])
    for rank in ranks:
        tp = rank["student"]["tp"]
        attention = "model.layers.3.self_attn"
        assert tp[f"{attention}.q_proj.weight"] == ["S(0)", [32, 64]]
        assert tp[f"{attention}.o_proj.weight"] == ["S(1)", [64, 32]]
        assert tp[f"{attention}.k_proj.weight"] == ["none", [16, 64]]
        assert tp[f"{attention}.v_proj.weight"] == ["none", [16, 64]]
        # Layer 1 keeps 2 KV heads, which divide: split by heads as before.
        assert tp["model.layers.1.self_attn.k_proj.weight"] == ["S(0)", [16, 64]]


@pytest.fixture(scope="module")
def anymodel_teacher(ckpts, tmp_path_factory):
    """The tiny Llama teacher converted to ModelOpt's AnyModel layout, as Puzzletron's first step does."""
    from modelopt.torch.puzzletron.anymodel.converter.convert_any_model import convert_model

    out = tmp_path_factory.mktemp("anymodel_teacher")
    convert_model(str(ckpts["llama"]["teacher"]), str(out), "llama")
    assert (out / "subblocks_safetensors").is_dir()
    return out


@pytest.mark.parametrize("teacher_layout", ["hf", "anymodel"])
@pytest.mark.parametrize("parallelism", ["tp2", "pp2"])
def test_modelopt_layout_loads_on_every_rank(ckpts, tmp_path, parallelism, teacher_layout, request):
    """The student is always in ModelOpt's layout; the teacher in HF layout, or converted to ModelOpt's
    and loaded with ``teacher_model.anymodel_descriptor``."""
    extra = list(PARALLELISMS[parallelism])
    if teacher_layout == "anymodel":
        extra += [f"teacher_model.pretrained_model_name_or_path={request.getfixturevalue('anymodel_teacher')}",
                  "teacher_model.anymodel_descriptor=llama"]
    ranks = build_report(ckpts, "llama", tmp_path, extra)
    assert all(r["teacher"]["frozen"] for r in ranks)
    for model in ("student", "teacher"):
        assert all(r[model]["max_abs_diff"] == 0.0 for r in ranks)
        names = set().union(*(r[model]["names"] for r in ranks))
        # The converted teacher must hold exactly the HF original's tensors, too.
        assert names == set(checkpoint_tensors(ckpts["llama"][model])), f"a {model} stage lost or invented weights"
        if parallelism == "pp2":
            assert set(ranks[0][model]["names"]).isdisjoint(ranks[1][model]["names"])
        else:
            assert any("Shard(dim=1)" in p for p in ranks[0][model]["placements"]), f"TP did not shard the {model}"


def test_a_converted_anymodel_teacher_distills_exactly_like_its_hf_original(ckpts, anymodel_teacher, tmp_path):
    teachers = {
        "hf": [],
        "anymodel": [f"teacher_model.pretrained_model_name_or_path={anymodel_teacher}",
                     "teacher_model.anymodel_descriptor=llama"],
    }
    rows = {}
    for name, teacher_args in teachers.items():
        out = tmp_path / name
        result = run_job(["-m", "run", "--mode", "kd", "-c", "kd.yaml",
                          *tiny_overrides(ckpts, "llama", out, steps=2), *teacher_args])
        assert result.returncode == 0, result.stderr[-4000:]
        rows[name] = read_jsonl(out / "training.jsonl")
    for hf, anymodel in zip(rows["hf"], rows["anymodel"], strict=True):
        for key in ("loss", "kd_loss", "ce_loss", "grad_norm"):
            assert anymodel[key] == pytest.approx(hf[key], rel=1e-6, abs=1e-9), key


def assert_trained(out_dir, steps, kd=True):
    rows = read_jsonl(out_dir / "training.jsonl")
    assert [r["step"] for r in rows] == list(range(steps))
    for r in rows:
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        if kd:
            assert math.isfinite(r["kd_loss"]) and r["kd_loss"] >= 0
            # The recipe mixes the two terms with kd_ratio.
            expected = (1 - r["kd_ratio"]) * r["ce_loss"] + r["kd_ratio"] * r["kd_loss"]
            assert r["loss"] == pytest.approx(expected, rel=1e-4)
    val = read_jsonl(out_dir / "validation.jsonl")
    assert val and all(math.isfinite(v["val_loss"]) for v in val)


def test_kd_fsdp2_two_ranks_trains_and_logs_every_step(ckpts, tmp_path):
    out = tmp_path / "kd"
    result = torchrun(["-m", "run", "--mode", "kd", "-c", "kd.yaml", *tiny_overrides(ckpts, "llama", out, steps=4)])
    assert result.returncode == 0, result.stderr[-4000:]
    assert_trained(out, 4)
    assert "| kd_loss " in result.stderr + result.stdout
    # The suite's parity runs fork their ranks from a preloaded interpreter (conftest.run_job): the same job.
    preloaded = tmp_path / "preloaded"
    assert run_job(["-m", "run", "--mode", "kd", "-c", "kd.yaml", *tiny_overrides(ckpts, "llama", preloaded, steps=4)]
                   ).returncode == 0
    keys = ("loss", "kd_loss", "grad_norm")
    for got, ref in zip(read_jsonl(preloaded / "training.jsonl"), read_jsonl(out / "training.jsonl"), strict=True):
        assert [got[k] for k in keys] == [ref[k] for k in keys]


def test_pretrain_two_ranks_trains_the_heterogeneous_student(ckpts, tmp_path):
    out = tmp_path / "pretrain"
    result = run_job(["-m", "run", "--mode", "pretrain", *tiny_overrides(ckpts, "llama", out, teacher=False)])
    assert result.returncode == 0, result.stderr[-4000:]
    assert_trained(out, 3, kd=False)


def test_kd_runs_as_a_single_plain_python_process(ckpts, tmp_path):
    out = tmp_path / "single"
    result = subprocess.run([sys.executable, "-m", "run", "--mode", "kd", *tiny_overrides(ckpts, "llama", out, steps=2)],
                            cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert_trained(out, 2)
