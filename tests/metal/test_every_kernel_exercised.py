"""Every kernel in shaders/*.metal (each dtype instantiation) was launched by this test session.

Runs last (tests/metal/conftest.py moves it there), after the shader tests recorded their launches
in ``metalcore._metal.launched``. A new kernel without a test fails here.
"""

import pytest
import torch

from metalcore import _metal


def test_every_shader_kernel_was_launched(executor, request):
    if not getattr(request.config, "_metalcore_shader_tests", 0):
        pytest.skip("run together with tests/metal/test_shaders_*.py (this test checks what they launched)")
    kernels = {(name, k) for name in _metal.shader_names()
               for k in dir(_metal.library(name, torch.device("cpu")))}
    assert kernels, "no kernels found in shaders/"
    missing = sorted(f"{name}.metal: {k}" for name, k in kernels if k not in _metal.launched)
    assert not missing, "kernels no test launched:\n  " + "\n  ".join(missing)
