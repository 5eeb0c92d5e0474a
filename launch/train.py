#!/usr/bin/env python
"""Train MineralNet: `accelerate launch launch/train.py [--config paper] --data DIR`.

Thin wrapper: the flags are those of `mineralnet train` (see --help); all logic is in
the mineralnet package (mineralnet/train/). Also runs as plain `python launch/train.py` (one process).
"""
import sys

from mineralnet.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
