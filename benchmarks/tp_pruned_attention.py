"""Per-rank parameter bytes and step time under TP=2 of a student whose layers keep fewer KV heads than TP ranks:
attention split by query heads (``kv_replicated``: each rank half of Q and O, the one KV head its queries read)
against the whole block replicated on both ranks (how ``architectures/tensor_parallel.py`` split it before).

    python benchmarks/tp_pruned_attention.py                       # CPU: about 4 minutes
    python benchmarks/tp_pruned_attention.py --hidden 1024 --rounds 5

The student: a random Llama (``--hidden``, 8 query heads of ``hidden / 8``, 4 layers, FFN ``2 * hidden``) whose
every layer keeps 1 KV head (ModelOpt's AnyModel layout), trained with ``--mode pretrain`` (no teacher) under
``distributed.tp_size=2`` on 2 CPU ranks, fp32. Both layouts run in alternating rounds (single runs on this
machine vary by a third); step time is the median of each run's steps after ``--warmup``, then the median over
rounds. Parameter bytes are rank 0's local parameters after setup: the whole student and its attention blocks.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = ("replicated", "kv_replicated")
HEADS = 8


def worker(layout: str, out: Path, argv: list[str]) -> None:
    """Runs inside torchrun: ``run.py``'s pretrain setup with ``layout`` for the 1-KV-head attention, rank 0's
    parameter bytes to ``out/params.json``, then the training loop."""
    sys.path.insert(0, str(REPO))
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    import run
    from architectures import tensor_parallel

    if layout == "replicated":
        split = tensor_parallel.attention_mode
        tensor_parallel.attention_mode = lambda attn, tp: "replicated" if split(attn, tp) == "kv_replicated" else \
            split(attn, tp)
    Recipe, cfg = run.prepare(argv)
    trainer = Recipe(cfg)
    trainer.setup()
    if dist.get_rank() == 0:
        sizes = {"model": 0, "attention": 0}
        for part in trainer.model_parts:
            for name, param in part.named_parameters():
                local = param.to_local() if isinstance(param, DTensor) else param
                size = local.numel() * local.element_size()
                sizes["model"] += size
                sizes["attention"] += size if ".self_attn." in name else 0
        (out / "params.json").write_text(json.dumps(sizes))
    trainer.run_train_validation_loop()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # as run.py does: interpreter teardown after gloo sometimes aborts


def build_student(root: Path, hidden: int) -> tuple[Path, Path]:
    """The 1-KV-head student (AnyModel layout) and SQuAD-like local data."""
    from modelopt.torch.puzzletron.anymodel import ModelDescriptorFactory
    from modelopt.torch.puzzletron.tools.checkpoint_utils_hf import save_checkpoint

    from architectures.descriptors import build_descriptor
    from tools.build_checkpoints import build_student_model, build_tokenizer, make_config, write_squad_like_data

    tokenizer = build_tokenizer()
    config = make_config("llama", len(tokenizer), tokenizer, hidden_size=hidden, num_attention_heads=HEADS,
                         num_key_value_heads=HEADS, intermediate_size=2 * hidden)
    blocks = [{"attention": {"no_op": False, "num_key_value_heads": 1},
               "ffn": {"no_op": False, "intermediate_size": 2 * hidden}}] * config.num_hidden_layers
    student = build_student_model(config, "llama", blocks, seed=0)
    save_checkpoint(student, root / "student", build_descriptor(ModelDescriptorFactory.get("llama")))
    tokenizer.save_pretrained(root / "student")
    return root / "student", write_squad_like_data(root / "data")


def run_layout(layout: str, args, student: Path, data: Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    overrides = [
        f"model.pretrained_model_name_or_path={student}", "model.anymodel_descriptor=llama",
        "model.torch_dtype=float32", f"dataset.dataset_name={data}", f"validation_dataset.dataset_name={data}",
        "distributed.tp_size=2", f"step_scheduler.max_steps={args.steps}",
        f"step_scheduler.global_batch_size={args.global_batch}",
        f"step_scheduler.local_batch_size={args.global_batch}", f"step_scheduler.val_every_steps={args.steps + 1}",
        "checkpoint.enabled=false", f"checkpoint.checkpoint_dir={out}",
        "distributed.mp_policy._target_=torch.distributed.fsdp.MixedPrecisionPolicy",
        "distributed.mp_policy.param_dtype=float32", "distributed.mp_policy.reduce_dtype=float32",
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={args.port}",
           __file__, "--worker", layout, "--out", str(out), "--mode", "pretrain", "-c", "pretrain.yaml", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    log = out / "training.jsonl"
    if result.returncode != 0 or not log.exists():
        return {"error": (result.stderr.strip().splitlines() or ["no output"])[-1][:120]}
    rows = [json.loads(line) for line in log.read_text().splitlines()][args.warmup:]
    return {"step_s": statistics.median(r["num_tokens_per_step"] / r["tps"] for r in rows),
            **json.loads((out / "params.json").read_text())}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512, help="hidden size (8 query heads of hidden / 8)")
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of both layouts")
    parser.add_argument("--port", type=int, default=29571)
    parser.add_argument("--worker", choices=LAYOUTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.worker:
        return worker(args.worker, args.out, rest)

    sys.path.insert(0, str(REPO))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        student, data = build_student(tmp, args.hidden)
        runs = {layout: [] for layout in LAYOUTS}
        for round_ in range(args.rounds):
            for layout in LAYOUTS:
                result = run_layout(layout, args, student, data, tmp / f"{layout}-{round_}")
                if "error" in result:
                    sys.exit(f"tp_pruned_attention.py: {layout} failed: {result['error']}")
                runs[layout].append(result)
    print(f"TP=2 on 2 CPU ranks (gloo), {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{datetime.date.today()}, fp32; Llama student, hidden {args.hidden}, {HEADS} query heads and 1 KV head in "
          f"each of 4 layers; global batch {args.global_batch}, {args.steps} steps, medians after {args.warmup} "
          f"warm-up steps, median of {args.rounds} alternating rounds.\n")
    print("| attention of the 1-KV-head layers | parameter MB per rank | attention MB per rank | step (s) "
          "| rounds (s) |")
    print("|---|---|---|---|---|")
    for layout, results in runs.items():
        steps = [r["step_s"] for r in results]
        print(f"| {layout} | {results[0]['model'] / 1e6:.2f} | {results[0]['attention'] / 1e6:.2f} | "
              f"{statistics.median(steps):.3f} | {', '.join(f'{s:.3f}' for s in steps)} |")


if __name__ == "__main__":
    main()
