"""Run AutoModel 0.7.0's recipes on a machine without CUDA (a laptop, a CI box).

``run.py`` calls :func:`apply` only when ``torch.cuda.is_available()`` is false; with CUDA present
nothing here runs, so the GPU path is AutoModel's own. Each stand-in replaces one CUDA-only call
that AutoModel makes unconditionally:

* ``torch.cuda.reset_peak_memory_stats`` / ``max_memory_allocated``: the recipes reset and log
  peak memory; on CPU they track the process's peak RSS instead, so ``mem`` in the logs is real.
* ``torch.cuda.current_device``: AutoModel builds ``torch.device("cuda", current_device())`` for
  the model and pipeline; the infrastructure entry points are wrapped to place them on CPU.
* ``torch.cuda.synchronize``: called by the pipeline-parallel stage setup; nothing to wait for.
* AutoModel's fp32 RMSNorm (its own Llama/Qwen implementations) is ``torch.compile``-d; on CPU,
  inductor fails on its sequence-parallel (DTensor) inputs, so the same op runs uncompiled.
* The ``dist_env.backend`` of the config: NCCL needs GPUs, so multi-process CPU runs use ``gloo``.
"""

import resource
from functools import wraps

import torch

_applied = False


def _reset_peak_memory_stats(device=None) -> None:
    """The process's peak RSS cannot be reset, so the logged peak is the peak since start."""


def _max_memory_allocated(device=None) -> int:
    """Peak resident memory of this process, in bytes (the CPU analogue of the CUDA allocator peak)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss is KiB on Linux


def _on_cpu(fn):
    """Wrap an AutoModel infrastructure function so its ``device`` argument is the CPU."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = torch.device("cpu")
        return fn(*args, **kwargs)

    return wrapper


def apply() -> None:
    """Install the CPU stand-ins. Idempotent; refuses to run where CUDA is available."""
    global _applied
    if _applied:
        return
    if torch.cuda.is_available():
        raise RuntimeError("cpu_support.apply() called on a machine with CUDA; the GPU path must stay untouched")

    torch.cuda.reset_peak_memory_stats = _reset_peak_memory_stats
    torch.cuda.max_memory_allocated = _max_memory_allocated
    torch.cuda.current_device = lambda: 0
    torch.cuda.synchronize = lambda device=None: None

    from nemo_automodel._transformers import auto_model
    from nemo_automodel.components.models.common import utils as model_utils
    from nemo_automodel.recipes.llm import train_ft

    model_utils._float32_rms_norm_fwd = torch.ops.nemo_automodel.float32_rms_norm

    for module in (auto_model, train_ft):
        for name in ("instantiate_infrastructure", "apply_model_infrastructure"):
            if hasattr(module, name):
                setattr(module, name, _on_cpu(getattr(module, name)))
    _applied = True


def is_applied() -> bool:
    return _applied


def use_gloo(cfg) -> None:
    """Point the config's process group at ``gloo``: the only backend that runs without GPUs."""
    dist_env = cfg.get("dist_env", None)
    if dist_env is None:
        cfg.set_by_dotted("dist_env.backend", "gloo")
    else:
        dist_env.backend = "gloo"
