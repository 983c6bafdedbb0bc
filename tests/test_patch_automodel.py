"""patch_automodel: heterogeneous AnyModel checkpoints through NeMoAutoModelForCausalLM (one process)."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

import patch_automodel
from architectures import descriptors
from common.errors import AnyModelError
from conftest import checkpoint_tensors
from nemo_automodel import NeMoAutoModelForCausalLM
from nemo_automodel.components.checkpoint.checkpointing import Checkpointer
from modelopt.torch.puzzletron.anymodel import ModelDescriptorFactory, deci_x_patcher
from modelopt.torch.puzzletron.anymodel.puzzformer.no_op import MatchingZeros

pytestmark = pytest.mark.usefixtures("patched")


def load(path, **kwargs):
    return NeMoAutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32, **kwargs)


def block_configs_of(path):
    return json.loads((path / "config.json").read_text())["block_configs"]


def assert_layers_match(model, block_configs):
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    for layer, block in zip(model.model.layers, block_configs, strict=True):
        if block["attention"].get("no_op"):
            assert not hasattr(layer.self_attn, "q_proj")
        else:
            assert layer.self_attn.k_proj.out_features == block["attention"]["num_key_value_heads"] * head_dim
            assert layer.self_attn.v_proj.out_features == block["attention"]["num_key_value_heads"] * head_dim
            assert layer.self_attn.q_proj.out_features == cfg.num_attention_heads * head_dim
        assert layer.mlp.up_proj.out_features == block["ffn"]["intermediate_size"]
        assert layer.mlp.down_proj.in_features == block["ffn"]["intermediate_size"]


def logits(model, vocab_size):
    ids = torch.arange(24).remainder(vocab_size).view(2, 12)
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_layer_shapes_follow_block_configs_in_config_json(ckpts, arch):
    student = ckpts[arch]["student"]
    model = load(student, anymodel_descriptor=arch)
    assert_layers_match(model, block_configs_of(student))
    assert isinstance(model.model.layers[2].self_attn, MatchingZeros)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_logits_equal_a_direct_modelopt_load(ckpts, arch):
    student = ckpts[arch]["student"]
    with deci_x_patcher(ModelDescriptorFactory.get(arch)):
        reference = AutoModelForCausalLM.from_pretrained(str(student), torch_dtype=torch.float32)
    model = load(student, anymodel_descriptor=arch)
    expected = logits(reference, reference.config.vocab_size)
    assert expected.abs().max() > 0
    torch.testing.assert_close(logits(model, model.config.vocab_size), expected, rtol=1e-5, atol=1e-5)


def test_block_configs_json_beside_the_checkpoint_is_used(ckpts, tmp_path):
    student = tmp_path / "student"
    shutil.copytree(ckpts["llama"]["student"], student)
    config = json.loads((student / "config.json").read_text())
    blocks = config.pop("block_configs")
    (student / "config.json").write_text(json.dumps(config))
    (student / "block_configs.json").write_text(json.dumps(blocks))
    model = load(student, anymodel_descriptor="llama")
    assert_layers_match(model, blocks)
    assert model.config.block_configs == blocks, "saved checkpoints must carry the block configs"


def test_block_configs_path_overrides_the_checkpoint(ckpts, tmp_path):
    blocks = block_configs_of(ckpts["llama"]["student"])
    # A homogeneous teacher checkpoint plus a file that prunes it: the layers follow the file.
    teacher = tmp_path / "teacher"
    shutil.copytree(ckpts["llama"]["teacher"], teacher)
    (teacher / "block_configs.json").write_text(json.dumps([{"attention": {"num_key_value_heads": 4}, "ffn": {"intermediate_size": 192}}] * 4))
    path = tmp_path / "pruned.json"
    path.write_text(json.dumps(blocks))
    model = NeMoAutoModelForCausalLM.from_config(str(teacher), anymodel_descriptor="llama", block_configs_path=str(path),
                                                 torch_dtype=torch.float32)
    assert_layers_match(model, blocks)


def test_sources_are_read_in_documented_order(ckpts, tmp_path):
    student = tmp_path / "student"
    shutil.copytree(ckpts["llama"]["student"], student)
    in_config = block_configs_of(student)
    beside = [dict(b, ffn={"intermediate_size": 32}) for b in in_config]
    explicit = [dict(b, ffn={"intermediate_size": 16}) for b in in_config]
    assert descriptors.load_block_configs(student, None, 4) == in_config
    (student / "block_configs.json").write_text(json.dumps(beside))
    assert descriptors.load_block_configs(student, None, 4) == beside
    (tmp_path / "explicit.json").write_text(json.dumps(explicit))
    assert descriptors.load_block_configs(student, tmp_path / "explicit.json", 4) == explicit


def test_plain_hf_checkpoint_loads_with_and_without_a_descriptor(ckpts):
    teacher = ckpts["llama"]["teacher"]
    on_disk = checkpoint_tensors(teacher)
    for model in (load(teacher), load(teacher, anymodel_descriptor="llama")):
        state = model.state_dict()
        assert state.keys() == on_disk.keys()
        for name, tensor in on_disk.items():
            torch.testing.assert_close(state[name], tensor, rtol=0, atol=0)


def test_anymodel_layout_weights_are_the_ones_on_disk(ckpts):
    student = ckpts["llama"]["student"]
    on_disk = checkpoint_tensors(student)
    state = load(student, anymodel_descriptor="llama").state_dict()
    assert state.keys() == on_disk.keys()
    for name, tensor in on_disk.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0)


def test_unknown_descriptor_lists_the_valid_names(ckpts):
    with pytest.raises(AnyModelError, match=r"unknown anymodel_descriptor 'lama'.*llama.*qwen3"):
        load(ckpts["llama"]["student"], anymodel_descriptor="lama")


def test_old_and_auto_descriptor_names_resolve():
    assert descriptors.resolve_descriptor("gpt_oss_20b") is ModelDescriptorFactory.get("gpt_oss")
    for name in ModelDescriptorFactory.CLASS_MAPPING:
        assert descriptors.resolve_descriptor(name) is ModelDescriptorFactory.get(name)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_auto_descriptor_reads_model_type(ckpts, arch):
    assert descriptors.resolve_descriptor("auto", ckpts[arch]["student"]) is ModelDescriptorFactory.get(arch)


def test_wrong_layer_count_names_the_file(ckpts, tmp_path):
    path = tmp_path / "three.json"
    path.write_text(json.dumps(block_configs_of(ckpts["llama"]["student"])[:3]))
    with pytest.raises(AnyModelError, match=r"three.json: 3 block configs .* num_hidden_layers=4"):
        load(ckpts["llama"]["student"], anymodel_descriptor="llama", block_configs_path=str(path))


def test_invalid_json_names_the_file(ckpts, tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"attention": ')
    with pytest.raises(AnyModelError, match=r"broken.json is not valid JSON"):
        load(ckpts["llama"]["student"], anymodel_descriptor="llama", block_configs_path=str(path))


def test_unknown_block_config_field_is_an_error(ckpts, tmp_path):
    path = tmp_path / "typo.json"
    path.write_text(json.dumps([{"attention": {"num_kv_heads": 2}, "ffn": {}}] * 4))
    with pytest.raises(AnyModelError, match=r"typo.json: invalid block config.*num_kv_heads"):
        descriptors.load_block_configs(None, path, 4)


def test_patched_target_still_counts_as_a_nemo_auto_model():
    # train_ft.build_model hands distributed_setup only to targets found in this tuple.
    target = NeMoAutoModelForCausalLM.from_pretrained
    assert target in (NeMoAutoModelForCausalLM.from_config, NeMoAutoModelForCausalLM.from_pretrained)
    assert NeMoAutoModelForCausalLM.from_config in (NeMoAutoModelForCausalLM.from_config,)


def test_apply_and_remove_are_idempotent_and_restore_exactly():
    patch_automodel.remove_patch()
    before = (dict(vars(NeMoAutoModelForCausalLM)), Checkpointer.load_base_model,
              NeMoAutoModelForCausalLM.from_pretrained.__func__)
    patch_automodel.apply_patch()
    patched = NeMoAutoModelForCausalLM.from_pretrained.__func__
    patch_automodel.apply_patch()
    assert NeMoAutoModelForCausalLM.from_pretrained.__func__ is patched is not before[2]
    patch_automodel.remove_patch()
    patch_automodel.remove_patch()
    after = (dict(vars(NeMoAutoModelForCausalLM)), Checkpointer.load_base_model,
             NeMoAutoModelForCausalLM.from_pretrained.__func__)
    assert after == before
    patch_automodel.apply_patch()
