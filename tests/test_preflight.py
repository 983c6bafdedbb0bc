"""preflight: every bad input is one PreflightError naming the value and the fix, before any weights load.

Most cases call ``preflight.check`` in-process on the real configs and the tiny checkpoints; the CLI
test here proves exit code 2, one line and an untouched ``checkpoint_dir`` under torchrun (``test_run.py``
does the same for one process).
"""

import json
import shutil
import time
from pathlib import Path

import mistral_common
import pytest
import torch

from safety import preflight
import run
from conftest import tiny_overrides, torchrun
from tools.build_checkpoints import TINY, build_tokenizer, student_block_configs, write_squad_like_data


def config(ckpts, tmp_path, *extra, mode="kd", arch="llama"):
    overrides = tiny_overrides(ckpts, arch, tmp_path / "ck", teacher=mode == "kd") + list(extra)
    return run.load_config(run.HERE / run.MODES[mode], [tuple(o.split("=", 1)) for o in overrides])


def error(ckpts, tmp_path, *extra, mode="kd", world_size=1, arch="llama") -> str:
    with pytest.raises(preflight.PreflightError) as e:
        preflight.check(config(ckpts, tmp_path, *extra, mode=mode, arch=arch), mode, world_size=world_size)
    assert "\n" not in str(e.value)
    return str(e.value)


def copy_checkpoint(src, dst, drop=(), config_changes=None):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*drop))
    if config_changes:
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**cfg, **config_changes}))
    return dst


@pytest.mark.parametrize("mode", ["kd", "pretrain"])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt_oss"])
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
        "pass the directory of a Hugging Face checkpoint (the one that holds config.json)")


def test_checkpoint_path_that_is_a_file(ckpts, tmp_path):
    path = ckpts["llama"]["teacher"] / "config.json"
    assert error(ckpts, tmp_path, f"teacher_model.pretrained_model_name_or_path={path}") == (
        f"teacher_model.pretrained_model_name_or_path={path} is a file, not a directory; "
        "pass the directory of a Hugging Face checkpoint (the one that holds config.json)")


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


def test_block_config_field_the_descriptor_would_ignore_is_refused(ckpts, tmp_path):
    blocks = json.loads((ckpts["gpt_oss"]["student"] / "config.json").read_text())["block_configs"]
    blocks[1] = {**blocks[1], "ffn": {"no_op": False, "intermediate_size": 64}}  # a dense width, in an MoE model
    path = tmp_path / "blocks.json"
    path.write_text(json.dumps(blocks))
    assert error(ckpts, tmp_path, f"model.block_configs_path={path}", arch="gpt_oss") == (
        f"model: {path}: layer 1 sets ffn.intermediate_size=64, which the gpt_oss descriptor does not apply (the "
        "layer would be built without it); fields it applies: attention.no_op, attention.num_key_value_heads, "
        "ffn.moe.expert_intermediate_dim, ffn.moe.num_experts_per_tok, ffn.moe.num_local_experts, ffn.no_op")


@pytest.mark.skipif(torch.cuda.is_available(), reason="AutoModel's own GPT-OSS runs where CUDA is")
def test_gpt_oss_teacher_without_descriptor_on_a_cpu_machine_asks_for_the_descriptor(ckpts, tmp_path):
    teacher = ckpts["gpt_oss"]["teacher"]
    assert error(ckpts, tmp_path, "teacher_model.anymodel_descriptor=null", arch="gpt_oss") == (
        f"teacher_model.pretrained_model_name_or_path={teacher} is a gpt_oss checkpoint without "
        "teacher_model.anymodel_descriptor: AutoModel 0.7.0 then uses its own gpt_oss implementation, which needs "
        "CUDA (its YaRN rotary embedding calls torch.cuda); on this CPU-only machine set "
        "teacher_model.anymodel_descriptor=gpt_oss (transformers' implementation)")


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
    (["distributed.pp_size=8", "step_scheduler.local_batch_size=8"], 8,
     "distributed.pp_size=8 is more than model's 4 layers; set distributed.pp_size <= 4"),
    (["distributed.pp_size=2", "distributed.pipeline.pp_microbatch_size=2"], 2,
     "step_scheduler.local_batch_size=2 must split into whole microbatches of distributed.pipeline.pp_microbatch_size=2, "
     "at least distributed.pp_size=2 of them: set local_batch_size to a multiple of 2 that is >= 4, or lower "
     "pp_microbatch_size"),
    (["distributed.tp_size=8"], 8, "distributed.tp_size=8 does not divide teacher_model's num_attention_heads=4; "
                                   "pick a tp_size that divides 4"),
    (["distributed.ep_size=2"], 2, "distributed.ep_size=2 is not supported (no MoE expert parallelism in this "
                                   "example); set distributed.ep_size=1"),
    (["distributed.pp_size=2", "distributed.cp_size=2"], 4, "distributed.pp_size > 1 with distributed.cp_size > 1 "
                                                            "is not supported for KD; set one of them to 1"),
])
def test_parallel_sizes_that_do_not_fit(ckpts, tmp_path, extra, world_size, message):
    assert message in error(ckpts, tmp_path, *extra, world_size=world_size)


@pytest.mark.parametrize("mode", ["kd", "pretrain"])
def test_packed_sequences_without_flash_attention_are_refused_naming_the_setting(ckpts, tmp_path, mode):
    from nemo_automodel._transformers import kernel_patches

    if kernel_patches.HAS_FA or kernel_patches.HAS_FA3 or kernel_patches.HAS_FA4:
        pytest.skip("flash-attn is installed here: AutoModel packs through it")
    assert error(ckpts, tmp_path, "packed_sequence.packed_sequence_size=256", mode=mode) == (
        "packed_sequence.packed_sequence_size=256: AutoModel 0.7.0 packs sequences only through Flash Attention, "
        "which is not installed here (flash-attn needs a CUDA GPU); set packed_sequence.packed_sequence_size=0 or "
        "install flash-attn on a GPU machine")


def test_packed_sequences_with_context_parallelism_are_refused(ckpts, tmp_path):
    assert error(ckpts, tmp_path, "packed_sequence.packed_sequence_size=256", "distributed.cp_size=2",
                 "fused_linear_loss=false", world_size=2).startswith(
        "packed_sequence.packed_sequence_size=256 with distributed.cp_size=2: AutoModel 0.7.0 packs sequences only "
        "without context parallelism")


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


# Descriptors beyond Llama/Qwen3: Mistral-Small (tokenizer read by mistral-common) and Qwen3-VL (an image-text
# model). Their tiny checkpoints are built here, once per module, the way tools/build_checkpoints.py builds its own.

TEKKEN = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"  # a real Mistral tokenizer file


def _save_anymodel_student(model_cls, config, descriptor_name, blocks, out):
    from modelopt.torch.puzzletron.anymodel import ModelDescriptorFactory, deci_x_patcher
    from modelopt.torch.puzzletron.tools.checkpoint_utils_hf import save_checkpoint

    descriptor = ModelDescriptorFactory.get(descriptor_name)
    torch.manual_seed(0)
    with deci_x_patcher(descriptor, blocks):
        model = model_cls.from_config(config, dtype=torch.float32)
    model.config.block_configs = blocks
    save_checkpoint(model, out, descriptor)
    return out


@pytest.fixture(scope="module")
def more_ckpts(tmp_path_factory):
    """``{"mistral": {"teacher", "student"}, "qwen3_vl": {"student"}, "data": dir}``: a Mistral teacher (HF layout)
    and heterogeneous Mistral-Small student, and a heterogeneous Qwen3-VL-MoE student (ModelOpt's AnyModel layout),
    all with the byte-level BPE tokenizer as Hugging Face files only (tokenizer.json, no tekken.json)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    root = tmp_path_factory.mktemp("more_ckpts")
    tokenizer = build_tokenizer()
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    mistral = AutoConfig.for_model("mistral", vocab_size=len(tokenizer), **special, **TINY)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(mistral, dtype=torch.float32).save_pretrained(root / "mistral" / "teacher")
    blocks = student_block_configs(TINY["num_hidden_layers"], TINY["num_key_value_heads"], TINY["intermediate_size"])
    _save_anymodel_student(AutoModelForCausalLM, mistral, "mistral_small", blocks, root / "mistral" / "student")

    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, **special)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16, deepstack_visual_indexes=[0])
    qwen3_vl = AutoConfig.for_model("qwen3_vl_moe", text_config=text, vision_config=vision)

    def moe(experts):
        return {"no_op": False, "moe": {"num_local_experts": experts, "num_experts_per_tok": 2,
                                        "expert_intermediate_dim": 32}}
    vl_blocks = [{"attention": {"no_op": False, "num_key_value_heads": 2}, "ffn": moe(4)},
                 {"attention": {"no_op": False, "num_key_value_heads": 1}, "ffn": moe(2)}]
    _save_anymodel_student(AutoModelForImageTextToText, qwen3_vl, "qwen3_vl", vl_blocks, root / "qwen3_vl" / "student")

    out = {"mistral": {"teacher": root / "mistral" / "teacher", "student": root / "mistral" / "student"},
           "qwen3_vl": {"student": root / "qwen3_vl" / "student"}, "data": write_squad_like_data(root / "data")}
    for path in (*out["mistral"].values(), out["qwen3_vl"]["student"]):
        tokenizer.save_pretrained(path)
    return out


def more_config(more_ckpts, tmp_path, student, descriptor, teacher=None, mode="kd"):
    overrides = [f"model.pretrained_model_name_or_path={student}", f"model.anymodel_descriptor={descriptor}",
                 f"dataset.dataset_name={more_ckpts['data']}", f"validation_dataset.dataset_name={more_ckpts['data']}",
                 f"checkpoint.checkpoint_dir={tmp_path / 'ck'}"]
    if mode == "kd":
        overrides.append(f"teacher_model.pretrained_model_name_or_path={teacher}")
    return run.load_config(run.HERE / run.MODES[mode], [tuple(o.split("=", 1)) for o in overrides])


def more_error(*args, **kwargs) -> str:
    mode = kwargs.get("mode", "kd")
    with pytest.raises(preflight.PreflightError) as e:
        preflight.check(more_config(*args, **kwargs), mode, world_size=1)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_mistral_student_with_only_hugging_face_tokenizer_files_names_the_missing_tekken_json(more_ckpts, tmp_path):
    # AutoModel tokenizes model_type mistral with mistral-common, which fails on tokenizer.json alone
    # ("No tokenizer file found.") once the recipe starts; preflight names the file instead.
    student, teacher = more_ckpts["mistral"]["student"], more_ckpts["mistral"]["teacher"]
    assert more_error(more_ckpts, tmp_path, student, "mistral_small", teacher) == (
        f"model.pretrained_model_name_or_path={student} has no tekken.json: AutoModel 0.7.0 loads the tokenizer of "
        "model_type='mistral' with mistral-common, which reads tekken.json (or a SentencePiece *.model), not "
        f"tokenizer.json; copy tekken.json from the checkpoint this one was made from into {student}")


def test_mistral_checkpoints_with_tekken_json_pass_also_when_it_is_their_only_tokenizer_file(more_ckpts, tmp_path):
    # ModelOpt's copy_tokenizer (transformers 5 with mistral-common) gives a Mistral child tekken.json and nothing else.
    student = copy_checkpoint(more_ckpts["mistral"]["student"], tmp_path / "s", drop=["tokenizer*"])
    teacher = copy_checkpoint(more_ckpts["mistral"]["teacher"], tmp_path / "t")
    for path in (student, teacher):
        shutil.copy(TEKKEN, path / "tekken.json")
    preflight.check(more_config(more_ckpts, tmp_path, student, "mistral_small", teacher), "kd", world_size=1)


def test_tekken_json_is_required_only_where_automodel_sends_the_model_type_to_mistral_common(more_ckpts, tmp_path,
                                                                                            monkeypatch):
    # The check asks AutoModel's tokenizer registry: a patch that takes model_type mistral off mistral-common
    # (to the Hugging Face tokenizer files) lifts it.
    from nemo_automodel._transformers.tokenization.registry import TokenizerRegistry

    student = more_ckpts["mistral"]["student"]
    assert " has no tekken.json: " in more_error(more_ckpts, tmp_path, student, "mistral_small", mode="pretrain")
    monkeypatch.delitem(TokenizerRegistry.model_type_to_tokenizer, "mistral")
    preflight.check(more_config(more_ckpts, tmp_path, student, "mistral_small", mode="pretrain"), "pretrain",
                    world_size=1)


@pytest.mark.parametrize("descriptor", ["qwen3_vl", "auto"])
def test_qwen3_vl_student_passes_with_its_descriptor_or_auto(more_ckpts, tmp_path, descriptor):
    # AutoModel's image-text class builds it (qwen3_vl.py; the runs are in test_qwen3_vl.py); auto maps its
    # model_type, which ModelOpt's auto-detection lacks.
    student = more_ckpts["qwen3_vl"]["student"]
    preflight.check(more_config(more_ckpts, tmp_path, student, descriptor, mode="pretrain"), "pretrain", world_size=1)


def test_image_text_student_other_than_qwen3_vl_is_refused_naming_the_causal_lm_limit(more_ckpts, tmp_path):
    student = copy_checkpoint(more_ckpts["qwen3_vl"]["student"], tmp_path / "s", config_changes={"model_type": "mistral3"})
    shutil.copy(TEKKEN, student / "tekken.json")  # mistral3's tokenizer file, checked first
    assert more_error(more_ckpts, tmp_path, student, "mistral_small", mode="pretrain") == (
        f"model.anymodel_descriptor=mistral_small: model.pretrained_model_name_or_path={student} has "
        "model_type='mistral3' (Mistral3ForConditionalGeneration), which AutoModel 0.7.0's NeMoAutoModelForCausalLM, "
        "the class this example builds every model with, cannot build (of image-text models only Qwen3-VL-MoE builds "
        "here, anymodel_descriptor qwen3_vl): distill a text-only causal-LM checkpoint (anymodel_descriptor gpt_oss, "
        "llama, mistral_small, nemotron_h, nemotron_h_v2, qwen2, qwen3)")


def test_descriptor_set_on_a_model_type_modelopt_cannot_detect_names_that_descriptor_not_auto(more_ckpts, tmp_path):
    student = copy_checkpoint(more_ckpts["mistral"]["student"], tmp_path / "s",
                              config_changes={"model_type": "qwen3_moe"})
    assert more_error(more_ckpts, tmp_path, student, "qwen3", mode="pretrain") == (
        "model.anymodel_descriptor=qwen3 does not match the checkpoint's model_type='qwen3_moe': ModelOpt 0.47 has "
        "no descriptor for that model_type")


# --------------------------------------------------------------------------- late errors made early


def test_truncated_weight_file_is_named(ckpts, tmp_path):
    student = copy_checkpoint(ckpts["llama"]["student"], tmp_path / "s")
    shard = student / "subblocks_safetensors" / "block_0_ffn.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    assert error(ckpts, tmp_path, f"model.pretrained_model_name_or_path={student}") == (
        f"model.pretrained_model_name_or_path={student}: subblocks_safetensors/block_0_ffn.safetensors is truncated "
        f"({shard.stat().st_size} bytes; its tensors end at byte {shard.stat().st_size + 100}); the file is damaged "
        "or was only partly copied: copy it again")


def test_weight_file_listed_in_the_index_but_missing_is_named(ckpts, tmp_path):
    student = copy_checkpoint(ckpts["llama"]["student"], tmp_path / "s")
    (student / "subblocks_safetensors" / "lm_head.safetensors").unlink()
    assert error(ckpts, tmp_path, f"model.pretrained_model_name_or_path={student}") == (
        f"model.pretrained_model_name_or_path={student}: subblocks_safetensors/lm_head.safetensors is listed in "
        "model.safetensors.index.json but missing; copy the whole checkpoint directory again")


def test_dataset_file_without_rows_is_named(ckpts, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(ckpts["data"], data)
    (data / "train.jsonl").write_text("\n")
    assert error(ckpts, tmp_path, f"dataset.dataset_name={data}") == (
        f"dataset.dataset_name={data}: {data}/train.jsonl has no rows; point it at a file with at least one JSON line")


@pytest.mark.parametrize("override, message", [
    ("optimizer.lr=abc", "optimizer.lr='abc' is not a number; pass one, e.g. optimizer.lr=1e-5"),
    ("step_scheduler.max_steps=0", "step_scheduler.max_steps=0 must be an integer >= 1"),
    ("step_scheduler.local_batch_size=two", "step_scheduler.local_batch_size='two' must be an integer >= 1"),
])
def test_hyper_parameters_that_are_not_numbers(ckpts, tmp_path, override, message):
    assert error(ckpts, tmp_path, override) == message


def test_numbers_yaml_reads_as_strings_pass(ckpts, tmp_path):
    preflight.check(config(ckpts, tmp_path, "optimizer.lr=1e-5", "optimizer.eps=1e-8"), "kd", world_size=1)


def test_kd_mode_with_the_pretrain_config_says_to_start_from_kd_yaml(ckpts, tmp_path):
    overrides = [tuple(o.split("=", 1)) for o in tiny_overrides(ckpts, "llama", tmp_path / "ck", teacher=False)]
    cfg = run.load_config(run.HERE / "pretrain.yaml", overrides)
    with pytest.raises(preflight.PreflightError, match="^the config has no teacher_model section, which --mode kd "
                                                       "needs .*: start from kd.yaml"):
        preflight.check(cfg, "kd", world_size=1)


def test_a_kd_config_without_kd_loss_fn_distills_with_this_examples_loss(ckpts, tmp_path):
    import yaml

    sections = yaml.safe_load((run.HERE / "kd.yaml").read_text())
    del sections["kd_loss_fn"]
    config = tmp_path / "kd_no_loss.yaml"
    config.write_text(yaml.safe_dump(sections))
    _, cfg = run.prepare(["--mode", "kd", "-c", str(config), *tiny_overrides(ckpts, "llama", tmp_path / "ck")])
    import loss

    assert cfg.kd_loss_fn._target_ is loss.KDLoss
