"""When a backend cannot run here: skip locally, fail in CI (CI=true, or METALCORE_REQUIRE_BACKENDS=1
anywhere), so that CI never passes by skipping the Triton interpreter or the shader executor."""

import os

import pytest
import torch

REQUIRE_BACKENDS = os.environ.get("CI") == "true" or os.environ.get("METALCORE_REQUIRE_BACKENDS") == "1"


def unavailable(message: str) -> None:
    if REQUIRE_BACKENDS:
        pytest.fail(message)
    pytest.skip(message)


def expected_backend(backend: str, *args) -> str:
    """The backend that must serve a call: ``backend``, except that an empty tensor argument is
    answered by the op core with the reference (no kernel launches on nothing)."""
    return "reference" if any(isinstance(a, torch.Tensor) and a.numel() == 0 for a in args) else backend
