"""The Puzzletron story on a CPU: pretrain a teacher, carve a heterogeneous student, distill it.

    python -m tools.demo [--out demo_out]        (what `make demo` runs)

Stages, each skipped when its output is already there and complete (delete a stage's folder
to rerun it and everything after it):

1. ``data``: English text that ships with CPython (``pydoc_data.topics``), its paragraphs grouped
   into ``train.jsonl`` / ``validation.jsonl`` rows ``{"title", "text"}`` of up to about
   :data:`SEQ_LEN` tokens, and a byte-level BPE
   tokenizer trained on the train split. Read by AutoModel's ``ColumnMappedTextInstructionDataset``
   (``title`` as the prompt, loss on ``text``): the same dataset class serves your own JSONL files.
2. ``teacher``: a randomly initialised small Llama, pretrained with
   ``torchrun --nproc_per_node=2 -m run --mode pretrain``.
3. ``student_init``: ``tools.prune_student`` with :data:`STUDENT_BLOCKS`.
4. ``cache_sampled`` and ``cache_topk``: ``--mode teacher_cache`` over the same data (:data:`CACHES`), and
   ``student_kd_cache_sampled`` / ``student_kd_cache_topk``: KD at :data:`KD_RATIO` from each cache, no teacher loaded.
5. ``student_ce``, ``student_kd`` and ``student_kd_hidden``: ``--mode kd`` from the same student, data and
   steps (:data:`STUDENT_RUNS`): ``kd_ratio=0`` (cross-entropy only), :data:`KD_RATIO`, and :data:`KD_RATIO` plus
   hidden-state KD (:data:`HIDDEN_KD`), on the first ``STUDENT_RUN["train_rows"]`` train rows.
6. ``candidate_b_init`` (:data:`CANDIDATE_B_BLOCKS`) and ``tournament``: ``torchrun -m tools.tournament`` ranks it
   and the first student after :data:`TOURNAMENT_STEPS` KD steps each from the sampled cache.
7. ``results.json``, the tables on stdout and ``loss_curves.png``: validation CE of every model, what each cache
   costs on disk and per step, and the tournament's ranking.

Each training run writes a consolidated Hugging Face checkpoint (``checkpoint.save_consolidated``),
which is what the evaluation (``tools.evaluate``, as a user runs it on their own models) loads, through
``from_pretrained(..., anymodel_descriptor="auto")``.
"""

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from common.errors import PreflightError
from distillation import teacher_cache
from safety import paths
from tools.demo_data import CHARS_PER_ROW, SEQ_LEN, VAL_FRACTION, VOCAB_SIZE, unigram_baseline, write_data

REPO = Path(__file__).resolve().parents[1]
# A small Llama: about 1.1 M parameters, 4 layers of 4 heads of 32 channels.
TEACHER = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=SEQ_LEN,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
# What a Puzzletron search could return for a tight budget: every layer differs from the teacher.
STUDENT_BLOCKS = [
    {"attention": {"num_key_value_heads": 2}, "ffn": {"intermediate_size": 192}},
    {"attention": {"no_op": True}, "ffn": {"intermediate_size": 256}},
    {"attention": {"num_key_value_heads": 1}, "ffn": {"intermediate_size": 128}},
    {"attention": {"num_key_value_heads": 4}, "ffn": {"intermediate_size": 192}},
]
TEACHER_RUN = dict(steps=300, lr=1e-2, warmup=30, global_batch=32, local_batch=16, val_every=50, compute="fp32 on CPU")
# Recovery sees a quarter of the pretraining rows, as a compressed model's budget usually does.
STUDENT_RUN = dict(steps=80, lr=2e-3, warmup=10, global_batch=32, local_batch=16, val_every=10, train_rows=256,
                   compute="fp32 on CPU")
# kd.yaml's (and AutoModel's) default. Against 0.9, on 2026-12-08's machine: online KD recovered 97.8 % of the gap
# instead of 96.3 %, and the sampled cache came within 0.14-0.38 points of it (3 cache seeds) instead of 0.87-1.34:
# with half the loss exact CE, the sample's error, which the demo's 10 epochs read again and again, weighs half as much.
KD_RATIO = 0.5
TEMPERATURE = 1.0
# Puzzle's global KD: every student layer also learns its teacher layer's output.
HIDDEN_KD = dict(weight=1.0, loss="cosine", layers="all")
# name: (legend, kd_ratio, hidden-state KD settings or None)
STUDENT_RUNS = {
    "student_ce": ("CE only (kd_ratio=0)", 0.0, None),
    "student_kd": (f"KD (kd_ratio={KD_RATIO})", KD_RATIO, None),
    "student_kd_hidden": (f"KD + hidden-state KD ({HIDDEN_KD['loss']}, weight {HIDDEN_KD['weight']})", KD_RATIO,
                          HIDDEN_KD),
}
COLORS = {"student_ce": "tab:orange", "student_kd": "tab:blue", "student_kd_hidden": "tab:purple"}
# Teacher once, students many: the teacher's distribution per label token, cached at the KD temperature in two
# kinds of about the same size on disk (sampled: 4k + 4 bytes a token, topk: 7k + 4), and KD from each at
# STUDENT_RUN's steps and KD_RATIO; then a tournament of two candidates on the sampled cache.
CACHES = {"sampled": 12, "topk": 7}
# A second candidate a Puzzletron search could return beside STUDENT_BLOCKS: attention kept everywhere, with
# 2 KV heads, and narrower FFNs.
CANDIDATE_B_BLOCKS = [{"attention": {"num_key_value_heads": 2}, "ffn": {"intermediate_size": 160}}] * 4
TOURNAMENT_STEPS = 40


def log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- training runs through run.py


def dataset_overrides(data_dir: Path, train_rows: int | None = None) -> list[str]:
    """Point ``dataset`` / ``validation_dataset`` at the JSONL files with AutoModel's column-mapped
    dataset; ``train_rows`` keeps only the first rows of the (shuffled) train split."""
    target = "nemo_automodel.components.datasets.llm.column_mapped_text_instruction_dataset.ColumnMappedTextInstructionDataset"

    def node(split, limit=None):
        return (f"{{_target_: {target}, path_or_dataset_id: {data_dir / f'{split}.jsonl'}, "
                f"column_mapping: {{context: title, answer: text}}, seq_length: {SEQ_LEN}, truncation: true, "
                f"limit_dataset_samples: {'null' if limit is None else limit}}}")

    return [f"dataset={node('train', train_rows)}", f"validation_dataset={node('validation')}"]


def kd_overrides(student: Path, teacher: Path, data_dir: Path) -> list[str]:
    """What every student run and cache build shares: the models in fp32, the KD temperature, the student's rows."""
    return [f"model.pretrained_model_name_or_path={student}", "model.anymodel_descriptor=llama",
            "model.torch_dtype=float32", f"teacher_model.pretrained_model_name_or_path={teacher}",
            "teacher_model.torch_dtype=float32", f"kd_loss_fn.temperature={TEMPERATURE}",
            *dataset_overrides(data_dir, STUDENT_RUN["train_rows"])]


def schedule_overrides(run: dict, out_dir: Path) -> list[str]:
    """Steps, batch, AdamW with warmup and cosine decay, one final consolidated checkpoint in ``out_dir``."""
    return [
        f"step_scheduler.max_steps={run['steps']}",
        f"step_scheduler.global_batch_size={run['global_batch']}",
        f"step_scheduler.local_batch_size={run['local_batch']}",
        f"step_scheduler.val_every_steps={run['val_every']}",
        f"step_scheduler.ckpt_every_steps={run['steps']}",
        "step_scheduler.save_checkpoint_every_epoch=false",  # only the final checkpoint: the demo's output
        "step_scheduler.num_epochs=1000",  # max_steps ends the run; the small data set repeats
        f"optimizer.lr={run['lr']}",
        "optimizer._target_=torch.optim.AdamW",
        "optimizer.weight_decay=0.01",
        f"lr_scheduler={{lr_warmup_steps: {run['warmup']}, lr_decay_style: cosine, min_lr: {run['lr'] / 10}}}",
        "checkpoint.save_consolidated=final",
        f"checkpoint.checkpoint_dir={out_dir}",
    ]


def torchrun(mode: str, overrides: list[str], out_dir: Path) -> Path:
    """Run ``torchrun --nproc_per_node=2 -m run --mode MODE`` into a fresh ``out_dir``; returns the
    consolidated checkpoint of its last step."""
    shutil.rmtree(out_dir, ignore_errors=True)  # the recipe would resume from a stale checkpoint
    launch(["-m", "run", "--mode", mode, "-c", f"{CONFIGS[mode]}.yaml", *compute_overrides(), *overrides],
           f"the --mode {mode} run")
    return final_checkpoint(out_dir)


def compute_overrides() -> list[str]:
    """fp32 compute where there is no GPU: FSDP2's default bf16 compute is emulated on CPUs without AVX512-BF16,
    whose bf16 matmuls ran 50x slower than fp32 ones here (2-core AMD EPYC, AVX2 only, 2026-12-07); a GPU keeps
    AutoModel's bf16."""
    import torch

    if torch.cuda.is_available():
        return []
    return ["distributed.mp_policy._target_=torch.distributed.fsdp.MixedPrecisionPolicy",
            "distributed.mp_policy.param_dtype=float32", "distributed.mp_policy.reduce_dtype=float32"]


CONFIGS = {"pretrain": "pretrain", "kd": "kd", "teacher_cache": "kd"}


def launch(args: list[str], what: str) -> None:
    """``python -m torch.distributed.run --nproc_per_node=2 ARGS`` from the repo."""
    with socket.socket() as s:  # a free port: other jobs on this machine may hold torchrun's default
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runner = ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    if subprocess.run([sys.executable, *runner, *args], cwd=REPO, env=env).returncode != 0:
        sys.exit(f"demo: {what} failed; its log is above")


def final_checkpoint(run_dir: Path) -> Path:
    """``<run_dir>/epoch_*_step_N/model/consolidated`` of the largest ``N``."""
    found = sorted(run_dir.glob("epoch_*_step_*/model/consolidated/config.json"),
                   key=lambda p: int(p.parts[-4].rsplit("_", 1)[1]))
    if not found:
        raise FileNotFoundError(f"{run_dir} holds no consolidated checkpoint")
    return found[-1].parent


# ---------------------------------------------------------------- evaluation


def evaluate_models(paths: dict[str, Path], data_dir: Path) -> dict[str, dict]:
    """``tools.evaluate`` on the validation split, scored as the runs' validation scores it (title as the prompt,
    loss on the text): ``{name: {"ce", "tokens", "parameters", ...}}``."""
    from tools.evaluate import evaluate

    return evaluate(paths, data_dir / "validation.jsonl", prompt_field="title", answer_field="text",
                    seq_length=SEQ_LEN, tokenizer=data_dir / "tokenizer")


def validation_curve(run_dir: Path) -> list[tuple[int, float]]:
    """``[(optimizer steps done, validation CE)]`` from the recipe's ``validation.jsonl``."""
    rows = [json.loads(line) for line in open(run_dir / "validation.jsonl") if line.strip()]
    return [(r["step"] + 1, r.get("ce_loss", r["val_loss"])) for r in rows]


def plot(results: dict, curves: dict, path: Path) -> None:
    """Validation CE of every student run against the teacher's level: all of it, and the last stretch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, first in zip(axes, (0, 2)):
        for name, (label, _, _) in STUDENT_RUNS.items():
            steps, losses = zip((0, results["student_init_val_loss"]), *curves[name])
            ax.plot(steps[first:], losses[first:], marker="o", ms=3, color=COLORS[name], label=f"student, {label}")
        ax.axhline(results["teacher_val_loss"], color="tab:green", ls="--", label="teacher")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].axhline(results["unigram_val_loss"], color="gray", ls=":", label="unigram baseline")
    axes[0].set_ylabel("validation cross-entropy (nats/token)")
    axes[0].set_title("pruned student, recovered")
    axes[1].set_title("zoom: from the 2nd evaluation on")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(results: dict) -> str:
    gap = results["student_init_val_loss"] - results["teacher_val_loss"]
    rows = [("unigram baseline", results["unigram_val_loss"], ""),
            ("teacher", results["teacher_val_loss"], ""),
            ("student, pruned from teacher", results["student_init_val_loss"], "0 %"),
            *((f"student, {label}", results[f"{name}_val_loss"], f"{results[gap_key(name)]:.1%}")
              for name, (label, _, _) in STUDENT_RUNS.items())]
    lines = ["| model | validation CE | share of the teacher-student gap recovered |", "|---|---|---|"]
    lines += [f"| {name} | {loss:.3f} | {share} |" for name, loss, share in rows]
    verdicts = [verdict(results, "student_kd", "KD", "student_ce", "CE only"),
                verdict(results, "student_kd_hidden", "KD + hidden-state KD", "student_kd", "KD alone")]
    return "\n".join(lines) + f"\n\n(gap: {gap:.3f} nats/token; {'; '.join(verdicts)})\n\n" + cached_table(results)


def cached_table(results: dict) -> str:
    """KD from each teacher cache against online KD (same student, steps, data): the gap recovered and the points
    it lies below online KD's, and each step's seconds against a CE-only step's; then the tournament's ranking."""
    online, ce_only = results["online_kd_seconds_per_step"], results["ce_only_seconds_per_step"]
    online_share = results[gap_key("student_kd")]
    lines = ["| KD (kd_ratio %g, %d steps) | teacher in memory | bytes per label token | seconds per step (vs CE only) "
             "| validation CE | share of the gap recovered (vs online) |" % (KD_RATIO, STUDENT_RUN["steps"]),
             "|---|---|---|---|---|---|",
             f"| none: CE only | no | | {ce_only:.3f} | {results['student_ce_val_loss']:.3f} | "
             f"{results[gap_key('student_ce')]:.1%} |",
             f"| online | yes | | {online:.3f} ({online / ce_only:.2f}x) | {results['student_kd_val_loss']:.3f} | "
             f"{online_share:.1%} |"]
    for kind, c in results["cached_kd"].items():
        name = f"student_kd_cache_{kind}"
        share = results[gap_key(name)]
        lines.append(f"| {kind} cache, k={c['k']} | no | {c['bytes_per_label_token']:.1f} | {c['seconds_per_step']:.3f} "
                     f"({c['seconds_per_step'] / ce_only:.2f}x) | {results[f'{name}_val_loss']:.3f} | {share:.1%} "
                     f"({(share - online_share) * 100:+.2f} points) |")
    t = results["tournament"]
    lines += ["", f"tournament: {len(t['ranking'])} candidates, {t['steps']} KD steps each from the {t['kind']} cache "
              f"(k={t['k']})", "", "| rank | candidate | parameters | CE before | CE after | gap recovered |",
              "|---|---|---|---|---|---|"]
    for place, name in enumerate(t["ranking"], 1):
        c = t["candidates"][name]
        lines.append(f"| {place} | {name} | {c['parameters'] / 1e6:.2f} M | {c['ce_before']:.3f} | "
                     f"{c.get('ce_after', float('nan')):.3f} | {c.get('gap_recovered') or 0:.1%} |")
    return "\n".join(lines)


def gap_key(run: str) -> str:
    """``gap_recovered_ce`` for ``student_ce``, and so on."""
    return f"gap_recovered_{run.removeprefix('student_')}"


def verdict(results: dict, run: str, name: str, other: str, other_name: str) -> str:
    margin = results[f"{other}_val_loss"] - results[f"{run}_val_loss"]
    if margin > 0:
        return f"{name} beats {other_name} by {margin:.3f} nats/token"
    return f"{name} does NOT beat {other_name} ({margin:.3f} nats/token)"


# ---------------------------------------------------------------- stages


class Stage:
    """A folder with a ``DONE`` file holding the fingerprint of what produced it.

    ``fresh()`` is true when the folder's ``DONE`` matches ``key`` (the stage's settings and its
    inputs' fingerprints), so a changed setting reruns this stage and every stage after it.
    """

    def __init__(self, out: Path, name: str, **key):
        self.dir = out / name
        self.name = name
        self.fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def fresh(self) -> bool:
        done = self.dir / "DONE"
        info = json.loads(done.read_text()) if done.is_file() else {}
        # A checkpoint deleted or moved since makes the stage stale too.
        output_there = "checkpoint" not in info or (Path(info["checkpoint"]) / "config.json").is_file()
        if info.get("fingerprint") == self.fingerprint and output_there:
            log(f"{self.name}: up to date, skipped ({self.dir})")
            return True
        log(f"{self.name}: running")
        self.started = time.time()
        return False

    def done(self, **info) -> dict:
        # ``finished`` tells a rerun of the same settings from the run before it (results.json depends on which).
        info = {"fingerprint": self.fingerprint, "seconds": round(time.time() - self.started, 1),
                "finished": time.time(), **info}
        (self.dir / "DONE").write_text(json.dumps(info, indent=1))
        log(f"{self.name}: done in {info['seconds']:.0f} s")
        return info

    def info(self) -> dict:
        return json.loads((self.dir / "DONE").read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo_out", help="folder for every stage's output (default: demo_out)")
    out = Path(parser.parse_args(argv).out).resolve()
    try:
        paths.writable_dir("--out", out)
    except PreflightError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        sys.exit(2)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    data = Stage(out, "data", vocab=VOCAB_SIZE, val=VAL_FRACTION, seq=SEQ_LEN, chars=CHARS_PER_ROW)
    if not data.fresh():
        rows = write_data(data.dir)
        data.done(rows=rows, unigram_val_loss=unigram_baseline(data.dir))
    data_dir = data.dir

    teacher = Stage(out, "teacher", arch=TEACHER, run=TEACHER_RUN, data=data.fingerprint)
    if not teacher.fresh():
        init = write_random_teacher(out / "teacher_random_init", data_dir / "tokenizer")
        ckpt = torchrun("pretrain", [f"model.pretrained_model_name_or_path={init}", "model.torch_dtype=float32",
                                     *dataset_overrides(data_dir), *schedule_overrides(TEACHER_RUN, teacher.dir)],
                        teacher.dir)
        teacher.done(checkpoint=str(ckpt))
    teacher_ckpt = Path(teacher.info()["checkpoint"])

    student = Stage(out, "student_init", blocks=STUDENT_BLOCKS, teacher=teacher.fingerprint)
    if not student.fresh():
        from tools.prune_student import prune

        shutil.rmtree(student.dir, ignore_errors=True)
        prune(teacher_ckpt, STUDENT_BLOCKS, student.dir)
        student.done(checkpoint=str(student.dir))

    common = kd_overrides(student.dir, teacher_ckpt, data_dir)
    # The cached runs go just before CE only, the step they are timed against: this machine's speed drifts by a
    # third over minutes.
    caches, cached_runs = {}, {}
    for kind, k in CACHES.items():
        cache = Stage(out, f"cache_{kind}", k=k, t=TEMPERATURE, teacher=teacher.fingerprint, data=data.fingerprint,
                      rows=STUDENT_RUN["train_rows"], format=teacher_cache.FORMAT)
        if not cache.fresh():
            shutil.rmtree(cache.dir, ignore_errors=True)
            launch(["-m", "run", "--mode", "teacher_cache", "-c", "kd.yaml", *compute_overrides(), *common,
                    *cache_overrides(kind, cache.dir),
                    f"step_scheduler.local_batch_size={STUDENT_RUN['local_batch']}"], f"the {kind} cache build")
            manifest = json.loads((cache.dir / "cache" / "manifest.json").read_text())
            cache.done(bytes_per_label_token=manifest["bytes_per_label_token"], label_tokens=manifest["label_tokens"])
        caches[kind] = cache
        stage = Stage(out, f"student_kd_cache_{kind}", run=STUDENT_RUN, kd_ratio=KD_RATIO, student=student.fingerprint,
                      cache=cache.fingerprint)
        if not stage.fresh():
            ckpt = torchrun("kd", [*common, f"kd_ratio={KD_RATIO}", *cache_overrides(kind, cache.dir),
                                   *schedule_overrides(STUDENT_RUN, stage.dir)], stage.dir)
            stage.done(checkpoint=str(ckpt))
        cached_runs[kind] = stage

    runs = {}
    for name, (_, kd_ratio, hidden) in STUDENT_RUNS.items():
        stage = Stage(out, name, run=STUDENT_RUN, kd_ratio=kd_ratio, t=TEMPERATURE, student=student.fingerprint,
                      **({"hidden_kd": hidden} if hidden else {}))
        if not stage.fresh():
            hidden_overrides = [f"hidden_kd.{k}={v}" for k, v in (hidden or {}).items()]
            ckpt = torchrun("kd", [*common, f"kd_ratio={kd_ratio}", *hidden_overrides,
                                   *schedule_overrides(STUDENT_RUN, stage.dir)], stage.dir)
            stage.done(checkpoint=str(ckpt))
        runs[name] = stage

    candidate_b = Stage(out, "candidate_b_init", blocks=CANDIDATE_B_BLOCKS, teacher=teacher.fingerprint)
    if not candidate_b.fresh():
        from tools.prune_student import prune

        shutil.rmtree(candidate_b.dir, ignore_errors=True)
        prune(teacher_ckpt, CANDIDATE_B_BLOCKS, candidate_b.dir)
        candidate_b.done(checkpoint=str(candidate_b.dir))
    tournament = Stage(out, "tournament", cache=caches["sampled"].fingerprint, a=student.fingerprint,
                       b=candidate_b.fingerprint, steps=TOURNAMENT_STEPS, run=STUDENT_RUN, kd_ratio=KD_RATIO)
    if not tournament.fresh():
        shutil.rmtree(tournament.dir, ignore_errors=True)
        kd_settings = [*compute_overrides(), "model.torch_dtype=float32", f"kd_ratio={KD_RATIO}",
                       *dataset_overrides(data_dir, STUDENT_RUN["train_rows"]), *schedule_overrides(STUDENT_RUN, tournament.dir)]
        launch(["-m", "tools.tournament", "--cache", str(caches["sampled"].dir / "cache"),
                "--candidate", f"A={student.dir}", "--candidate", f"B={candidate_b.dir}",
                "--steps", str(TOURNAMENT_STEPS), "--out", str(tournament.dir),
                "--data", str(data_dir / "validation.jsonl"), "--prompt-field", "title", "--answer-field", "text",
                "--seq-length", str(SEQ_LEN), "--tokenizer", str(data_dir / "tokenizer"), "--teacher", str(teacher_ckpt),
                *kd_settings], "the tournament")
        tournament.done(ranking=json.loads((tournament.dir / "summary.json").read_text())["ranking"])

    results_path = out / "results.json"
    key = [s.info() for s in (data, teacher, student, *runs.values(), *caches.values(), *cached_runs.values(),
                              candidate_b, tournament)]
    if results_path.is_file() and json.loads(results_path.read_text()).get("inputs") == key:
        log("results: up to date, skipped")
        results = json.loads(results_path.read_text())
    else:
        log("results: evaluating every model on the validation split (tools.evaluate)")
        evaluated = evaluate_models({"teacher": teacher_ckpt, "student_init": student.dir,
                                     **{n: Path(s.info()["checkpoint"]) for n, s in runs.items()},
                                     **{s.name: Path(s.info()["checkpoint"]) for s in cached_runs.values()}}, data_dir)
        losses = {name: r["ce"] for name, r in evaluated.items()}
        params = {name: r["parameters"] for name, r in evaluated.items()}
        val_tokens = evaluated["teacher"]["tokens"]
        for name, loss in losses.items():
            log(f"  {name}: {loss:.4f}")
        gap = losses["student_init"] - losses["teacher"]
        results = {
            **{f"{n}_val_loss": v for n, v in losses.items()},
            "unigram_val_loss": data.info()["unigram_val_loss"],
            **{gap_key(n): (losses["student_init"] - losses[n]) / gap for n in [*runs, *(s.name for s in
                                                                                           cached_runs.values())]},
            "teacher_params": params["teacher"],
            "student_params": params["student_init"],
            "teacher_steps": TEACHER_RUN["steps"],
            "student_steps": STUDENT_RUN["steps"],
            "teacher_train_tokens": train_tokens(teacher.dir),
            "student_train_tokens": train_tokens(runs["student_kd"].dir),
            "data_rows": data.info().get("rows"),
            "student_train_rows": STUDENT_RUN["train_rows"],
            "validation_tokens": val_tokens,
            "stage_seconds": {s.name: s.info()["seconds"] for s in (data, teacher, student, *runs.values())},
            "kd_ratio": KD_RATIO,
            "hidden_kd": HIDDEN_KD,
            "temperature": TEMPERATURE,
            "inputs": key,
            "cached_kd": {kind: {"k": CACHES[kind], "bytes_per_label_token": caches[kind].info()["bytes_per_label_token"],
                                 "seconds_per_step": seconds_per_step(cached_runs[kind].dir),
                                 "cache_build_seconds": caches[kind].info()["seconds"]} for kind in CACHES},
            "online_kd_seconds_per_step": seconds_per_step(runs["student_kd"].dir),
            "ce_only_seconds_per_step": seconds_per_step(runs["student_ce"].dir),
            "tournament": json.loads((tournament.dir / "summary.json").read_text()),
        }
        results["curves"] = {n: validation_curve(s.dir) for n, s in runs.items()}
        plot(results, results["curves"], out / "loss_curves.png")
        results_path.write_text(json.dumps(results, indent=1))
    print("\n" + table(results) + "\n")
    log(f"results: {results_path}, {out / 'loss_curves.png'}; {time.time() - t0:.0f} s")


def cache_overrides(kind: str, stage_dir: Path) -> list[str]:
    """KD from (or a build of) the ``kind`` cache of :data:`CACHES` in ``<stage_dir>/cache``."""
    return [f"teacher_cache.path={stage_dir / 'cache'}", f"teacher_cache.kind={kind}", f"teacher_cache.k={CACHES[kind]}"]


def seconds_per_step(run_dir: Path) -> float:
    """Median seconds of a training step, from the recipe's per-step tokens and tokens/s."""
    import statistics

    rows = [json.loads(line) for line in open(run_dir / "training.jsonl") if line.strip()]
    return statistics.median(r["num_tokens_per_step"] / r["tps"] for r in rows)


def train_tokens(run_dir: Path) -> int:
    """Tokens the run trained on, summed from the recipe's per-step ``num_tokens_per_step``."""
    return sum(json.loads(line)["num_tokens_per_step"] for line in open(run_dir / "training.jsonl") if line.strip())


def write_random_teacher(path: Path, tokenizer_dir: Path) -> Path:
    """A randomly initialised :data:`TEACHER` Llama with the demo tokenizer, in Hugging Face layout."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **TEACHER)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


if __name__ == "__main__":
    main()
