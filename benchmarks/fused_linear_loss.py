"""The KD loss stage alone, from final hidden states and LM-head weights: our fused linear KD vs the logits
paths (projection, then ``loss.KDLoss`` or AutoModel 0.7.0's ``KDLoss``) vs Liger-Kernel's fused linear JSD,
each against its floor: the four LM-head products any exact KD step must do (student logits, teacher logits,
the hidden-state gradient ``g @ W_s`` and the weight gradient ``g^T @ h_s``), as bare full-size matmuls.

    python benchmarks/fused_linear_loss.py                # GPT-OSS's head: hidden 2880, vocab 201088, bf16
    python benchmarks/fused_linear_loss.py --quick        # tiny shapes, seconds, CPU (the test suite)
    python benchmarks/fused_linear_loss.py --hidden 256 --vocab 32000 201088 --tokens 1024 4096 --dtype fp32

Every case is forward + backward of the KD term over ``tokens`` labelled tokens, student hidden states and
student weight with gradients, teacher without, at temperature 1 with forward KL (Liger's ``jsd_beta=0``): the
term all four compute (Liger computes no CE, so ``kd_ratio`` is 1 in ours and CE is left out of the logits
paths). Each case runs in a fresh subprocess: time is the median of ``--reps`` after a warm-up, memory the peak
above the inputs (``benchmarks/kd_loss.py``'s measure: CUDA allocator peak on a GPU, RSS high-water mark on a
CPU). ``liger`` runs only where ``liger_kernel`` imports and a CUDA GPU is present (its kernels are Triton);
elsewhere its row says so. A case whose logits would not fit in half the free memory is skipped.
"""

import argparse
import datetime
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from kd_loss import DTYPES, PeakMemory, _gb, _machine, _mem_available, _timed_runs

REPO = Path(__file__).resolve().parents[1]
# floor and logits_ours first: the other rows are compared with them.
PATHS = ("floor", "logits_ours", "logits_automodel", "fused", "liger")
# Peak above the inputs of the logits paths, in fp32 [tokens, vocab] tensors (both logits, their gradient and
# the losses' fp32 intermediates; kd_loss.py measured the last at 1.2 and 8.5 copies).
_LOGITS_COPIES = {"floor": 2, "logits_ours": 3.2, "logits_automodel": 10.5}


def _loss_step(path: str, h_s, w_s, h_t, w_t, labels):
    """A closure running forward + backward of ``path`` once."""
    if path == "floor":  # the logits stand in for their gradient: same shape, same products

        def products():
            with torch.no_grad():
                h_t @ w_t.T
                g = h_s @ w_s.T
                g @ w_s
                g.T @ h_s

        return products
    if path == "fused":
        from distillation.fused_linear_kd import FusedLinearKDLoss

        loss_fn = FusedLinearKDLoss(kd_ratio=1.0)
        return lambda: loss_fn(h_s, w_s, h_t, w_t, labels)[0].backward()
    if path == "liger":
        from liger_kernel.transformers import LigerFusedLinearJSD

        loss_fn = LigerFusedLinearJSD(jsd_beta=0.0)
        return lambda: loss_fn(h_s, w_s, h_t, w_t, labels).backward()
    if path == "logits_ours":
        from loss import KDLoss
    else:
        from nemo_automodel.components.loss.kd_loss import KDLoss
    loss_fn = KDLoss()

    def step():
        with torch.no_grad():
            teacher_logits = h_t @ w_t.T
        loss_fn(h_s @ w_s.T, teacher_logits, labels).backward()

    return step


def worker(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype, (tokens,), (vocab,), hidden = DTYPES[args.dtype], args.tokens, args.vocab, args.hidden
    torch.manual_seed(0)
    h_s = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    w_s = (torch.randn(vocab, hidden, device=device, dtype=dtype) / hidden**0.5).requires_grad_()
    h_t = torch.randn(tokens, hidden, device=device, dtype=dtype)
    w_t = torch.randn(vocab, hidden, device=device, dtype=dtype) / hidden**0.5
    labels = torch.randint(0, vocab, (tokens,), device=device)
    step = _loss_step(args.path, h_s, w_s, h_t, w_t, labels)
    memory = PeakMemory(device)
    memory.start()

    def step_and_clear():
        step()
        h_s.grad = w_s.grad = None

    times = _timed_runs(step_and_clear, args.reps)
    return {"time": statistics.median(times), "peak": memory.above_start()}


def _liger_missing() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (Triton kernels)"
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return "liger_kernel not installed"
    return None


def _run(path, tokens, vocab, args) -> dict:
    argv = ["--worker", "--path", path, "--tokens", str(tokens), "--vocab", str(vocab), "--hidden", str(args.hidden),
            "--dtype", args.dtype, "--reps", str(args.reps)]
    out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        errors = [line for line in out.stderr.splitlines() if "Error" in line] or [f"exit code {out.returncode}"]
        return {"error": errors[-1].strip()[:120]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2880)
    parser.add_argument("--vocab", type=int, nargs="+", default=[201088])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="hidden 64, vocab 8000, 256 tokens, fp32, 2 reps")
    parser.add_argument("--output", type=Path, help="also write the markdown table to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        sys.path.insert(0, str(REPO))
        print(json.dumps(worker(args)))
        return
    if args.quick:
        args.hidden, args.vocab, args.tokens, args.dtype, args.reps = 64, [8000], [256], "fp32", 2

    free = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else _mem_available()
    lines = [f"KD loss stage from hidden states, {datetime.date.today()}: {_machine()}, torch {torch.__version__}; "
             f"hidden {args.hidden}, {args.dtype}, forward KL, forward + backward, median of {args.reps} reps.", "",
             "| tokens | vocab | path | time (s) | peak above inputs (GB) | time vs floor | time vs logits_ours "
             "| peak vs logits_ours |", "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    liger_missing = _liger_missing()
    for vocab in args.vocab:
        for tokens in args.tokens:
            results = {}
            for path in PATHS:
                need = _LOGITS_COPIES.get(path, 0) * tokens * vocab * 4
                if path == "liger" and liger_missing:
                    results[path] = {"error": f"not run: {liger_missing}"}
                elif need > free / 2:
                    results[path] = {"error": f"skipped: needs ~{need / 1e9:.0f} GB, half the free memory is "
                                              f"{free / 2e9:.0f} GB"}
                else:
                    results[path] = _run(path, tokens, vocab, args)
                lines.append(_row(tokens, vocab, path, results))
                print(lines[-1], flush=True)
    if args.output:
        args.output.write_text("\n".join(lines) + "\n")


def _row(tokens, vocab, path, results) -> str:
    r, floor, base = results[path], results.get("floor", {}), results.get("logits_ours", {})
    if "error" in r:
        return f"| {tokens} | {vocab} | {path} | {r['error']} | | | | |"
    versus = [f"{r[k] / ref[k]:.2f}x" if k in ref and ref[k] > 0 else ""
              for ref, k in ((floor, "time"), (base, "time"), (base, "peak"))]
    return f"| {tokens} | {vocab} | {path} | {r['time']:.3f} | {_gb(r['peak'])} | {' | '.join(versus)} |"


if __name__ == "__main__":
    main()
