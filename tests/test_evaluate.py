"""tools/evaluate.py: CE equal to a direct fp32 forward pass, on 1 and 2 processes, every checkpoint form, and
one-line errors for bad paths and bad data."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import run_job
from modelopt.torch.puzzletron.anymodel import ModelDescriptorFactory, deci_x_patcher
from tools.build_checkpoints import english_corpus
from tools import evaluate as evaluate_module
from tools.evaluate import EvaluateError, add_gaps, evaluate, table

pytestmark = pytest.mark.usefixtures("unpatch_automodel_after_module")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """Seven ``{"title", "text"}`` rows of English of different lengths, as JSON lines."""
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    paragraphs = english_corpus()[:7]
    path.write_text("".join(json.dumps({"title": f"topic {i}", "text": p[:60 + 90 * i]}) + "\n"
                            for i, p in enumerate(paragraphs)))
    return path


@pytest.fixture(scope="module")
def one_process(ckpts, rows):
    """The Llama teacher (Hugging Face layout) and its student (AnyModel layout) on ``rows``, one process."""
    paths = ckpts["llama"]
    return evaluate({"teacher": paths["teacher"], "student": paths["student"]}, rows, batch_size=3)


def direct_ce(model, tokenizer, texts) -> tuple[float, int]:
    """Mean CE of every token after the first, one row per forward pass, in float64."""
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1]
            total += F.cross_entropy(logits.double(), ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    return total / count, count


@pytest.mark.parametrize("name", ["teacher", "student"])
def test_ce_equals_a_direct_fp32_forward_pass(ckpts, rows, one_process, name):
    path = ckpts["llama"][name]
    if name == "student":  # ModelOpt's own AnyModel build, not this example's patch
        with deci_x_patcher(ModelDescriptorFactory.get("llama")):
            model = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32)
    texts = [json.loads(line)["text"] for line in rows.read_text().splitlines()]
    ce, tokens = direct_ce(model.eval(), AutoTokenizer.from_pretrained(str(path)), texts)
    result = one_process[name]
    assert result["tokens"] == tokens
    assert result["ce"] == pytest.approx(ce, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(ce), rel=1e-5)
    assert result["parameters"] == sum(p.numel() for p in model.parameters())


def test_prompt_answer_mapping_scores_the_tokens_automodels_column_mapped_dataset_scores(ckpts, rows):
    from nemo_automodel.components.datasets.llm.column_mapped_text_instruction_dataset import (
        ColumnMappedTextInstructionDataset,
    )
    from nemo_automodel.components.datasets.utils import default_collater

    teacher = str(ckpts["llama"]["teacher"])
    got = evaluate({"teacher": teacher}, rows, prompt_field="title", answer_field="text", seq_length=64)["teacher"]
    dataset = ColumnMappedTextInstructionDataset(str(rows), {"context": "title", "answer": "text"},
                                                 AutoTokenizer.from_pretrained(teacher), seq_length=64, truncation=True)
    batch = default_collater([dataset[i] for i in range(len(dataset))])
    model = AutoModelForCausalLM.from_pretrained(teacher, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"].flatten()
    assert got["tokens"] == int((labels != -100).sum())
    assert got["ce"] == pytest.approx(F.cross_entropy(logits.flatten(0, 1).double(), labels).item(), rel=1e-5)


def test_two_processes_give_the_one_process_result_and_the_gap_recovered(ckpts, rows, one_process):
    paths = ckpts["llama"]
    # The student as its own baseline has recovered none of the gap; the teacher as a student all of it.
    result = run_job(["-m", "tools.evaluate", "--teacher", str(paths["teacher"]), "--baseline", str(paths["student"]),
                      "--student", str(paths["student"]), "--student", str(paths["teacher"]), "--data", str(rows),
                      "--json"], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout)
    assert got["processes"] == 2
    models = got["models"]
    for name, reference in (("teacher", "teacher"), ("baseline", "student"), ("student 1", "student"),
                            ("student 2", "teacher")):
        assert models[name]["tokens"] == one_process[reference]["tokens"]
        assert models[name]["ce"] == pytest.approx(one_process[reference]["ce"], rel=1e-6)
    assert models["student 1"]["gap_recovered"] == 0.0
    assert models["student 2"]["gap_recovered"] == pytest.approx(1.0)


def test_table_shows_each_models_share_of_the_gap(one_process):
    halfway = (one_process["teacher"]["ce"] + one_process["student"]["ce"]) / 2
    results = {"teacher": dict(one_process["teacher"]), "baseline": dict(one_process["student"]),
               "student": {**one_process["student"], "ce": halfway}}
    add_gaps(results)
    lines = table(results, "rows.jsonl", 1).splitlines()
    assert lines[0] == "| model | checkpoint | parameters | CE (nats/token) | perplexity | gap recovered |"
    assert [line.rsplit("|", 2)[1].strip() for line in lines[2:5]] == ["", "0.0%", "50.0%"]
    assert lines[-1] == f"{one_process['teacher']['tokens']:,} tokens scored (rows.jsonl), 1 process"


def test_a_run_directory_means_its_newest_consolidated_export(ckpts, rows, one_process, tmp_path):
    export = tmp_path / "run" / "epoch_0_step_4" / "model" / "consolidated"
    shutil.copytree(ckpts["llama"]["student"], export)
    (tmp_path / "run" / "LATEST").symlink_to("epoch_0_step_4")
    got = evaluate({"student": tmp_path / "run"}, rows, tokenizer=ckpts["llama"]["teacher"], batch_size=3)["student"]
    assert got["path"] == str(export)
    assert got["ce"] == one_process["student"]["ce"]


def bad_data(tmp_path, text):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    return path


@pytest.mark.parametrize("case, message", [
    ("missing checkpoint", "student {tmp}/nope does not exist; pass a checkpoint directory (with config.json), a "
                           "recipe checkpoint (epoch_E_step_S) or a run's checkpoint_dir"),
    ("file as checkpoint", "student {tmp}/bad.jsonl is a file, not a directory"),
    ("empty directory", "student {tmp} has no config.json and no complete recipe checkpoint"),
    ("sharded checkpoint only", "student {tmp}/run: epoch_0_step_1 holds only the recipe's sharded weights, no "
                                "consolidated export; train with checkpoint.save_consolidated=final"),
    ("unknown descriptor", "unknown anymodel_descriptor 'lama'; valid names: auto, gpt_oss"),
    ("missing data", "--data {tmp}/nope.jsonl does not exist; pass a JSON-lines file, one object per line with a "
                     "'text' field"),
    ("not JSON", "--data {tmp}/bad.jsonl: line 2 is not JSON (Expecting value, column 1); each line must be one "
                 "JSON object"),
    ("missing field", "--data {tmp}/bad.jsonl: line 1 has no string field 'text' (its fields: title, body); map other "
                      "fields with --text-field, or with --prompt-field and --answer-field"),
    ("no rows", "--data {tmp}/bad.jsonl has no rows"),
    ("prompt without answer", "--prompt-field and --answer-field go together"),
    ("row too long", "(max_position_embeddings=512); pass --seq-length 512"),
])
def test_bad_paths_and_data_are_one_line_errors_before_any_weights_load(ckpts, rows, tmp_path, monkeypatch, case,
                                                                         message):
    paths = ckpts["llama"]
    models, data, options = {"teacher": paths["teacher"], "student": paths["student"]}, rows, {}
    if case == "missing checkpoint":
        models["student"] = tmp_path / "nope"
    elif case == "file as checkpoint":
        models["student"] = bad_data(tmp_path, "{}")
    elif case == "empty directory":
        models["student"] = tmp_path
    elif case == "sharded checkpoint only":
        (tmp_path / "run" / "epoch_0_step_1" / "model").mkdir(parents=True)
        models["student"] = tmp_path / "run"
    elif case == "unknown descriptor":
        options["anymodel_descriptor"] = "lama"
    elif case == "missing data":
        data = tmp_path / "nope.jsonl"
    elif case == "not JSON":
        data = bad_data(tmp_path, '{"text": "fine"}\nnot json\n')
    elif case == "missing field":
        data = bad_data(tmp_path, '{"title": "a", "body": "b"}\n')
    elif case == "no rows":
        data = bad_data(tmp_path, "\n\n")
    elif case == "prompt without answer":
        options["prompt_field"] = "title"
    elif case == "row too long":
        data = bad_data(tmp_path, json.dumps({"text": " ".join(english_corpus())[:6000]}) + "\n")
    loads = []
    monkeypatch.setattr(evaluate_module, "load_model", lambda *args: loads.append(args))
    with pytest.raises(EvaluateError) as e:
        evaluate(models, data, **options)
    assert message.format(tmp=tmp_path) in str(e.value)
    assert "\n" not in str(e.value) and not loads


def test_command_line_error_is_one_line_with_exit_code_2(tmp_path, rows, capsys):
    assert evaluate_module.main(["--teacher", str(tmp_path / "nope"), "--student", str(tmp_path),
                                 "--data", str(rows)]) == 2
    out, err = capsys.readouterr()
    assert err.strip().splitlines()[-1] == (
        f"evaluate: error: teacher {tmp_path / 'nope'} does not exist; pass a checkpoint directory (with "
        "config.json), a recipe checkpoint (epoch_E_step_S) or a run's checkpoint_dir")
    assert out == ""
