"""The README's multi-node launch, on one machine: two torchrun agents (``--nnodes=2 --nproc_per_node=1``)
meeting through c10d rendezvous on 127.0.0.1 train exactly like one agent with 2 processes."""

import os
import subprocess
import sys

import pytest

from conftest import REPO, free_port, read_jsonl, tiny_overrides, torchrun


def test_two_nodes_by_c10d_rendezvous_give_the_losses_of_two_local_processes(ckpts, tmp_path):
    args = ["-m", "run", "--mode", "kd"]
    local = torchrun([*args, *tiny_overrides(ckpts, "llama", tmp_path / "local")])
    assert local.returncode == 0, local.stderr[-3000:]

    endpoint = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={node}",
         "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", "--rdzv_id=kd-test",
         *args, *tiny_overrides(ckpts, "llama", tmp_path / "nodes")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    for agent in agents:
        _, err = agent.communicate(timeout=300)
        assert agent.returncode == 0, err[-3000:]

    for two_nodes, two_processes in zip(read_jsonl(tmp_path / "nodes" / "training.jsonl"),
                                        read_jsonl(tmp_path / "local" / "training.jsonl"), strict=True):
        for key in ("loss", "ce_loss", "kd_loss", "grad_norm", "num_label_tokens"):
            assert two_nodes[key] == pytest.approx(two_processes[key], rel=1e-6), (two_nodes["step"], key)
