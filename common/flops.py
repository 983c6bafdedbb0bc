"""Model FLOPs of heterogeneous decoder stacks, read off the built modules, for the recipe's ``mfu``.

AutoModel's FLOPs formulas take one config for every layer; a Puzzletron student has a different
FFN width, KV-head count or no attention at all from one layer to the next. So the count here walks
the modules that exist: every ``nn.Linear`` (``2 * in * out`` per token) and, per attention block,
the score and value products (``4 * seq * num_heads * head_dim`` per token, the non-causal count
used by the PaLM MFU definition). Embedding lookups cost nothing.

Weights are read with their global shapes (a ``DTensor`` reports the unsharded shape), so FSDP and
TP count the whole model on every rank; under PP each rank holds only its stages and the counts are
summed over the ``pp`` group.
"""

import torch
import torch.distributed as dist
from torch import nn

# Dense bf16 tensor-core peak per GPU, TFLOP/s (vendor datasheets, no sparsity). Matched on the
# CUDA device name; set ``mfu_peak_tflops`` in the config for anything else (a CPU included).
PEAK_TFLOPS = {"GB200": 2500.0, "B200": 2250.0, "H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}


def device_peak_tflops() -> float | None:
    """Peak dense bf16 TFLOP/s of this process's GPU, or None where it is not known."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def forward_flop_coefficients(parts: list[nn.Module], pp_group=None) -> tuple[float, float]:
    """``(linear, attention)``: forward FLOPs per token are ``linear + attention * seq_len``.

    Args:
        parts: The model parts this rank holds (one module, or its pipeline stages).
        pp_group: Process group over pipeline stages, whose counts are summed; None without PP.
    """
    linear = attention = 0.0
    for part in parts:
        for module in part.modules():
            if isinstance(module, nn.Linear):
                out_features, in_features = module.weight.shape
                linear += 2.0 * in_features * out_features
            q_proj = getattr(module, "q_proj", None)
            if isinstance(q_proj, nn.Linear):
                attention += 4.0 * q_proj.weight.shape[0]
    counts = torch.tensor([linear, attention], dtype=torch.float64)
    if pp_group is not None:
        dist.all_reduce(counts, group=pp_group)
    return counts[0].item(), counts[1].item()


def kd_step_flops(student: tuple[float, float], teacher: tuple[float, float], tokens: int, seq_len: int) -> float:
    """Model FLOPs of one KD step: student forward + backward (3x forward) and teacher forward."""

    def forward(coefficients):
        linear, attention = coefficients
        return tokens * (linear + attention * seq_len)

    return 3.0 * forward(student) + forward(teacher)
