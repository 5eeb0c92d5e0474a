#!/usr/bin/env python3
"""Thin entry point: `python export/export.py RUN [options]` is `mineralnet-export RUN [options]`.

All logic lives in mineralnet.export; see `mineralnet-export --help` and export/DEPLOY.md.
"""
import sys

from mineralnet.cli import export_main

if __name__ == "__main__":
    sys.exit(export_main())
