"""Step time and peak memory of KD from a teacher cache vs online KD vs a CE-only step; the cache build's cost.

    python benchmarks/cached_kd_step.py                          # the docs table (CPU: ~15 min)
    python benchmarks/cached_kd_step.py --vocab 201088 --seq 2048 --procs 1
    python benchmarks/cached_kd_step.py --dry-run                # tiny sizes, seconds (the test suite)
    python benchmarks/cached_kd_step.py --demo demo_out          # the demo's models and cache, alternating rounds

The models and data are ``benchmarks/fused_kd_step.py``'s (a 2-layer hidden-64 Qwen3 pair with the vocabulary
under test, one synthetic sequence of ``seq`` tokens per step), every cell a real run of ``run.py`` through
``recipe_step.py``'s worker, all with ``fused_linear_loss: true``:

* ``ce_only``: ``kd_ratio=0`` (the teacher is not run): the floor a KD step is measured against;
* ``online``: KD from the teacher, run beside the student;
* ``cached``: KD from a ``sampled`` cache (``k=12``) built by ``--mode teacher_cache`` first; no teacher is built.

``--procs 2`` runs TP=2 (build and KD). The build's row gives its wall time (process start and model build
included), label tokens per second of the progress line's kind (tokens over the whole wall time here) and bytes
per label token on disk.

``--demo DIR`` times the three steps on a ``make demo`` output instead: its pruned student, teacher, sampled cache
and 256 rows, at its batch and ``kd_ratio``, on 2 ranks as the demo runs them. The demo times each path once,
minutes apart, and this machine's speed drifts by a third over such spans; here every round runs the three
back to back in a rotated order, and the ratios are taken within a round.
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
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fused_kd_step import (REPO, _has_cuda, build_pair, compute_overrides, run_cell, run_logged,  # noqa: E402
                           write_config)
from recipe_step import demo_models  # noqa: E402

K = 12


def build_cache(procs: int, seq: int, args, teacher: Path, out: Path) -> dict:
    """``--mode teacher_cache`` for the benchmark data; its wall time, label tokens/s and bytes per label token."""
    config = write_config(out.with_suffix(".yaml"), seq)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", f"--master_port={args.port}",
           "-m", "run", "--mode", "teacher_cache", "-c", str(config),
           f"teacher_model.pretrained_model_name_or_path={teacher}", f"teacher_model.torch_dtype={args.dtype}",
           f"distributed.tp_size={procs}", "step_scheduler.global_batch_size=1", "step_scheduler.local_batch_size=1",
           f"teacher_cache.path={out}", f"teacher_cache.k={K}", *compute_overrides(args.dtype)]
    started = time.time()
    result = subprocess.run(cmd, cwd=REPO, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
                            capture_output=True, text=True)
    seconds = time.time() - started
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1][:100]}
    manifest = json.loads((out / "manifest.json").read_text())
    return {"seconds": seconds, "tokens_per_s": manifest["label_tokens"] / seconds,
            "bytes": manifest["bytes_per_label_token"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 201088])
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    parser.add_argument("--steps", type=int, help="steps per run (default 4; 30 with --demo)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--port", type=int, default=29581)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, one process: vocab 4096, 64 tokens")
    parser.add_argument("--output", type=Path, help="also write the markdown table to this file")
    parser.add_argument("--demo", type=Path, help="time the models and sampled cache of a `make demo` output directory")
    parser.add_argument("--rounds", type=int, default=3, help="with --demo: rounds of the three paths (default 3)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    if args.demo:
        args.steps = args.steps or 30
        lines = demo_rounds(args)
        if args.output:
            args.output.write_text("\n".join(lines) + "\n")
        return
    args.steps = args.steps or 4
    if args.dry_run:
        args.vocab, args.seq, args.procs, args.steps = [4096], [64], [1], 2

    lines = [f"Cached vs online KD step, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"{args.dtype}, {datetime.date.today()}; 2-layer hidden-64 Qwen3 pair, one sequence per step, median of "
             f"steps 2-{args.steps}; peak = {'CUDA allocator peak' if _has_cuda() else 'peak RSS of rank 0'}; sampled "
             f"cache, k={K}.", "",
             "| ranks | vocab | tokens | path | peak (GB) | step (s) | step vs CE only | step vs online |",
             "|---|---|---|---|---|---|---|---|"]
    builds = ["", "| ranks | vocab | tokens | cache build (s) | label tokens/s | bytes per label token |",
              "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for vocab in args.vocab:
            student, teacher = build_pair(tmp / f"v{vocab}", vocab)
            for procs in args.procs:
                for seq in args.seq:
                    cache = tmp / f"cache-{vocab}-{procs}-{seq}"
                    built = build_cache(procs, seq, args, teacher, cache)
                    builds.append(f"| {procs} | {vocab} | {seq} | " + (f"fails: {built['error']} | | |" if "error" in built
                                  else f"{built['seconds']:.1f} | {built['tokens_per_s']:.0f} | {built['bytes']:.1f} |"))
                    paths = {"ce_only": ("ours", ["kd_ratio=0"]), "online": ("ours", []),
                             "cached": ("ours", [f"teacher_cache.path={cache}", f"teacher_cache.k={K}",
                                                 "teacher_model.pretrained_model_name_or_path=null"])}
                    cells = {}
                    for name in paths:
                        if name == "cached" and "error" in built:
                            continue
                        cells[name] = run_cell(name, procs, seq, args, student, teacher, tmp / f"{vocab}-{procs}-{seq}-{name}",
                                               paths={**paths, name: (paths[name][0], ["fused_linear_loss=true",
                                                                                      *paths[name][1]])})
                        lines.append(_row(procs, vocab, seq, name, cells))
                        print(lines[-1], flush=True)
    lines += builds
    print("\n".join(builds), flush=True)
    if args.output:
        args.output.write_text("\n".join(lines) + "\n")


DEMO_PATHS = ("ce_only", "cached", "online")


def demo_rounds(args) -> list[str]:
    """``args.rounds`` rounds of CE only, KD from the demo's sampled cache and online KD on ``args.demo``; the
    table's lines (printed as they come)."""
    from tools import demo

    out = args.demo.resolve()
    student, teacher, _ = demo_models(out)
    cache = out / "cache_sampled"
    if not (cache / "cache" / "manifest.json").is_file():
        sys.exit(f"cached_kd_step.py: error: {out} holds no demo cache (cache_sampled); run `make demo` first")
    common = [*demo.kd_overrides(student, teacher, out / "data"), *demo.compute_overrides(), "checkpoint.enabled=false"]
    extra = {"ce_only": ["kd_ratio=0"], "cached": [f"kd_ratio={demo.KD_RATIO}", *demo.cache_overrides("sampled", cache)],
             "online": [f"kd_ratio={demo.KD_RATIO}"]}
    run = dict(demo.STUDENT_RUN, steps=args.steps, val_every=args.steps + 1)
    lines = [f"Demo step times, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"{datetime.datetime.now():%Y-%m-%d %H:%M}; {out}, 2 ranks, batch {run['global_batch']}, kd_ratio "
             f"{demo.KD_RATIO}, sampled cache k={demo.CACHES['sampled']}; median of steps 2-{args.steps} per run.", "",
             "| round | order | CE only (s) | cached (s) | online (s) | cached vs CE only | online vs CE only |",
             "|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    steps, peaks = {name: [] for name in DEMO_PATHS}, {name: [] for name in DEMO_PATHS}
    with tempfile.TemporaryDirectory() as tmp:
        for r, order in enumerate(rotations(DEMO_PATHS, args.rounds)):
            for name in order:
                run_dir = Path(tmp) / f"{r}-{name}"
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                       f"--master_port={args.port}", "-m", "run", "--mode", "kd", "-c", "kd.yaml", *common,
                       *extra[name], *demo.schedule_overrides(run, run_dir)]
                error, rows = run_logged(cmd, run_dir)
                if rows is None:
                    sys.exit(f"cached_kd_step.py: error: the {name} run failed: {error}")
                steps[name].append(statistics.median(row["num_tokens_per_step"] / row["tps"] for row in rows[1:]))
                peaks[name].append(max(row["mem"] for row in rows) * 1024**3 / 1e9)
            ce, cached, online = (steps[name][-1] for name in DEMO_PATHS)
            lines.append(f"| {r + 1} | {', '.join(order)} | {ce:.3f} | {cached:.3f} | {online:.3f} | "
                         f"{cached / ce:.2f}x | {online / ce:.2f}x |")
            print(lines[-1], flush=True)
    cached_ratio, online_ratio = (statistics.median(a / b for a, b in zip(steps[name], steps["ce_only"]))
                                  for name in ("cached", "online"))
    summary = [f"| median | | {statistics.median(steps['ce_only']):.3f} | {statistics.median(steps['cached']):.3f} | "
               f"{statistics.median(steps['online']):.3f} | **{cached_ratio:.2f}x** | {online_ratio:.2f}x |", "",
               "| path | peak (GB) |", "|---|---|", *(f"| {name} | {max(peaks[name]):.2f} |" for name in DEMO_PATHS)]
    print("\n".join(summary), flush=True)
    return lines + summary


def rotations(names: tuple, rounds: int) -> list[tuple]:
    """``rounds`` orders of ``names``, each the previous one rotated by one: every name runs first, middle and last."""
    return [names[r % len(names):] + names[:r % len(names)] for r in range(rounds)]


def _row(procs, vocab, seq, name, cells) -> str:
    cell = cells[name]
    head = f"| {procs} | {vocab} | {seq} | {name} |"
    if "error" in cell:
        return f"{head} fails: {cell['error']} | | | |"
    ratios = [f"{cell['step_s'] / cells[b]['step_s']:.2f}x" if "step_s" in cells.get(b, {}) else ""
              for b in ("ce_only", "online")]
    return f"{head} {cell['peak_gb']:.2f} | {cell['step_s']:.3f} | {ratios[0]} | {ratios[1]} |"


if __name__ == "__main__":
    main()
