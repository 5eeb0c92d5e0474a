"""bf16 autocast only where the CPU computes bf16 natively; elsewhere training runs fp32 and says so."""
from __future__ import annotations

import yaml

from mineralnet import data as mdata
from mineralnet.config import load_config
from mineralnet.precision import cpu_flags, resolve_precision

AVX2 = {"fpu", "sse2", "avx", "avx2", "fma"}


def test_resolve_precision_table():
    assert resolve_precision("bf16", False, AVX2, "x86_64")[0] == "fp32"
    assert "no bf16 instructions" in resolve_precision("bf16", False, AVX2, "x86_64")[1]
    assert resolve_precision("bf16", False, AVX2 | {"avx512f"}, "x86_64")[0] == "fp32"  # AVX-512 alone is not bf16
    assert resolve_precision("bf16", False, AVX2 | {"avx512_bf16"}, "x86_64") == ("bf16", "")
    assert resolve_precision("bf16", False, AVX2 | {"amx_bf16"}, "x86_64") == ("bf16", "")
    assert resolve_precision("bf16", False, {"asimd", "bf16"}, "aarch64") == ("bf16", "")
    assert resolve_precision("bf16", False, {"asimd"}, "aarch64")[0] == "fp32"
    assert resolve_precision("bf16", True, AVX2, "x86_64") == ("bf16", "")  # a GPU decides for itself
    assert resolve_precision("bf16", False, None, "x86_64") == ("bf16", "")  # flags unknown: as asked
    for other in ("fp32", "fp16"):
        assert resolve_precision(other, False, AVX2, "x86_64") == (other, "")


def test_cpu_flags_reads_this_machine():
    flags = cpu_flags()
    assert flags is None or (isinstance(flags, set) and all(isinstance(f, str) for f in flags))


def test_bf16_run_on_a_cpu_without_bf16_trains_fp32_and_says_so(tmp_path, monkeypatch, capsys):
    import importlib

    fit_module = importlib.import_module("mineralnet.train.fit")

    monkeypatch.setattr(fit_module, "cpu_flags", lambda: set(AVX2))
    monkeypatch.setattr(fit_module.torch.cuda, "is_available", lambda: False)
    root = mdata.make_demo_dataset(tmp_path / "demo", classes=2, per_class=6, size=32, seed=2)
    cfg = load_config("base", data=str(root), out=str(tmp_path / "run"), backbone="resnet18", image_size=32,
                      batch_size=4, workers=0, epochs=1, precision="bf16", loss="ce")
    assert fit_module.fit(cfg)["status"] == "finished"
    err = capsys.readouterr().err
    assert "no bf16 instructions" in err and "training in fp32" in err
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["precision"] == "fp32"
