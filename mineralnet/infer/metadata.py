"""Reading what mineralnet-export writes into a model file: the ONNX metadata_props (also in an IR's rt_info)."""
from __future__ import annotations

import json

from mineralnet.errors import MineralNetError


def parse_metadata(props: dict[str, str]) -> dict:
    """metadata_props (str -> JSON str) -> the model meta dict (classes, mean, std, ...)."""
    missing = [k for k in ("classes", "image_size", "resize", "mean", "std") if k not in props]
    if missing:
        raise MineralNetError(f"ONNX metadata lacks {', '.join(missing)}: the file was not written by "
                              f"mineralnet-export; re-export it from the run with `mineralnet-export RUN`")
    out = {}
    for key, value in props.items():
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def major_of(version: str | None) -> int | None:
    """"10.3.0.30" -> 10; None or an unparsable string -> None."""
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return None
