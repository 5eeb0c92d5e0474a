"""A newcomer's first commands, run through the real entry points as subprocesses (issue 19)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _env(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    return env


def _run(cmd, tmp_path, **kw):
    return subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=300, **kw)


def _error_lines(stderr):
    return [ln for ln in stderr.splitlines() if ln.strip()]


def test_train_script_bad_data_is_one_line_exit_2(tmp_path):
    r = _run([sys.executable, "launch/train.py", "--data", str(tmp_path / "nonexistent")], tmp_path)
    assert r.returncode == 2
    lines = _error_lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith("train.py: error: data path"), r.stderr
    assert "Traceback" not in r.stderr


def test_train_without_config_names_the_machines_preset(tmp_path):
    (tmp_path / "empty").mkdir()
    r = _run([sys.executable, "launch/train.py", "--data", str(tmp_path / "empty")], tmp_path)
    assert r.returncode == 2 and "no class folders" in r.stderr
    assert r.stdout.startswith("preset: ") and "--config" in r.stdout.splitlines()[0]


def test_train_script_unknown_preset_is_one_line_exit_2(tmp_path):
    r = _run([sys.executable, "launch/train.py", "--config", "nosuchpreset"], tmp_path)
    assert r.returncode == 2
    lines = _error_lines(r.stderr)
    assert len(lines) == 1 and "nosuchpreset" in lines[0], r.stderr


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate's command not on PATH")
def test_accelerate_launch_quiet_bad_data_is_one_line_no_traceback(tmp_path):
    # The README's several-process form (`accelerate launch -q`), on one CPU process with every
    # launcher default given so accelerate's "defaults used" warning stays away.
    r = _run(["accelerate", "launch", "-q", "--cpu", "--num_processes", "1", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
              "launch/train.py", "--data", str(tmp_path / "nonexistent")], tmp_path)
    assert r.returncode != 0  # accelerate's launcher turns every failure into 1
    assert "Traceback" not in r.stderr and "CalledProcessError" not in r.stderr
    lines = _error_lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith("train.py: error: data path"), r.stderr


def test_bare_mineralnet_prints_usage_and_exits_2(tmp_path):
    r = _run([sys.executable, "-m", "mineralnet.cli"], tmp_path)
    assert r.returncode == 2
    assert "usage: mineralnet <command>" in r.stderr and r.stdout == ""
    r = _run([sys.executable, "-m", "mineralnet.cli", "--help"], tmp_path)
    assert r.returncode == 0 and "usage: mineralnet <command>" in r.stdout


@pytest.mark.parametrize("gpu, weights, available, expected", [
    (True, True, {"paper", "cpu", "cpu-pretrained"}, "paper"),
    (True, False, {"paper", "cpu"}, "paper"),
    (False, True, {"paper", "cpu", "cpu-pretrained"}, "cpu-pretrained"),
    (False, True, {"paper", "cpu"}, "cpu"),  # weights installed but no such preset in this version
    (False, False, {"paper", "cpu", "cpu-pretrained"}, "cpu"),
])
def test_default_preset_fits_the_machine(gpu, weights, available, expected):
    from mineralnet.train.cli import default_preset
    assert default_preset(gpu, weights, available) == expected


def test_presets_shown_to_readers_include_base():
    from mineralnet.config import load_config
    from mineralnet.config import TrainConfig
    assert load_config("base") == TrainConfig().validate()


def test_train_help_is_grouped_with_choices_and_each_default_once(capsys):
    from mineralnet.cli import main as cli_main
    with pytest.raises(SystemExit) as e:
        cli_main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for section in ("data:", "model:", "augmentation:", "optimisation:", "loss:", "performance / distribution:",
                    "run control:"):
        assert f"\n{section}\n" in out, section
    for flag in ("--loss {ce,topk,wtopk,center}", "--optimizer {sgd,adamw}", "--scheduler {plateau,cosine,none}",
                 "--precision {fp32,bf16,fp16}", "--normalize {dataset,imagenet}", "--loss-scope {global,local}"):
        assert flag in out, flag
    assert "(default: None)" not in out
    flat = " ".join(out.split())
    assert flat.count("(default runs/") == 1 and "(default runs/<date>-<backbone>-s<stages>-<loss>) (default" not in flat
    assert "a preset changes many" in flat


def test_a_choice_field_rejects_other_values(capsys):
    from mineralnet.cli import main as cli_main
    with pytest.raises(SystemExit):
        cli_main(["train", "--loss", "nosuch"])
    assert "invalid choice: 'nosuch'" in capsys.readouterr().err


def test_predict_reports_a_missing_model_before_a_missing_image(tmp_path):
    r = _run([sys.executable, "-m", "mineralnet.cli", "predict", str(tmp_path / "norun"), str(tmp_path / "no.jpg")],
             tmp_path)
    assert r.returncode == 2
    lines = _error_lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"mineralnet: error: model {str(tmp_path / 'norun')!r}"), r.stderr


def test_export_without_a_run_is_one_line_without_usage(tmp_path):
    r = _run([sys.executable, "-c", "import sys; from mineralnet.cli import export_main; sys.exit(export_main())"],
             tmp_path)
    assert r.returncode == 2
    lines = _error_lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith("mineralnet-export: error: say which run"), r.stderr


def test_fast_checks_report_a_missing_data_path_before_heavy_imports(tmp_path):
    # In a fresh interpreter: the error comes out and torch was never imported.
    code = ("import sys; from mineralnet.cli import run_command; "
            "rc = run_command('train', ['--data', sys.argv[1]]); "
            "print('torch' in sys.modules); sys.exit(rc)")
    r = _run([sys.executable, "-c", code, str(tmp_path / "nope")], tmp_path)
    assert r.returncode == 2 and r.stdout.strip() == "False"
    assert "does not exist" in r.stderr


def test_training_on_the_folder_above_the_classes_names_the_right_one(tmp_path, capsys):
    import shutil

    from mineralnet import data as mdata
    from mineralnet.cli import main

    demo = mdata.make_demo_dataset(tmp_path / "cache", classes=3, per_class=4, size=32, seed=1)
    above = tmp_path / "above"
    shutil.copytree(demo, above / "demo-set")
    assert main(["train", "--config", "base", "--data", str(above), "--epochs", "1", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(above / "demo-set") in err
