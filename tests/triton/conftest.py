"""Every test here runs metalcore's Triton training kernels: under the interpreter on CPU tensors
(CI), or compiled on a CUDA device (tests marked ``gpu``). Fixtures: tests/conftest.py."""

import pytest


@pytest.fixture(autouse=True)
def _triton(triton_backend):
    yield
