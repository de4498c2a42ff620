"""Metal shaders on the CPU: every test here needs the CPU executor for Metal, which needs clang.

Without it the tests skip locally and fail in CI (tests/backends.py).
"""

import pytest

from backends import unavailable
from metalcore import _metal

def require_executor():
    """The executor module, or skip (locally) / fail (CI)."""
    ex = _metal.executor()
    if ex is None:
        unavailable(f"the CPU executor for Metal cannot run here: {_metal.executor_missing_reason()}")
    return ex


@pytest.fixture(scope="session")
def executor():
    return require_executor()


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Kernel outputs start as NaN, so that an element a kernel never writes fails the comparison."""
    monkeypatch.setattr(_metal, "poison_outputs", True)
