"""torch's own test data for every ``metalcore.linalg`` twin: each OpInfo sample input and error input of
``torch.testing._internal.common_methods_invocations.op_db`` runs through ``metalcore.linalg.X`` and
``torch.X`` side by side, on every backend.

* Unique outputs (solutions, ``L``, ``A⁺``, eigen- and singular values, ``info``, ``rank``) are compared
  by value: metalcore's error against torch in float64 at most ``TORCH_ERROR_FACTOR`` times torch's
  own error in the sample's dtype (tests/tolerances.py).
* Decompositions are judged by LAPACK's ratios (reconstruction, orthogonality) and by what is unique:
  singular values, eigenvalues, ``Q·sign(diag R)`` and ``sign(diag R)·R``, the projector ``U Vᴴ``.
* Shapes, dtypes and triangular structure equal torch's.
* Gradients (float64 samples of differentiable ops) of a gauge-invariant function of the outputs equal
  torch's.
* Error inputs raise torch's exception type.

The oracle is torch in float64 on the CPU. On a CUDA machine, ``METALCORE_OPINFO_DEVICE=cuda pytest
tests/linalg/test_opinfo.py`` runs every sample (no subsampling: the kernels are compiled) on CUDA
tensors through the reference, the compiled Triton kernels and the automatic choice (``auto``: Triton
kernels, cuSOLVER and torch's own calls, as users get them), with TF32 off so that float32 means
float32. Each test id starts with its backend; the run ends with the pass counts per backend
(tests/linalg/conftest.py).
"""

import functools
import os

import pytest
import torch
from torch.testing._internal.common_methods_invocations import op_db

import metalcore
from oracle import orthogonality_ratio, residual_ratio
from tolerances import ABS_FLOOR, LAPACK_RATIO_MAX, TORCH_ERROR_FACTOR

# metalcore.linalg name -> the name of the OpInfo(s) (every variant) of its torch twin.
TWINS = {
    "cholesky": "linalg.cholesky", "cholesky_ex": "linalg.cholesky_ex", "cholesky_solve": "cholesky_solve",
    "eigh": "linalg.eigh", "eigvalsh": "linalg.eigvalsh", "householder_product": "linalg.householder_product",
    "lstsq": "linalg.lstsq", "pinv": "linalg.pinv", "qr": "linalg.qr", "solve": "linalg.solve",
    "solve_ex": "linalg.solve_ex", "solve_triangular": "linalg.solve_triangular", "svd": "linalg.svd",
    "svdvals": "linalg.svdvals",
}
# OpInfos whose op wraps torch's function: metalcore's twin goes through the same wrapper.
WRAPPED = {
    ("linalg.lstsq", "grad_oriented"): lambda a, b, driver: metalcore.linalg.lstsq(a, b, driver=driver)[:2],
    ("linalg.pinv", "singular"): lambda a, b: metalcore.linalg.pinv(a @ b.mT),  # rank-k products
}
OPINFOS = {(op.name, op.variant_test_name): op for op in op_db if op.name in TWINS.values()}
OPS = sorted(OPINFOS)
DTYPES = (torch.float64, torch.float32)
DEVICE = os.environ.get("METALCORE_OPINFO_DEVICE", "cpu")
ON_CUDA = DEVICE.startswith("cuda")
BACKENDS = ("reference", "triton", "auto") if ON_CUDA else ("reference", "triton", "metal")
# The Triton interpreter takes ~1 s per sample here (numpy per program instance, measured on the
# 2-core CI machine): all ~2,400 samples would take ~40 core-minutes, over CI's 30-minute budget. On
# the interpreter each (op, dtype) runs every (n // INTERPRETED)-th sample (508 in all, ~7 minutes on
# one core; the kernels are the same code at every sample, the samples differ in shapes); the
# reference, the Metal executor and compiled Triton on a GPU run every sample, as does
# METALCORE_OPINFO_ALL=1.
INTERPRETED = 12
ALL = os.environ.get("METALCORE_OPINFO_ALL") == "1" or ON_CUDA


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True, scope="module")
def _ieee_float32():
    """TF32 off for CUDA matmuls in this module (torch's, and metalcore's GEMM paths and syrk kernel,
    which follow torch's flag): the tolerances compare float32 with float32. (No convolutions run
    here, and torch's test machinery locks cuDNN's flags.)"""
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = allowed


def _twin_name(opinfo_name: str) -> str:
    return next(ours for ours, theirs in TWINS.items() if theirs == opinfo_name)


@functools.cache
def _samples(key, dtype, device, requires_grad):
    """The OpInfo's samples, generated once per (op, dtype, device) from a fixed seed."""
    torch.manual_seed(0)
    return tuple(OPINFOS[key].sample_inputs(device, dtype, requires_grad=requires_grad))


def _count(key, dtype, requires_grad=False):
    """Samples on the device they run on (an OpInfo may generate other samples per device)."""
    return len(_samples(key, dtype, DEVICE, requires_grad))


def _runs_on(backend, i, n, budget=INTERPRETED):
    return backend != "triton" or ALL or i % max(1, n // budget) == 0


SAMPLE_CASES = [(backend, key, dtype, i) for key in OPS for dtype in DTYPES for n in [_count(key, dtype)]
                for i in range(n) for backend in BACKENDS if _runs_on(backend, i, n)]
ERROR_CASES = [(backend, key, i) for key in OPS if OPINFOS[key].error_inputs_func is not None
               for i in range(len(tuple(OPINFOS[key].error_inputs(DEVICE)))) for backend in BACKENDS]


def _ours(key):
    return WRAPPED.get(key) or getattr(metalcore.linalg, _twin_name(key[0]))


def _case_id(backend, key, dtype=None, i=0):
    name = key[0] + (f".{key[1]}" if key[1] else "")
    return f"{backend}-{name}-{str(dtype).removeprefix('torch.')}-{i}" if dtype else f"{backend}-{name}-{i}"


def _clone(x):
    """A fresh leaf per call (the samples are shared), requiring grad where torch's sample does."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone().requires_grad_(x.requires_grad)
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    return x


def _call(fn, sample):
    inputs = (_clone(sample.input), *_clone(sample.args))
    kwargs = {k: _clone(v) for k, v in sample.kwargs.items()}
    return fn(*inputs, **kwargs), inputs


def _as_tuple(out):
    return tuple(out) if isinstance(out, tuple) else (out,)


def _oracle_input(x):
    """A sample's tensor for the oracle: float64, on the CPU."""
    if isinstance(x, torch.Tensor):
        return (x.detach().double() if x.is_floating_point() else x.detach()).cpu()
    return x


def _assert_within_torch_error(what, ours, torch_same, expected64):
    """The one rule for values: ``|ours − oracle| ≤ 2 |torch_same − oracle| + floor · max(1, |oracle|)``."""
    assert ours.shape == expected64.shape, f"{what}: shape {tuple(ours.shape)}, torch {tuple(expected64.shape)}"
    if ours.numel() == 0:
        return
    if not ours.is_floating_point():
        assert torch.equal(ours.cpu(), expected64.cpu()), f"{what}: {ours} != torch's {expected64}"
        return
    ours, theirs, expected = ours.double().cpu(), torch_same.double().cpu(), expected64.double().cpu()
    err = (ours - expected).abs().max().item()
    torch_err = (theirs - expected).abs().max().item()
    bound = TORCH_ERROR_FACTOR * torch_err + ABS_FLOOR[torch_same.dtype] * max(1.0, expected.abs().max().item())
    assert err <= bound, f"{what}: error {err:.3e} > {bound:.3e} ({TORCH_ERROR_FACTOR}x torch's {torch_err:.3e})"


def _sign_fix(Q, R):
    """``Q·diag(s)`` and ``diag(s)·R`` with ``s = sign(diag R)``: unique for full-rank ``A``."""
    k = min(R.shape[-2], R.shape[-1])
    d = R.diagonal(dim1=-2, dim2=-1)[..., :k]
    s = torch.where(d < 0, -1.0, 1.0).to(R.dtype)
    if Q.numel():
        Q = torch.cat([Q[..., :k] * s.unsqueeze(-2), Q[..., k:]], -1)
    R = torch.cat([R[..., :k, :] * s.unsqueeze(-1), R[..., k:, :]], -2)
    return Q, R


def _unique_parts(name, out):
    """The outputs that do not depend on a gauge choice, in a form both libraries must agree on."""
    out = _as_tuple(out)
    if name == "qr":
        Q, R = out
        return _sign_fix(Q, R)
    if name == "svd":
        U, S, Vh = out
        k = S.shape[-1]
        return (S, U[..., :k] @ Vh[..., :k, :])  # the projector U Vᴴ: unique where singular values differ
    if name == "eigh":
        L, V = out
        return (L,)
    return out


def _distinct_spectrum(values):
    """Whether the sorted values are separated enough for U Vᴴ (or V Vᴴ blocks) to be well determined."""
    if values.numel() == 0 or values.shape[-1] < 2:
        return True
    v = values.double().sort(-1).values
    gap = (v[..., 1:] - v[..., :-1]).abs().min().item()
    return gap > 1e-3 * max(1.0, v.abs().max().item())


def _check_invariants(name, out, inputs, sample, dtype):
    """LAPACK's ratios and structure for the decompositions."""
    A = inputs[0]
    out = _as_tuple(out)
    if name in ("cholesky", "cholesky_ex"):
        upper = sample.kwargs.get("upper", False)
        L = out[0]
        assert torch.equal(L, L.triu() if upper else L.tril()), "the other triangle must be exactly zero"
    if name == "qr":
        Q, R = out
        mode = sample.kwargs.get("mode", sample.args[0] if sample.args else "reduced")
        assert torch.equal(R, R.triu()), "R must be upper triangular"
        if mode != "r":
            assert residual_ratio(A, Q @ R, dtype) <= LAPACK_RATIO_MAX
            assert orthogonality_ratio(Q, dtype) <= LAPACK_RATIO_MAX
    if name == "svd":
        U, S, Vh = out
        k = S.shape[-1]
        assert residual_ratio(A, (U[..., :k] * S.unsqueeze(-2)) @ Vh[..., :k, :], dtype) <= LAPACK_RATIO_MAX
        assert orthogonality_ratio(U, dtype) <= LAPACK_RATIO_MAX
        assert orthogonality_ratio(Vh, dtype, rows=True) <= LAPACK_RATIO_MAX
        assert (S[..., 1:] <= S[..., :-1]).all() and (S >= 0).all(), "singular values: descending, >= 0"
    if name == "eigh":
        L, V = out
        uplo = sample.kwargs.get("UPLO", "L")
        H = A.tril() + A.tril(-1).mH if uplo == "L" else A.triu() + A.triu(1).mH
        assert residual_ratio(H, (V * L.unsqueeze(-2)) @ V.mH, dtype) <= LAPACK_RATIO_MAX
        assert orthogonality_ratio(V, dtype) <= LAPACK_RATIO_MAX
        assert (L[..., 1:] >= L[..., :-1]).all(), "eigenvalues ascending"


def _gauge_invariant(name, out, vectors):
    """A scalar whose gradient is defined by the op, not by its gauge choice (signs of singular or
    eigenvectors, sign convention of R). Without ``vectors`` (a repeated singular value or eigenvalue,
    where no function of the vectors but the projectors onto whole eigenspaces is differentiable),
    the values alone."""
    parts = _as_tuple(out)
    if name == "svd":
        U, S, Vh = parts
        k = S.shape[-1]
        parts = (S, U[..., :k] @ Vh[..., :k, :]) if vectors else (S,)
    elif name == "eigh":
        L, V = parts
        # V diag(w) Vᴴ with w a function of the eigenvalues' order: sign-free for distinct eigenvalues.
        w = torch.linspace(-1, 1, L.shape[-1], dtype=L.dtype, device=L.device)
        parts = (L, (V * w) @ V.mH) if vectors else (L,)
    elif name == "qr":
        parts = _sign_fix(*parts)
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p) for p in parts]
    return sum((p * w).sum() for p, w in zip(parts, weights) if p.is_floating_point() and p.requires_grad)


def _spectrum(name, sample):
    if name == "svd":
        return torch.linalg.svdvals(sample.input.detach().double())
    if name == "eigh":
        return torch.linalg.eigvalsh(sample.input.detach().double(), UPLO=sample.kwargs.get("UPLO", "L"))
    return None


@pytest.mark.parametrize("backend,key,dtype,i", SAMPLE_CASES, ids=[_case_id(*c) for c in SAMPLE_CASES],
                         indirect=["backend"])
def test_sample_matches_torch(key, dtype, i, backend, device):
    opinfo = OPINFOS[key]
    name = _twin_name(key[0])
    ours_fn, torch_fn = _ours(key), opinfo.op
    sample = _samples(key, dtype, device, False)[i]

    ours, inputs = _call(ours_fn, sample)
    theirs, _ = _call(torch_fn, sample)
    oracle, _ = _call(torch_fn, sample.transform(_oracle_input))

    # Structure: the same return type, shapes and dtypes as torch.
    assert type(ours) is type(theirs)
    for a, b in zip(_as_tuple(ours), _as_tuple(theirs)):
        assert a.shape == b.shape and a.dtype == b.dtype and a.device == b.device, (a.shape, b.shape, a.dtype)
    _check_invariants(name, ours, inputs, sample, dtype)

    distinct = _spectrum(name, sample)
    parts = zip(_unique_parts(name, ours), _unique_parts(name, theirs),
                _unique_parts(name, oracle))
    for j, (a, b, c) in enumerate(parts):
        if j == 1 and distinct is not None and not _distinct_spectrum(distinct):
            continue  # U Vᴴ is not unique inside a repeated singular value; the ratios above still hold
        _assert_within_torch_error(f"{name} output {j}", a, b, c)


GRAD_CASES = [(backend, key, i) for key in OPS if OPINFOS[key].supports_autograd
              for n in [_count(key, torch.float64, requires_grad=True)]
              for i in range(n) for backend in BACKENDS if _runs_on(backend, i, n, INTERPRETED // 2)]


@pytest.mark.parametrize("backend,key,i", GRAD_CASES, ids=[_case_id(b, k, torch.float64, i) for b, k, i in GRAD_CASES],
                         indirect=["backend"])
def test_sample_gradient_matches_torch(key, i, backend, device):
    opinfo = OPINFOS[key]
    name = _twin_name(key[0])
    sample = _samples(key, torch.float64, device, True)[i]
    # torch's wrapper: e.g. differentiate over Hermitian (eigh) or triangular inputs.
    outputs = [_call(functools.partial(opinfo.gradcheck_wrapper, fn), sample) for fn in (opinfo.op, _ours(key))]
    torch_out = _as_tuple(outputs[0][0])
    spectrum = {"svd": 1, "eigh": 0}.get(name)
    vectors = spectrum is None or _distinct_spectrum(torch_out[spectrum])
    # Only what torch differentiates (metalcore's lstsq also differentiates its singular values).
    differentiable = [t.requires_grad for t in torch_out]
    grads = []
    for out, inputs in reversed(outputs):
        out = type(out)(t if d else t.detach() for t, d in zip(_as_tuple(out), differentiable)) \
            if isinstance(out, tuple) else out
        leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
        loss = _gauge_invariant(name, out, vectors)
        if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
            grads.append(None)
            continue
        grads.append(torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True))
    ours, theirs = grads
    assert (ours is None) == (theirs is None), "one side has no gradient"
    for a, b in zip(ours or (), theirs or ()):
        assert torch.isfinite(a).all() == torch.isfinite(b).all()
        # Two analytic gradients in float64; decompositions' gradients carry 1/gap factors, so the
        # bound is relative to the gradient's size: 1e-7 is far below any formula error (O(1)).
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7 * max(1.0, b.abs().max().item() if b.numel() else 1.0))


@pytest.mark.parametrize("backend,key,i", ERROR_CASES, ids=[_case_id(*c) for c in ERROR_CASES],
                         indirect=["backend"])
def test_error_input_raises_torchs_exception(key, i, backend, device):
    opinfo = OPINFOS[key]
    error = tuple(opinfo.error_inputs(device))[i]
    with pytest.raises(error.error_type):
        _call(opinfo.op, error.sample_input)
    with pytest.raises(error.error_type):
        _call(_ours(key), error.sample_input)
