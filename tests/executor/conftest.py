"""The CPU executor for Metal (metalcore.executor): every test here needs clang.

Without it the tests skip locally and fail in CI (tests/backends.py).
"""

import pytest

from backends import unavailable
from metalcore import _metal


@pytest.fixture(scope="session")
def executor():
    """The executor module, or skip (locally) / fail (CI)."""
    ex = _metal.executor()
    if ex is None:
        unavailable(f"the CPU executor for Metal cannot run here: {_metal.executor_missing_reason()}")
    return ex
