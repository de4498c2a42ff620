"""The dispatcher: automatic choice falls back quietly, explicit choice is honoured or raises."""

import pytest
import torch

import metalcore
from metalcore._backend import BackendUnavailableError
from metalcore._op import _Kernel
from metalcore.nn.rms_norm import rms_norm_fwd


@pytest.fixture
def fake_triton_kernel(monkeypatch):
    """Plug a recording 'triton' kernel into rms_norm_fwd for the duration of one test."""
    calls = []

    def kernel(x, weight, eps, offset):
        calls.append(x.shape)
        return rms_norm_fwd.reference(x, weight, eps, offset)

    monkeypatch.setitem(rms_norm_fwd.kernels, "triton", _Kernel(kernel, lambda x, w, e, o: x.shape[-1] <= 8))
    monkeypatch.setattr("metalcore._backend.triton_importable", lambda: True)
    monkeypatch.delenv("METALCORE_BACKEND", raising=False)
    return calls


def test_cpu_tensors_use_the_reference_automatically(fake_triton_kernel, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(3, 8)
    assert rms_norm_fwd.backend_for(x, None, 1e-6, 0.0) == "reference"
    metalcore.rms_norm(x, 8)
    assert fake_triton_kernel == []


def test_explicit_backend_is_honoured_when_it_can_run(fake_triton_kernel, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with metalcore.use_backend("triton"):
        y = metalcore.rms_norm(torch.randn(3, 8), 8)
    assert fake_triton_kernel == [(3, 8)]
    assert y.shape == (3, 8)


def test_explicit_backend_that_cannot_run_raises(fake_triton_kernel, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with metalcore.use_backend("triton"), pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        metalcore.rms_norm(torch.randn(3, 8), 8)
    monkeypatch.setenv("METALCORE_BACKEND", "triton")
    with pytest.raises(BackendUnavailableError, match="cannot run on cpu"):
        metalcore.rms_norm(torch.randn(3, 8), 8)


def test_explicit_backend_without_a_kernel_raises(monkeypatch):
    monkeypatch.delitem(rms_norm_fwd.kernels, "metal", raising=False)
    with metalcore.use_backend("metal"), pytest.raises(BackendUnavailableError, match="no metal kernel"):
        metalcore.rms_norm(torch.randn(3, 8), 8)


def test_inputs_outside_a_kernels_domain_use_the_reference(fake_triton_kernel, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with metalcore.use_backend("triton"):
        assert rms_norm_fwd.backend_for(torch.randn(2, 9), None, 1e-6, 0.0) == "reference"
        metalcore.rms_norm(torch.randn(2, 9), 9)
    assert fake_triton_kernel == []


def test_environment_override_forces_the_reference(fake_triton_kernel, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("METALCORE_BACKEND", "reference")
    assert rms_norm_fwd.backend_for(torch.randn(2, 4), None, 1e-6, 0.0) == "reference"


def test_context_manager_takes_precedence_and_restores(monkeypatch):
    monkeypatch.setenv("METALCORE_BACKEND", "reference")
    with metalcore.use_backend("auto"):
        assert metalcore._backend.requested_backend() == "auto"
    assert metalcore._backend.requested_backend() == "reference"


@pytest.mark.parametrize("name", ["cuda", "Triton ", "mlx", ""])
def test_unknown_backend_names_are_rejected(name, monkeypatch):
    with pytest.raises(ValueError, match="metalcore backend must be one of"):
        with metalcore.use_backend(name):
            pass


def test_unknown_environment_value_is_rejected(monkeypatch):
    monkeypatch.setenv("METALCORE_BACKEND", "cublas")
    with pytest.raises(ValueError, match="got 'cublas'"):
        metalcore.rms_norm(torch.randn(2, 4), 4)


def test_eager_calls_take_the_short_road_with_identical_results_and_gradients():
    x = torch.randn(5, 33, dtype=torch.float64, requires_grad=True)
    w = torch.randn(33, dtype=torch.float64, requires_grad=True)
    eager, _ = rms_norm_fwd(x, w, 1e-6, 0.0)
    library, _ = rms_norm_fwd.custom_op(x, w, 1e-6, 0.0)
    assert "GeneratedBackwardFor" not in type(eager.grad_fn).__name__
    assert "GeneratedBackwardFor" in type(library.grad_fn).__name__
    assert torch.equal(eager, library)
    g = torch.randn_like(eager)
    for a, b in zip(torch.autograd.grad(eager, (x, w), g), torch.autograd.grad(library, (x, w), g)):
        assert torch.equal(a, b)


def test_eager_mutating_ops_bump_the_version_counter():
    p = torch.nn.Parameter(torch.randn(8))
    p.grad = torch.randn(8)
    opt = metalcore.optim.MetalAdamW([p])
    before = p._version
    opt.step()
    assert p._version > before


def test_dispatch_modes_see_the_library_op():
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record():
        metalcore.rms_norm(torch.randn(2, 4), 4)
    assert "metalcore.rms_norm_fwd.default" in seen


def test_kernels_kept_out_of_automatic_selection_still_serve_explicit_requests(monkeypatch):
    calls = []

    def kernel(x, weight, eps, offset):
        calls.append(x.shape)
        return rms_norm_fwd.reference(x, weight, eps, offset)

    monkeypatch.setitem(rms_norm_fwd.kernels, "triton", _Kernel(kernel, None, automatic=False))
    monkeypatch.setattr("metalcore._backend.triton_importable", lambda: True)
    monkeypatch.setattr("metalcore._op.automatic_backend", lambda device: "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("METALCORE_BACKEND", raising=False)
    x = torch.randn(2, 4)
    assert rms_norm_fwd.backend_for(x, None, 1e-6, 0.0) == "reference"
    monkeypatch.setitem(rms_norm_fwd.kernels, "triton", _Kernel(kernel, None, automatic=True))
    assert rms_norm_fwd.backend_for(x, None, 1e-6, 0.0) == "triton"
    monkeypatch.setitem(rms_norm_fwd.kernels, "triton", _Kernel(kernel, None, automatic=False))
    with metalcore.use_backend("triton"):
        assert rms_norm_fwd.backend_for(x, None, 1e-6, 0.0) == "triton"
        metalcore.rms_norm(x, 4)
    assert calls == [(2, 4)]


def test_a_compiled_first_call_in_a_fresh_process():
    """The environment flags' first read may happen inside dynamo's trace (here the public attention
    function, compiled before any eager metalcore call): their unset-value sentinel must be a
    constant dynamo can compare (an ``object()`` failed the trace)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import torch, torch.nn.functional as F, metalcore
        q, k, v = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
        compiled = torch.compile(metalcore.metal_scaled_dot_product_attention, fullgraph=True)
        out = compiled(q, k, v, is_causal=True, enable_gqa=True)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
