#!/usr/bin/env python
"""Train MineralNet: `accelerate launch launch/train.py [--config launch/configs/paper.yaml] --data DIR`.

Thin wrapper: the flags are those of `mineralnet train` (see --help); all logic is in
mineralnet.train. Also runs as plain `python launch/train.py` (one process).
"""
import sys

from mineralnet.train import main

if __name__ == "__main__":
    sys.exit(main())
