"""preflight: every bad input is one PreflightError naming the value and the fix, before any weights load.

Most cases call ``preflight.check`` in-process on the real configs and the tiny checkpoints; the CLI
test here proves exit code 2, one line and an untouched ``checkpoint_dir`` under torchrun (``test_run.py``
does the same for one process).
"""

import json
import shutil
import time

import pytest

import preflight
import run
from conftest import tiny_overrides, torchrun


def config(ckpts, tmp_path, *extra, mode="kd", arch="llama"):
    overrides = tiny_overrides(ckpts, arch, tmp_path / "ck", teacher=mode == "kd") + list(extra)
    return run.load_config(run.HERE / run.MODES[mode], [tuple(o.split("=", 1)) for o in overrides])


def error(ckpts, tmp_path, *extra, mode="kd", world_size=1) -> str:
    with pytest.raises(preflight.PreflightError) as e:
        preflight.check(config(ckpts, tmp_path, *extra, mode=mode), mode, world_size=world_size)
    assert "\n" not in str(e.value)
    return str(e.value)


def copy_checkpoint(src, dst, drop=(), config_changes=None):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*drop))
    if config_changes:
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**cfg, **config_changes}))
    return dst


@pytest.mark.parametrize("mode", ["kd", "pretrain"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_the_tiny_checkpoints_pass_on_one_and_two_processes(ckpts, tmp_path, mode, arch):
    for world_size, extra in ((1, []), (2, []), (2, ["distributed.tp_size=2"]), (2, ["distributed.pp_size=2"])):
        preflight.check(config(ckpts, tmp_path, *extra, mode=mode, arch=arch), mode, world_size=world_size)


def test_student_layers_with_fewer_kv_heads_than_tp_are_allowed(ckpts, tmp_path):
    # The student keeps 1 KV head in one layer; tp_plan replicates that block instead of splitting it.
    preflight.check(config(ckpts, tmp_path, "distributed.tp_size=4"), "kd", world_size=4)


def test_missing_teacher_path_names_the_key(ckpts, tmp_path):
    assert error(ckpts, tmp_path, "teacher_model.pretrained_model_name_or_path=null") == (
        "teacher_model.pretrained_model_name_or_path is not set; pass "
        "teacher_model.pretrained_model_name_or_path=/path/to/checkpoint")


def test_checkpoint_path_that_does_not_exist(ckpts, tmp_path):
    assert error(ckpts, tmp_path, f"model.pretrained_model_name_or_path={tmp_path}/nope") == (
        f"model.pretrained_model_name_or_path={tmp_path}/nope does not exist; "
        "pass the directory of a Hugging Face checkpoint")


def test_checkpoint_path_that_is_a_file(ckpts, tmp_path):
    path = ckpts["llama"]["teacher"] / "config.json"
    assert error(ckpts, tmp_path, f"teacher_model.pretrained_model_name_or_path={path}") == (
        f"teacher_model.pretrained_model_name_or_path={path} is a file, not a directory; "
        "pass the checkpoint directory that holds config.json")


def test_checkpoint_without_config_json(ckpts, tmp_path):
    path = copy_checkpoint(ckpts["llama"]["student"], tmp_path / "s", drop=["config.json"])
    assert error(ckpts, tmp_path, f"model.pretrained_model_name_or_path={path}") == (
        f"model.pretrained_model_name_or_path={path} has no config.json; pass the checkpoint directory itself "
        "(the one saved with save_pretrained)")


def test_kd_teacher_without_tokenizer(ckpts, tmp_path):
    path = copy_checkpoint(ckpts["llama"]["teacher"], tmp_path / "t", drop=["tokenizer*"])
    assert error(ckpts, tmp_path, f"teacher_model.pretrained_model_name_or_path={path}").startswith(
        f"teacher_model.pretrained_model_name_or_path={path} has no tokenizer (tokenizer.json, ")


def test_unknown_descriptor_lists_the_valid_names(ckpts, tmp_path):
    assert error(ckpts, tmp_path, "model.anymodel_descriptor=lama") == (
        "model: unknown anymodel_descriptor 'lama'; valid names: auto, gpt_oss, gpt_oss_20b, llama, mistral_small, "
        "nemotron_h, nemotron_h_v2, qwen2, qwen3, qwen3_vl")


def test_descriptor_of_another_architecture_names_the_right_one(ckpts, tmp_path):
    assert error(ckpts, tmp_path, "model.anymodel_descriptor=qwen3") == (
        "model.anymodel_descriptor=qwen3 does not match the checkpoint's model_type='llama'; "
        "set model.anymodel_descriptor=llama (or auto)")


def test_heterogeneous_checkpoint_without_descriptor(ckpts, tmp_path):
    assert "is a heterogeneous (AnyModel) checkpoint; set model.anymodel_descriptor=auto" in error(
        ckpts, tmp_path, "model.anymodel_descriptor=null")


def write_block_configs(tmp_path, text):
    path = tmp_path / "block_configs.json"
    path.write_text(text)
    return path


LAYER = {"attention": {"no_op": False, "num_key_value_heads": 2}, "ffn": {"no_op": False, "intermediate_size": 96}}


@pytest.mark.parametrize("text, message", [
    ("[{", "is not valid JSON"),
    (json.dumps([LAYER] * 3), "3 block configs for a model with num_hidden_layers=4; give exactly one entry per layer"),
    (json.dumps([{**LAYER, "attention": {"num_kv_heads": 2}}] * 4), "invalid block config"),
])
def test_bad_block_configs(ckpts, tmp_path, text, message):
    path = write_block_configs(tmp_path, text)
    msg = error(ckpts, tmp_path, f"model.block_configs_path={path}")
    assert msg.startswith(f"model: {path}") and message in msg


def test_teacher_with_another_vocab_size_names_both_sizes(ckpts, tmp_path):
    path = copy_checkpoint(ckpts["llama"]["teacher"], tmp_path / "t", config_changes={"vocab_size": 1024})
    assert error(ckpts, tmp_path, f"teacher_model.pretrained_model_name_or_path={path}") == (
        "student vocab_size=512 and teacher vocab_size=1024 differ; KD compares logits token by token: "
        "distill from a teacher with the student's vocabulary")


def test_teacher_with_another_tokenizer_of_the_same_size(ckpts, tmp_path):
    path = copy_checkpoint(ckpts["llama"]["teacher"], tmp_path / "t")
    tok = json.loads((path / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (path / "tokenizer.json").write_text(json.dumps(tok))
    assert error(ckpts, tmp_path, f"teacher_model.pretrained_model_name_or_path={path}") == (
        f"student tokenizer (512 tokens, {ckpts['llama']['student']}) and teacher tokenizer (512 tokens, {path}) "
        "differ; use the same tokenizer for both")


@pytest.mark.parametrize("override, message", [
    ("kd_ratio=1.5", "kd_ratio=1.5 must be a number in [0, 1] (0: CE only, 1: KD only)"),
    ("kd_ratio=-0.1", "kd_ratio=-0.1 must be a number in [0, 1] (0: CE only, 1: KD only)"),
    ("kd_ratio=high", "kd_ratio='high' must be a number in [0, 1] (0: CE only, 1: KD only)"),
    ("kd_loss_fn.temperature=0", "kd_loss_fn.temperature=0 must be a number > 0 (1.0 is the usual choice)"),
    ("kd_loss_fn.temperature=-2.0", "kd_loss_fn.temperature=-2.0 must be a number > 0 (1.0 is the usual choice)"),
    ("kd_loss_fn.divergence=kl", "kd_loss_fn.divergence='kl' is not one of forward_kl, reverse_kl, jsd"),
])
def test_bad_kd_settings(ckpts, tmp_path, override, message):
    assert error(ckpts, tmp_path, override) == message


@pytest.mark.parametrize("extra, world_size, message", [
    (["distributed.tp_size=3"], 2, "tp_size * pp_size * cp_size = 3 * 1 * 1 = 3 does not divide the 2 processes; "
                                   "launch a multiple of 3 processes (torchrun --nproc_per_node) or lower the sizes"),
    (["distributed.tp_size=2", "distributed.cp_size=2"], 2, "= 4 does not divide the 2 processes"),
    (["distributed.tp_size=0"], 2, "distributed.tp_size=0 must be an integer >= 1"),
    (["distributed.dp_size=4"], 2, "distributed.dp_size=4 times tp*pp*cp=1 is not the 2 processes; "
                                   "set distributed.dp_size=none to infer it"),
    (["distributed.pp_size=8"], 8, "distributed.pp_size=8 is more than model's 4 layers; set distributed.pp_size <= 4"),
    (["distributed.tp_size=8"], 8, "distributed.tp_size=8 does not divide teacher_model's num_attention_heads=4; "
                                   "pick a tp_size that divides 4"),
    (["distributed.ep_size=2"], 2, "distributed.ep_size=2 is not supported (no MoE expert parallelism in this "
                                   "example); set distributed.ep_size=1"),
    (["distributed.pp_size=2", "distributed.cp_size=2"], 4, "distributed.pp_size > 1 with distributed.cp_size > 1 "
                                                            "is not supported for KD; set one of them to 1"),
])
def test_parallel_sizes_that_do_not_fit(ckpts, tmp_path, extra, world_size, message):
    assert message in error(ckpts, tmp_path, *extra, world_size=world_size)


def test_plain_hf_student_needs_heads_divisible_by_tp(ckpts, tmp_path):
    teacher = ckpts["llama"]["teacher"]
    assert error(ckpts, tmp_path, f"model.pretrained_model_name_or_path={teacher}", "model.anymodel_descriptor=null",
                 "distributed.tp_size=8", mode="pretrain", world_size=8) == (
        "distributed.tp_size=8 does not divide model's num_attention_heads=4; pick a tp_size that divides 4")


@pytest.mark.parametrize("section", ["dataset", "validation_dataset"])
def test_dataset_path_that_does_not_exist(ckpts, tmp_path, section):
    assert error(ckpts, tmp_path, f"{section}.dataset_name={tmp_path}/data") == (
        f"{section}.dataset_name={tmp_path}/data does not exist; pass a directory with train.jsonl / "
        "validation.jsonl or a hub dataset id")


def test_hub_ids_are_left_to_automodel(ckpts, tmp_path):
    preflight.check(config(ckpts, tmp_path, "dataset.dataset_name=rajpurkar/squad"), "kd", world_size=1)


def test_torchrun_bad_teacher_vocab_ends_every_rank_with_the_one_line_cause(ckpts, tmp_path):
    teacher = copy_checkpoint(ckpts["llama"]["teacher"], tmp_path / "t", config_changes={"vocab_size": 1024})
    start = time.monotonic()
    result = torchrun(["-m", "run", "--mode", "kd", *tiny_overrides(ckpts, "llama", tmp_path / "ck"),
                       f"teacher_model.pretrained_model_name_or_path={teacher}"], timeout=180)
    line = ("run.py: error: student vocab_size=512 and teacher vocab_size=1024 differ; KD compares logits token by "
            "token: distill from a teacher with the student's vocabulary")
    assert result.returncode != 0 and time.monotonic() - start < 120
    assert line in result.stderr.splitlines()
    # torchrun ends with its own failure summary; its root cause is our line, not a traceback.
    summary = result.stderr[result.stderr.rindex("Root Cause"):]
    assert "exitcode  : 2" in summary and f"traceback : {line}" in summary
    assert not (tmp_path / "ck").exists()
