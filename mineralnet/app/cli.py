"""`mineralnet app MODEL`: flags -> `serve` (app/ui.py)."""
from __future__ import annotations

import os
from pathlib import Path

from mineralnet.app.page import MAX_PHOTOS
from mineralnet.app.ui import MAX_MB, serve
from mineralnet.errors import MineralNetError

def add_arguments(parser) -> None:
    parser.add_argument("model", help="run directory, .onnx file from mineralnet-export, TensorRT engine, "
                                      "OpenVINO IR (.xml + .bin), or an ensemble folder (`mineralnet ensemble`)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to "
                             "the network)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--max-photos", type=int, default=MAX_PHOTOS,
                        help=f"photos answered per upload (default {MAX_PHOTOS})")
    parser.add_argument("--max-mb", type=float, default=MAX_MB, help=f"largest upload in MB (default {MAX_MB})")
    parser.add_argument("--device", default=None, help="PyTorch device for run directories (default cuda if present)")


def run(args) -> int:
    if not 0 < args.port < 65536:
        raise MineralNetError(f"--port {args.port} must be between 1 and 65535")
    if args.max_photos < 1 or args.max_mb <= 0:
        raise MineralNetError(f"--max-photos {args.max_photos} must be at least 1 and --max-mb {args.max_mb} "
                              f"above 0")
    if not Path(os.path.expanduser(args.model)).exists():
        raise MineralNetError(f"model {args.model!r} does not exist; pass a run directory, .onnx file, engine, IR "
                              f"or ensemble folder")
    serve(args.model, host=args.host, port=args.port, max_photos=args.max_photos, max_mb=args.max_mb,
          device=args.device)
    return 0
