import importlib.util
import os
import tempfile

import pytest
import torch

# Collection indexes and the demo set go to a cache of this test session, not the user's ~/.cache
# (subprocesses of the tests inherit it).
os.environ.setdefault("MINERALNET_CACHE", tempfile.mkdtemp(prefix="mineralnet-test-cache-"))

# Tests share 2 CPU cores with whatever else runs; keep intra-op threads modest and results stable.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

MINET7 = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "minet7")


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    try:
        import tensorrt  # noqa: F401
        has_trt = has_cuda
    except ImportError:
        has_trt = False
    for item in items:  # markers, not item.keywords: keywords include folder names (a checkout in .../trt/)
        if item.get_closest_marker("gpu") and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if item.get_closest_marker("trt") and not has_trt:
            item.add_marker(pytest.mark.skip(reason="needs TensorRT and a CUDA GPU"))
        if item.get_closest_marker("realdata") and not os.path.isdir(MINET7):
            item.add_marker(pytest.mark.skip(reason=f"real photos not present at {MINET7}"))


@pytest.fixture
def minet7_dir():
    return os.path.abspath(MINET7)



@pytest.fixture(scope="session")
def load_study():
    """studies/NAME.py imported as a module (studies/ is not a package: the scripts run from the repository root)."""
    def load(name: str):
        path = os.path.join(os.path.dirname(__file__), "..", "studies", f"{name}.py")
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load
