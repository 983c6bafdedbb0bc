"""A run's curves from its ``training.jsonl`` and ``validation.jsonl``, in one picture; several runs to compare.

    python -m tools.plot_run CHECKPOINT_DIR [CHECKPOINT_DIR ...] [--out FILE.png]

``CHECKPOINT_DIR`` is a run's ``checkpoint.checkpoint_dir``, where the recipe appends one JSON row per step to
``training.jsonl`` and one per validation pass to ``validation.jsonl``. Six panels against the logged ``step``:
the training loss and its terms (every key ending in ``loss`` that the rows have: ``loss``, ``ce_loss``,
``kd_loss``, ``hidden_loss``, ...), the validation loss and its terms, the learning rate (``lr``), the
gradient norm (``grad_norm``), tokens per second over all ranks (``tps``) and peak memory in GiB (``mem``:
the CUDA allocator's peak on GPUs, the process's peak RSS on CPU). Each run has its own colour and is named after
its directory (the path as given where two names clash), each loss term has its own line style. The picture is
written with matplotlib's Agg backend (no display needed).

Finished runs, resumed runs and runs still going all plot. A rerun that resumes from a checkpoint appends
rows again from the restored step, so a step can appear more than once: the row written last for a step is
the one plotted (the run that carried on from there), and a dotted vertical line marks each step a restart
went back to. Lines that are not JSON (the last line of a run still writing, or one cut short by a killed
run) are skipped, and counted in what the command prints.

A directory without ``training.jsonl`` stops with one line ``plot_run: error: ...``, exit code 2.
"""

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import PreflightError
from safety import paths

TRAINING_LOG = "training.jsonl"
VALIDATION_LOG = "validation.jsonl"
# Line style of a loss term in both loss panels; terms not listed (a future one) get LOSS_STYLES[None].
LOSS_STYLES = {"loss": "-", "val_loss": "-", "ce_loss": "--", "kd_loss": ":", "hidden_loss": "-.",
               None: (0, (5, 1, 1, 1))}
# (row key, panel title) of the panels after the two loss panels.
METRIC_PANELS = (("lr", "learning rate"), ("grad_norm", "gradient norm"), ("tps", "tokens / s (all ranks)"),
                 ("mem", "peak memory (GiB)"))


class PlotError(ValueError):
    """A directory that holds no run logs; the message says what to pass instead."""


@dataclass
class Run:
    """One run's rows, the last written for each step, in step order."""

    name: str
    training: list[dict]
    validation: list[dict]
    restarts: list[int] = field(default_factory=list)  # steps a rerun went back to
    skipped_lines: int = 0


def read_log(path: Path) -> tuple[list[dict], int]:
    """``(rows, lines skipped)``: the JSON-object lines of a ``*.jsonl`` log, in file order."""
    rows, skipped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        else:
            skipped += 1
    return rows, skipped


def last_per_step(rows: list[dict]) -> tuple[list[dict], list[int]]:
    """``(rows, restarts)``: the last row written for each step, by step, and each step the log went back to."""
    by_step, restarts, previous = {}, [], None
    for row in rows:
        if previous is not None and row["step"] <= previous:
            restarts.append(row["step"])
        by_step[row["step"]] = row
        previous = row["step"]
    return [by_step[step] for step in sorted(by_step)], restarts


def load_run(directory: str | Path, name: str | None = None) -> Run:
    """The run logged in ``directory`` (its ``checkpoint.checkpoint_dir``), called ``name`` (default: the
    directory's own name)."""
    root = Path(directory)
    if not root.is_dir():
        raise PlotError(f"{directory} {'is a file' if root.exists() else 'does not exist'}; pass a run's "
                        f"checkpoint.checkpoint_dir, where the recipe writes {TRAINING_LOG} and {VALIDATION_LOG}")
    if not (root / TRAINING_LOG).is_file():
        raise PlotError(f"{directory} has no {TRAINING_LOG}; pass a run's checkpoint.checkpoint_dir, where the "
                        f"recipe writes {TRAINING_LOG} and {VALIDATION_LOG}")
    training, skipped = read_log(root / TRAINING_LOG)
    if not training:
        raise PlotError(f"{root / TRAINING_LOG} has no rows yet; plot it once the run has logged a step")
    validation, skipped_val = read_log(root / VALIDATION_LOG) if (root / VALIDATION_LOG).is_file() else ([], 0)
    training, restarts = last_per_step(training)
    validation, _ = last_per_step(validation)
    return Run(name or root.resolve().name, training, validation, restarts, skipped + skipped_val)


def run_names(directories: list[str]) -> list[str]:
    """Each run's name in the picture: its directory's name, or the path as given where two names would clash."""
    names = [Path(d).resolve().name for d in directories]
    return names if len(set(names)) == len(names) else [str(d) for d in directories]


def loss_keys(rows: list[dict]) -> list[str]:
    """The numeric keys ending in ``loss`` that any row has, in the order they first appear."""
    keys = {}
    for row in rows:
        keys.update((k, None) for k, v in row.items() if k.endswith("loss") and isinstance(v, (int, float)))
    return list(keys)


def figure(runs: list[Run]):
    """The picture: a matplotlib ``Figure`` with an Agg canvas, six panels (see the module docstring). Every
    line is labelled ``"<run>: <key>"`` (restart lines ``"<run>: restart at step <step>"``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(15, 8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3).flatten()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for run, color in zip(runs, colors):
        for ax, rows, marker in ((axes[0], run.training, None), (axes[1], run.validation, "o")):
            for key in loss_keys(rows):
                ax.plot(*_series(rows, key), color=color, ls=_style(key), marker=marker, ms=3,
                        label=f"{run.name}: {key}")
        for ax, (key, _) in zip(axes[2:], METRIC_PANELS):
            ax.plot(*_series(run.training, key), color=color, label=f"{run.name}: {key}")
        for step in run.restarts:
            for ax in axes:
                ax.axvline(step, color=color, ls=":", alpha=0.7, label=f"{run.name}: restart at step {step}")
    for ax, title in zip(axes, ("training loss", "validation loss", *(title for _, title in METRIC_PANELS))):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    # Legends by what tells lines apart, not one entry per line: the style is the loss term, the colour the run.
    restart = [Line2D([], [], color="gray", ls=":", label="restart")] if any(run.restarts for run in runs) else []
    for ax, rows in ((axes[0], [r for run in runs for r in run.training]),
                     (axes[1], [r for run in runs for r in run.validation])):
        terms = [Line2D([], [], color="black", ls=_style(key), label=key) for key in loss_keys(rows)]
        if terms:
            ax.legend(handles=terms + restart, fontsize="small")
    axes[2].legend(handles=[Line2D([], [], color=color, label=run.name) for run, color in zip(runs, colors)],
                   fontsize="small")
    fig.suptitle(", ".join(run.name for run in runs))
    return fig


def _style(key: str):
    return LOSS_STYLES.get(key, LOSS_STYLES[None])


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of ``key`` where a row has a number for it (``mfu`` and others may be null)."""
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def describe(run: Run) -> str:
    """One line: steps, validation passes, restarts and skipped lines of a run."""
    text = (f"{run.name}: steps {run.training[0]['step']}-{run.training[-1]['step']}, "
            f"{len(run.validation)} validation pass{'es' if len(run.validation) != 1 else ''}")
    if run.restarts:
        text += f", restarted at step {', '.join(map(str, run.restarts))}"
    if run.skipped_lines:
        text += f", {run.skipped_lines} line(s) not JSON skipped"
    return text


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="plot_run", usage="python -m tools.plot_run CHECKPOINT_DIR [...] "
                                     "[--out FILE.png]", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", metavar="CHECKPOINT_DIR", help="a run's checkpoint.checkpoint_dir")
    parser.add_argument("--out", default="curves.png", metavar="FILE.png",
                        help="the picture to write (default: curves.png)")
    args = parser.parse_args(argv)
    out = paths.writable_file("--out", args.out)
    runs = [load_run(directory, name) for directory, name in zip(args.dirs, run_names(args.dirs))]
    figure(runs).savefig(out, dpi=100)
    for run in runs:
        print(describe(run))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    try:
        main()
    except (PlotError, PreflightError) as e:
        print(f"plot_run: error: {e}", file=sys.stderr)
        sys.exit(2)
