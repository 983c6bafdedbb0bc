"""Spec for ``hidden_kd``: the term's value and gradients against a float64 reference written the obvious way
(layer outputs captured with the graph, the loss formulas spelled out, ``backward``), on a real heterogeneous
AnyModel student and its teacher; how ``hidden_kd.layers`` pairs layers; and the one-line refusals preflight makes
before any weights load. Under every parallelism, see ``tests/test_recipe.py``."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from distillation import hidden_kd
from safety import preflight
from conftest import tiny_overrides, torchrun
from test_preflight import config, copy_checkpoint, error

LOSSES = hidden_kd.LOSSES
IGNORE = -100


def reference_per_token(kind, student, teacher):
    if kind == "cosine":
        return 1 - (student * teacher).sum(-1) / (student.norm(dim=-1) * teacher.norm(dim=-1))
    if kind == "mse":
        return ((student - teacher) ** 2).sum(-1) / student.shape[-1]
    return ((student - teacher) ** 2).sum(-1) / (teacher**2).sum(-1)


def layer_outputs(model, input_ids) -> dict[int, torch.Tensor]:
    outputs = {}
    handles = [layer.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out))
               for i, layer in enumerate(model.model.layers)]
    model(input_ids=input_ids)
    for handle in handles:
        handle.remove()
    return outputs


@pytest.fixture(scope="module")
def models(ckpts, patched):
    from nemo_automodel import NeMoAutoModelForCausalLM

    student = NeMoAutoModelForCausalLM.from_pretrained(str(ckpts["llama"]["student"]), anymodel_descriptor="llama",
                                                       torch_dtype=torch.float32).double()
    teacher = AutoModelForCausalLM.from_pretrained(str(ckpts["llama"]["teacher"]), torch_dtype=torch.float32).double()
    return student, teacher.eval()


@pytest.fixture(scope="module")
def batch(models):
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, models[0].config.vocab_size, (2, 12), generator=generator)
    labels = input_ids.roll(-1, dims=1)
    labels[0, :5] = IGNORE  # a prompt
    labels[:, -1] = IGNORE
    labels[1, 7:] = IGNORE  # padding
    return input_ids, labels


@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("layers", ["all", [[0, 1], [2, 3], [3, 3]]])
def test_value_and_student_gradients_equal_the_float64_reference(models, batch, kind, layers):
    student, teacher = models
    input_ids, labels = batch
    mask = labels != IGNORE
    # A step's count covers every microbatch of the step, so it is larger than this batch's.
    num_label_tokens = int(mask.sum()) + 7
    weight = 0.7
    pairs = hidden_kd.layer_pairs(layers, 4, 4)

    with torch.no_grad():
        teacher_out = layer_outputs(teacher, input_ids)
    student_out = layer_outputs(student, input_ids)
    terms = [reference_per_token(kind, student_out[s], teacher_out[t])[mask].sum() / num_label_tokens
             for s, t in pairs]
    ref_value = sum(terms) / len(pairs)
    student.zero_grad(set_to_none=True)
    (weight * ref_value).backward()
    ref_grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}

    term = hidden_kd.HiddenStateKD([student], [teacher], weight, kind, pairs)
    try:
        term.begin([mask], grad_scale=1.0 / num_label_tokens)
        with torch.no_grad():
            teacher(input_ids=input_ids)
        logits = student(input_ids=input_ids).logits
        student.zero_grad(set_to_none=True)
        (logits.sum() * 0.0).backward()  # only the hidden term's gradient reaches the weights
        value = term.hidden_loss(term.take_sums(lambda sums: sums), num_label_tokens)
    finally:
        term.remove()

    assert value == pytest.approx(ref_value.item(), rel=1e-10)
    assert ref_value.item() > 0
    for name, param in student.named_parameters():
        # Weights after the last distilled layer (the final norm, the LM head) get none of the term's gradient.
        ref = ref_grads.get(name, torch.zeros_like(param))
        torch.testing.assert_close(param.grad, ref, rtol=1e-9, atol=1e-12, msg=name)
    assert ref_grads["model.embed_tokens.weight"].abs().sum() > 0


def test_a_teacher_identical_to_the_student_gives_zero(models, batch):
    student, _ = models
    input_ids, labels = batch
    teacher = copy.deepcopy(student)  # what loading the student's checkpoint as the teacher gives
    term = hidden_kd.HiddenStateKD([student], [teacher], 1.0, "normalized_mse", hidden_kd.layer_pairs("all", 4, 4))
    try:
        with torch.no_grad():
            term.begin([labels != IGNORE], grad_scale=0.0)
            teacher(input_ids=input_ids)
            student(input_ids=input_ids)
        assert term.take_sums(lambda sums: sums).abs().max().item() < 1e-12
    finally:
        term.remove()


def test_a_student_layer_before_its_teacher_layer_is_an_error_not_a_silent_zero(models, batch):
    student, teacher = models
    input_ids, labels = batch
    term = hidden_kd.HiddenStateKD([student], [teacher], 1.0, "cosine", [(0, 0)])
    try:
        term.begin([labels != IGNORE], grad_scale=0.0)
        with pytest.raises(RuntimeError, match="student layer 0 ran before teacher layer 0"):
            student(input_ids=input_ids)
    finally:
        term.remove()


@pytest.mark.parametrize("layers, depths, pairs", [
    ("all", (3, 3), [(0, 0), (1, 1), (2, 2)]),
    ([2, 0], (3, 3), [(2, 2), (0, 0)]),
    ([[0, 1], [1, 3]], (2, 4), [(0, 1), (1, 3)]),
])
def test_layers_setting_gives_student_teacher_pairs(layers, depths, pairs):
    assert hidden_kd.layer_pairs(layers, *depths) == pairs


@pytest.mark.parametrize("override, message", [
    ("hidden_kd.weight=-1", "hidden_kd.weight=-1 must be a number >= 0 (0 turns hidden-state KD off)"),
    ("hidden_kd.loss=l1", "hidden_kd.loss='l1' is not one of cosine, mse, normalized_mse"),
    ("hidden_kd.layers=[4]", "hidden_kd.layers: layer 4 is not one of the student's 4 layers (0..3)"),
    ("hidden_kd.layers=[[0,0],[0,0]]", "hidden_kd.layers: [0, 0] is listed twice"),
    ("hidden_kd.layers=[[0,1,2]]", "hidden_kd.layers: [0, 1, 2] is neither a layer index nor a [student, teacher] pair"),
    ("distributed.cp_size=2 fused_linear_loss=false", "hidden_kd: distributed.cp_size=2 is not supported (context parallelism is untested "
                              "with hidden-state KD): set distributed.cp_size=1 or hidden_kd.weight=0"),
])
def test_bad_hidden_kd_settings_are_refused_in_one_line(ckpts, tmp_path, override, message):
    assert error(ckpts, tmp_path, "hidden_kd.weight=1", *override.split(), world_size=2) == message


def teacher_with(ckpts, tmp_path, **config_changes) -> str:
    """The tiny teacher with ``config.json`` changed (preflight reads configs only, so the weights need not fit)."""
    return f"teacher_model.pretrained_model_name_or_path={copy_checkpoint(ckpts['llama']['teacher'], tmp_path / 't', config_changes=config_changes)}"


def test_a_teacher_of_another_depth_needs_explicit_pairs(ckpts, tmp_path):
    deeper = teacher_with(ckpts, tmp_path, num_hidden_layers=6)
    assert error(ckpts, tmp_path, deeper, "hidden_kd.weight=1") == (
        "hidden_kd.layers=all pairs each layer with its namesake, but the student has 4 layers and the teacher 6: "
        "list the pairs, e.g. hidden_kd.layers=[[0,0],[1,2]]")
    preflight.check(config(ckpts, tmp_path, deeper, "hidden_kd.weight=1", "hidden_kd.layers=[[0,0],[3,5]]"), "kd",
                    world_size=1)


def test_a_teacher_of_another_width_is_refused_naming_both_sizes(ckpts, tmp_path):
    wider = teacher_with(ckpts, tmp_path, hidden_size=128)
    assert error(ckpts, tmp_path, wider, "hidden_kd.weight=1", "hidden_kd.layers=[[0,0]]") == (
        "hidden_kd: the student's hidden_size is 64 and the teacher's 128; hidden-state KD compares them channel by "
        "channel (no projection is learned): set hidden_kd.weight=0 or use a teacher of the student's width")
    preflight.check(config(ckpts, tmp_path, wider), "kd", world_size=1)  # without hidden_kd the teacher is fine


def test_a_pair_split_across_pipeline_stages_stops_every_rank_with_one_line(ckpts, tmp_path):
    # PP=2 puts layers 0-1 on rank 0 and 2-3 on rank 1, for the student and the teacher alike.
    args = [*tiny_overrides(ckpts, "llama", tmp_path / "ck"), "distributed.pp_size=2",
            "distributed.pipeline.pp_microbatch_size=2", "step_scheduler.local_batch_size=4", "hidden_kd.weight=1",
            "hidden_kd.layers=[[0,0],[1,2]]"]
    result = torchrun(["-m", "run", "--mode", "kd", *args], nproc=2)
    assert result.returncode != 0
    line = ("run.py: error: hidden_kd.layers: student layer 1 and teacher layer 2 are in different pipeline stages, "
            "so the stage that trains 1 never sees 2: pair layers the pipeline split keeps together, or set "
            "distributed.pp_size=1")
    assert result.stderr.count(line) >= 2, result.stderr[-3000:]  # both ranks, neither left waiting for the other
