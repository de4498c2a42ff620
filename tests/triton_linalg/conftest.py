"""Every test here runs metalcore's small-matrix linalg kernels (metalcore/linalg/*_triton.py):
under the Triton interpreter on CPU tensors (CI), or compiled on a CUDA device (tests marked ``gpu``).

Shared fixtures (triton_backend, device, poison): tests/conftest.py.
"""

import pytest


@pytest.fixture(autouse=True)
def _triton(triton_backend):
    yield


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
