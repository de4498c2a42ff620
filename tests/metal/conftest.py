"""Metal shaders on the CPU: every test here needs the shader executor (csrc/), which needs clang.

Without it the tests skip locally and fail in CI (REQUIRE_BACKENDS, tests/conftest.py).
"""

import pytest

from metalcore import _metal

# tests/conftest.py puts tests/ on sys.path; its REQUIRE_BACKENDS is the suite's one rule.
from conftest import REQUIRE_BACKENDS

EXECUTOR_MISSING = ("the Metal shader executor cannot be built here: it needs clang++ >= 17 "
                    "(apt-get install -y clang-19) and a checkout with csrc/")


def require_executor():
    """The executor module, or skip (locally) / fail (CI)."""
    ex = _metal.executor()
    if ex is None:
        if REQUIRE_BACKENDS:
            pytest.fail(EXECUTOR_MISSING)
        pytest.skip(EXECUTOR_MISSING)
    return ex


@pytest.fixture(scope="session")
def executor():
    return require_executor()


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Kernel outputs start as NaN, so that an element a kernel never writes fails the comparison."""
    monkeypatch.setattr(_metal, "poison_outputs", True)
