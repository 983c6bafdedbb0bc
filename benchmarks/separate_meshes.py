"""The teacher on its own ranks: bytes shipped per token, step time and peak memory on both sides.

    python benchmarks/separate_meshes.py                  # the docs table (CPU: ~10 min)
    python benchmarks/separate_meshes.py --vocab 201088 --seq 2048

Two processes, student on rank 0 and teacher on rank 1 (``separate_meshes: true``, each mesh ``dp_size: 1``),
with the models of ``benchmarks/fused_kd_step.py`` (a 2-layer hidden-64 Qwen3 pair with the vocabulary under test,
one sequence of ``seq`` tokens per step). Every cell is a real run of ``run.py`` through ``recipe_step.py``'s worker:

* ``shared``: both models on both ranks (FSDP2, dp=2), fused loss: the layout separate meshes replace;
* ``logits``: separate meshes, ``fused_linear_loss: false``: the teacher ships its logits (AutoModel's path);
* ``hidden``: separate meshes, ``fused_linear_loss: true``: the teacher ships its final hidden states.

Shipped bytes per token are the logged ``teacher_bytes`` over the step's tokens, and the next column scales them to
GPT-OSS-120B's shapes (hidden 2,880, bf16) at the same vocabulary. Step time and tokens/s (the student's tokens:
``shared`` trains on two sequences a step, the others on one) are medians over the steps after the first. Peaks are
each rank's (CPU: peak RSS, with about 1 GB of runtime; GPU: the allocator's); in ``shared`` both ranks hold both
models.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fused_kd_step import REPO, build_pair, compute_overrides, run_logged, write_config  # noqa: E402

HIDDEN, GPT_OSS_HIDDEN, BF16 = 64, 2880, 2
SEPARATE = ["separate_meshes=true", "distributed.dp_size=1", "teacher_distributed.dp_size=1"]
CELLS = {"shared": ["fused_linear_loss=true"],
         "logits": [*SEPARATE, "fused_linear_loss=false"],
         "hidden": [*SEPARATE, "fused_linear_loss=true"]}


def run_cell(name: str, vocab: int, seq: int, args, student: Path, teacher: Path, out: Path) -> dict:
    config = write_config(out.with_suffix(".yaml"), seq)
    teacher_compute = [o.replace("distributed.", "teacher_distributed.", 1) for o in compute_overrides(args.dtype)]
    overrides = [
        f"model.pretrained_model_name_or_path={student}", f"teacher_model.pretrained_model_name_or_path={teacher}",
        f"model.torch_dtype={args.dtype}", f"teacher_model.torch_dtype={args.dtype}",
        f"step_scheduler.max_steps={args.steps}", "step_scheduler.global_batch_size=2" if name == "shared" else
        "step_scheduler.global_batch_size=1", "step_scheduler.local_batch_size=1",
        f"step_scheduler.val_every_steps={args.steps + 1}", "checkpoint.enabled=false",
        f"checkpoint.checkpoint_dir={out}", *compute_overrides(args.dtype),
        *(teacher_compute if name != "shared" else []), *CELLS[name],
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={args.port}",
           str(REPO / "benchmarks" / "recipe_step.py"), "--worker", "ours", "--mode", "kd", "-c", str(config),
           *overrides]
    error, rows = run_logged(cmd, out)
    if rows is None:
        return {"error": error}
    timed = rows[1:] or rows
    peaks = [json.loads((out / f"peak_rank{r}.json").read_text())["peak_gb"] for r in range(2)]
    cell = {"step_s": statistics.median(r["num_tokens_per_step"] / r["tps"] for r in timed),
            "tps": statistics.median(r["tps"] for r in timed), "peaks": peaks}
    if "teacher_bytes" in rows[-1]:
        per_token = statistics.median(r["teacher_bytes"] / r["num_tokens_per_step"] for r in rows)
        element = 2 if args.dtype == "bfloat16" else 4
        cell["bytes"] = per_token
        # A token ships vectors of the vocabulary's length (logits) or the width's (hidden states); at GPT-OSS-120B's
        # shapes the width is 2,880 and the dtype bf16.
        length, gpt_oss_length = (vocab, vocab) if name == "logits" else (HIDDEN, GPT_OSS_HIDDEN)
        cell["gpt_oss_bytes"] = per_token / element / length * gpt_oss_length * BF16
    return cell


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 201088])
    parser.add_argument("--seq", type=int, nargs="+", default=[1024])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--port", type=int, default=29591)
    parser.add_argument("--output", type=Path, help="also write the markdown table to this file")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))

    lines = [f"Separate meshes, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.dtype}, "
             f"{datetime.date.today()}; 2 processes, 2-layer hidden-64 Qwen3 pair, one sequence per step per student "
             "rank, median of the steps after the first.", "",
             "| vocab | tokens | layout | shipped bytes / token | at GPT-OSS-120B shapes, bf16 | step (s) | "
             "tokens/s | rank 0 (student) peak (GB) | rank 1 (teacher) peak (GB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for vocab in args.vocab:
            student, teacher = build_pair(tmp / f"v{vocab}", vocab)
            for seq in args.seq:
                for name in CELLS:
                    cell = run_cell(name, vocab, seq, args, student, teacher, tmp / f"{vocab}-{seq}-{name}")
                    head = f"| {vocab} | {seq} | {name} |"
                    if "error" in cell:
                        lines.append(f"{head} fails: {cell['error']} | | | | | |")
                    else:
                        shipped = (f"{cell['bytes']:,.0f} | {cell['gpt_oss_bytes']:,.0f}" if "bytes" in cell
                                   else "none | none")
                        lines.append(f"{head} {shipped} | {cell['step_s']:.3f} | {cell['tps']:.0f} | "
                                     f"{cell['peaks'][0]:.2f} | {cell['peaks'][1]:.2f} |")
                    print(lines[-1], flush=True)
    if args.output:
        args.output.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
