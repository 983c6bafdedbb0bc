"""Rank Puzzletron candidates by distilling each briefly from one teacher cache, then evaluating them.

    python -m tools.tournament --cache DIR --candidate NAME=PATH [--candidate NAME=PATH ...] --steps N \\
        --out DIR --data FILE [--prompt-field F --answer-field F] [--teacher PATH] [--nproc N] \\
        [-c kd.yaml] [override ...]
    torchrun --nproc_per_node=8 [--nnodes ...] -m tools.tournament ...   # every KD run on all the job's ranks

Each candidate gets the same ``--mode kd`` run: the config (``kd.yaml`` by default) and its overrides, the
candidate as ``model``, ``teacher_cache.path=DIR`` (no teacher is loaded), ``--steps`` optimizer steps, into
``<out>/<name>``. Every candidate is evaluated before and after with ``tools.evaluate`` (same data, same scoring,
rows split over the ranks), and the candidates are ranked by CE after: a table on stdout (parameters, CE before
and after, share of the gap to the teacher recovered when ``--teacher`` is given, seconds of KD) and
``<out>/summary.json``. The cache's own settings (``kind``, ``k``, ``seed``, KD temperature) are passed to every
run, so they need not be repeated.

Launched with ``python``, each KD run is a child ``torchrun --nproc_per_node=--nproc``. Launched with ``torchrun``
(one node or many, Slurm included), each rank starts its own share of every KD run: a child ``python -m run`` with
this rank's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` and a port rank 0 picked, so a KD run spans all the job's
ranks, as if torchrun had started it (``--nproc``, if given, must equal the world size). A candidate whose run
fails is ranked last with its error; the others still run (under torchrun a rank whose peer failed waits for its
own run to fail on the ``dist_env.timeout_minutes`` timeout). Bad arguments stop before anything runs, one line,
exit code 2. ``<out>`` must be on a filesystem every node sees.
"""

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class TournamentError(ValueError):
    """A bad argument; the message says what is wrong and how to fix it."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.tournament", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", required=True, metavar="DIR", help="a complete teacher cache (--mode teacher_cache)")
    parser.add_argument("--candidate", required=True, action="append", metavar="NAME=PATH",
                        help="a student checkpoint to distill and rank (repeat for each candidate)")
    parser.add_argument("--steps", required=True, type=int, metavar="N", help="optimizer steps of KD per candidate")
    parser.add_argument("--out", required=True, metavar="DIR", help="one run directory per candidate, summary.json")
    parser.add_argument("--data", required=True, metavar="FILE", help="JSON-lines evaluation data (tools.evaluate)")
    parser.add_argument("--text-field", default="text", metavar="FIELD")
    parser.add_argument("--prompt-field", metavar="FIELD")
    parser.add_argument("--answer-field", metavar="FIELD")
    parser.add_argument("--seq-length", type=int, metavar="N", help="truncate evaluation rows to N tokens")
    parser.add_argument("--teacher", metavar="PATH", help="the cache's teacher, evaluated for the gap recovered")
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer for evaluation (default: the first candidate's)")
    parser.add_argument("--nproc", type=int, metavar="N",
                        help="processes per KD run (default: 1; under torchrun the world size)")
    parser.add_argument("-c", "--config", default=str(REPO / "kd.yaml"), metavar="CONFIG")
    parser.add_argument("overrides", nargs="*", help="kd.yaml overrides for every run (key=value)")
    return parser.parse_args(argv)


def candidates(args: argparse.Namespace) -> dict[str, Path]:
    """``{name: checkpoint directory}``, checked before anything runs."""
    from tools.evaluate import resolve_checkpoint

    out = {}
    for item in args.candidate:
        name, eq, path = item.partition("=")
        if not eq or not name or not path:
            raise TournamentError(f"--candidate {item!r} is not NAME=PATH; e.g. --candidate small=/ckpts/student_a")
        if name in out:
            raise TournamentError(f"--candidate name {name!r} is given twice; give each candidate its own name")
        out[name] = resolve_checkpoint(path, f"--candidate {name}")
    return out


def check(args: argparse.Namespace) -> dict:
    """Every argument that can be checked without running anything; returns the cache's manifest."""
    from distillation import teacher_cache
    from safety import paths

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and args.nproc not in (None, world):
        raise TournamentError(f"--nproc={args.nproc} under torchrun with {world} processes: every KD run spans the "
                              "job's ranks; leave --nproc out, or launch with python to run each KD on --nproc")
    args.nproc = args.nproc or world
    if args.steps < 1 or args.nproc < 1:
        raise TournamentError(f"--steps={args.steps} and --nproc={args.nproc} must be >= 1")
    paths.readable_dir("--cache", args.cache, "a cache built with python -m run --mode teacher_cache")
    paths.writable_dir("--out", args.out)
    manifest = teacher_cache.read_manifest(args.cache)
    if manifest is None or not manifest.get("complete"):
        raise TournamentError(f"--cache {args.cache} is not a complete teacher cache; build it with "
                              "python -m run --mode teacher_cache")
    paths.readable_file("--data", args.data, "a JSON-lines file")
    if not Path(args.config).is_file():
        raise TournamentError(f"-c {args.config} does not exist; pass the KD config the cache was built with")
    return manifest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def launcher(nproc: int) -> tuple[list[str], dict]:
    """How this rank starts its part of a KD run: ``(command prefix, environment)``.

    Under torchrun: ``python`` with this rank's place in the job and a fresh rendezvous port from rank 0 (the
    agent's own store and error file belong to this process, not to the child). Else ``torchrun`` on
    ``nproc`` local processes.
    """
    import torch
    import torch.distributed as dist

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TOKENIZERS_PARALLELISM": "false"}
    if not dist.is_initialized():
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                f"--master_port={_free_port()}"], env
    port = torch.tensor([_free_port() if dist.get_rank() == 0 else 0])
    dist.broadcast(port, src=0)
    for agent_only in ("TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE"):
        env.pop(agent_only, None)
    return [sys.executable], {**env, "MASTER_PORT": str(int(port))}


def kd_run(name: str, path: Path, run_dir: Path, args: argparse.Namespace, manifest: dict) -> dict:
    """One candidate's KD run from the cache; ``{"seconds", "checkpoint"}`` or ``{"error"}``, the same on every
    rank."""
    rank, _ = _rank_and_world()
    prefix, env = launcher(args.nproc)
    cmd = [*prefix, "-m", "run", "--mode", "kd", "-c", args.config, *args.overrides,
           f"model.pretrained_model_name_or_path={path}", "model.anymodel_descriptor=auto",
           "teacher_model.pretrained_model_name_or_path=null", f"teacher_cache.path={args.cache}",
           f"teacher_cache.kind={manifest['kind']}", f"teacher_cache.k={manifest['k']}",
           f"teacher_cache.seed={manifest['seed']}", f"kd_loss_fn.temperature={manifest['temperature']}",
           f"step_scheduler.max_steps={args.steps}", f"step_scheduler.ckpt_every_steps={args.steps}",
           "checkpoint.save_consolidated=true", f"checkpoint.checkpoint_dir={run_dir}"]  # last: these win
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / ("run.log" if rank == 0 else f"run.rank{rank}.log")
    started = time.time()
    with open(log_path, "w") as log:
        code = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.time() - started
    failed = _first_failed_rank(code)
    if failed is not None:
        log_path = run_dir / ("run.log" if failed == 0 else f"run.rank{failed}.log")
        lines = [line for line in log_path.read_text().splitlines() if "error" in line.lower()]
        return {"error": (lines[-1] if lines else "exit code != 0") + f" (log: {log_path})", "seconds": seconds}
    return {"seconds": seconds, "checkpoint": str(run_dir)}


def _first_failed_rank(code: int) -> "int | None":
    """The lowest rank whose KD run exited with an error (this process's own ``code`` without torchrun)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return None if code == 0 else 0
    failed = torch.tensor([dist.get_rank() if code != 0 else dist.get_world_size()])
    dist.all_reduce(failed, op=dist.ReduceOp.MIN)
    return None if int(failed) == dist.get_world_size() else int(failed)


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def ranking(results: dict[str, dict]) -> list[str]:
    """Names by CE after KD, best first; failed runs last."""
    return sorted(results, key=lambda n: (results[n].get("ce_after") is None, results[n].get("ce_after") or 0.0))


def table(results: dict[str, dict], order: list[str], teacher_ce: float | None) -> str:
    lines = ["| rank | candidate | parameters | CE before | CE after | gap recovered | KD seconds |",
             "|---|---|---|---|---|---|---|"]
    for place, name in enumerate(order, 1):
        r = results[name]
        after = "failed" if "error" in r else f"{r['ce_after']:.4f}"
        gap = "" if r.get("gap_recovered") is None else f"{r['gap_recovered']:.1%}"
        lines.append(f"| {place} | {name} | {r['parameters'] / 1e6:.2f} M | {r['ce_before']:.4f} | {after} | {gap} | "
                     f"{r['seconds']:.0f} |")
    if teacher_ce is not None:
        lines.append(f"\nteacher CE {teacher_ce:.4f}")
    return "\n".join(lines)


def tournament(args: argparse.Namespace) -> dict:
    from tools.evaluate import evaluate, gap_recovered

    manifest = check(args)
    paths = candidates(args)
    out = Path(args.out)
    eval_kwargs = dict(text_field=args.text_field, prompt_field=args.prompt_field, answer_field=args.answer_field,
                       seq_length=args.seq_length, tokenizer=args.tokenizer or next(iter(paths.values())))
    with contextlib.redirect_stdout(sys.stderr):
        before = evaluate({**({"teacher": args.teacher} if args.teacher else {}), **paths}, args.data, **eval_kwargs)
    teacher_ce = before.pop("teacher")["ce"] if args.teacher else None
    results = {}
    rank, _ = _rank_and_world()
    for name, path in paths.items():
        if rank == 0:
            print(f"tournament: {name}: KD for {args.steps} steps from {args.cache}", file=sys.stderr, flush=True)
        results[name] = {"path": str(path), "parameters": before[name]["parameters"],
                         "ce_before": before[name]["ce"], **kd_run(name, path, out / name, args, manifest)}
    finished = {n: r["checkpoint"] for n, r in results.items() if "checkpoint" in r}
    with contextlib.redirect_stdout(sys.stderr):
        after = evaluate(finished, args.data, **eval_kwargs) if finished else {}
    for name, r in after.items():
        results[name]["ce_after"] = r["ce"]
        if teacher_ce is not None:
            results[name]["gap_recovered"] = gap_recovered(r["ce"], results[name]["ce_before"], teacher_ce)
    order = ranking(results)
    summary = {"cache": str(args.cache), "kind": manifest["kind"], "k": manifest["k"], "steps": args.steps,
               "teacher_ce": teacher_ce, "ranking": order, "candidates": results}
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(table(results, order, teacher_ce))
    return summary


def main(argv: list[str] | None = None) -> int:
    """The table on rank 0's stdout and 0, or the one-line error (rank 0) and 2."""
    import torch
    import torch.distributed as dist

    from common.errors import PreflightError
    from tools.evaluate import EvaluateError

    args = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # The tool's own group: evaluation's sums (on the GPU where there is one), ports and outcomes (on the CPU).
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    try:
        tournament(args)
    except (TournamentError, EvaluateError, PreflightError) as e:
        if _rank_and_world()[0] == 0:  # every rank raises the same error
            print(f"tournament: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
