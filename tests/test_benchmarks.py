"""benchmarks/gpu_check.sh works before any GPU runs it: its Python, at tiny sizes on CPU (``--dry-run``),
produces every table row with numbers; the demo's step timing spreads the machine's drift over its three paths."""

import os
import subprocess

from conftest import REPO


def test_gpu_check_dry_run_measures_every_path_of_the_kd_step_the_loss_and_the_loss_stage(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1", "PYTHON": os.sys.executable}
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in (tmp_path / "kd_step.md").read_text().splitlines()
            if line.startswith("| 1 | 4096 | 64 |")]
    assert [row[3].strip() for row in rows] == ["unfused", "fused", "automodel"]
    for row in rows:
        peak, step = float(row[4]), float(row[5])
        assert peak > 0 and step > 0
    longest = [[cell.strip() for cell in line.split("|")[1:-1]] for line in (tmp_path / "kd_step.md").read_text()
               .splitlines() if line.startswith("| 1 | 4096 |") and line.count("|") == 7]  # the longest-sequence table
    assert [row[3:5] for row in longest] == [["unfused", "64"], ["fused", "64"], ["automodel", "64"]]
    assert "ours" in (tmp_path / "kd_loss.md").read_text()
    head = {row[2].strip(): row[3:6] for row in (line.split("|")[1:-1] for line in
            (tmp_path / "fused_linear_loss.md").read_text().splitlines() if line.startswith("| 256 | 8000 |"))}
    assert list(head) == ["floor", "logits_ours", "logits_automodel", "fused", "liger"]
    for path in ("floor", "logits_ours", "logits_automodel", "fused"):
        assert float(head[path][0]) > 0 and float(head[path][1]) > 0, head[path]
    assert head["fused"][2].strip().endswith("x")  # its time against the four bare products
    assert head["liger"][0].strip().startswith("not run")  # no CUDA GPU here


def test_the_demo_rounds_run_each_path_first_middle_and_last_once_in_three_rounds(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from cached_kd_step import DEMO_PATHS, rotations

    orders = rotations(DEMO_PATHS, 3)
    assert orders == [("ce_only", "cached", "online"), ("cached", "online", "ce_only"),
                      ("online", "ce_only", "cached")]
    for position in range(3):
        assert sorted(order[position] for order in orders) == sorted(DEMO_PATHS)
