"""Shared fixtures: tiny real checkpoints (built once per session) and a 2-process launcher."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import preloaded_ranks  # noqa: E402
from modelopt.torch.puzzletron.anymodel.puzzformer import no_op  # noqa: E402
from tools.build_checkpoints import build, write_squad_like_data  # noqa: E402


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    """``{"llama": {"teacher", "student"}, "qwen3": {...}, "gpt_oss": {...}, "data": dir}``: teacher in HF
    layout, heterogeneous student in ModelOpt's AnyModel layout, SQuAD-format local data."""
    root = tmp_path_factory.mktemp("ckpts")
    out = {arch: build(root / arch, arch) for arch in ("llama", "qwen3", "gpt_oss")}
    out["data"] = write_squad_like_data(root / "data")
    return out


def checkpoint_tensors(path) -> dict:
    """Every tensor of a safetensors checkpoint, following its index into subfolders if it has one."""
    from safetensors.torch import load_file

    path = Path(path)
    index = path / "model.safetensors.index.json"
    files = set(json.loads(index.read_text())["weight_map"].values()) if index.exists() else {"model.safetensors"}
    return {k: v for f in sorted(files) for k, v in load_file(path / f).items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker, out_dir: Path, nprocs: int = 2) -> list[dict]:
    """Run ``worker(rank, port, out_dir)`` on ``nprocs`` spawned processes (one thread each); return what each
    rank wrote to ``out_dir/rank<N>.json``. A rank that crashes fails the caller."""
    import torch.multiprocessing as mp

    port = free_port()
    with mock.patch.dict(os.environ, {"OMP_NUM_THREADS": "1"}):
        mp.spawn(worker, args=(port, str(out_dir)), nprocs=nprocs)
    return [json.loads((Path(out_dir) / f"rank{r}.json").read_text()) for r in range(nprocs)]


def leave_rank(rank: int, out_dir, results) -> None:
    """End a spawned gloo rank: write its results, wait for the other ranks, and exit without interpreter
    teardown, which after gloo sometimes aborts ("terminate called without an active exception")."""
    import torch.distributed as dist

    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    # No rank may tear down its gloo threads while another is still in a collective.
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def torchrun(args: list[str], nproc: int = 2, timeout: int = 300, env: dict | None = None):
    """Run ``python -m torch.distributed.run --nproc_per_node=N <args>`` from the repo root on CPU."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", *args]
    return subprocess.run(cmd, cwd=REPO, env=_job_env(env), capture_output=True, text=True, timeout=timeout)


def run_job(args: list[str], nproc: int = 2, timeout: int = 300, env: dict | None = None):
    """``torchrun(["-m", module, ...])`` with the ranks forked from a preloaded interpreter
    (``preloaded_ranks.py``): the same job, without importing the stack again for every rank."""
    return preloaded_ranks.launch(args, nproc, free_port(), _job_env(env), timeout)


def _job_env(env: dict | None) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}


@pytest.fixture(scope="module")
def patched():
    """AutoModel patched as ``run.py`` patches it (AnyModel builds; CPU stand-ins where CUDA is absent)."""
    import torch

    from common import cpu_support
    import patch_automodel

    if not torch.cuda.is_available():
        cpu_support.apply()
    patch_automodel.apply_patch()
    yield
    patch_automodel.remove_patch()


@pytest.fixture(scope="module")
def unpatch_automodel_after_module():
    """For modules whose code under test patches AutoModel as ``run.py`` does (``tools.evaluate``): later test
    modules expect it unpatched."""
    yield
    import patch_automodel

    patch_automodel.remove_patch()


def assert_same_training(got, ref, keys, steps: int, rel: float = 1e-4):
    """Two runs' ``(training rows, validation rows)`` agree: every step's ``keys`` and every validation loss."""
    (got_train, got_val), (ref_train, ref_val) = got, ref
    assert [r["step"] for r in got_train] == list(range(steps))
    for g, r in zip(got_train, ref_train, strict=True):
        for key in keys:
            assert g[key] == pytest.approx(r[key], rel=rel), (g["step"], key)
    assert [v["val_loss"] for v in got_val] == pytest.approx([v["val_loss"] for v in ref_val], rel=rel)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# Hidden-state KD on every layer, for the descriptor parity runs (each descriptor's layers are found and paired).
HIDDEN_KD = ["hidden_kd.weight=0.5", "hidden_kd.loss=mse"]
HIDDEN_KD_KEYS = ("loss", "ce_loss", "kd_loss", "hidden_loss", "grad_norm")

# AutoModel's FSDP2 default computes in bf16; comparisons between runs need fp32 compute.
FP32_COMPUTE = [
    "distributed.mp_policy._target_=torch.distributed.fsdp.MixedPrecisionPolicy",
    "distributed.mp_policy.param_dtype=float32",
    "distributed.mp_policy.reduce_dtype=float32",
]


def tiny_overrides(ckpts, arch: str, out_dir: Path, steps: int = 3, teacher: bool = True) -> list[str]:
    """The overrides that point kd.yaml (``teacher=True``) or pretrain.yaml at the tiny
    checkpoints and local data, in fp32 (weights and FSDP2 compute: bf16 matmuls are emulated, 50x slower, on
    AVX2-only CPUs). A GPT-OSS teacher is built with its descriptor, so that
    student and teacher are the same (transformers') implementation."""
    paths = ckpts[arch]
    teacher_args = [
        f"teacher_model.pretrained_model_name_or_path={paths['teacher']}",
        "teacher_model.torch_dtype=float32",
        *([f"teacher_model.anymodel_descriptor={arch}"] if arch == "gpt_oss" else []),
    ]
    return [
        f"model.pretrained_model_name_or_path={paths['student']}",
        f"model.anymodel_descriptor={arch}",
        "model.torch_dtype=float32",
        *(teacher_args if teacher else []),
        f"dataset.dataset_name={ckpts['data']}",
        f"validation_dataset.dataset_name={ckpts['data']}",
        f"step_scheduler.max_steps={steps}",
        "step_scheduler.global_batch_size=4",
        "step_scheduler.local_batch_size=2",
        f"step_scheduler.val_every_steps={steps}",
        f"checkpoint.checkpoint_dir={out_dir}",
        *FP32_COMPUTE,
    ]


def parity_run(ckpts, arch: str, out_dir: Path, mode: str, nproc: int, extra: list[str], steps: int):
    """One ``run.py`` job of a parity matrix on ``arch``'s tiny pair: fp32 compute, local batch 4 unless ``extra``
    says otherwise, validation after the last step, hidden-state KD in KD mode. ``(training rows, validation rows)``."""
    args = [*tiny_overrides(ckpts, arch, out_dir, steps=steps, teacher=mode == "kd"),
            "step_scheduler.local_batch_size=4", f"step_scheduler.val_every_steps={steps}",
            "step_scheduler.ckpt_every_steps=100", *(HIDDEN_KD if mode == "kd" else []), *extra]
    result = run_job(["-m", "run", "--mode", mode, *args], nproc=nproc)
    assert result.returncode == 0, f"{arch} {out_dir.name}: {result.stderr[-4000:]}"
    return read_jsonl(out_dir / "training.jsonl"), read_jsonl(out_dir / "validation.jsonl")


def assert_layer_follows_block_config(layer, block, config):
    """Every field of ``block`` shows in the shapes (or the routing) of ``layer``."""
    attention, ffn = block["attention"], block["ffn"]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if attention.get("no_op"):
        assert isinstance(layer.self_attn, no_op.MatchingZeros) or not hasattr(layer.self_attn, "q_proj")
    else:
        kv_heads = attention.get("num_key_value_heads", config.num_key_value_heads)
        assert layer.self_attn.k_proj.out_features == layer.self_attn.v_proj.out_features == kv_heads * head_dim
        assert layer.self_attn.q_proj.out_features == config.num_attention_heads * head_dim
    if ffn.get("no_op"):
        assert not hasattr(layer.mlp, "down_proj") and not hasattr(layer.mlp, "experts")
    elif "moe" in ffn:
        moe = ffn["moe"]
        experts, width = moe["num_local_experts"], moe["expert_intermediate_dim"]
        assert tuple(layer.mlp.router.weight.shape) == (experts, config.hidden_size)
        assert layer.mlp.router.top_k == moe["num_experts_per_tok"]
        assert tuple(layer.mlp.experts.gate_up_proj.shape) == (experts, config.hidden_size, 2 * width)
        assert tuple(layer.mlp.experts.down_proj.shape) == (experts, width, config.hidden_size)
    else:
        assert layer.mlp.up_proj.out_features == layer.mlp.down_proj.in_features == ffn["intermediate_size"]
