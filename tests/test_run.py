"""run.py: modes, the three override forms, YAML values, and one-line errors for bad input."""

import os
import subprocess
import sys

import pytest
import yaml

import run
from conftest import REPO


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "run", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def fresh_python(code: str):
    """Run ``code`` in a new interpreter: what this process has patched already cannot leak into it."""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_all_three_override_forms_are_collected():
    mode, config, overrides = run.parse_argv(
        ["--mode", "kd", "kd_ratio=0.9", "--optimizer.lr=1e-4", "--step_scheduler.max_steps", "7"])
    assert mode == "kd" and config == run.HERE / "kd.yaml"
    assert overrides == [("kd_ratio", "0.9"), ("optimizer.lr", "1e-4"), ("step_scheduler.max_steps", "7")]


def test_mode_and_config_accept_equals_form_and_default_per_mode():
    assert run.parse_argv(["--mode=pretrain"])[1] == run.HERE / "pretrain.yaml"
    assert run.parse_argv(["--mode", "kd", "--config=pretrain.yaml"])[1].name == "pretrain.yaml"
    assert run.parse_argv(["-c", "kd.yaml", "--mode", "kd"])[1].name == "kd.yaml"


def test_overrides_are_applied_as_yaml_scalars():
    _, config, overrides = run.parse_argv([
        "--mode", "kd", "kd_ratio=0.9", "optimizer.lr=1e-4", "--step_scheduler.max_steps", "7",
        "model.block_configs_path=null", "optimizer.betas=[0.8, 0.9]", "distributed.sequence_parallel=true",
        "model.anymodel_descriptor=llama"])
    cfg = run.load_config(config, overrides)
    assert cfg.get("kd_ratio") == 0.9
    assert cfg.get("optimizer.lr") == 1e-4
    assert cfg.get("step_scheduler.max_steps") == 7
    assert cfg.get("model.block_configs_path") is None
    assert list(cfg.get("optimizer.betas")) == [0.8, 0.9]
    assert cfg.get("distributed.sequence_parallel") is True
    assert cfg.get("model.anymodel_descriptor") == "llama"


def test_unknown_key_in_an_existing_section_warns_and_is_added(capsys):
    cfg = run.load_config(run.HERE / "kd.yaml", [("optimizer.momentum", "0.1")])
    assert "override optimizer.momentum is not in kd.yaml" in capsys.readouterr().err
    assert cfg.get("optimizer.momentum") == 0.1


@pytest.mark.parametrize("key, message", [
    ("optimzer.lr", "override optimzer.lr: kd.yaml has no section 'optimzer'; did you mean optimizer?"),
    ("modle.pretrained_model_name_or_path", "override modle.pretrained_model_name_or_path: kd.yaml has no section "
                                            "'modle'; did you mean model?"),
])
def test_override_of_a_missing_section_is_an_error_naming_the_closest(key, message):
    with pytest.raises(run.UsageError) as e:
        run.load_config(run.HERE / "kd.yaml", [(key, "0.1")])
    assert str(e.value) == message


def test_override_of_an_optional_automodel_section_is_added():
    assert run.load_config(run.HERE / "kd.yaml", [("lr_scheduler.lr_warmup_steps", "5")]).get(
        "lr_scheduler.lr_warmup_steps") == 5


def test_unknown_key_hint_names_the_nearest_key(capsys):
    run.load_config(run.HERE / "kd.yaml", [("kd_ration", "0.1")])
    assert "did you mean kd_ratio?" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--mode", "train"], "--mode must be one of kd, pretrain, teacher_cache (got 'train')"),
    ([], "--mode must be one of kd, pretrain, teacher_cache (got None)"),
    (["--mode", "kd", "-c", "missing.yaml"], "config file missing.yaml does not exist"),
    (["--mode", "kd", "stray"], "unexpected argument 'stray'"),
])
def test_bad_command_line_is_a_usage_error(argv, message):
    with pytest.raises(run.UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run.parse_argv(argv)


@pytest.mark.parametrize("text, message", [
    ("model:\n  lr: [1, 2\n", "is not valid YAML at line 3, column 1: expected ',' or ']', but got '<stream end>'"),
    ("- model\n", "is not a YAML mapping of sections; start from kd.yaml or pretrain.yaml"),
    ("", "is not a YAML mapping of sections; start from kd.yaml or pretrain.yaml"),
])
def test_malformed_config_file_is_a_usage_error_with_the_place(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(run.UsageError) as e:
        run.load_config(path, [])
    assert str(e.value) == f"{path} {message}"


def test_unknown_mode_exits_2_with_one_line_naming_every_mode():
    result = cli("--mode", "distill")
    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == "run.py: error: --mode must be one of kd, pretrain, teacher_cache (got 'distill')"
    assert "Traceback" not in result.stderr


def test_missing_checkpoint_path_names_the_key_to_set(tmp_path):
    result = cli("--mode", "kd", f"checkpoint.checkpoint_dir={tmp_path / 'ck'}")
    assert result.returncode == 2
    assert "model.pretrained_model_name_or_path is not set; pass model.pretrained_model_name_or_path=" in result.stderr
    assert not (tmp_path / "ck").exists()


def test_kd_ratio_outside_unit_interval_is_rejected_before_loading(ckpts, tmp_path):
    paths = ckpts["llama"]
    result = cli("--mode", "kd", f"model.pretrained_model_name_or_path={paths['student']}",
                 f"teacher_model.pretrained_model_name_or_path={paths['teacher']}", "kd_ratio=1.5",
                 f"checkpoint.checkpoint_dir={tmp_path / 'ck'}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == \
        "run.py: error: kd_ratio=1.5 must be a number in [0, 1] (0: CE only, 1: KD only)"
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "ck").exists()


def test_with_cuda_present_nothing_is_patched_for_cpu():
    code = (
        # Import first: some of the stack probes CUDA at import time, which a CPU build cannot fake.
        "import torch, patch_automodel, loss\n"
        "torch.cuda.is_available = lambda: True\n"
        "originals = (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.max_memory_allocated,"
        " torch.cuda.reset_peak_memory_stats)\n"
        "from nemo_automodel._transformers import auto_model; infra = auto_model.apply_model_infrastructure\n"
        "from nemo_automodel.components.models.common import utils as model_utils\n"
        "rms_norm = model_utils._float32_rms_norm_fwd\n"
        "import run\nfrom common import cpu_support\n"
        "assert run.setup_runtime() is False\n"
        "assert not cpu_support.is_applied()\n"
        "assert originals == (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.max_memory_allocated,"
        " torch.cuda.reset_peak_memory_stats)\n"
        "assert auto_model.apply_model_infrastructure is infra\n"
        "assert model_utils._float32_rms_norm_fwd is rms_norm\n"
        "print('untouched')\n"
    )
    result = fresh_python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("untouched")


def test_cpu_support_refuses_to_patch_a_cuda_machine():
    code = (
        "import torch\nfrom common import cpu_support\n"
        "torch.cuda.is_available = lambda: True\n"
        "cpu_support.apply()\n"
    )
    result = fresh_python(code)
    assert result.returncode != 0
    assert "RuntimeError: cpu_support.apply() called on a machine with CUDA" in result.stderr


def test_cpu_memory_stand_in_reports_real_peak_rss():
    code = (
        "import run, torch, resource\nrun.setup_runtime()\n"
        "x = torch.ones(64 * 2**20, dtype=torch.float32)  # 256 MiB\n"
        "print(torch.cuda.max_memory_allocated() / 2**20)\n"
    )
    result = fresh_python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.strip().splitlines()[-1]) > 256


def test_every_logged_row_is_on_disk_as_soon_as_it_is_logged(tmp_path):
    # AutoModel's loggers buffer 100 rows unless told otherwise; a crash would lose them all.
    log = tmp_path / "training.jsonl"
    result = fresh_python(
        "import run; run.setup_runtime()\n"
        "from nemo_automodel.recipes.llm import train_ft\n"
        "from nemo_automodel.components.loggers.metric_logger import MetricsSample\n"
        f"logger = train_ft.build_metric_logger({str(log)!r})\n"
        "for step in range(3):\n"
        "    logger.log(MetricsSample(step=step, epoch=0, metrics={'loss': 1.0}))\n"
        f"    assert len(open({str(log)!r}).read().splitlines()) == step + 1\n"
        "import os; os._exit(0)  # no close, no interpreter teardown: as after a crash\n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(log.read_text().splitlines()) == 3


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_exits_0_with_usage_modes_override_forms_and_shipped_configs(flag):
    result = cli("--mode", "kd", "kd_ratio=0.9", flag)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(run.USAGE + "\n")
    for text in ("--mode kd", "--mode pretrain", "section.key=value   --section.key=value   --section.key value",
                 "--print-config", "kd.yaml", "pretrain.yaml", f"{run.HERE / 'README.md'} explains them"):
        assert text in result.stdout
    assert "error" not in result.stderr


def test_help_and_print_config_are_never_overrides_or_values():
    _, _, overrides = run.parse_argv(["--mode", "kd", "--print-config", "kd_ratio=0.9", "--model.x", "-h",
                                      "--optimizer.lr", "--help"])
    assert overrides == [("kd_ratio", "0.9"), ("model.x", "true"), ("optimizer.lr", "true")]


def test_print_config_shows_the_resolved_config_and_writes_nothing(ckpts, tmp_path):
    paths = ckpts["llama"]
    result = cli("--mode", "kd", f"model.pretrained_model_name_or_path={paths['student']}",
                 "model.anymodel_descriptor=auto", f"teacher_model.pretrained_model_name_or_path={paths['teacher']}",
                 "kd_ratio=0.25", "--optimizer.lr", "3e-4", f"checkpoint.checkpoint_dir={tmp_path / 'ck'}",
                 "--print-config")
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = yaml.safe_load(result.stdout)
    assert cfg["kd_ratio"] == 0.25 and cfg["optimizer"]["lr"] == 3e-4
    assert cfg["model"]["pretrained_model_name_or_path"] == str(paths["student"])
    assert cfg["kd_loss_fn"]["_target_"] == "loss.KDLoss"
    assert cfg["dist_env"]["backend"] == "gloo"  # the CPU switch: this suite runs without CUDA
    assert list(tmp_path.iterdir()) == []


def test_print_config_stops_on_what_preflight_refuses(ckpts, capsys):
    import patch_automodel
    from safety import preflight

    paths = ckpts["llama"]
    try:
        with pytest.raises(preflight.PreflightError, match=r"^kd_ratio=1.5 must be a number in \[0, 1\]"):
            run.main(["--mode", "kd", f"model.pretrained_model_name_or_path={paths['student']}",
                      f"teacher_model.pretrained_model_name_or_path={paths['teacher']}", "kd_ratio=1.5",
                      "--print-config"])
    finally:
        patch_automodel.remove_patch()  # run.main patched AutoModel; later modules expect it as shipped
    assert capsys.readouterr().out == ""
