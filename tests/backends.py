"""When a backend cannot run here: skip locally, fail in CI (CI=true, or METALCORE_REQUIRE_BACKENDS=1
anywhere), so that CI never passes by skipping the Triton interpreter or the shader executor."""

import os

import pytest

REQUIRE_BACKENDS = os.environ.get("CI") == "true" or os.environ.get("METALCORE_REQUIRE_BACKENDS") == "1"


def unavailable(message: str) -> None:
    if REQUIRE_BACKENDS:
        pytest.fail(message)
    pytest.skip(message)
