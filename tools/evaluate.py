"""Validation cross-entropy and perplexity of a teacher and its students on your data.

    python -m tools.evaluate --teacher PATH --student PATH [--student PATH ...] --data FILE.jsonl \\
        [--baseline PATH] [--prompt-field title --answer-field text] [--json]
    torchrun --nproc_per_node=N -m tools.evaluate ...      (the rows are split over the N processes)

``PATH`` is any checkpoint this example handles: a Hugging Face directory, ModelOpt's AnyModel layout (built
with ``--anymodel-descriptor``, ``auto`` by default, wherever the checkpoint has block configs), a recipe
checkpoint ``epoch_E_step_S`` or a run's ``checkpoint_dir`` (its newest complete checkpoint): both mean the
consolidated export in ``model/consolidated`` (``checkpoint.save_consolidated``). Every model is loaded as
``run.py`` loads it, through the patched ``NeMoAutoModelForCausalLM.from_pretrained`` (a plain Hugging Face
checkpoint without a descriptor, so with AutoModel's own implementation where it has one), in fp32 unless
``--dtype`` says otherwise, whole on each process's device: the GPU where there is one, else the CPU.

The tokens scored are those a training run's validation scores: with ``--text-field`` (``text`` by default)
every token of the row after the first, predicted from the ones before; with ``--prompt-field`` and
``--answer-field`` only the answer's tokens, as AutoModel's ``ColumnMappedTextInstructionDataset``
(``column_mapping: {context: PROMPT, answer: ANSWER}``) masks them. Both go through AutoModel's own
``format_prompt_completion``. The result is the mean cross-entropy per scored token (nats) and its
exponential, the perplexity; with ``--baseline`` (the student before KD) each model's share of the
teacher-student gap recovered, ``(baseline_ce - ce) / (baseline_ce - teacher_ce)``.

Bad paths and bad data stop before any weights load, with one line ``evaluate: error: ...``, exit code 2.
"""

import argparse
import contextlib
import json
import math
import os
import sys
from pathlib import Path

from common.errors import PreflightError
from safety import paths

DTYPES = ("float32", "bfloat16", "float16")
USAGE = ("python -m tools.evaluate --teacher PATH --student PATH [--student PATH ...] --data FILE [--baseline PATH] "
         "[options]")
CHECKPOINT_FORMS = ("pass a checkpoint directory (with config.json), a recipe checkpoint (epoch_E_step_S) or a "
                    "run's checkpoint_dir")


class EvaluateError(ValueError):
    """A bad path, option or data file; the message says what is wrong and how to fix it."""


def evaluate(models: dict[str, str | os.PathLike], data: str | os.PathLike, *, text_field: str = "text",
             prompt_field: str | None = None, answer_field: str | None = None,
             anymodel_descriptor: str = "auto", tokenizer: str | os.PathLike | None = None,
             seq_length: int | None = None, batch_size: int = 8, dtype: str = "float32") -> dict[str, dict]:
    """Cross-entropy of each model on ``data``: ``{name: {"path", "ce", "perplexity", "tokens", "parameters"}}``.

    ``models`` maps a name to any checkpoint form of the module docstring; a checkpoint named twice is
    evaluated once. ``data`` is a JSON-lines file: ``text_field`` is scored, or, with ``prompt_field`` and
    ``answer_field`` (both or neither), the answer after the prompt. ``tokenizer`` defaults to the first
    model's directory. ``seq_length`` truncates rows (None: rows are kept whole, and one longer than a
    model's ``max_position_embeddings`` is an error). ``ce`` is the mean over scored tokens, in nats.
    Every check runs before any weights load and raises :class:`EvaluateError`.

    Under an initialised ``torch.distributed`` process group every rank calls this with the same arguments:
    rank ``r`` of ``n`` scores rows ``r, r + n, ...`` with whole models on its device (the current CUDA
    device, else the CPU), the token-sum CE and token counts are all-reduced, and every rank returns the
    same result.
    """
    import torch

    import run

    run.setup_runtime()  # AnyModel builds, CPU stand-ins: what run.py loads models with
    if (prompt_field is None) != (answer_field is None):
        raise EvaluateError("--prompt-field and --answer-field go together: pass both (e.g. --prompt-field title "
                            "--answer-field text) or neither (score --text-field)")
    if dtype not in DTYPES:
        raise EvaluateError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}")
    if batch_size < 1 or (seq_length is not None and seq_length < 2):
        raise EvaluateError("--batch-size must be >= 1 and --seq-length >= 2")
    checkpoints = {name: resolve_checkpoint(path, name) for name, path in models.items()}
    configs = {name: read_config(path, name) for name, path in checkpoints.items()}
    descriptors = {name: descriptor_for(path, name, configs[name], anymodel_descriptor)
                   for name, path in checkpoints.items()}
    fields = (prompt_field, answer_field) if prompt_field is not None else (text_field,)
    rows = read_rows(data, fields)
    tok = load_tokenizer(tokenizer if tokenizer is not None else next(iter(checkpoints.values())),
                         "--tokenizer" if tokenizer is not None else next(iter(checkpoints)))
    check_vocabulary(tok, configs, checkpoints)
    examples = tokenize(rows, tok, fields, seq_length)
    check_lengths(examples, configs, checkpoints)

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    rank, world = _rank_and_world()
    mine = [example for _, example in examples[rank::world]]
    results, done = {}, {}
    for name, path in checkpoints.items():
        key = (str(path.resolve()), descriptors[name])
        if key not in done:
            model = load_model(path, descriptors[name], getattr(torch, dtype)).to(device)
            ce_sum, tokens = _ce_sum(model, mine, batch_size, device)
            ce_sum, tokens = _all_reduce(ce_sum, tokens, device)
            done[key] = {"path": str(path), "ce": ce_sum / tokens, "perplexity": math.exp(ce_sum / tokens),
                         "tokens": tokens, "parameters": sum(p.numel() for p in model.parameters())}
            del model  # freed before the next model loads
        results[name] = dict(done[key])
    return results


def gap_recovered(ce: float, baseline_ce: float, teacher_ce: float) -> float | None:
    """Share of the baseline-to-teacher gap a model closed: 0 at the baseline, 1 at the teacher (None: no gap)."""
    gap = baseline_ce - teacher_ce
    return (baseline_ce - ce) / gap if gap != 0 else None


# ---------------------------------------------------------------- checks (nothing here loads weights)


def resolve_checkpoint(path: str | os.PathLike, name: str) -> Path:
    """The directory holding ``config.json``: ``path`` itself, or a recipe checkpoint's consolidated export."""
    from nemo_automodel.components.checkpoint.utils import find_latest_checkpoint

    root = Path(path)
    if not root.exists():
        raise EvaluateError(f"{name} {path} does not exist; {CHECKPOINT_FORMS}")
    if not root.is_dir():
        raise EvaluateError(f"{name} {path} is a file, not a directory; {CHECKPOINT_FORMS}")
    paths.readable_dir(name, path)
    if (root / "config.json").is_file():
        return root
    step_dir = root if (root / "model").is_dir() else find_latest_checkpoint(root)
    if step_dir is None:
        raise EvaluateError(f"{name} {path} has no config.json and no complete recipe checkpoint; {CHECKPOINT_FORMS}")
    export = Path(step_dir) / "model" / "consolidated"
    if not (export / "config.json").is_file():
        raise EvaluateError(f"{name} {path}: {Path(step_dir).name} holds only the recipe's sharded weights, no "
                            "consolidated export; train with checkpoint.save_consolidated=final (or true), or run "
                            f"{Path(step_dir) / 'model' / 'consolidate.sh'}")
    return export


def read_config(path: Path, name: str) -> dict:
    """The checkpoint's ``config.json``."""
    try:
        return json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise EvaluateError(f"{name} {path}: config.json is not valid JSON ({e}); re-save the checkpoint") from None


def descriptor_for(path: Path, name: str, config: dict, anymodel_descriptor: str) -> str | None:
    """``anymodel_descriptor`` for a checkpoint with block configs (checked against them), None for a plain one."""
    from architectures import descriptors
    from common.errors import AnyModelError

    try:
        if descriptors.load_block_configs(path, None, None) is None:
            return None
        with contextlib.redirect_stdout(sys.stderr):  # ModelOpt prints what `auto` detects
            descriptors.resolve_descriptor(anymodel_descriptor, path)
        text_config = _text_config(config)
        descriptors.load_block_configs(
            path, None, text_config.get("num_hidden_layers"),
            descriptor=None if anymodel_descriptor == "auto" else anymodel_descriptor,
            num_attention_heads=text_config.get("num_attention_heads"), model_config=text_config)
    except AnyModelError as e:
        raise EvaluateError(f"{name} {path}: {e}") from None
    return anymodel_descriptor


def read_rows(path: str | os.PathLike, fields: tuple[str, ...]) -> list[tuple[int, dict]]:
    """``[(line number, row)]`` of a JSON-lines file whose every row has the string ``fields``."""
    data = Path(path)
    hint = ("map other fields with --text-field, or with --prompt-field and --answer-field" if len(fields) == 1
            else "pass the fields the rows have to --prompt-field and --answer-field")
    if not data.is_file():
        raise EvaluateError(f"--data {path} {'is a directory' if data.is_dir() else 'does not exist'}; pass a "
                            f"JSON-lines file, one object per line with a {fields[-1]!r} field")
    paths.readable_file("--data", path)
    rows = []
    try:
        with open(data, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise EvaluateError(f"--data {path}: line {number} is not JSON ({e.msg}, column {e.colno}); "
                                        "each line must be one JSON object") from None
                if not isinstance(row, dict):
                    raise EvaluateError(f"--data {path}: line {number} is a JSON {type(row).__name__}, not an "
                                        "object; each line must be one JSON object")
                for field in fields:
                    if not isinstance(row.get(field), str):
                        raise EvaluateError(f"--data {path}: line {number} has no string field {field!r} (its "
                                            f"fields: {', '.join(row) or 'none'}); {hint}")
                rows.append((number, row))
    except UnicodeDecodeError as e:
        raise EvaluateError(f"--data {path} is not UTF-8 text ({e.reason} at byte {e.start}); pass a JSON-lines "
                            "file") from None
    if not rows:
        raise EvaluateError(f"--data {path} has no rows; pass a JSON-lines file with at least one object")
    return rows


def load_tokenizer(path: str | os.PathLike, name: str):
    """The tokenizer saved in ``path`` (``name`` says whose it is in the error)."""
    from transformers import AutoTokenizer

    from safety.preflight import TOKENIZER_FILES

    if not any((Path(path) / file).is_file() for file in TOKENIZER_FILES):
        raise EvaluateError(f"{name} {path} has no tokenizer ({', '.join(TOKENIZER_FILES)}); pass --tokenizer DIR "
                            "with the tokenizer the models were trained with")
    return AutoTokenizer.from_pretrained(str(path))


def check_vocabulary(tokenizer, configs: dict[str, dict], checkpoints: dict[str, Path]) -> None:
    """Every token id the tokenizer can give has a row in each model's embedding."""
    for name, config in configs.items():
        vocab = _text_config(config).get("vocab_size")
        if vocab is not None and len(tokenizer) > vocab:
            raise EvaluateError(f"the tokenizer ({len(tokenizer)} tokens, {tokenizer.name_or_path}) does not fit "
                                f"{name} {checkpoints[name]} (vocab_size={vocab}); pass --tokenizer with that "
                                "model's tokenizer")


def tokenize(rows: list[tuple[int, dict]], tokenizer, fields: tuple[str, ...],
             seq_length: int | None) -> list[tuple[int, dict]]:
    """``[(line number, {"input_ids", "labels", "attention_mask"})]``: AutoModel's next-token format, ``labels``
    shifted and -100 where nothing is scored. Rows with no token to score (one token; an answer cut off by
    ``seq_length``) are left out, where AutoModel's dataset would score the next row in their place.
    Raises :class:`EvaluateError` when no row is left."""
    from nemo_automodel.components.datasets.llm.formatting_utils import _add_pad_token, format_prompt_completion

    eos = getattr(tokenizer, "eos_token_id", None)
    # The pad id ColumnMappedTextInstructionDataset uses (it decides where the attention mask ends).
    pad = _add_pad_token(tokenizer) or eos
    examples = []
    for number, row in rows:
        if len(fields) == 2:
            # ColumnMappedTextInstructionDataset's prompt for {context, answer}: the context, then a space.
            prompt, answer, answer_only = row[fields[0]] + " ", row[fields[1]], True
        else:
            prompt, answer, answer_only = "", row[fields[0]], False
        example = format_prompt_completion(tokenizer, prompt, answer, eos, pad, seq_length=seq_length,
                                           truncation=seq_length is not None, answer_only_loss_mask=answer_only)
        example.pop("___PAD_TOKEN_IDS___")
        if any(label != -100 for label in example["labels"]):
            examples.append((number, example))
    if not examples:
        raise EvaluateError(f"no row has a token to score ({len(rows)} rows; a row needs 2 tokens, or an answer "
                            "that survives --seq-length); check the fields and --seq-length")
    return examples


def check_lengths(examples: list[tuple[int, dict]], configs: dict[str, dict], checkpoints: dict[str, Path]) -> None:
    """No row longer than a model's ``max_position_embeddings``."""
    number, longest = max(((n, len(e["input_ids"])) for n, e in examples), key=lambda item: item[1])
    for name, config in configs.items():
        limit = _text_config(config).get("max_position_embeddings")
        if limit is not None and longest > limit:
            raise EvaluateError(f"--data line {number} has {longest + 1} tokens, more than {name} {checkpoints[name]} "
                                f"takes (max_position_embeddings={limit}); pass --seq-length {limit}")


def _text_config(config: dict) -> dict:
    return config.get("text_config", config)


# ---------------------------------------------------------------- scoring


def load_model(path: Path, anymodel_descriptor: str | None, dtype):
    """A checkpoint through the patched ``NeMoAutoModelForCausalLM.from_pretrained``, as ``run.py`` builds it;
    in eval mode."""
    from nemo_automodel import NeMoAutoModelForCausalLM

    kwargs = {} if anymodel_descriptor is None else {"anymodel_descriptor": anymodel_descriptor}
    return NeMoAutoModelForCausalLM.from_pretrained(str(path), torch_dtype=dtype, **kwargs).eval()


def _ce_sum(model, examples: list[dict], batch_size: int, device) -> tuple[float, int]:
    """``(sum of CE over scored tokens, scored tokens)``: right-padded batches, CE per token from fp32 logits,
    summed in float64."""
    import torch
    import torch.nn.functional as F
    from nemo_automodel.components.datasets.utils import default_collater

    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = default_collater(examples[start:start + batch_size])
            labels = batch["labels"].to(device)
            output = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            scored = labels != -100
            # Only scored positions are upcast: fp32 logits of every position can outweigh the model.
            logits = getattr(output, "logits", output)[scored].float()
            total += F.cross_entropy(logits, labels[scored], reduction="none").double().sum().item()
            count += int(scored.sum())
    return total, count


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _all_reduce(ce_sum: float, tokens: int, device) -> tuple[float, int]:
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return ce_sum, tokens
    sums = torch.tensor([ce_sum, tokens], dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    return sums[0].item(), int(sums[1].item())


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="evaluate", usage=USAGE, description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, metavar="PATH", help="teacher checkpoint")
    parser.add_argument("--student", required=True, action="append", metavar="PATH",
                        help="student checkpoint (repeat for several)")
    parser.add_argument("--baseline", metavar="PATH",
                        help="the student before KD: adds each model's share of the gap recovered")
    parser.add_argument("--data", required=True, metavar="FILE", help="JSON-lines file, one row per line")
    parser.add_argument("--text-field", default="text", metavar="FIELD", help="the field scored whole (default: text)")
    parser.add_argument("--prompt-field", metavar="FIELD",
                        help="with --answer-field: score the answer after this prompt")
    parser.add_argument("--answer-field", metavar="FIELD", help="with --prompt-field: the field scored")
    parser.add_argument("--anymodel-descriptor", default="auto", metavar="NAME",
                        help="descriptor of the checkpoints with block configs (default: auto, from model_type)")
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: the teacher's)")
    parser.add_argument("--seq-length", type=int, metavar="N",
                        help="truncate rows to N tokens (default: keep them whole)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N",
                        help="rows per forward pass and process (default: 8)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="compute dtype (default: float32)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    return parser.parse_args(argv)


def model_names(args: argparse.Namespace) -> dict[str, str]:
    """``{name: path}`` in table order: teacher, baseline, then ``student`` (or ``student 1``, ``student 2``, ...)."""
    students = ({"student": args.student[0]} if len(args.student) == 1
                else {f"student {i}": path for i, path in enumerate(args.student, 1)})
    return {"teacher": args.teacher, **({"baseline": args.baseline} if args.baseline else {}), **students}


def add_gaps(results: dict[str, dict]) -> None:
    """Each model's ``gap_recovered`` (in place), where there is a baseline."""
    if "baseline" not in results:
        return
    for name, result in results.items():
        if name != "teacher":
            result["gap_recovered"] = gap_recovered(result["ce"], results["baseline"]["ce"], results["teacher"]["ce"])


def table(results: dict[str, dict], scored: str, world: int) -> str:
    """A Markdown table of the results, and one line saying what was scored."""
    gaps = "baseline" in results
    lines = ["| model | checkpoint | parameters | CE (nats/token) | perplexity |" + (" gap recovered |" * gaps),
             "|---|---|---|---|---|" + "---|" * gaps]
    for name, r in results.items():
        gap = r.get("gap_recovered")
        cells = [name, r["path"], f"{r['parameters'] / 1e6:.2f} M", f"{r['ce']:.4f}", f"{r['perplexity']:.2f}"]
        if gaps:
            # + 0.0: with a baseline better than the teacher its own 0 / negative gap is -0.0, printed "-0.0%".
            cells.append("" if name == "teacher" else "n/a" if gap is None else f"{gap + 0.0:.1%}")
        lines.append("| " + " | ".join(cells) + " |")
    tokens = next(iter(results.values()))["tokens"]
    return "\n".join(lines) + f"\n\n{tokens:,} tokens scored ({scored}), {world} process{'es' if world > 1 else ''}"


def main(argv: list[str] | None = None) -> int:
    """The command line: prints the table (or JSON) on rank 0 and returns 0, or prints the one-line error and
    returns 2."""
    args = parse_args(argv)
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = _rank_and_world()
    try:
        # AutoModel and ModelOpt print while models load; stdout carries only the result.
        with contextlib.redirect_stdout(sys.stderr):
            results = evaluate(model_names(args), args.data, text_field=args.text_field,
                               prompt_field=args.prompt_field, answer_field=args.answer_field,
                               anymodel_descriptor=args.anymodel_descriptor, tokenizer=args.tokenizer,
                               seq_length=args.seq_length, batch_size=args.batch_size, dtype=args.dtype)
    except (EvaluateError, PreflightError) as e:
        import run

        if rank == 0:  # every rank raises the same error
            run.report_error(f"evaluate: error: {e}")  # also where torchrun's failure summary looks
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    add_gaps(results)
    if rank == 0:
        scored = (f"answer tokens of {args.prompt_field} -> {args.answer_field}" if args.prompt_field
                  else f"every token after the first of {args.text_field}")
        summary = {"data": str(args.data), "scored": scored, "processes": world, "models": results}
        print(json.dumps(summary, indent=1) if args.json else table(results, f"{args.data}: {scored}", world))
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # As run.py: interpreter teardown after gloo sometimes aborts a finished run.
    os._exit(code)
