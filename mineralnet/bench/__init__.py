"""Latency and throughput benchmarks: ``mineralnet bench MODEL...`` (see runtimes.py until the split is done).

Step one of issue 11's split: the code still lives in one module; every name it defines (tests use private ones
too) is re-exported here so ``from mineralnet import bench`` keeps working.
"""
from mineralnet.bench import runtimes as _impl

globals().update({name: value for name, value in vars(_impl).items() if not name.startswith("__")})
