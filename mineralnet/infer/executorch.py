"""ExecuTorch (.pte) at run time: `ExecuTorchRunner`, in ExecuTorch's Python runtime (XNNPACK)."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np

from mineralnet.errors import MineralNetError
from mineralnet.infer import phone

METADATA_METHOD = "mineralnet_metadata"


class ExecuTorchRunner:
    """A .pte from mineralnet-export in ExecuTorch's Python runtime (XNNPACK kernels), float32 in and out."""

    def __init__(self, path, threads: int | None = None):
        phone.require("executorch")
        from executorch.runtime import Runtime

        self.path = Path(os.path.expanduser(os.fspath(path)))
        try:
            self.program = Runtime.get().load_program(self.path.read_bytes())
        except Exception as e:
            raise MineralNetError(f"{str(self.path)!r} is not a loadable ExecuTorch program ({type(e).__name__}); "
                                  f"export it again with `mineralnet-export RUN --executorch`") from None
        inner = None
        if METADATA_METHOD in self.program.method_names:
            with contextlib.suppress(ValueError, TypeError, IndexError):
                inner = json.loads(self.program.load_method(METADATA_METHOD).execute([])[0])
        self.meta = phone.check_meta(inner or phone.read_sidecar(self.path), self.path)
        self.method = self.program.load_method("forward")
        self.batch = int(self.meta.get("batch", {}).get("size") or 1)
        self.label = f"ExecuTorch {_version()} (XNNPACK)"

    def _call(self, x: np.ndarray) -> list:
        import torch

        return [v.numpy() for v in self.method.execute([torch.from_numpy(x)])]

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return phone.run_fixed(self._call, images, self.batch, self.meta["outputs"])


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    with contextlib.suppress(PackageNotFoundError):
        return version("executorch")
    return "?"
