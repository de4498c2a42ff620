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


# --- Backends -------------------------------------------------------------------------------------

@pytest.fixture
def device(request):
    """Where a test's tensors live: CUDA for tests marked ``gpu``, the CPU otherwise."""
    return "cuda" if "gpu" in request.keywords else "cpu"


def _enter_triton(device, monkeypatch):
    """Triton interpreted on CPU tensors (CI), compiled on CUDA ones.

    Setting ``TRITON_INTERPRET`` per test is enough: metalcore's kernels choose interpret-or-compile
    at launch (metalcore/_triton.py), not when triton is imported."""
    if not triton_importable():
        unavailable("triton is not importable: the Triton backend cannot run (pip install 'metalcore[cuda]')")
    if torch.device(device).type != "cuda":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _enter_metal(device, monkeypatch):
    """Metal shaders through the CPU executor, with kernel outputs poisoned (NaN) so that an element a
    kernel never writes fails the comparison."""
    if torch.device(device).type != "cpu":
        pytest.skip("the Metal backend runs on CPU tensors here (the shader executor), not on " + str(device))
    if metalcore._metal.executor() is None:
        unavailable("the Metal shader executor cannot be built here (it needs clang++ >= 17)")
    monkeypatch.setattr(metalcore._metal, "poison_outputs", True)


@pytest.fixture(params=["reference", "triton", "metal"])
def backend(request, device, monkeypatch):
    """Every backend of an op in turn, forced with ``metalcore.use_backend``: the reference; Triton
    (interpreter on CPU tensors, compiled for ``gpu`` tests); Metal (the shader executor on CPU
    tensors). An op with no kernel for some input runs the reference there, as it does for users."""
    name = request.param
    if name == "triton":
        _enter_triton(device, monkeypatch)
    elif name == "metal":
        _enter_metal(device, monkeypatch)
    with metalcore.use_backend(name):
        yield name


@pytest.fixture(scope="session")
def executor():
    """The shader executor module, or skip (locally) / fail (CI)."""
    ex = metalcore._metal.executor()
    if ex is None:
        unavailable("the Metal shader executor cannot be built here (it needs clang++ >= 17)")
    return ex


@pytest.fixture
def _metal_backend(executor):
    """Every metalcore op in the test on the Metal backend (the shader executor)."""
    with metalcore.use_backend("metal"):
        yield


@pytest.fixture
def metal_outputs_poisoned(monkeypatch):
    """Kernel outputs start as NaN, so that an element a kernel never writes fails the comparison."""
    monkeypatch.setattr(metalcore._metal, "poison_outputs", True)


@pytest.fixture
def executions():
    """``(op name, backend)`` of every op execution during the test, forward and backward passes
    alike (the op core's observers): proves which backend served each call, whatever function the
    plan keeps (a kernel's launcher, or one specialized to the call signature)."""
    seen = []
    with metalcore._op.observing(lambda op, backend: seen.append((op, backend))):
        yield seen


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


@pytest.fixture
def triton_backend(device, monkeypatch):
    """Only the Triton backend (tests of the Triton kernels themselves)."""
    _enter_triton(device, monkeypatch)
    with metalcore.use_backend("triton"):
        yield


@pytest.fixture
def metal_backend(device, monkeypatch):
    """Only the Metal backend (tests of the shaders themselves)."""
    _enter_metal(device, monkeypatch)
    with metalcore.use_backend("metal"):
        yield


@pytest.fixture
def poison(monkeypatch):
    """Fill every float tensor that torch.empty/empty_like hand out with NaN, so that an element a
    kernel forgets to write fails the comparison instead of passing by luck."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poisoned(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poisoned(empty_like(*a, **k)))
