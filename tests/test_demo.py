"""tools/demo.py's pieces on a 2-step run: the exported student is the trained one, and stages skip."""

import json

import pytest
import torch

from conftest import checkpoint_tensors, read_jsonl
from tools import demo, demo_data
from tools.prune_student import prune

pytestmark = pytest.mark.usefixtures("unpatch_automodel_after_module")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A demo-sized teacher (random), its pruned student, and a 2-step KD run with a consolidated export."""
    root = tmp_path_factory.mktemp("demo")
    data = root / "data"
    demo_data.write_data(data)
    teacher = demo.write_random_teacher(root / "teacher", data / "tokenizer")
    student = prune(teacher, demo.STUDENT_BLOCKS, root / "student")
    run = dict(steps=2, lr=1e-3, warmup=1, global_batch=4, local_batch=2, val_every=2)
    export = demo.torchrun("kd", [
        f"model.pretrained_model_name_or_path={student}", "model.anymodel_descriptor=llama", "model.torch_dtype=float32",
        f"teacher_model.pretrained_model_name_or_path={teacher}", "teacher_model.torch_dtype=float32", "kd_ratio=0.5",
        *demo.dataset_overrides(data), *demo.schedule_overrides(run, root / "run"),
    ], root / "run")
    return {"data": data, "student": student, "run": root / "run", "export": export}


def test_export_is_a_consolidated_checkpoint_carrying_the_block_configs(trained):
    config = json.loads((trained["export"] / "config.json").read_text())
    assert [b["attention"]["no_op"] for b in config["block_configs"]] == [False, True, False, False]
    assert [b["ffn"]["intermediate_size"] for b in config["block_configs"]] == [192, 256, 128, 192]
    assert (trained["export"] / "tokenizer.json").is_file()
    exported, initial = checkpoint_tensors(trained["export"]), checkpoint_tensors(trained["student"])
    assert exported.keys() == initial.keys()
    assert any(not torch.equal(exported[k], initial[k]) for k in initial), "the export holds untrained weights"


def test_export_loads_with_anymodel_descriptor_and_reproduces_the_final_validation_loss(trained):
    """The recipe's last validation pass ran the trained model over every validation token; the
    exported model, loaded as a user loads it, must give the same cross-entropy from its logits."""
    result = demo.evaluate_models({"student": trained["export"]}, trained["data"])["student"]
    logged = read_jsonl(trained["run"] / "validation.jsonl")[-1]
    assert logged["step"] == 1 and result["tokens"] == logged["num_label_tokens"]
    assert result["ce"] == pytest.approx(logged["ce_loss"], rel=1e-5)
    # Loaded with its block configs: the pruned student's parameter count, not the teacher's.
    assert result["parameters"] == sum(t.numel() for t in checkpoint_tensors(trained["student"]).values())


def test_a_stage_is_skipped_only_when_its_fingerprint_matches(tmp_path):
    stage = demo.Stage(tmp_path, "s", lr=1e-3, upstream="abc")
    stage.dir.mkdir()
    assert not stage.fresh()
    stage.done(rows=1)
    assert demo.Stage(tmp_path, "s", lr=1e-3, upstream="abc").fresh()
    assert not demo.Stage(tmp_path, "s", lr=2e-3, upstream="abc").fresh()
    assert not demo.Stage(tmp_path, "s", lr=1e-3, upstream="abd").fresh()


def test_a_stage_rerun_with_the_same_settings_is_a_new_input_to_the_results(tmp_path):
    """results.json is rebuilt from a stage's DONE record, which a rerun (its output deleted) renews."""
    stage = demo.Stage(tmp_path, "s", lr=1e-3)
    stage.dir.mkdir()
    stage.fresh()
    first = stage.done(rows=1)
    again = demo.Stage(tmp_path, "s", lr=1e-3)
    again.fresh()
    (stage.dir / "DONE").unlink()
    assert not again.fresh()
    second = again.done(rows=1)
    assert first["fingerprint"] == second["fingerprint"] and first != second == again.info()


def test_a_stage_whose_checkpoint_is_gone_is_not_fresh(tmp_path):
    stage = demo.Stage(tmp_path, "s", lr=1e-3)
    (stage.dir / "ckpt").mkdir(parents=True)
    (stage.dir / "ckpt" / "config.json").write_text("{}")
    stage.fresh()
    stage.done(checkpoint=str(stage.dir / "ckpt"))
    assert demo.Stage(tmp_path, "s", lr=1e-3).fresh()
    (stage.dir / "ckpt" / "config.json").unlink()
    assert not demo.Stage(tmp_path, "s", lr=1e-3).fresh()


def test_the_cached_rows_give_the_points_below_online_kd_and_the_step_against_a_ce_only_step():
    """What the issue judges the caches by, printed: teacher 4.0, pruned student 5.0 (a gap of 1 nat), so a CE of
    4.04 recovers 96 % and 4.055 94.5 %, 1.5 points below; 0.33 s a step against CE only's 0.3 s is 1.10x."""
    losses = {"teacher": 4.0, "student_init": 5.0, "student_ce": 4.1, "student_kd": 4.04, "student_kd_hidden": 4.03,
              "student_kd_cache_sampled": 4.055, "student_kd_cache_topk": 4.08}
    results = {f"{name}_val_loss": loss for name, loss in losses.items()}
    results.update({demo.gap_key(name): 5.0 - loss for name, loss in losses.items() if name.startswith("student_")},
                   unigram_val_loss=6.0, online_kd_seconds_per_step=0.42, ce_only_seconds_per_step=0.3,
                   cached_kd={"sampled": {"k": 12, "bytes_per_label_token": 52.2, "seconds_per_step": 0.33},
                              "topk": {"k": 7, "bytes_per_label_token": 53.2, "seconds_per_step": 0.3}},
                   tournament={"ranking": [], "candidates": {}, "steps": 40, "kind": "sampled", "k": 12})
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in demo.table(results).splitlines() if line.startswith("| ")}
    assert rows["online"][2:] == ["0.420 (1.40x)", "4.040", "96.0%"]
    assert rows["sampled cache, k=12"][2:] == ["0.330 (1.10x)", "4.055", "94.5% (-1.50 points)"]
    assert rows["topk cache, k=7"][2:] == ["0.300 (1.00x)", "4.080", "92.0% (-4.00 points)"]
