"""`mineralnet predict MODEL IMAGE...`: the minerals in photos, as a table or JSON."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Sequence

from mineralnet.errors import MineralNetError
from mineralnet.infer.predictor import Predictor
from mineralnet.infer.tta import HELP as TTA_HELP


def expand_images(paths: Sequence[str]) -> list[str]:
    """Files as given; folders expand to the image files under them (sorted)."""
    from mineralnet.data import IMAGE_EXTENSIONS, list_images
    from mineralnet.data.scan import list_unsupported

    out: list[str] = []
    for raw in paths:
        p = Path(os.path.expanduser(raw))
        if p.is_dir():
            for path, reason in list_unsupported(p):  # never skipped silently
                print(f"skipping {path}: {reason}", file=sys.stderr)
            found = list_images(p)
            if not found:
                raise MineralNetError(f"folder {raw!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            out += found
        elif p.is_file():
            out.append(str(p))
        else:
            raise MineralNetError(f"image {raw!r} does not exist; check the path (folders are searched for images)")
    return out


def add_arguments(parser) -> None:
    parser.add_argument("model", help="run directory, .onnx file from mineralnet-export, TensorRT engine, "
                                      "OpenVINO IR (.xml + .bin), LiteRT .tflite or ExecuTorch .pte")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="photo files or folders of photos")
    parser.add_argument("--topk", type=int, default=3, help="how many minerals to list per photo (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    parser.add_argument("--batch-size", type=int, default=32, help="photos per forward pass (default 32)")
    parser.add_argument("--device", default=None, help="PyTorch device for run directories (default cuda if present)")
    parser.add_argument("--coverage", type=float, default=None,
                        help="also give the smallest candidate set that holds the true mineral with this "
                             "probability (e.g. 0.9; needs a calibrated model)")
    parser.add_argument("--tta", default=None, help=TTA_HELP)
    parser.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp16"),
                        help="OpenVINO inference precision for an IR (default fp32; bf16/fp16 run faster on CPUs "
                             "that have them, with slightly different numbers)")


def run(args) -> int:
    if args.topk < 1:
        raise MineralNetError(f"--topk {args.topk} must be at least 1")
    if args.batch_size < 1:
        raise MineralNetError(f"--batch-size {args.batch_size} must be at least 1")
    if args.coverage is not None and not 0.0 < args.coverage < 1.0:
        raise MineralNetError(f"--coverage {args.coverage} must be between 0 and 1, e.g. 0.9")
    # a wrong model first: it is the first argument
    predictor = Predictor(args.model, device=args.device, precision=getattr(args, "precision", None),
                          tta=getattr(args, "tta", None))
    images = expand_images(args.images)
    results = predictor.predict(images, topk=args.topk, batch_size=args.batch_size, coverage=args.coverage)
    if args.json:
        doc = {"model": predictor.path, "runtime": predictor.kind, "calibrated": predictor.calibration is not None}
        if predictor.tta:
            doc["tta"] = list(predictor.tta)
        if predictor.note:
            doc["note"] = predictor.note
        if args.coverage is not None:
            doc["coverage"] = args.coverage
        print(json.dumps({**doc, "predictions": [r.to_dict() for r in results]}, indent=2))
        return 0
    if predictor.note:
        print(f"note: {predictor.note}", file=sys.stderr)
    width = min(60, max(len(r.image) for r in results))
    for r in results:
        tops = "  ".join(f"{name} {p:6.1%}" for name, p in r.top)
        flag = "" if r.unknown is None else ("  UNKNOWN?" if r.unknown else "  known") + f" (novelty {r.novelty:.3g})"
        cands = "" if r.set is None else f"  set {{{', '.join(r.set)}}}"
        print(f"{r.image:<{width}}  {tops}{flag}{cands}")
    return 0
