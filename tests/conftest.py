import os
import sys
import zlib
from pathlib import Path

import pytest
import torch

import metalcore
from metalcore._op import clear_plans
from metalcore._backend import triton_importable

sys.path.insert(0, str(Path(__file__).parent))  # shared helpers: tolerances, oracle, cases, backends, linalg_matrices

from backends import unavailable  # noqa: E402

# Under pytest-xdist every core already runs a worker; torch's own intra-op threads on top of that
# oversubscribe the machine (small-op tests ran 10-20x slower on 2 cores with 2 threads per worker).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed(request):
    """Fresh random inputs per test, reproducible from the test's id."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _fresh_plans():
    """Each test starts with no cached dispatch decisions: tests patch module constants that kernels'
    ``supports``/``automatic`` rules read (tile limits, crossovers), which the plan key cannot see."""
    clear_plans()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (GPU tests run on the H100)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# --- Triton kernels (tests/triton, tests/triton_linalg) -------------------------------------------

@pytest.fixture
def triton_backend(request, monkeypatch):
    """Force the triton backend: interpreted on CPU tensors (CI), compiled for tests marked ``gpu``.

    Setting ``TRITON_INTERPRET`` per test is enough: metalcore's kernels choose interpret-or-compile
    at launch (metalcore/_triton.py), not when triton is imported."""
    if not triton_importable():
        unavailable("triton is not importable: the Triton backend cannot run (pip install 'metalcore[cuda]')")
    if "gpu" not in request.keywords:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    with metalcore.use_backend("triton"):
        yield


@pytest.fixture
def device(request):
    return "cuda" if "gpu" in request.keywords else "cpu"


@pytest.fixture
def poison(monkeypatch):
    """Fill every float tensor that torch.empty/empty_like hand out with NaN, so that an element a
    kernel forgets to write fails the comparison instead of passing by luck."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poisoned(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poisoned(empty_like(*a, **k)))
