"""tools/prune_student.py: a heterogeneous student carved from a teacher, through the real CLI."""

import json
import subprocess
import sys

import pytest
import torch

from common import cpu_support
import patch_automodel
from conftest import REPO, checkpoint_tensors
from nemo_automodel import NeMoAutoModelForCausalLM
from tools import prune_student

# The tiny teacher of tools/build_checkpoints.py: 4 layers, 4 KV heads of 16 channels, FFN 192.
BLOCKS = [
    {"attention": {"num_key_value_heads": 2}, "ffn": {"intermediate_size": 96}},
    {"attention": {"no_op": True}, "ffn": {"intermediate_size": 192}},
    {"attention": {"num_key_value_heads": 1}, "ffn": {"intermediate_size": 64}},
    {"attention": {"num_key_value_heads": 4}, "ffn": {"intermediate_size": 128}},
]
HEAD_DIM = 16


def prune_cli(*args):
    return subprocess.run([sys.executable, "-m", "tools.prune_student", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def student(ckpts, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pruned")
    (tmp / "blocks.json").write_text(json.dumps(BLOCKS))
    result = prune_cli("--teacher", ckpts["llama"]["teacher"], "--block-configs", tmp / "blocks.json", "--out", tmp / "student")
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "student"


def test_student_is_saved_in_modelopt_layout_with_block_configs_and_tokenizer(student):
    config = json.loads((student / "config.json").read_text())
    assert [b["attention"]["no_op"] for b in config["block_configs"]] == [False, True, False, False]
    assert [b["ffn"]["intermediate_size"] for b in config["block_configs"]] == [96, 192, 64, 128]
    assert (student / "subblocks_safetensors").is_dir() and (student / "tokenizer.json").is_file()


def test_kept_ffn_channels_are_the_teachers_largest_down_proj_columns(ckpts, student):
    teacher, child = checkpoint_tensors(ckpts["llama"]["teacher"]), checkpoint_tensors(student)
    for i, block in enumerate(BLOCKS):
        p = f"model.layers.{i}.mlp"
        width, full = block["ffn"]["intermediate_size"], teacher[f"{p}.down_proj.weight"].shape[1]
        # A layer that keeps its full width keeps the teacher's channel order.
        kept = torch.argsort(teacher[f"{p}.down_proj.weight"].norm(dim=0), descending=True)[:width] if width < full else torch.arange(full)
        assert torch.equal(child[f"{p}.down_proj.weight"], teacher[f"{p}.down_proj.weight"][:, kept])
        for name in ("up_proj", "gate_proj"):
            assert torch.equal(child[f"{p}.{name}.weight"], teacher[f"{p}.{name}.weight"][kept])


def test_fewer_kv_heads_average_the_teachers_and_queries_are_copied(ckpts, student):
    teacher, child = checkpoint_tensors(ckpts["llama"]["teacher"]), checkpoint_tensors(student)
    for i, block in enumerate(BLOCKS):
        p = f"model.layers.{i}.self_attn"
        if block["attention"].get("no_op"):
            assert not any(k.startswith(p) for k in child)
            continue
        heads = block["attention"]["num_key_value_heads"]
        for name in ("k_proj", "v_proj"):
            w = teacher[f"{p}.{name}.weight"]
            expected = w.view(heads, -1, HEAD_DIM, w.shape[1]).mean(dim=1).reshape(heads * HEAD_DIM, w.shape[1])
            torch.testing.assert_close(child[f"{p}.{name}.weight"], expected)
        for name in ("q_proj", "o_proj"):
            assert torch.equal(child[f"{p}.{name}.weight"], teacher[f"{p}.{name}.weight"])
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(child[name], teacher[name])


def test_student_loads_through_the_patch_with_per_layer_shapes(student):
    if not torch.cuda.is_available():
        cpu_support.apply()
    patch_automodel.apply_patch()
    try:
        model = NeMoAutoModelForCausalLM.from_pretrained(str(student), anymodel_descriptor="llama", torch_dtype=torch.float32)
    finally:
        patch_automodel.remove_patch()
    for layer, block in zip(model.model.layers, BLOCKS, strict=True):
        assert layer.mlp.up_proj.out_features == block["ffn"]["intermediate_size"]
        if not block["attention"].get("no_op"):
            assert layer.self_attn.k_proj.out_features == block["attention"]["num_key_value_heads"] * HEAD_DIM
    for name, tensor in checkpoint_tensors(student).items():
        assert torch.equal(model.state_dict()[name], tensor), name


@pytest.mark.parametrize("blocks, message", [
    (BLOCKS[:3], "one entry per teacher layer (4), got 3 entries"),
    ([*BLOCKS[:3], {"attention": {"num_key_value_heads": 3}}], "num_key_value_heads=3 must divide the teacher's 4"),
    ([*BLOCKS[:3], {"ffn": {"intermediate_size": 512}}], "intermediate_size=512 must be between 1 and the teacher's 192"),
    ([*BLOCKS[:3], {"mlp": {}}], "each entry holds only 'attention' and 'ffn'"),
])
def test_bad_block_configs_exit_2_with_one_line_saying_what_to_fix(ckpts, tmp_path, capsys, blocks, message):
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    with pytest.raises(SystemExit) as exit_info:
        prune_student.main(["--teacher", str(ckpts["llama"]["teacher"]), "--block-configs", str(tmp_path / "blocks.json"),
                            "--out", str(tmp_path / "s")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()
