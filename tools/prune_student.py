"""Carve a heterogeneous student out of a teacher checkpoint: a quick pruned student, not a search.

    python -m tools.prune_student --teacher DIR --block-configs FILE --out DIR [--descriptor llama]

``FILE`` is a JSON list with one entry per teacher layer, e.g.
``{"attention": {"num_key_value_heads": 2}, "ffn": {"intermediate_size": 256}}`` or
``{"attention": {"no_op": true}, "ffn": {"intermediate_size": 384}}``. The student keeps the
teacher's hidden size, embeddings, norms and LM head; per layer it keeps

- attention as is, averaged into fewer KV heads (ModelOpt's ``GQAInitMode.AverageKV``), or none;
- the FFN channels with the largest importance, here the L2 norm of each channel's column in
  ``down_proj`` (``[hidden, intermediate]``): a data-free score, where Puzzletron scores channels
  by their activations on calibration data.

Everything is ModelOpt 0.47's own machinery: ``Converter.convert`` gives a plain Hugging Face
teacher its uniform block configs, ``init_child_from_parent`` (``MlpInitMode.PruneByActivationsLog``,
fed the weight-norm scores in the activation-log format it reads) builds the child weights, and
its saver writes ``config.json["block_configs"]`` + ``subblocks_safetensors/`` + the tokenizer.
Puzzletron itself searches the block configs per layer under a budget (``modelopt.torch.puzzletron``);
this tool takes them from you.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from modelopt.torch.puzzletron.anymodel import ModelDescriptorFactory
from modelopt.torch.puzzletron.anymodel.converter.converter_factory import ConverterFactory
from modelopt.torch.puzzletron.pruning import pruning_utils
from modelopt.torch.puzzletron.pruning.pruning_utils import GQAInitMode, LinearInitMode, MlpInitMode
from modelopt.torch.puzzletron.tools.bypassed_training.init_child_from_parent import init_child_from_parent
from modelopt.torch.puzzletron.tools.checkpoint_utils import load_state_dict

SUBBLOCKS = ("attention", "ffn")


class PruneError(ValueError):
    """Bad teacher or block configs; the message says what to fix."""


def read_block_configs(path: str | Path, num_layers: int) -> list[dict]:
    """The per-layer JSON list in ``path``, checked against the teacher's layer count."""
    path = Path(path)
    if not path.is_file():
        raise PruneError(f"block configs file {path} does not exist; pass a JSON list with one entry per layer")
    try:
        blocks = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PruneError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(blocks, list) or len(blocks) != num_layers:
        got = f"{len(blocks)} entries" if isinstance(blocks, list) else type(blocks).__name__
        raise PruneError(f"{path}: expected a JSON list with one entry per teacher layer ({num_layers}), got {got}")
    for i, block in enumerate(blocks):
        unknown = set(block) - set(SUBBLOCKS) if isinstance(block, dict) else {"<not an object>"}
        if unknown:
            raise PruneError(f"{path}: layer {i} has {sorted(unknown)}; each entry holds only 'attention' and 'ffn'")
    return blocks


def check_fits_teacher(blocks: list[dict], config: dict) -> None:
    """Each layer may only shrink: KV heads dividing the teacher's, FFN no wider than the teacher's."""
    kv, ffn = config.get("num_key_value_heads", config["num_attention_heads"]), config["intermediate_size"]
    for i, block in enumerate(blocks):
        heads = block.get("attention", {}).get("num_key_value_heads")
        if heads is not None and (heads < 1 or kv % heads):
            raise PruneError(f"layer {i}: num_key_value_heads={heads} must divide the teacher's {kv}")
        width = block.get("ffn", {}).get("intermediate_size")
        if width is not None and not 1 <= width <= ffn:
            raise PruneError(f"layer {i}: intermediate_size={width} must be between 1 and the teacher's {ffn}")


def ffn_channel_importance(state_dict: dict[str, torch.Tensor], num_layers: int) -> dict[str, dict]:
    """``{"model.layers.{i}.mlp.down_proj": {"score": [intermediate]}}``: L2 norm of each channel's
    ``down_proj`` column (how much that channel can write into the residual stream)."""
    return {
        f"model.layers.{i}.mlp.down_proj": {"score": state_dict[f"model.layers.{i}.mlp.down_proj.weight"].float().norm(dim=0)}
        for i in range(num_layers)
    }


def prune(teacher: str | Path, block_configs: list[dict], out: str | Path, descriptor: str = "llama") -> Path:
    """Write the student for ``block_configs`` (one dict per teacher layer) to ``out``; returns ``out``.

    ``teacher`` is a Hugging Face checkpoint (any layout ``from_pretrained`` reads) or an AnyModel
    checkpoint with ``config.json["block_configs"]``; its tokenizer is copied to ``out``.
    """
    teacher, out = Path(teacher), Path(out)
    config = json.loads((teacher / "config.json").read_text())
    desc = ModelDescriptorFactory.get(descriptor)
    overrides = {sub: [block.get(sub, {}) for block in block_configs] for sub in SUBBLOCKS}
    with tempfile.TemporaryDirectory() as tmp:
        parent = teacher
        if "block_configs" not in config:
            parent = Path(tmp) / "teacher_anymodel"
            ConverterFactory.get(descriptor).convert(desc, teacher, parent)
        scores_dir = Path(tmp) / "ffn_importance"
        scores_dir.mkdir()
        torch.save(ffn_channel_importance(load_state_dict(parent), config["num_hidden_layers"]), scores_dir / "rank_0.pth")
        # ModelOpt caches the score file per process; a second call must read its own.
        pruning_utils.ACTIVATIONS_LOG.clear()
        init_child_from_parent(
            descriptor=desc,
            pruning_mixin=None,  # ModelOpt's built-in per-layer init, driven by the three modes below
            parent_checkpoint_dir=str(parent),
            model_config_overrides_dict=overrides,
            output_checkpoint_dir=str(out),
            gqa_init_mode=GQAInitMode.AverageKV,
            mlp_init_mode=MlpInitMode.PruneByActivationsLog,
            mlp_init_config_yaml={"activations_log_dir": str(scores_dir)},
            linear_init_mode=LinearInitMode.FromTeacher,
            max_workers=1,
            max_layer_workers=1,
        )
        pruning_utils.ACTIVATIONS_LOG.clear()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="teacher checkpoint directory (HF or AnyModel layout)")
    parser.add_argument("--block-configs", required=True, help="JSON list, one {attention, ffn} entry per layer")
    parser.add_argument("--out", required=True, help="directory for the student (ModelOpt AnyModel layout)")
    parser.add_argument("--descriptor", default="llama", help="ModelOpt descriptor name (default: llama)")
    args = parser.parse_args(argv)
    try:
        config_path = Path(args.teacher) / "config.json"
        if not config_path.is_file():
            raise PruneError(f"{config_path} does not exist; --teacher must be a checkpoint directory")
        if args.descriptor not in ModelDescriptorFactory.CLASS_MAPPING:
            raise PruneError(f"unknown --descriptor {args.descriptor!r}; one of {sorted(ModelDescriptorFactory.CLASS_MAPPING)}")
        config = json.loads(config_path.read_text())
        blocks = read_block_configs(args.block_configs, config["num_hidden_layers"])
        check_fits_teacher(blocks, config)
        out = prune(args.teacher, blocks, args.out, args.descriptor)
    except PruneError as e:
        print(f"prune_student: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"student: {out}")


if __name__ == "__main__":
    main()
