"""The model file: safetensors weights + a JSON that rebuilds and preprocesses, and which run owns it.

A run directory holds `model.safetensors` (best weights) and `model.json` (DESIGN.md section 4).
The same JSON is also stored in the safetensors header under the key "mineralnet", so a lone
.safetensors file is self-describing. No pickle is used for weights anywhere. This module is the one
place that writes, reads and checks these files (and the checkpoint files training resumes from), and
`run_of` is the one answer to "which run folder does this model or export file belong to".
"""
from __future__ import annotations

import json
import platform
import re
from pathlib import Path
from typing import Any

import torch

from mineralnet import __version__
from mineralnet.errors import MineralNetError
from mineralnet.files import atomic_write_bytes, atomic_write_json
from mineralnet.model import FusionNet

MODEL_FILE = "model.safetensors"
META_FILE = "model.json"
FORMAT = "mineralnet-model/1"
REQUIRED_KEYS = ("backbone", "stages", "num_classes", "classes", "image_size", "mean", "std", "resize")


def versions() -> dict[str, str]:
    import timm
    out = {"mineralnet": __version__, "torch": torch.__version__, "timm": timm.__version__,
           "python": platform.python_version()}
    try:
        import accelerate
        out["accelerate"] = accelerate.__version__
    except ImportError:
        pass
    return out


def model_meta(model, *, classes, image_size: int, mean, std, resize: int, metrics: dict | None = None,
               extra: dict | None = None) -> dict[str, Any]:
    """The model.json contents for a FusionNet."""
    cfg = model.config()
    if len(classes) != cfg["num_classes"]:
        raise MineralNetError(f"{len(classes)} class names for a model with {cfg['num_classes']} outputs")
    meta = {
        "format": FORMAT,
        **cfg,
        "feature_dim": model.feature_dim,
        "classes": list(classes),
        "image_size": int(image_size),
        "resize": int(resize),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "input": {"layout": "NCHW", "color": "RGB", "scale": "0..1 then (x - mean) / std",
                  "preprocess": "resize shorter side to `resize`, centre crop `image_size`"},
        "metrics": metrics or {},
        "versions": versions(),
    }
    if extra:
        meta.update(extra)
    return meta


PARAMETRIZED = ".parametrizations."


def plain_key(key: str) -> str:
    """A state-dict key without torch's parametrization wrapper ('a.conv.parametrizations.weight.original' ->
    'a.conv.weight'): a model trained with parametrized weights (quantization-aware training) saves as the plain
    model and loads anywhere."""
    if PARAMETRIZED in key and key.endswith(".original"):
        head, _, rest = key.partition(PARAMETRIZED)
        return f"{head}.{rest[:-len('.original')]}"
    return key


def save_model(run_dir, model, meta: dict) -> Path:
    """Write model.safetensors and model.json into run_dir, each atomically. Returns the weights path."""
    from safetensors.torch import save

    run_dir = Path(run_dir)
    model = getattr(model, "module", model)  # unwrap DDP
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    state = {plain_key(k): v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    blob = save(state, metadata={"mineralnet": json.dumps(meta), "format": "pt"})
    atomic_write_bytes(run_dir / MODEL_FILE, blob)
    atomic_write_json(run_dir / META_FILE, meta)
    return run_dir / MODEL_FILE


def _resolve(path) -> tuple[Path, Path | None]:
    """(weights file, json file or None) for a run dir, a .safetensors file or a model.json."""
    p = Path(path)
    if not p.exists():
        raise MineralNetError(f"model {str(p)!r} does not exist; pass a run directory made by training "
                              f"(it holds {MODEL_FILE} and {META_FILE}) or a {MODEL_FILE} file")
    if p.is_dir():
        w, j = p / MODEL_FILE, p / META_FILE
        if not w.is_file():
            raise MineralNetError(f"run {str(p)!r} has no {MODEL_FILE} (training writes it after the first "
                                  f"validated epoch; an ensemble folder has none: this command takes one model, e.g. "
                                  f"a member or a student distilled from it); train it first or pass another run")
        return w, (j if j.is_file() else None)
    if p.suffix == ".json":
        w = p.with_name(MODEL_FILE)
        if not w.is_file():
            raise MineralNetError(f"{str(p)!r} has no {MODEL_FILE} beside it")
        return w, p
    if p.suffix == ".safetensors":
        j = p.with_name(META_FILE)
        return p, (j if j.is_file() else None)
    raise MineralNetError(f"{str(p)!r} is not a run directory, .safetensors or model.json; "
                          f"(ONNX files and TensorRT engines are loaded by `mineralnet predict`)")


def read_meta(path) -> dict:
    """model.json of a run dir / weights file (from the safetensors header when no JSON is beside it)."""
    weights, js = _resolve(path)
    if js is not None:
        try:
            meta = json.loads(js.read_text())
        except (OSError, ValueError) as e:
            raise MineralNetError(f"{str(js)!r} is not valid JSON ({e}); re-export or retrain the run") from None
    else:
        from safetensors import safe_open
        try:
            with safe_open(str(weights), framework="pt") as f:
                raw = (f.metadata() or {}).get("mineralnet")
        except Exception as e:
            raise MineralNetError(f"{str(weights)!r} is not a readable safetensors file ({e})") from None
        if raw is None:
            raise MineralNetError(f"{str(weights)!r} carries no MineralNet metadata and has no {META_FILE} "
                                  f"beside it; it was not written by MineralNet")
        meta = json.loads(raw)
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise MineralNetError(f"model metadata of {str(path)!r} lacks {', '.join(missing)}; it was written by "
                              f"an incompatible version; retrain or fix {META_FILE}")
    return meta


def load_model(path, map_location: str | torch.device = "cpu"):
    """Rebuild a trained FusionNet from a run directory or weights file -> (model in eval mode, meta)."""
    from safetensors.torch import load_file

    weights, _ = _resolve(path)
    meta = read_meta(path)
    backbone = str(meta["backbone"])
    if backbone.split(":", 1)[0].lower() in ("hf-hub", "hf_hub", "local-dir"):
        raise MineralNetError(f"model metadata of {str(path)!r} names backbone {backbone!r}, which timm builds from "
                              f"the network or another folder; saved models load offline from plain timm names "
                              f"only: retrain with a timm architecture name (e.g. resnet50)")
    model = FusionNet(meta["backbone"], meta["stages"], meta["num_classes"], pretrained=False,
                      drop_rate=meta.get("drop_rate", 0.0))
    try:
        state = load_file(str(weights), device=str(map_location))
    except Exception as e:
        raise MineralNetError(f"cannot read weights {str(weights)!r} ({type(e).__name__}: {e}); the file is "
                              f"damaged: retrain or copy it again") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0:2]
        raise MineralNetError(f"weights {str(weights)!r} do not match the architecture in its metadata "
                              f"({' '.join(first)[:200]}); the checkpoint is incompatible") from None
    return model.eval(), meta


def run_of(path) -> Path | None:
    """The run folder that owns a model or export file: a run folder itself, the folder of its
    model.safetensors / model.json, or the run whose export folder (RUN/export/) holds the file.
    None when no folder there holds a model.safetensors (a lone file copied elsewhere) or `path` does not exist."""
    p = Path(path)
    for cand in ([p] if p.is_dir() else [p.parent, p.parent.parent] if p.is_file() else []):
        if (cand / MODEL_FILE).is_file():
            return cand
    return None


# Accelerate's own RNG file is a pickle but is read with weights_only=True (plain tensors and numpy state).
_ACCELERATE_RNG = re.compile(r"random_states_\d+\.pkl")


def check_state_files(state) -> None:
    """Refuse a state/ that could run code when loaded, and name the first damaged file in one line.

    MineralNet never writes custom pickles (Accelerate's `custom_checkpoint_N.pkl` is loaded with full
    unpickling); a state/ that holds one, or any other *.pkl, came from elsewhere."""
    from accelerate.utils import load as torch_load_safe
    from safetensors.torch import load_file

    state = Path(state)
    files = sorted(p for p in state.iterdir() if p.is_file())
    for f in files:
        if f.name.startswith("custom_checkpoint_") or (f.suffix == ".pkl" and not _ACCELERATE_RNG.fullmatch(f.name)):
            raise MineralNetError(f"{str(f)!r} is a pickle that MineralNet never writes and will not load (loading "
                                  f"it could run code); resume only runs you trust, or start fresh without --resume")
    fix = "resume from a copy of the run's previous state (state.old/) or start fresh without --resume"
    for f in files:
        try:
            if f.suffix == ".safetensors":
                load_file(str(f))
            elif f.suffix in (".bin", ".pt", ".pkl"):
                torch_load_safe(str(f), map_location="cpu", weights_only=True)
            elif f.suffix == ".json":
                json.loads(f.read_text())
        except Exception as e:  # noqa: BLE001 -- any failure to read means a damaged file
            msg = str(e).splitlines()[0][:160] if str(e) else ""
            raise MineralNetError(f"checkpoint file {str(f)!r} is damaged ({type(e).__name__}: {msg}); "
                                  f"{fix}") from None
