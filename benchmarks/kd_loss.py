"""Benchmark ``loss.KDLoss`` against AutoModel 0.7.0's ``KDLoss`` and a plain ``F.kl_div`` on full logits.

    python benchmarks/kd_loss.py            # N in {1024, 4096} x V in {32000, 128256} x {fp32, bf16}, plus TP=2
    python benchmarks/kd_loss.py --quick    # one small shape, fewer reps (a smoke run)
    python benchmarks/kd_loss.py --output benchmarks/kd_loss_results.md

Every measurement runs forward + backward in a fresh subprocess so peak memory is that case's own:

* time: median over a few repetitions after one warm-up;
* memory: peak resident memory above the inputs (VmHWM, reset through /proc/self/clear_refs once the
  inputs exist, minus VmRSS at that point) on CPU, ``torch.cuda.max_memory_allocated`` above the
  inputs on GPU;
* x floor: time over the memory-bandwidth floor, i.e. the bytes that must move (read both logit
  tensors, write the student gradient) divided by the bandwidth of a large tensor copy.

Labels are all valid (the most work per token). A case whose estimated peak does not fit in half the
machine's available memory is reported as skipped instead of being run. The TP rows run our loss on
2 gloo ranks with vocab-sharded local logits and compare per-rank peak memory with a 1-rank group.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LOSSES = ("ours", "automodel", "kl_div")

# Peak memory above the inputs, in units of one fp32 [N, V] tensor, measured at V=32000 on CPU (with
# some margin): AutoModel upcasts and keeps several full-vocab fp32 intermediates, ours the gradient.
_PEAK_FP32_COPIES = {"ours": 1.2, "automodel": 8.5, "kl_div": 6.5}


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


class PeakMemory:
    """Peak memory above the moment ``start`` is called (RSS on CPU, allocator on CUDA)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.base = _proc_status_bytes("VmRSS")

    def above_start(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated() - self.base
        return _proc_status_bytes("VmHWM") - self.base


def _make_loss(name: str):
    if name == "ours":
        sys.path.insert(0, str(REPO))
        from loss import KDLoss

        return KDLoss()
    if name == "automodel":
        from nemo_automodel.components.loss.kd_loss import KDLoss

        return KDLoss()

    def kl_div(student, teacher, labels):
        log_p_s = torch.nn.functional.log_softmax(student, dim=-1, dtype=torch.float32)
        log_p_t = torch.nn.functional.log_softmax(teacher, dim=-1, dtype=torch.float32)
        return torch.nn.functional.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean")

    return kl_div


def _timed_runs(step, reps: int) -> list[float]:
    times = []
    for _ in range(reps + 1):  # the first run is a warm-up
        start = time.perf_counter()
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times[1:]


def worker_single(args) -> dict:
    """One loss, one shape, in this (fresh) process."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    student = torch.randn(args.n, args.v, device=device, dtype=dtype, requires_grad=True)
    teacher = torch.randn(args.n, args.v, device=device, dtype=dtype)
    labels = torch.randint(0, args.v, (args.n,), device=device)
    loss_fn = _make_loss(args.loss)
    memory = PeakMemory(device)
    memory.start()

    def step():
        loss_fn(student, teacher, labels).backward()
        student.grad = None

    times = _timed_runs(step, args.reps)
    return {"time": statistics.median(times), "peak": memory.above_start()}


def _tp_rank(rank: int, world: int, args, port: int, queue):
    import torch.distributed as dist

    sys.path.insert(0, str(REPO))
    from loss import KDLoss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(rank)
    shard = [len(c) for c in torch.arange(args.v).chunk(world)][rank]
    student = torch.randn(args.n, shard, requires_grad=True)
    teacher = torch.randn(args.n, shard)
    labels = torch.ones(args.n, dtype=torch.long)  # identical on every TP rank, as the loss requires
    loss_fn = KDLoss(tp_group=dist.group.WORLD)
    memory = PeakMemory(torch.device("cpu"))
    dist.barrier()
    memory.start()

    def step():
        loss_fn(student, teacher, labels).backward()
        student.grad = None

    times = _timed_runs(step, args.reps)
    queue.put({"rank": rank, "time": statistics.median(times), "peak": memory.above_start()})
    dist.destroy_process_group()


def worker_tp(args) -> dict:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_tp_rank, args=(r, args.world, args, port, queue)) for r in range(args.world)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return {"time": max(r["time"] for r in results), "peak": max(r["peak"] for r in results)}


def worker_bandwidth(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    src = torch.randn(1 << 28, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    times = _timed_runs(lambda: dst.copy_(src), 3)
    return {"bytes_per_s": 2 * src.numel() * src.element_size() / min(times)}


def _run_worker(*argv: str) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(
        [sys.executable, __file__, "--worker", *argv], capture_output=True, text=True, cwd=REPO, env=env
    )
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["exit code %d" % out.returncode])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _gb(x: int) -> str:
    return f"{x / 1e9:.2f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small shape and 2 reps")
    parser.add_argument("--output", type=Path, help="also write the markdown tables to this file")
    parser.add_argument("--worker", choices=["single", "tp", "bandwidth"], help=argparse.SUPPRESS)
    parser.add_argument("--loss", choices=LOSSES)
    parser.add_argument("--n", type=int)
    parser.add_argument("--v", type=int)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    if args.worker:
        result = {"single": worker_single, "tp": worker_tp, "bandwidth": worker_bandwidth}[args.worker](args)
        print(json.dumps(result))
        return

    reps = "2" if args.quick else "3"
    shapes = [(256, 8000)] if args.quick else [(n, v) for v in (32000, 128256) for n in (1024, 4096)]
    tp_shape = (512, 8000) if args.quick else (4096, 32000)
    bandwidth = _run_worker("bandwidth")["bytes_per_s"]
    lines = [
        f"KD loss benchmark, {datetime.date.today()}: {_machine()}, torch {torch.__version__}, copy bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s. Forward + backward, all tokens valid, median of {reps} reps after a warm-up.",
        "",
        "| N | V | dtype | loss | time (s) | x floor | peak above inputs (GB) "
        "| time vs AutoModel | peak vs AutoModel |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    budget = _mem_available() // 2
    for n, v in shapes:
        for dtype in DTYPES:
            for row in _single_process_rows(n, v, dtype, reps, bandwidth, budget):
                lines.append(row)
                print(row, flush=True)

    n, v = tp_shape
    tp = {w: _run_worker("tp", "--world", str(w), "--n", str(n), "--v", str(v), "--reps", reps) for w in (1, 2)}
    tp_lines = [
        "",
        f"Tensor parallel (ours, gloo, one thread per rank, N={n}, V={v}, fp32): per-rank peak memory above inputs.",
        "",
        "| TP | time (s) | per-rank peak (GB) | vs TP=1 |",
        "|---|---|---|---|",
    ]
    for world, r in tp.items():
        if "error" in r or "error" in tp[1]:
            tp_lines.append(f"| {world} | {r.get('error', '')} | | |")
        else:
            tp_lines.append(f"| {world} | {r['time']:.3f} | {_gb(r['peak'])} | {r['peak'] / tp[1]['peak']:.2f}x |")
    print("\n".join(tp_lines), flush=True)
    if args.output:
        args.output.write_text("\n".join(lines + tp_lines) + "\n")


def _single_process_rows(n, v, dtype, reps, bandwidth, budget) -> list[str]:
    elem = DTYPES[dtype].itemsize
    floor = n * v * elem * 3 / bandwidth  # read student and teacher, write the gradient
    results = {}
    for name in LOSSES:
        estimate = n * v * 2 * elem + _PEAK_FP32_COPIES[name] * n * v * 4
        if estimate > budget:
            results[name] = {"error": f"OOM/skipped (needs ~{estimate / 1e9:.0f} GB, budget {budget / 1e9:.0f} GB)"}
        else:
            argv = ["--loss", name, "--n", str(n), "--v", str(v), "--dtype", dtype, "--reps", reps]
            results[name] = _run_worker("single", *argv)
    base = results["automodel"]
    rows = []
    for name, r in results.items():
        if "error" in r:
            cells = [r["error"], "", "", "", ""]
        else:
            versus = ("", "")
            if "error" not in base:
                versus = (f"{r['time'] / base['time']:.2f}x", f"{r['peak'] / base['peak']:.2f}x")
            cells = [f"{r['time']:.3f}", f"{r['time'] / floor:.1f}", _gb(r["peak"]), *versus]
        rows.append("| " + " | ".join([str(n), str(v), dtype, name, *cells]) + " |")
    return rows


def _machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line), platform.machine())
    return f"{model}, {os.cpu_count()} CPU cores, {_mem_total_gb():.0f} GB RAM"


def _mem_total_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return 0.0


if __name__ == "__main__":
    main()
