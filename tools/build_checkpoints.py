"""Build tiny, random-weight checkpoints for the tests: a teacher and a heterogeneous student.

The student is a Puzzletron-style AnyModel checkpoint: its per-layer block configs drop attention
in one layer, keep fewer KV heads in others and vary the FFN width. It is written with ModelOpt's
own saver (``config.json["block_configs"]`` + ``subblocks_safetensors/`` + index), so it is exactly
what a Puzzletron pipeline hands to distillation. The teacher is a plain Hugging Face checkpoint.
Both carry a byte-level BPE tokenizer trained on English text that ships with every CPython
(``pydoc_data``), so nothing is downloaded.

    python -m tools.build_checkpoints --out /tmp/tiny --arch llama

(``make demo`` trains its own teacher and prunes its student from it: see ``tools/demo.py``.)
"""

import argparse
import copy
import json
import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from modelopt.torch.puzzletron.anymodel import ModelDescriptorFactory, deci_x_patcher
from modelopt.torch.puzzletron.block_config import maybe_cast_block_configs
from modelopt.torch.puzzletron.tools.checkpoint_utils_hf import save_checkpoint

from architectures.descriptors import build_descriptor

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]

# Small enough to train in seconds on 2 CPU cores; head_dim 16 keeps RoPE and SDPA realistic.
TINY = dict(
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)

MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gpt_oss": "gpt_oss"}
# Config fields of an architecture that differ from TINY. GPT-OSS: 4 experts of 64 channels, top-2
# routing, and sliding-window layers (every other one) whose window is shorter than the test rows.
ARCH_CONFIG = {
    "qwen3": dict(head_dim=16),
    "gpt_oss": dict(head_dim=16, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, sliding_window=16),
}


def english_corpus() -> list[str]:
    """Paragraphs of the Python reference manual: real English text on every machine with Python."""
    from pydoc_data.topics import topics

    return [p.strip() for text in topics.values() for p in text.split("\n\n") if len(p.strip()) > 40]


def build_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on :func:`english_corpus`."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(english_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def student_block_configs(num_layers: int, num_kv_heads: int, intermediate_size: int) -> list[dict]:
    """Per-layer configs a Puzzletron search could return: every layer differs from the teacher."""
    assert num_layers == 4, "the hand-picked pattern below is for 4 layers"
    return [
        {"attention": {"no_op": False, "num_key_value_heads": num_kv_heads}, "ffn": {"no_op": False, "intermediate_size": intermediate_size}},
        {"attention": {"no_op": False, "num_key_value_heads": 2}, "ffn": {"no_op": False, "intermediate_size": intermediate_size // 2}},
        {"attention": {"no_op": True}, "ffn": {"no_op": False, "intermediate_size": intermediate_size}},
        {"attention": {"no_op": False, "num_key_value_heads": 1}, "ffn": {"no_op": False, "intermediate_size": intermediate_size // 3}},
    ]


def gpt_oss_block_configs() -> list[dict]:
    """A GPT-OSS student that differs from its teacher in every way the block configs allow: KV heads,
    no attention, and per layer the number of experts, the top-k and the expert width (33 channels do
    not split over 2 TP ranks, so that layer's experts are replicated under TP=2)."""
    def moe(experts, top_k, width):
        return {"no_op": False, "moe": {"num_local_experts": experts, "num_experts_per_tok": top_k,
                                        "expert_intermediate_dim": width}}
    return [
        {"attention": {"no_op": False, "num_key_value_heads": 2}, "ffn": moe(4, 2, 32)},
        {"attention": {"no_op": True}, "ffn": moe(3, 1, 64)},
        {"attention": {"no_op": False, "num_key_value_heads": 1}, "ffn": moe(2, 2, 48)},
        {"attention": {"no_op": False, "num_key_value_heads": 4}, "ffn": moe(4, 1, 33)},
    ]


def make_config(arch: str, vocab_size: int, tokenizer: PreTrainedTokenizerFast, **overrides):
    return AutoConfig.for_model(
        MODEL_TYPES[arch],
        vocab_size=vocab_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
        **{**TINY, **ARCH_CONFIG.get(arch, {}), **overrides},
    )


def build_student_model(config, descriptor_name: str, block_configs: list[dict], seed: int):
    torch.manual_seed(seed)
    descriptor = build_descriptor(ModelDescriptorFactory.get(descriptor_name))
    with deci_x_patcher(descriptor, block_configs):
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model.config.block_configs = block_configs
    return model


def build(out: str | os.PathLike, arch: str = "llama", seed: int = 0) -> dict[str, Path]:
    """Write ``<out>/teacher`` (HF layout) and ``<out>/student`` (ModelOpt AnyModel layout).

    Returns the two paths. Deterministic for a given ``seed``.
    """
    if arch in NEMOTRON_H_ARCHS:
        return build_nemotron_h(out, arch, seed)
    if arch == "qwen3_vl":
        return build_qwen3_vl(out, seed)
    if arch == "mistral_small":
        return build_mistral_small(out, seed)
    out = Path(out)
    tokenizer = build_tokenizer()
    vocab_size = len(tokenizer)

    teacher_dir, student_dir = out / "teacher", out / "student"
    torch.manual_seed(seed)
    teacher = AutoModelForCausalLM.from_config(make_config(arch, vocab_size, tokenizer), torch_dtype=torch.float32)
    teacher.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)

    if arch == "gpt_oss":
        blocks = gpt_oss_block_configs()
    else:
        blocks = student_block_configs(TINY["num_hidden_layers"], TINY["num_key_value_heads"], TINY["intermediate_size"])
    student = build_student_model(make_config(arch, vocab_size, tokenizer), arch, blocks, seed + 1)
    save_checkpoint(student, student_dir, build_descriptor(ModelDescriptorFactory.get(arch)))
    tokenizer.save_pretrained(student_dir)
    return {"teacher": teacher_dir, "student": student_dir}


# Nemotron-H: a hybrid of Mamba-2 (M), attention (*), MLP (-) and MoE (E) layers, one mixer per layer.
# ``nemotron_h`` is the MoE generation (Nemotron-3 Nano: M, * and E layers; ModelOpt's descriptor saves no
# plain MLP layers), ``nemotron_h_v2`` the dense one (Nemotron Nano v2: M, * and - layers). Both checkpoints
# carry the remote-code modeling file that ModelOpt's descriptors look for (``tools/nemotron_h_remote/``).
NEMOTRON_H_ARCHS = {"nemotron_h": "M*EM*E", "nemotron_h_v2": "M*-M*-"}
NEMOTRON_H_REMOTE_CODE = Path(__file__).resolve().parent / "nemotron_h_remote"
NEMOTRON_H_AUTO_MAP = {
    "AutoConfig": "configuration_nemotron_h.NemotronHConfig",
    "AutoModel": "modeling_nemotron_h.NemotronHModel",
    "AutoModelForCausalLM": "modeling_nemotron_h.NemotronHForCausalLM",
}
NEMOTRON_H_TINY = dict(
    hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=192,
    mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16, n_groups=2, conv_kernel=4, chunk_size=16,
    n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, moe_shared_expert_intermediate_size=64,
    n_group=1, topk_group=1, max_position_embeddings=512, layer_norm_epsilon=1e-5, tie_word_embeddings=False,
    use_cache=False,
)


def nemotron_h_block_configs(arch: str) -> list[dict]:
    """A student that differs from its teacher wherever ModelOpt's Nemotron-H descriptors apply a block config:
    KV heads (layer 1 keeps 2 of 2, layer 4 keeps 1), FFN width (``nemotron_h_v2``: 96 and 33 of 192) or
    expert count and width (``nemotron_h``: 3 of 4 experts 32 wide, 4 experts 48 wide), and a removed
    Mamba layer (layer 3: attention and FFN both no-op). Mamba, attention and MoE layers keep the
    fields ModelOpt's converter writes for them."""
    mamba = {"no_op": False, "mamba": {"state_dim": 16, "num_heads": 4, "head_dim": 16, "num_groups": 2}}
    no_attention, no_ffn = {"no_op": True}, {"no_op": True}

    def attention(kv_heads):
        return {"attention": {"no_op": False, "num_key_value_heads": kv_heads}, "ffn": no_ffn}

    def ffn(width):
        return {"attention": no_attention, "ffn": {"no_op": False, "intermediate_size": width}}

    def moe(experts, width):
        return {"attention": no_attention, "ffn": {"no_op": False, "moe": {
            "num_local_experts": experts, "num_experts_per_tok": 2, "expert_intermediate_dim": width,
            "shared_expert_intermediate_dim": 64}}}

    first, second = (moe(3, 32), moe(4, 48)) if arch == "nemotron_h" else (ffn(96), ffn(33))
    return [{"attention": mamba, "ffn": no_ffn}, attention(2), first,
            {"attention": no_attention, "ffn": no_ffn}, attention(1), second]


def build_nemotron_h(out: str | os.PathLike, arch: str, seed: int = 0) -> dict[str, Path]:
    """``build`` for Nemotron-H: a 6-layer teacher (pattern ``NEMOTRON_H_ARCHS[arch]``) and a student with
    :func:`nemotron_h_block_configs`, both in the remote-code layout (``backbone.*``, ``auto_map``) with the
    modeling file beside the weights; the student in ModelOpt's AnyModel layout (``save_checkpoint``)."""
    import shutil

    from modelopt.torch.puzzletron.tools.checkpoint_utils_hf import force_cache_dynamic_modules

    out = Path(out)
    tokenizer = build_tokenizer()
    teacher_dir, student_dir = out / "teacher", out / "student"
    teacher_dir.mkdir(parents=True, exist_ok=True)
    for source in NEMOTRON_H_REMOTE_CODE.glob("*.py"):
        shutil.copy(source, teacher_dir / source.name)
    fields = dict(NEMOTRON_H_TINY, vocab_size=len(tokenizer), hybrid_override_pattern=NEMOTRON_H_ARCHS[arch],
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, torch_dtype="float32", model_type="nemotron_h",
                  architectures=["NemotronHForCausalLM"], auto_map=NEMOTRON_H_AUTO_MAP)
    (teacher_dir / "config.json").write_text(json.dumps(fields, indent=2))
    config = AutoConfig.from_pretrained(teacher_dir, trust_remote_code=True)
    force_cache_dynamic_modules(config, teacher_dir, trust_remote_code=True)

    torch.manual_seed(seed)
    teacher = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32, trust_remote_code=True)
    teacher.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)

    blocks = nemotron_h_block_configs(arch)
    descriptor = build_descriptor(ModelDescriptorFactory.get(arch))
    student_config = copy.deepcopy(config)
    student_config.block_configs = maybe_cast_block_configs(blocks)
    torch.manual_seed(seed + 1)
    with deci_x_patcher(descriptor, blocks):
        student = AutoModelForCausalLM.from_config(student_config, torch_dtype=torch.float32, trust_remote_code=True)
    student.config.block_configs = blocks
    save_checkpoint(student, student_dir, descriptor)
    for source in NEMOTRON_H_REMOTE_CODE.glob("*.py"):  # ModelOpt's saver copies the config's module only
        shutil.copy(source, student_dir / source.name)
    tokenizer.save_pretrained(student_dir)
    return {"teacher": teacher_dir, "student": student_dir}


# Qwen3-VL-MoE (ModelOpt's ``qwen3_vl`` descriptor): a 4-layer MoE language model (4 experts of 32 channels,
# top-2) behind a 1-block vision tower, which the text-only recipes leave frozen.
QWEN3_VL_TEXT = dict(
    hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
    intermediate_size=128, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
    max_position_embeddings=512, rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
)
QWEN3_VL_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
                       spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                       deepstack_visual_indexes=[0])


def qwen3_vl_block_configs() -> list[dict]:
    """A Qwen3-VL-MoE student that differs from its teacher wherever ModelOpt's ``qwen3_vl`` descriptor applies a
    block config: KV heads (2, 1 and 4 of 4), no attention (layer 1), expert count (4, 3, 2, 4) and expert
    width (32, 16, 32 and 24 channels). The top-k stays the teacher's 2 (the descriptor does not apply it)."""
    def moe(experts, width):
        return {"no_op": False, "moe": {"num_local_experts": experts, "num_experts_per_tok": 2,
                                        "expert_intermediate_dim": width}}
    return [
        {"attention": {"no_op": False, "num_key_value_heads": 2}, "ffn": moe(4, 32)},
        {"attention": {"no_op": True}, "ffn": moe(3, 16)},
        {"attention": {"no_op": False, "num_key_value_heads": 1}, "ffn": moe(2, 32)},
        {"attention": {"no_op": False, "num_key_value_heads": 4}, "ffn": moe(4, 24)},
    ]


def build_qwen3_vl(out: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    """``build`` for Qwen3-VL-MoE: a homogeneous teacher (HF layout) and a student with :func:`qwen3_vl_block_configs`
    (ModelOpt's AnyModel layout), both image-text models (``model_type: qwen3_vl_moe``) with the same vision tower."""
    from transformers import AutoModelForImageTextToText

    out = Path(out)
    tokenizer = build_tokenizer()
    text = dict(QWEN3_VL_TEXT, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = AutoConfig.for_model("qwen3_vl_moe", text_config=text, vision_config=QWEN3_VL_VISION,
                                  tie_word_embeddings=False, torch_dtype="float32")
    teacher_dir, student_dir = out / "teacher", out / "student"
    torch.manual_seed(seed)
    AutoModelForImageTextToText.from_config(config, dtype=torch.float32).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)

    blocks = qwen3_vl_block_configs()
    descriptor = build_descriptor(ModelDescriptorFactory.get("qwen3_vl"))
    torch.manual_seed(seed + 1)
    with deci_x_patcher(descriptor, blocks):
        student = AutoModelForImageTextToText.from_config(copy.deepcopy(config), dtype=torch.float32)
    student.config.block_configs = blocks
    save_checkpoint(student, student_dir, descriptor)
    tokenizer.save_pretrained(student_dir)
    return {"teacher": teacher_dir, "student": student_dir}


def build_mistral_small(out: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    """``build`` for Mistral-Small (``model_type: mistral``): AutoModel reads such tokenizers with mistral-common,
    which needs ``tekken.json``, so both checkpoints carry the one mistral-common ships (131,072 tokens) and no
    Hugging Face tokenizer files, as ModelOpt's ``copy_tokenizer`` leaves a pruned Mistral."""
    import shutil

    import mistral_common

    out = Path(out)
    tekken = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
    config = AutoConfig.for_model("mistral", vocab_size=131072, bos_token_id=1, eos_token_id=2, pad_token_id=11,
                                  torch_dtype="float32", **TINY)
    teacher_dir, student_dir = out / "teacher", out / "student"
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).save_pretrained(teacher_dir)
    blocks = student_block_configs(TINY["num_hidden_layers"], TINY["num_key_value_heads"], TINY["intermediate_size"])
    student = build_student_model(copy.deepcopy(config), "mistral_small", blocks, seed + 1)
    save_checkpoint(student, student_dir, build_descriptor(ModelDescriptorFactory.get("mistral_small")))
    for directory in (teacher_dir, student_dir):
        shutil.copy(tekken, directory / "tekken.json")
    return {"teacher": teacher_dir, "student": student_dir}


def write_squad_like_data(out: str | os.PathLike, n_train: int = 256, n_val: int = 32, seed: int = 0) -> Path:
    """SQuAD-format JSON lines (``train.jsonl``, ``validation.jsonl``) built from :func:`english_corpus`.

    ``load_dataset(<dir>)`` reads this directory, so ``dataset.dataset_name=<dir>`` switches
    AutoModel's ``make_squad_dataset`` to local data. Answers are spans of the context, as in SQuAD.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    paragraphs = [p for p in english_corpus() if 200 < len(p) < 600]
    order = torch.randperm(len(paragraphs), generator=g).tolist()
    rows = []
    for i in order[: n_train + n_val]:
        context = paragraphs[i]
        words = context.split()
        start = int(torch.randint(0, max(1, len(words) - 4), (1,), generator=g))
        answer = " ".join(words[start : start + 3])
        question = "Which words follow: " + " ".join(words[max(0, start - 3) : start]) + "?"
        rows.append({"id": str(i), "title": "python", "context": context, "question": question,
                     "answers": {"text": [answer], "answer_start": [context.find(answer)]}})
    for name, part in (("train", rows[:n_train]), ("validation", rows[n_train:])):
        with open(out / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory to write teacher/, student/ and data/ into")
    parser.add_argument("--arch", default="llama", choices=sorted([*MODEL_TYPES, *NEMOTRON_H_ARCHS, "qwen3_vl", "mistral_small"]))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    paths = build(args.out, args.arch, args.seed)
    data = write_squad_like_data(Path(args.out) / "data", seed=args.seed)
    for name, path in {**paths, "data": data}.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
