"""The ``backend`` fixture of the optimizer tests: every test that takes it runs once per backend —
the reference, the Triton kernels under the interpreter (CPU tensors) and the Metal shaders under
the CPU executor — with that backend requested for the whole test, so an op whose kernel cannot
take an input falls back to the reference exactly as it would for a user. A backend that cannot
run here skips locally and fails in CI (tests/backends.py)."""

import pytest

import metalcore
from backends import unavailable
from metalcore import _metal
from metalcore._backend import triton_importable

BACKENDS = ("reference", "triton", "metal")


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    name = request.param
    if name == "triton":
        if not triton_importable():
            unavailable("triton is not importable: the Triton backend cannot run (pip install 'metalcore[cuda]')")
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # read at launch (metalcore/_triton.py)
    if name == "metal":
        if _metal.executor() is None:
            unavailable("the Metal shader executor cannot be built here: it needs clang++ >= 17 "
                        "(apt-get install -y clang-19) and a checkout with csrc/")
        monkeypatch.setattr(_metal, "poison_outputs", True)  # unwritten outputs show as NaN
    with metalcore.use_backend(name):
        yield name
