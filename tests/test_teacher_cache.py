"""Teacher once, students many: ``--mode teacher_cache`` writes a cache keyed by sample that any layout reads, and
``--mode kd`` with ``teacher_cache.path`` distills from it without a teacher. A ``topk`` cache over the whole
vocabulary reproduces online KD (losses and grad norms, every step, and validation) within 1e-5, built on one
process, dp=2, TP=2 or PP=2 and read at another of those layouts; a killed build resumes; a cache that does not fit
the run is refused in one line before anything starts. ``tools.tournament`` ranks candidates distilled from a cache,
launched with python or torchrun alike."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import run
from conftest import REPO, assert_same_training, read_jsonl, run_job, tiny_overrides, torchrun
from distillation import teacher_cache
from safety.preflight import PreflightError
from tools.prune_student import prune

STEPS = 4
VOCAB = 512  # the tiny checkpoints' vocabulary
KEYS = ("loss", "ce_loss", "kd_loss", "grad_norm")
TOPK_ALL = ["teacher_cache.kind=topk", f"teacher_cache.k={VOCAB}"]
PP2 = ["distributed.pp_size=2", "distributed.pipeline.pp_microbatch_size=1"]


def args(ckpts, out_dir: Path, *extra: str) -> list[str]:
    return [*tiny_overrides(ckpts, "llama", out_dir, steps=STEPS), "step_scheduler.ckpt_every_steps=100",
            *extra]


def dense(entries) -> torch.Tensor:
    """``[tokens, vocab]``: each entry's weights at its ids."""
    return torch.zeros(len(entries), VOCAB).scatter_add_(1, entries.ids, entries.weights)


def build_cache(ckpts, path: Path, *extra: str, nproc: int = 1) -> dict:
    result = run_job(["-m", "run", "--mode", "teacher_cache", *args(ckpts, path.parent / "unused"),
                       f"teacher_cache.path={path}", *extra], nproc=nproc)
    assert result.returncode == 0, result.stderr[-4000:]
    return teacher_cache.read_manifest(path)


def distill(ckpts, out_dir: Path, *extra: str, nproc: int = 1):
    result = run_job(["-m", "run", "--mode", "kd", *args(ckpts, out_dir), *extra], nproc=nproc)
    assert result.returncode == 0, result.stderr[-4000:]
    return read_jsonl(out_dir / "training.jsonl"), read_jsonl(out_dir / "validation.jsonl")


@pytest.fixture(scope="module")
def caches(ckpts, tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher_cache")
    layouts = {"one_process": ([], 1), "dp2": ([], 2), "tp2": (["distributed.tp_size=2"], 2), "pp2": (PP2, 2)}
    built = {name: (root / name, build_cache(ckpts, root / name, *TOPK_ALL, *layout, nproc=nproc))
             for name, (layout, nproc) in layouts.items()}
    return {**built, "sampled": (root / "sampled", build_cache(ckpts, root / "sampled"))}


@pytest.fixture(scope="module")
def online(ckpts, tmp_path_factory):
    return distill(ckpts, tmp_path_factory.mktemp("online"))


# --------------------------------------------------------------------------- the cache itself


def test_row_keys_ignore_padding_and_tell_samples_apart():
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 0]])
    labels = torch.tensor([[6, 7, -100, -100, -100], [6, 7, 8, -100, -100]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    first, second = teacher_cache.row_keys(ids, labels, mask)
    assert first != second
    assert teacher_cache.row_keys(ids[:1, :3], labels[:1, :3], mask[:1, :3]) == [first]


@pytest.mark.parametrize("layout, writers", [("dp2", 2), ("tp2", 1), ("pp2", 1)])
def test_a_build_on_two_processes_holds_the_same_entries_as_on_one(caches, layout, writers):
    """dp ranks each write their samples; one rank writes for a TP group, the last stage's under PP."""
    (one, m1), (two, m2) = caches["one_process"], caches[layout]
    assert m1["complete"] and m2["complete"]
    assert m1["samples"] == m2["samples"] and m1["label_tokens"] == m2["label_tokens"]
    assert len({Path(s).name.split("-")[0] for s in m2["shards"]}) == writers
    a, b = teacher_cache.TeacherCache(one), teacher_cache.TeacherCache(two)
    keys = sorted(a.index)
    assert sorted(b.index) == keys
    # As distributions over the vocabulary: near-equal probabilities may rank in another order on another layout.
    x, y = (dense(cache.lookup(keys)) for cache in (a, b))
    torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-9)


def test_sampled_cache_stores_at_most_64_bytes_a_label_token_and_k_draws_each(caches):
    path, manifest = caches["sampled"]
    assert manifest["kind"] == "sampled" and manifest["k"] == 12
    assert manifest["bytes_per_label_token"] <= 64
    cache = teacher_cache.TeacherCache(path)
    entries = cache.lookup(sorted(cache.index))
    assert torch.equal((entries.weights * 12).round().sum(-1), torch.full((len(entries),), 12.0))
    assert (entries.neg_entropy <= 0).all()


def test_a_killed_build_resumes_and_leaves_no_partial_shard(ckpts, caches, tmp_path):
    original, manifest = caches["one_process"]
    path = tmp_path / "cache"
    shutil.copytree(original, path)
    train_shard = next(name for name in manifest["shards"] if name.startswith("train/"))
    (path / train_shard).rename(path / (train_shard + ".tmp"))  # as a build killed while writing it leaves it
    teacher_cache.write_json_atomically(path / teacher_cache.MANIFEST, {**manifest, "complete": False})
    resumed = build_cache(ckpts, path, *TOPK_ALL)
    assert resumed["complete"] and resumed["label_tokens"] == manifest["label_tokens"]
    assert not list(path.glob("*/*.tmp"))
    a, b = teacher_cache.TeacherCache(original), teacher_cache.TeacherCache(path)
    keys = sorted(a.index)
    torch.testing.assert_close(dense(a.lookup(keys)), dense(b.lookup(keys)), rtol=1e-5, atol=1e-9)


# --------------------------------------------------------------------------- KD from the cache


@pytest.mark.parametrize("cache, nproc, layout", [
    ("dp2", 1, []),
    ("one_process", 2, ["step_scheduler.local_batch_size=1"]),
    ("pp2", 2, ["distributed.tp_size=2"]),
    ("tp2", 2, PP2),
], ids=["built_dp2-read_1p", "built_1p-read_dp2", "built_pp2-read_tp2", "built_tp2-read_pp2"])
def test_topk_cache_over_the_whole_vocabulary_reproduces_online_kd(ckpts, caches, online, tmp_path, cache, nproc,
                                                                    layout):
    path, _ = caches[cache]
    got = distill(ckpts, tmp_path / "kd", "teacher_model.pretrained_model_name_or_path=null",
                  f"teacher_cache.path={path}", *TOPK_ALL, *layout, nproc=nproc)
    assert_same_training(got, online, KEYS, STEPS, rel=1e-5)


def test_kd_from_a_sampled_cache_trains_without_a_teacher(ckpts, caches, online, tmp_path):
    path, _ = caches["sampled"]
    train, val = distill(ckpts, tmp_path / "kd", "teacher_model.pretrained_model_name_or_path=null",
                         f"teacher_cache.path={path}")
    # Same CE (the student sees the same batches); KD is a noisy estimate of the online value, not a copy of it.
    assert [r["ce_loss"] for r in train] == pytest.approx([r["ce_loss"] for r in online[0]], rel=1e-5)
    assert all(r["kd_loss"] > 0 for r in train) and [r["kd_loss"] for r in train] != [r["kd_loss"] for r in online[0]]
    assert val[0]["kd_loss"] == pytest.approx(online[1][0]["kd_loss"], rel=0.5)


# --------------------------------------------------------------------------- refusals, before anything starts


def refusal(ckpts, tmp_path, *extra: str) -> str:
    with pytest.raises(PreflightError) as error:
        run.prepare(["--mode", "kd", *args(ckpts, tmp_path / "kd"), *extra])
    return str(error.value)


@pytest.fixture
def cache_copy(caches, tmp_path):
    path = tmp_path / "cache"
    shutil.copytree(caches["one_process"][0], path)
    return path


def test_a_directory_that_is_not_a_cache_is_refused(ckpts, tmp_path):
    (tmp_path / "empty").mkdir()
    assert refusal(ckpts, tmp_path, f"teacher_cache.path={tmp_path / 'empty'}", *TOPK_ALL) == (
        f"teacher_cache.path={tmp_path / 'empty'} is not a teacher cache (no manifest.json); build one with "
        "--mode teacher_cache and the same config")


def test_an_unfinished_cache_is_refused(ckpts, cache_copy, tmp_path):
    manifest = teacher_cache.read_manifest(cache_copy)
    teacher_cache.write_json_atomically(cache_copy / teacher_cache.MANIFEST, {**manifest, "complete": False})
    assert "whose build did not finish; rerun --mode teacher_cache" in refusal(
        ckpts, tmp_path, f"teacher_cache.path={cache_copy}", *TOPK_ALL)


@pytest.mark.parametrize("damage, message", [
    ("missing", "is missing; copy the whole cache directory again or rebuild it"),
    ("truncated", "bytes, the manifest says"),
])
def test_a_missing_or_truncated_shard_is_named(ckpts, cache_copy, tmp_path, damage, message):
    shard = sorted(teacher_cache.read_manifest(cache_copy)["shards"])[0]
    if damage == "missing":
        (cache_copy / shard).unlink()
    else:
        with open(cache_copy / shard, "r+b") as f:
            f.truncate(100)
    text = refusal(ckpts, tmp_path, f"teacher_cache.path={cache_copy}", *TOPK_ALL)
    assert f"shard {shard}" in text and message in text


@pytest.mark.parametrize("override, named", [
    ("kd_loss_fn.temperature=2.0", "kd_loss_fn.temperature"),
    ("teacher_cache.k=12", "teacher_cache.k"),
    ("teacher_cache.seed=1", "teacher_cache.seed"),
])
def test_a_cache_built_for_other_settings_is_refused(ckpts, cache_copy, tmp_path, override, named):
    text = refusal(ckpts, tmp_path, f"teacher_cache.path={cache_copy}", *TOPK_ALL, override)
    assert text.startswith(f"teacher_cache.path={cache_copy} was built for other {named} than this run's")


def test_a_cache_built_from_other_data_is_refused(ckpts, cache_copy, tmp_path):
    text = refusal(ckpts, tmp_path, f"teacher_cache.path={cache_copy}", *TOPK_ALL, "dataset.seq_length=64")
    assert "was built for other datasets (or their preprocessing)" in text


def test_a_teacher_model_other_than_the_cache_teacher_is_refused(ckpts, cache_copy, tmp_path):
    text = refusal(ckpts, tmp_path, f"teacher_cache.path={cache_copy}", *TOPK_ALL,
                   f"teacher_model.pretrained_model_name_or_path={ckpts['qwen3']['teacher']}")
    assert "is not the teacher the cache at" in text


@pytest.mark.parametrize("override, message", [
    ("hidden_kd.weight=1.0", "hidden-state KD needs the teacher's layer outputs"),
    ("fused_linear_loss=false", "KD from a cache is computed by the fused loss only"),
    ("kd_loss_fn.divergence=reverse_kl", "a sparse teacher cache gives forward KL only"),
])
def test_settings_the_cached_path_cannot_compute_are_refused(ckpts, cache_copy, tmp_path, override, message):
    assert message in refusal(ckpts, tmp_path, f"teacher_cache.path={cache_copy}", *TOPK_ALL, override)


def test_a_build_into_a_cache_of_other_settings_is_refused(ckpts, cache_copy, tmp_path):
    with pytest.raises(PreflightError, match="holds a cache built with other teacher_cache.k; pass another"):
        run.prepare(["--mode", "teacher_cache", *args(ckpts, tmp_path / "kd"), f"teacher_cache.path={cache_copy}",
                     "teacher_cache.kind=topk", "teacher_cache.k=8"])


def test_manifest_records_what_the_cache_is_valid_for(caches):
    manifest = caches["one_process"][1]
    assert {"teacher", "tokenizer", "datasets", "temperature", "kind", "k", "seed"} <= set(manifest)
    assert manifest["datasets"]["dataset"]["dataset_name"] == manifest["datasets"]["validation_dataset"]["dataset_name"]
    json.dumps(manifest)


# --------------------------------------------------------------------------- the tournament


def tournament_args(ckpts, caches, root: Path, out: str, narrow: bool = True) -> list[str]:
    """The tiny student and (``narrow``) a narrower prune of the teacher, 2 KD steps each from the sampled cache,
    evaluated on the validation rows' contexts."""
    candidates = ["--candidate", f"student={ckpts['llama']['student']}"]
    if narrow:
        if not (root / "narrow").exists():
            prune(ckpts["llama"]["teacher"], [{"ffn": {"intermediate_size": 64}}] * 4, root / "narrow")
        candidates += ["--candidate", f"narrow={root / 'narrow'}"]
    return ["-m", "tools.tournament", "--cache", str(caches["sampled"][0]), "--steps", "2", "--out", str(root / out),
            *candidates,
            "--teacher", str(ckpts["llama"]["teacher"]), "--data", str(ckpts["data"] / "validation.jsonl"),
            "--text-field", "context", "--seq-length", "64",
            *tiny_overrides(ckpts, "llama", root / "unused", steps=2, teacher=False), "optimizer.lr=1e-3"]


@pytest.fixture(scope="module")
def tournaments(ckpts, caches, tmp_path_factory):
    """A tournament launched with ``python`` (each KD run a child torchrun of 2 processes), and its first candidate's
    launched with ``torchrun`` on 2 processes (each KD run spans the tool's own ranks): ``{launch: (stdout,
    summary)}``."""
    root = tmp_path_factory.mktemp("tournament")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    spawned = subprocess.run([sys.executable, *tournament_args(ckpts, caches, root, "python"), "--nproc", "2"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert spawned.returncode == 0, spawned.stderr[-4000:]
    ranks = torchrun(tournament_args(ckpts, caches, root, "torchrun", narrow=False), timeout=600)
    assert ranks.returncode == 0, ranks.stderr[-4000:]
    return {launch: (result.stdout, json.loads((root / launch / "summary.json").read_text()))
            for launch, result in (("python", spawned), ("torchrun", ranks))}


def test_the_tournament_ranks_candidates_by_ce_after_kd_from_the_cache(tournaments):
    stdout, summary = tournaments["python"]
    results = summary["candidates"]
    assert sorted(summary["ranking"]) == ["narrow", "student"]
    assert [results[n]["ce_after"] for n in summary["ranking"]] == sorted(r["ce_after"] for r in results.values())
    for name, r in results.items():
        assert r["ce_after"] < r["ce_before"], name  # 2 steps at lr 1e-3 from the cache lower the CE
        gap = (r["ce_before"] - r["ce_after"]) / (r["ce_before"] - summary["teacher_ce"])
        assert r["gap_recovered"] == pytest.approx(gap)
        assert f"| {name} |" in stdout
    assert summary["kind"] == "sampled" and summary["steps"] == 2


def test_the_tournament_under_torchrun_runs_each_kd_on_its_own_ranks_with_the_same_results(tournaments):
    """Each KD run spans the tool's 2 ranks, as the python-launched one's 2 child processes: same models after."""
    (_, spawned), (ranks_out, ranks) = tournaments["python"], tournaments["torchrun"]
    assert ranks["ranking"] == ["student"]
    for name, r in ranks["candidates"].items():
        assert r["ce_before"] == pytest.approx(spawned["candidates"][name]["ce_before"], rel=1e-6)
        assert r["ce_after"] == pytest.approx(spawned["candidates"][name]["ce_after"], rel=1e-5)
        assert (Path(r["checkpoint"]) / "run.rank1.log").is_file()  # rank 1 ran its share of the KD run
    assert ranks_out.count("| rank | candidate |") == 1  # one table, from rank 0


def test_a_tournament_on_a_path_that_is_not_a_cache_stops_before_anything_runs(ckpts, tmp_path, capsys):
    from tools import tournament

    (tmp_path / "empty").mkdir()
    code = tournament.main(["--cache", str(tmp_path / "empty"), "--candidate", f"a={ckpts['llama']['student']}",
                            "--steps", "2", "--out", str(tmp_path / "out"), "--data", str(tmp_path / "none.jsonl")])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"tournament: error: --cache {tmp_path / 'empty'} is not a complete teacher cache; build it with "
        "python -m run --mode teacher_cache")
    assert not (tmp_path / "out").exists()
