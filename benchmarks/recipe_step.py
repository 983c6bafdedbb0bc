"""Step time and tokens/s of our KD recipe vs AutoModel 0.7.0's own KD recipe, and KD vs a pretrain step.

    python benchmarks/recipe_step.py                       # tiny Llama pair, FSDP2 / TP=2 / PP=2 on 2 ranks
    python benchmarks/recipe_step.py --student S --teacher T --data D --descriptor llama
    python benchmarks/recipe_step.py --demo demo_out --global-batch 32   # the models `make demo` built
    python benchmarks/recipe_step.py --output benchmarks/recipe_step_results.md

Every cell is a real ``torchrun --nproc_per_node=2`` run of the same config through ``run.py``
(so both KD recipes load the heterogeneous student with our patch and run on CPU with our
stand-ins). The three recipes differ only in what trains:

* ``ours``: ``recipe.KnowledgeDistillationRecipeForNextTokenPrediction`` with ``loss.KDLoss``;
* ``automodel``: AutoModel's ``KnowledgeDistillationRecipeForNextTokenPrediction`` with its ``KDLoss``;
* ``pretrain``: AutoModel's ``TrainFinetuneRecipeForNextTokenPrediction`` on the student (no teacher).

Step time is ``num_tokens_per_step / tps`` from ``training.jsonl``, median over the steps after
the first ``--warmup``; tokens/s is the median ``tps``. A run that fails is reported with the
last line of its error instead of numbers.
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
# Overrides and data-parallel size; each rank's local batch is global batch / dp (no accumulation).
PARALLELISMS = {
    "FSDP2 (dp=2)": ([], 2),
    "TP=2": (["distributed.tp_size=2"], 1),
    "PP=2": (["distributed.pp_size=2", "distributed.pipeline.pp_microbatch_size=2"], 1),
}
RECIPES = ("ours", "automodel", "pretrain")
NOISE = ("ChildFailedError", "Connection closed by peer", "Connection reset by peer")
AUTOMODEL_KD_LOSS = "nemo_automodel.components.loss.kd_loss.KDLoss"


def worker(recipe: str, argv: list[str]) -> None:
    """Runs inside torchrun: build the config as ``run.py`` does, then train with ``recipe``."""
    sys.path.insert(0, str(REPO))
    import run

    Recipe, cfg = run.prepare(argv)
    if recipe == "automodel":
        from nemo_automodel.recipes.llm.kd import KnowledgeDistillationRecipeForNextTokenPrediction as Recipe
    trainer = Recipe(cfg)
    trainer.setup()
    trainer.run_train_validation_loop()
    _write_peak(Path(cfg.get("checkpoint.checkpoint_dir")))
    import torch.distributed as dist

    dist.destroy_process_group()
    # As run.py does: interpreter teardown after gloo sometimes aborts; the logs are closed.
    sys.stdout.flush()
    os._exit(0)


def _write_peak(out_dir: Path) -> None:
    """This rank's peak memory in GB, to ``peak_rank<N>.json``: the CUDA allocator's, else the process's peak RSS
    (the teacher ranks of separate meshes log nothing themselves)."""
    import resource

    import torch

    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"peak_rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps({"peak_gb": peak / 1e9}))


def run_case(recipe: str, parallelism: str, args, out_dir: Path) -> dict:
    mode = "pretrain" if recipe == "pretrain" else "kd"
    parallel, dp = PARALLELISMS[parallelism]
    overrides = [
        f"model.pretrained_model_name_or_path={args.student}",
        f"model.anymodel_descriptor={args.descriptor}",
        *args.data_overrides,
        f"step_scheduler.max_steps={args.steps}",
        f"step_scheduler.global_batch_size={args.global_batch}",
        f"step_scheduler.local_batch_size={args.global_batch // dp}",
        f"step_scheduler.val_every_steps={args.steps + 1}",
        "checkpoint.enabled=false",
        f"checkpoint.checkpoint_dir={out_dir}",
        *parallel,
    ]
    if mode == "kd":
        overrides.append(f"teacher_model.pretrained_model_name_or_path={args.teacher}")
    if recipe == "automodel":
        overrides.append(f"kd_loss_fn._target_={AUTOMODEL_KD_LOSS}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={args.port}",
           __file__, "--worker", recipe, "--mode", mode, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    log = out_dir / "training.jsonl"
    if result.returncode != 0 or not log.exists():
        # The root cause, not the other rank's "connection closed" or torchrun's summary.
        errors = [line.split("]:")[-1].strip() for line in result.stderr.splitlines()
                  if "Error:" in line and not any(noise in line for noise in NOISE)]
        return {"error": (errors[0] if errors else f"exit code {result.returncode}")[:120]}
    rows = [json.loads(line) for line in log.read_text().splitlines()][args.warmup:]
    return {
        "step_s": statistics.median(r["num_tokens_per_step"] / r["tps"] for r in rows),
        "tps": statistics.median(r["tps"] for r in rows),
    }


def build_tiny(root: Path) -> tuple[Path, Path, Path]:
    from tools.build_checkpoints import build, write_squad_like_data

    paths = build(root / "llama", "llama")
    return paths["student"], paths["teacher"], write_squad_like_data(root / "data")


def demo_models(demo_dir: Path) -> tuple[Path, Path, list[str]]:
    """The pruned student, the pretrained teacher and the column-mapped data of a ``make demo`` run."""
    from tools.demo import dataset_overrides, final_checkpoint

    if not (demo_dir / "student_init" / "config.json").exists():
        sys.exit(f"{Path(sys.argv[0]).name}: error: {demo_dir} holds no demo student; run `make demo` first")
    try:
        teacher = final_checkpoint(demo_dir / "teacher")
    except FileNotFoundError as e:
        sys.exit(f"{Path(sys.argv[0]).name}: error: {e}; run `make demo` first")
    return demo_dir / "student_init", teacher, dataset_overrides(demo_dir / "data")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", type=Path)
    parser.add_argument("--teacher", type=Path)
    parser.add_argument("--data", type=Path, help="directory with SQuAD-format train.jsonl / validation.jsonl")
    parser.add_argument("--descriptor", default="llama")
    parser.add_argument("--demo", type=Path, help="benchmark the models of a `make demo` output directory")
    parser.add_argument("--global-batch", type=int, default=4, help="sequences per step (even, for dp=2)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians")
    parser.add_argument("--port", type=int, default=29561)
    parser.add_argument("--output", type=Path, help="also write the markdown table to this file")
    parser.add_argument("--worker", choices=RECIPES, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.worker:
        return worker(args.worker, rest)
    if args.global_batch < 2 or args.global_batch % 2:
        parser.error(f"--global-batch {args.global_batch}: pass an even number, FSDP2 splits it over 2 ranks")

    sys.path.insert(0, str(REPO))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.demo:
            args.student, args.teacher, args.data_overrides = demo_models(args.demo.resolve())
        else:
            if args.student is None:
                args.student, args.teacher, args.data = build_tiny(tmp / "ckpts")
            args.data_overrides = [f"dataset.dataset_name={args.data}", f"validation_dataset.dataset_name={args.data}"]
        lines = [
            f"2 CPU ranks (gloo), {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{datetime.date.today()}; {args.steps} steps of global batch {args.global_batch}, "
            f"medians after {args.warmup} warm-up steps.",
            "",
            "| parallelism | recipe | step time (s) | tokens/s | vs AutoModel KD | vs pretrain step |",
            "|---|---|---|---|---|---|",
        ]
        print("\n".join(lines), flush=True)
        for parallelism in PARALLELISMS:
            results = {r: run_case(r, parallelism, args, tmp / f"{r}-{parallelism.split()[0]}") for r in RECIPES}
            for recipe, res in results.items():
                if "error" in res:
                    row = f"| {parallelism} | {recipe} | fails: {res['error']} | | | |"
                else:
                    ratios = [f"{res['step_s'] / results[ref]['step_s']:.2f}x" if "step_s" in results[ref] else ""
                              for ref in ("automodel", "pretrain")]
                    row = f"| {parallelism} | {recipe} | {res['step_s']:.3f} | {res['tps']:.0f} | {ratios[0]} | {ratios[1]} |"
                lines.append(row)
                print(row, flush=True)
    if args.output:
        args.output.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
