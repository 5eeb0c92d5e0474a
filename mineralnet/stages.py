"""The paper's stage numbering, shared by the config (validation) and the model (building)."""
from __future__ import annotations

from mineralnet.errors import MineralNetError


def parse_stages(stages) -> tuple[int, ...]:
    """`"2,4"`, `[2, 4]` or `4` -> (2, 4): sorted, unique, each in 1..4."""
    if isinstance(stages, str):
        parts = [p for p in stages.replace(" ", "").split(",") if p]
        try:
            stages = [int(p) for p in parts]
        except ValueError:
            raise MineralNetError(f"--stages {stages!r} is not a comma list of stage numbers; "
                                  f"use e.g. --stages 2,4 (stages are 1..4)") from None
    elif isinstance(stages, int):
        stages = [stages]
    out = tuple(sorted(set(int(s) for s in stages)))
    if not out or any(s not in (1, 2, 3, 4) for s in out):
        raise MineralNetError(f"stages {list(stages)} must be a non-empty subset of 1..4 "
                              f"(Layer1..Layer4 of ResNet), e.g. 2,4")
    return out
