"""Analyses of trained runs: label issues from held-out predictions."""
