"""The owners of the run folder and the model file: RunDir's names and readers, artifact.run_of."""
import json

import pytest

from mineralnet.artifact import META_FILE, MODEL_FILE, run_of
from mineralnet.errors import MineralNetError
from mineralnet.runs import FILE_NAMES, RUN_NAMES, RunDir, run_folder


def _run(tmp_path):
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "model.safetensors").write_bytes(b"")
    (run / "model.json").write_text("{}")
    (run / "export" / "model.onnx").write_bytes(b"")
    return run


def test_run_of_finds_the_run_from_the_folder_its_files_and_its_export_files(tmp_path):
    run = _run(tmp_path)
    for p in (run, run / "model.safetensors", run / "model.json", run / "export" / "model.onnx"):
        assert run_of(p) == run, p
    loose = tmp_path / "elsewhere" / "model.onnx"
    loose.parent.mkdir()
    loose.write_bytes(b"")
    assert run_of(loose) is None and run_of(tmp_path / "elsewhere") is None
    assert run_of(run / "not-there.onnx") is None and run_folder(run / "not-there") == run / "not-there"
    assert run_folder(loose) == loose.parent and run_folder(run / "export" / "model.onnx") == run


def test_run_dir_paths_are_the_documented_names(tmp_path):
    r = RunDir(tmp_path)
    assert (r.eval_dir.name, r.export_dir.name, r.tensorboard_dir.name, r.config_file.name) == \
        ("eval", "export", "tb", "config.yaml")
    assert [p.name for p in r.calibration_files] == ["calibration.json", "calibration.safetensors"]
    assert (MODEL_FILE, META_FILE) == ("model.safetensors", "model.json")
    assert set(RUN_NAMES) <= set(FILE_NAMES) and len(set(FILE_NAMES)) == len(FILE_NAMES)


def test_run_dir_readers(tmp_path):
    r = RunDir(tmp_path)
    assert r.saved_config() is None and r.eval_metrics() is None and not r.has_state() and not r.has_split()
    (tmp_path / "config.yaml").write_text("epochs: 3\nbackbone: resnet18\n")
    assert r.saved_config() == {"epochs": 3, "backbone": "resnet18"}
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps({"top1": 0.5}))
    assert r.eval_metrics() == {"top1": 0.5}
    (tmp_path / "eval-test").mkdir()
    (tmp_path / "eval-test" / "metrics.json").write_text(json.dumps({"top1": 0.25}))
    assert r.eval_metrics("eval-test") == {"top1": 0.25}
    (tmp_path / "state.old").mkdir()  # a swap cut short still counts as a checkpoint
    assert r.has_state() and r.state_dir().name == "state.old"


def test_damaged_run_files_name_the_file(tmp_path):
    r = RunDir(tmp_path)
    (tmp_path / "config.yaml").write_text("epochs: [3\n")
    with pytest.raises(MineralNetError, match="config.yaml"):
        r.saved_config()
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text("{not json")
    with pytest.raises(MineralNetError, match=r"metrics\.json.*mineralnet eval"):
        r.eval_metrics()
