"""Peak memory and step time of a whole KD step: fused linear KD vs logits (unfused) vs AutoModel's KD recipe.

    python benchmarks/fused_kd_step.py                                   # the README table (CPU: ~30 min)
    python benchmarks/fused_kd_step.py --vocab 201088 --seq 1024 2048 --procs 1
    python benchmarks/fused_kd_step.py --budget-gb 16 --longest          # also: longest sequence within budget
    python benchmarks/fused_kd_step.py --dry-run                         # tiny sizes, seconds (the test suite)

The models are a 2-layer, hidden-64 Qwen3 teacher and student with the vocabulary under test (and the
512-token test tokenizer), so that the step is dominated by what the vocabulary costs, as it is for
GPT-OSS (201,088) at long context. Each row of data is one sequence of exactly ``seq`` tokens
(AutoModel's ``mock.build_unpacked_dataset``), one sequence per step. Every cell is a real run through
``benchmarks/recipe_step.py``'s worker (so through ``run.py``'s config, patches and preflight):

* ``fused``: our recipe with ``fused_linear_loss: true``;
* ``unfused``: our recipe with ``fused_linear_loss: false`` (both models' full logits, then ``loss.KDLoss``);
* ``automodel``: AutoModel 0.7.0's KD recipe with its ``KDLoss``.

``--procs 2`` runs TP=2 (the vocabulary split over the two ranks). Peak memory is the logged ``mem``:
the CUDA allocator peak on a GPU, the process's peak RSS on a CPU (rank 0; it includes the weights and
the Python runtime, about 1 GB here). Step time is the median over the steps after the first.
A cell whose peak, extrapolated linearly from the two shorter sequences, would exceed ``--budget-gb``
(per rank; on a CPU at most the machine's memory over the ranks, which share it) is not run ("over budget");
a run the OS kills for memory says so; with ``--longest`` each path's sequence length keeps doubling past the grid
until that happens, which gives the longest sequence each path fits in the budget.
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

import yaml

REPO = Path(__file__).resolve().parents[1]
# Unfused first: the other rows are compared with it.
PATHS = {"unfused": ("ours", ["fused_linear_loss=false"]),
         "fused": ("ours", ["fused_linear_loss=true"]),
         "automodel": ("automodel", ["fused_linear_loss=false"])}
NOISE = ("ChildFailedError", "Connection closed by peer", "Connection reset by peer")


def build_pair(root: Path, vocab: int, layers: int = 2) -> tuple[Path, Path]:
    """A Qwen3 teacher and student (another seed) with ``vocab`` logits, saved with the test tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from tools.build_checkpoints import build_tokenizer, make_config

    tokenizer = build_tokenizer()
    paths = []
    for seed, name in ((0, "teacher"), (1, "student")):
        torch.manual_seed(seed)
        config = make_config("qwen3", vocab, tokenizer, num_hidden_layers=layers, max_position_embeddings=1 << 17)
        AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths.append(root / name)
    return paths[1], paths[0]


def write_config(path: Path, seq: int) -> Path:
    """kd.yaml with fixed-length synthetic rows of ``seq`` tokens for training and validation."""
    config = yaml.safe_load((REPO / "kd.yaml").read_text())
    dataset = {"_target_": "nemo_automodel.components.datasets.llm.mock.build_unpacked_dataset",
               "num_sentences": 64, "mean_len": seq, "std_len": 0, "vocab_size": 512, "max_sentence_len": seq}
    config["dataset"], config["validation_dataset"] = dataset, {**dataset, "num_sentences": 2}
    path.write_text(yaml.safe_dump(config))
    return path


def compute_overrides(dtype: str) -> list[str]:
    """FSDP2 computes in ``dtype`` (its default is bf16 whatever the weights are; bf16 matmuls are emulated, 50x
    slower, on AVX2-only CPUs); gradients are reduced in fp32, as by default."""
    return ["distributed.mp_policy._target_=torch.distributed.fsdp.MixedPrecisionPolicy",
            f"distributed.mp_policy.param_dtype={dtype}", "distributed.mp_policy.reduce_dtype=float32"]


def run_cell(path_name: str, procs: int, seq: int, args, student: Path, teacher: Path, out: Path,
             paths: dict = PATHS) -> dict:
    """One path's KD run (``paths[path_name]``: recipe and overrides); its peak, median step time and mfu."""
    recipe, extra = paths[path_name]
    config = write_config(out.with_suffix(".yaml"), seq)
    overrides = [
        f"model.pretrained_model_name_or_path={student}", f"teacher_model.pretrained_model_name_or_path={teacher}",
        f"model.torch_dtype={args.dtype}", f"teacher_model.torch_dtype={args.dtype}",
        f"distributed.tp_size={procs}", f"step_scheduler.max_steps={args.steps}", "step_scheduler.global_batch_size=1",
        "step_scheduler.local_batch_size=1", f"step_scheduler.val_every_steps={args.steps + 1}",
        "checkpoint.enabled=false", f"checkpoint.checkpoint_dir={out}", *compute_overrides(args.dtype), *extra,
    ]
    if recipe == "automodel":
        overrides.append("kd_loss_fn._target_=nemo_automodel.components.loss.kd_loss.KDLoss")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", f"--master_port={args.port}",
           str(REPO / "benchmarks" / "recipe_step.py"), "--worker", recipe, "--mode", "kd", "-c", str(config),
           *overrides]
    error, rows = run_logged(cmd, out)
    if rows is None:
        return {"error": error}
    timed = rows[1:] or rows
    mfu = [r["mfu"] for r in timed if r.get("mfu") is not None]
    return {"peak_gb": max(r["mem"] for r in rows) * 1024**3 / 1e9,
            "step_s": statistics.median(r["num_tokens_per_step"] / r["tps"] for r in timed),
            "mfu": statistics.median(mfu) if mfu else None}


def run_logged(cmd: list[str], out: Path) -> tuple:
    """Run a benchmark job; ``(None, rows of out/training.jsonl)``, or ``(one-line cause, None)`` when it failed."""
    result = subprocess.run(cmd, cwd=REPO, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
                            capture_output=True, text=True)
    log = out / "training.jsonl"
    if "SIGKILL" in result.stderr or "exitcode  : -9" in result.stderr:
        return "killed by the OS: out of memory", None
    if result.returncode != 0 or not log.exists():
        # The root cause, not the other rank's "connection closed" or torchrun's summary.
        errors = [line.split("]:")[-1].strip() for line in result.stderr.splitlines()
                  if "Error" in line and not any(noise in line for noise in NOISE)]
        return (errors[-1] if errors else f"exit code {result.returncode}")[:100], None
    return None, [json.loads(line) for line in log.read_text().splitlines()]


def predicted_peak(measured: dict[int, dict], seq: int) -> float | None:
    """Linear extrapolation of the peak from the two longest sequences measured so far."""
    points = sorted((s, m["peak_gb"]) for s, m in measured.items() if "peak_gb" in m)
    if len(points) < 2:
        return None
    (s0, p0), (s1, p1) = points[-2:]
    return p1 + (p1 - p0) / (s1 - s0) * (seq - s1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256, 201088])
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    parser.add_argument("--budget-gb", type=float, default=16.0)
    parser.add_argument("--longest", action="store_true", help="double each path's sequence until the budget")
    parser.add_argument("--max-seq", type=int, default=65536, help="stop --longest here")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--port", type=int, default=29571)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, one process: vocab 4096, 64 tokens")
    parser.add_argument("--output", type=Path, help="also write the markdown table to this file")
    args = parser.parse_args()
    if args.dry_run:
        args.vocab, args.seq, args.procs, args.steps, args.budget_gb = [4096], [64], [1], 2, 1000.0
    sys.path.insert(0, str(REPO))

    lines = [f"KD step, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.dtype}, "
             f"{datetime.date.today()}; 2-layer hidden-64 Qwen3 pair, one sequence per step, median of steps "
             f"2-{args.steps}; peak = {'CUDA allocator peak' if _has_cuda() else 'peak RSS of rank 0'}; budget "
             f"{args.budget_gb:g} GB.", "",
             "| ranks | vocab | tokens | path | peak (GB) | step (s) | mfu | peak vs unfused | step vs unfused |",
             "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    longest = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for vocab in args.vocab:
            student, teacher = build_pair(tmp / f"v{vocab}", vocab)
            for procs in args.procs:
                measured = {p: {} for p in args.paths}
                budget = args.budget_gb if _has_cuda() else min(args.budget_gb, _ram_gb() / procs)
                seqs = sorted(args.seq)
                while seqs:
                    seq = seqs.pop(0)
                    for path_name in args.paths:
                        guess = predicted_peak(measured[path_name], seq)
                        if any("over" in m or "error" in m for m in measured[path_name].values()):
                            continue
                        if guess is not None and guess > budget:
                            measured[path_name][seq] = {"over": guess}
                        else:
                            out = tmp / f"{vocab}-{procs}-{seq}-{path_name}"
                            measured[path_name][seq] = run_cell(path_name, procs, seq, args, student, teacher, out)
                        lines.append(_row(procs, vocab, seq, path_name, measured))
                        print(lines[-1], flush=True)
                    if args.longest and not seqs and seq * 2 <= args.max_seq and any(
                            "peak_gb" in m.get(seq, {}) for m in measured.values()):
                        seqs.append(seq * 2)
                for path_name, cells in measured.items():
                    fits = [s for s, m in cells.items() if "peak_gb" in m and m["peak_gb"] <= budget]
                    longest.append((procs, vocab, path_name, max(fits, default=0), budget))
    lines += ["", "Longest sequence measured within the budget (per rank):", "",
              "| ranks | vocab | budget (GB) | path | tokens | vs automodel |", "|---|---|---|---|---|---|"]
    for procs, vocab, path_name, seq, budget in longest:
        base = next((s for p, v, n, s, _ in longest if (p, v, n) == (procs, vocab, "automodel")), 0)
        lines.append(f"| {procs} | {vocab} | {budget:.1f} | {path_name} | {seq} | "
                     f"{f'{seq / base:.1f}x' if base else ''} |")
    print("\n".join(lines[-len(longest) - 4:]), flush=True)
    if args.output:
        args.output.write_text("\n".join(lines) + "\n")


def _row(procs, vocab, seq, path_name, measured) -> str:
    cell = measured[path_name][seq]
    head = f"| {procs} | {vocab} | {seq} | {path_name} |"
    if "over" in cell:
        return f"{head} over budget (~{cell['over']:.1f} predicted) | | | | |"
    if "error" in cell:
        return f"{head} fails: {cell['error']} | | | | |"
    base = measured.get("unfused", {}).get(seq, {})
    ratios = [f"{cell[k] / base[k]:.2f}x" if k in base else "" for k in ("peak_gb", "step_s")]
    mfu = "n/a" if cell["mfu"] is None else f"{cell['mfu']:.1f}%"
    return f"{head} {cell['peak_gb']:.2f} | {cell['step_s']:.2f} | {mfu} | {ratios[0]} | {ratios[1]} |"


def _ram_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
