"""MineralNet: mineral photo recognition by feature fusion and online hard-sample mining."""

__version__ = "0.1.0"
