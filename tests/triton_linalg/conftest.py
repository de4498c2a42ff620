"""Every test here runs metalcore's small-matrix linalg kernels (metalcore/linalg/*_triton.py):
under the Triton interpreter on CPU tensors (CI), or compiled on a CUDA device (tests marked ``gpu``).

``TRITON_INTERPRET`` is set per test, before any kernel launches: metalcore's kernels choose
interpret-or-compile at launch (metalcore/nn/_jit_triton.py), so setting it here is enough.
"""

import os
import sys
from pathlib import Path

import pytest

import metalcore
from metalcore._backend import triton_importable

sys.path.insert(0, str(Path(__file__).parent))  # linalg_matrices.py

# Same rule as tests/conftest.py: in CI an unavailable backend is a failure, never a skip.
REQUIRE_BACKENDS = os.environ.get("CI") == "true" or os.environ.get("METALCORE_REQUIRE_BACKENDS") == "1"


@pytest.fixture(autouse=True)
def triton_backend(request, monkeypatch):
    """Force the triton backend; interpret on the CPU unless the test is a GPU test."""
    if not triton_importable():
        if REQUIRE_BACKENDS:
            pytest.fail("triton is not importable, and CI requires the Triton backend to run "
                        "(pip install 'metalcore[cuda]' or triton)")
        pytest.skip("triton is not installed")
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
    import torch

    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poisoned(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poisoned(empty_like(*a, **k)))


@pytest.fixture
def launches(monkeypatch):
    """Count the launches of a kernel module's launcher: ``launches(module, "name")`` wraps it and
    returns a list that grows by one per call (proves backward passes reach the kernels too)."""
    def wrap(module, name):
        calls = []
        original = getattr(module, name)

        def counted(*args, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
        return calls

    return wrap
