"""tools/plot_run.py: a PNG of a finished, a resumed and a still-running run; several runs on one picture."""

import json
import subprocess
import sys

import pytest
from matplotlib.image import imread

from common.errors import PreflightError
from conftest import REPO
from tools.plot_run import figure, load_run, main, run_names


def training_row(step: int, loss: float) -> dict:
    """A row with the keys the KD recipe logs (``hidden_loss`` included, as with hidden_kd.weight > 0)."""
    return {"step": step, "epoch": 0, "timestamp": "2026-11-27T03:19:36.117Z", "loss": loss, "ce_loss": 2 * loss,
            "kd_loss": loss / 2, "hidden_loss": loss / 4, "grad_norm": 1.0 + step, "lr": 1e-3 * (10 - step),
            "mem": 0.7 + step / 100, "tps": 5000.0 + step, "tps_per_gpu": 2500.0 + step / 2,
            "num_tokens_per_step": 900, "num_label_tokens": 30, "kd_ratio": 0.5, "temperature": 1.0, "mfu": None}


def validation_row(step: int, loss: float) -> dict:
    return {"step": step, "epoch": 0, "val_loss": loss, "ce_loss": 2 * loss, "kd_loss": loss / 2,
            "lr": 1e-3, "num_label_tokens": 279, "mem": 0.73}


def write_run(directory, training, validation=(), tail: str = ""):
    directory.mkdir()
    (directory / "training.jsonl").write_text("".join(json.dumps(r) + "\n" for r in training) + tail)
    if validation:
        (directory / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in validation))
    return directory


@pytest.fixture
def finished(tmp_path):
    """Steps 0-9, validation after steps 4 and 9."""
    return write_run(tmp_path / "finished", [training_row(s, 5.0 - 0.1 * s) for s in range(10)],
                     [validation_row(4, 4.6), validation_row(9, 4.1)])


@pytest.fixture
def resumed(tmp_path):
    """Killed after step 6 with its last checkpoint at step 3; the rerun logged steps 4-9 again, from 4.0 down."""
    first = [training_row(s, 5.0 - 0.1 * s) for s in range(7)]
    rerun = [training_row(s, 4.0 - 0.1 * (s - 4)) for s in range(4, 10)]
    return write_run(tmp_path / "resumed", first + rerun,
                     [validation_row(4, 4.6), validation_row(4, 4.5), validation_row(9, 3.9)])


def lines_of(ax) -> dict:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines}


def test_a_finished_run_plots_every_logged_curve_to_a_png(finished, tmp_path, capsys):
    out = main([str(finished), "--out", str(tmp_path / "curves.png")])
    height, width, _ = imread(out).shape
    assert (width, height) == (1500, 800)
    assert capsys.readouterr().out == f"finished: steps 0-9, 2 validation passes\nwrote {out}\n"
    train_loss, val_loss, lr, grad_norm, tps, mem = figure([load_run(finished)]).axes
    curves = lines_of(train_loss)
    assert list(curves) == ["finished: loss", "finished: ce_loss", "finished: kd_loss", "finished: hidden_loss"]
    assert curves["finished: hidden_loss"] == (list(range(10)), [(5.0 - 0.1 * s) / 4 for s in range(10)])
    assert lines_of(val_loss)["finished: val_loss"] == ([4, 9], [4.6, 4.1])
    for ax, key in ((lr, "lr"), (grad_norm, "grad_norm"), (tps, "tps"), (mem, "mem")):
        assert lines_of(ax)[f"finished: {key}"][1] == [training_row(s, 0)[key] for s in range(10)]


def test_a_resumed_run_plots_the_last_row_of_each_step_and_marks_the_restart(resumed, tmp_path, capsys):
    run = load_run(resumed)
    assert run.restarts == [4]
    assert [r["step"] for r in run.training] == list(range(10))
    train_loss, val_loss, *_ = figure([run]).axes
    assert lines_of(train_loss)["resumed: loss"][1] == pytest.approx([5.0, 4.9, 4.8, 4.7, 4.0, 3.9, 3.8, 3.7, 3.6, 3.5])
    assert lines_of(train_loss)["resumed: restart at step 4"][0] == [4, 4]
    assert lines_of(val_loss)["resumed: val_loss"] == ([4, 9], [4.5, 3.9])
    imread(main([str(resumed), "--out", str(tmp_path / "resumed.png")]))
    assert "steps 0-9, 2 validation passes, restarted at step 4" in capsys.readouterr().out


def test_a_run_still_going_plots_without_validation_and_skips_the_line_being_written(tmp_path, capsys):
    going = write_run(tmp_path / "going", [training_row(s, 5.0) for s in range(3)], tail='{"step": 3, "lo')
    imread(main([str(going), "--out", str(tmp_path / "going.png")]))
    assert capsys.readouterr().out.splitlines()[0] == \
        "going: steps 0-2, 0 validation passes, 1 line(s) not JSON skipped"


def test_several_runs_share_one_picture_one_colour_each(finished, resumed, tmp_path):
    runs = [load_run(finished), load_run(resumed)]
    train_loss, *_, mem = figure(runs).axes
    colors = {line.get_label(): line.get_color() for line in train_loss.lines}
    assert colors["finished: loss"] == colors["finished: kd_loss"] != colors["resumed: loss"]
    assert set(lines_of(mem)) == {"finished: mem", "resumed: mem", "resumed: restart at step 4"}
    imread(main([str(finished), str(resumed), "--out", str(tmp_path / "both.png")]))


def test_runs_are_named_after_their_directories_unless_two_names_clash():
    assert run_names(["/runs/a/kd", "/runs/b/ce"]) == ["kd", "ce"]
    assert run_names(["/runs/a/ckpt", "/runs/b/ckpt"]) == ["/runs/a/ckpt", "/runs/b/ckpt"]


def test_a_directory_without_a_training_log_is_a_one_line_error_with_exit_code_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tools.plot_run", str(tmp_path)], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"plot_run: error: {tmp_path} has no training.jsonl; pass a run's "
                                     "checkpoint.checkpoint_dir, where the recipe writes training.jsonl and "
                                     "validation.jsonl")
    assert not (REPO / "curves.png").exists()


def test_an_output_folder_that_does_not_exist_is_a_one_line_error_before_reading_the_logs(tmp_path):
    out = tmp_path / "missing" / "curves.png"
    with pytest.raises(PreflightError, match=r"the folder .*missing does not exist; create it or pass another"):
        main([str(tmp_path / "no_run"), "--out", str(out)])
