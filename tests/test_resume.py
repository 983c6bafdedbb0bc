"""Resume after preemption, as clusters do it: onto another layout or number of processes, and with the
student staged somewhere else. The reference is one uninterrupted 2-rank (dp=2) run of 4 steps; the
interrupted run trains steps 0-1 with dp=2 and checkpoints, and each resume trains steps 2-3 (fp32)."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from conftest import read_jsonl, run_job, tiny_overrides

STEPS = 4
LOSSES = ("loss", "ce_loss", "kd_loss", "grad_norm", "num_label_tokens")


def kd(ckpts, out_dir, steps, nproc=2, student=None, extra=()):
    args = [*tiny_overrides(ckpts, "llama", out_dir, steps=steps),
            "step_scheduler.ckpt_every_steps=2", "step_scheduler.val_every_steps=100", *extra]
    if student is not None:
        args.append(f"model.pretrained_model_name_or_path={student}")
    return run_job(["-m", "run", "--mode", "kd", *args], nproc=nproc)


@pytest.fixture(scope="module")
def reference(ckpts, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    result = kd(ckpts, out, STEPS)
    assert result.returncode == 0, result.stderr[-3000:]
    return read_jsonl(out / "training.jsonl")


@pytest.fixture(scope="module")
def interrupted(ckpts, tmp_path_factory):
    """A checkpoint_dir after 2 of the 4 steps, under dp=2."""
    out = tmp_path_factory.mktemp("interrupted")
    result = kd(ckpts, out, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in read_jsonl(out / "training.jsonl")] == [0, 1]
    return out


def resumed_copy(interrupted, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(interrupted, out, symlinks=True)
    return out


def assert_continues_like_the_uninterrupted_run(out, reference):
    rows = read_jsonl(out / "training.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3], "resume must continue at step 2, not restart"
    for got, ref in zip(rows[2:], reference[2:], strict=True):
        for key in LOSSES:
            assert got[key] == pytest.approx(ref[key], rel=1e-5), (got["step"], key)


@pytest.mark.parametrize("layout, nproc, extra", [
    ("tp2", 2, ["distributed.tp_size=2"]),
    ("one_process", 1, ["step_scheduler.local_batch_size=4"]),
])
def test_resume_under_another_layout_trains_on_the_batches_an_uninterrupted_run_would(
        ckpts, interrupted, reference, tmp_path, layout, nproc, extra):
    out = resumed_copy(interrupted, tmp_path)
    result = kd(ckpts, out, STEPS, nproc=nproc, extra=extra)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "was saved by 2 data-parallel ranks, this run has 1" in result.stderr
    assert_continues_like_the_uninterrupted_run(out, reference)


def test_the_same_student_at_another_path_resumes(ckpts, interrupted, reference, tmp_path):
    staged = tmp_path / "node_local" / "student"
    shutil.copytree(ckpts["llama"]["student"], staged)
    out = resumed_copy(interrupted, tmp_path)
    result = kd(ckpts, out, STEPS, student=f"{staged}/")  # another directory, and a trailing slash
    assert result.returncode == 0, result.stderr[-3000:]
    assert_continues_like_the_uninterrupted_run(out, reference)


def test_another_student_is_refused_in_one_line_naming_both_before_training(ckpts, interrupted, tmp_path):
    other = tmp_path / "other_student"
    shutil.copytree(ckpts["llama"]["student"], other)
    shard = other / "subblocks_safetensors" / "block_0_ffn.safetensors"
    tensors = load_file(shard)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 0.01  # same shapes, other weights
    save_file(tensors, shard)
    out = resumed_copy(interrupted, tmp_path)
    before = sorted(p.name for p in out.iterdir())
    result = kd(ckpts, out, STEPS, student=other)
    assert result.returncode != 0
    lines = {line for line in result.stderr.splitlines() if line.startswith("run.py: error:")}
    assert lines == {
        f"run.py: error: checkpoint.checkpoint_dir={out} holds checkpoints (newest: epoch_0_step_1) of another "
        f"student, {ckpts['llama']['student']}, not model.pretrained_model_name_or_path={other} (their config, block "
        "configs or weights differ); resume with that student, or give this one its own checkpoint.checkpoint_dir"}
    assert sorted(p.name for p in out.iterdir()) == before, "nothing in checkpoint_dir was touched"
    assert len(read_jsonl(out / "training.jsonl")) == 2


def test_the_fingerprint_sees_config_block_configs_and_weights_but_not_the_path(ckpts, tmp_path):
    from safety import resume

    original = ckpts["llama"]["student"]
    moved = tmp_path / "moved"
    shutil.copytree(original, moved)
    assert resume.fingerprint(moved) == resume.fingerprint(original)
    layers = json.loads((original / "config.json").read_text())["block_configs"]
    layers[0]["ffn"]["intermediate_size"] //= 2
    blocks = tmp_path / "blocks.json"
    blocks.write_text(json.dumps(layers))
    assert resume.fingerprint(original, blocks) != resume.fingerprint(original)
    other_config = tmp_path / "other_config"
    shutil.copytree(original, other_config)
    (other_config / "config.json").write_text((original / "config.json").read_text().replace('"rms_norm_eps": 1e-05',
                                                                                              '"rms_norm_eps": 1e-06'))
    assert resume.fingerprint(other_config) != resume.fingerprint(original)
