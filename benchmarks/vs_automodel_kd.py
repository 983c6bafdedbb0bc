"""Our KD recipe against AutoModel 0.7.0's own, measured as issue 21 does: FSDP2 on 2 ranks, alternating rounds.

    python benchmarks/vs_automodel_kd.py                          # 3 rounds of 24 steps, vocabularies 512 and 32,000
    python benchmarks/vs_automodel_kd.py --vocab 512 --rounds 1 --steps 8 --compute bf16

Each round runs back to back: our recipe on the logits path (``fused_linear_loss=false``), AutoModel's
``KnowledgeDistillationRecipeForNextTokenPrediction`` with its ``KDLoss``, and our recipe's fused path (kd.yaml's
default). The table gives each recipe's median tokens/s over the rounds and the median of its per-round ratios to
AutoModel's (one round alone varies by a third on a 2-core machine). Every run is a real ``torchrun`` through
``benchmarks/recipe_step.py``'s worker.

Models: at vocabulary 512 the 4-layer hidden-64 Qwen3 pair of ``tools/build_checkpoints.py`` (AnyModel student);
otherwise ``benchmarks/fused_kd_step.py``'s 2-layer hidden-64 Qwen3 pair with that many logits. Data: SQuAD-style
rows (``write_squad_like_data``), the loss on the answer only, the prompt masked, as in instruction tuning; global
batch 4. ``--compute bf16`` keeps AutoModel's default FSDP2 mixed precision (emulated, slowly, on CPUs without
AVX512-BF16); ``fp32`` (the default) computes in fp32.
"""

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fused_kd_step  # noqa: E402
import recipe_step  # noqa: E402

REPO = recipe_step.REPO
# name: (recipe_step worker, overrides); AutoModel's recipe has no fused path, and our preflight checks its config too.
RECIPES = {"ours, logits path": ("ours", ["fused_linear_loss=false"]),
           "AutoModel KD": ("automodel", ["fused_linear_loss=false"]),
           "ours, fused": ("ours", ["fused_linear_loss=true"])}


def models(root: Path, vocab: int) -> tuple[Path, Path, str]:
    """``(student, teacher, descriptor)`` for ``vocab``."""
    from tools.build_checkpoints import build

    if vocab == 512:
        paths = build(root / "qwen3", "qwen3")
        return paths["student"], paths["teacher"], "qwen3"
    student, teacher = fused_kd_step.build_pair(root / f"v{vocab}", vocab)
    return student, teacher, "null"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[512, 32000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=4, help="first steps left out of each run's median")
    parser.add_argument("--compute", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--port", type=int, default=29571)
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from tools.build_checkpoints import write_squad_like_data

    print(f"2 CPU ranks (gloo), FSDP2, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{datetime.date.today()}; {args.compute} compute, {args.steps} steps of global batch 4, medians after "
          f"{args.warmup} warm-up steps, {args.rounds} alternating rounds.\n\n"
          "| vocab | recipe | tokens/s (median of rounds) | vs AutoModel KD (median of round ratios) | rounds |\n"
          "|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_squad_like_data(tmp / "data")
        for vocab in args.vocab:
            student, teacher, descriptor = models(tmp, vocab)
            tps = {name: [] for name in RECIPES}
            for round_ in range(args.rounds):
                for name, (worker, overrides) in RECIPES.items():
                    # run_case appends data_overrides to every run: the data, the compute and this recipe's path.
                    case = argparse.Namespace(
                        student=student, teacher=teacher, descriptor=descriptor, steps=args.steps, global_batch=4,
                        warmup=args.warmup, port=args.port,
                        data_overrides=[f"dataset.dataset_name={data}", f"validation_dataset.dataset_name={data}",
                                        *(fused_kd_step.compute_overrides("float32") if args.compute == "fp32" else []),
                                        *overrides])
                    result = recipe_step.run_case(worker, "FSDP2 (dp=2)", case, tmp / f"{vocab}-{round_}-{worker}")
                    if "error" in result:
                        sys.exit(f"vs_automodel_kd.py: {name} at vocab {vocab} failed: {result['error']}")
                    tps[name].append(result["tps"])
            for name, values in tps.items():
                ratio = statistics.median(v / ref for v, ref in zip(values, tps["AutoModel KD"]))
                rounds = ", ".join(f"{v:.0f}" for v in values)
                print(f"| {vocab:,} | {name} | {statistics.median(values):.0f} | {ratio:.2f}x | {rounds} |", flush=True)


if __name__ == "__main__":
    main()
