"""The op core (metalcore/_op.py): plans cached per call signature, the measured-selection hook,
empty inputs answered by the reference, oversized batches split, and the kernel module list."""

import importlib
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import metalcore
from metalcore import _kernels
from metalcore._backend import BackendUnavailableError, triton_importable
from metalcore._op import _Kernel, observe_backends, observing, registered_ops
from metalcore.linalg.cholesky import cholesky_ex_op
from metalcore.linalg.eigh import eigh_op
from metalcore.nn.attention import sdpa_fwd
from metalcore.nn.rms_norm import rms_norm_fwd

ROOT = Path(metalcore.__file__).parent


@pytest.fixture
def recording_kernel(monkeypatch):
    """A 'triton' kernel for rms_norm_fwd that records its inputs and takes contiguous float32 rows
    of at most 8 elements; Triton 'runs' on CPU tensors (TRITON_INTERPRET=1)."""
    calls = []

    def kernel(x, weight, eps, offset):
        calls.append((tuple(x.shape), x.dtype, x.is_contiguous()))
        return rms_norm_fwd.reference(x, weight, eps, offset)

    def supports(x, weight, eps, offset):
        return x.dtype == torch.float32 and x.is_contiguous() and x.shape[-1] <= 8

    monkeypatch.setitem(rms_norm_fwd.kernels, "triton", _Kernel(kernel, supports))
    monkeypatch.setattr("metalcore._backend.triton_importable", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("METALCORE_BACKEND", raising=False)
    return calls


def _repeat(fn, times=3):
    for _ in range(times):
        out = fn()
    return out


# --- the plan cache -------------------------------------------------------------------------------

def test_a_changed_stride_misses_the_cache(recording_kernel):
    x = torch.randn(8, 4)
    with metalcore.use_backend("triton"):
        _repeat(lambda: rms_norm_fwd(x, None, 1e-6, 0.0))
        assert recording_kernel == [((8, 4), torch.float32, True)] * 3
        # Same shape, dtype and device; only the strides differ: the kernel does not take it.
        view = torch.randn(4, 8).mT
        y, _ = rms_norm_fwd(view, None, 1e-6, 0.0)
    assert len(recording_kernel) == 3
    torch.testing.assert_close(y, rms_norm_fwd.reference(view.contiguous(), None, 1e-6, 0.0)[0])


def test_a_specialized_kernel_is_worked_out_once_per_signature(recording_kernel, monkeypatch):
    """``specialize`` runs when a plan is decided, not per call; its function serves the calls of
    that signature, and another stride, dtype or ``requires_grad`` decides (and specializes) anew."""
    specialized = []

    def specialize(x, weight, eps, offset):
        specialized.append((tuple(x.shape), x.stride(), x.dtype, x.requires_grad))
        return lambda x, weight, eps, offset: (rms_norm_fwd.reference(x, weight, eps, offset)[0] * 2, None)

    kernel = rms_norm_fwd.kernels["triton"]
    supports = lambda x, weight, eps, offset: x.shape[-1] <= 8   # noqa: E731 — strides of any kind
    monkeypatch.setitem(rms_norm_fwd.kernels, "triton", _Kernel(kernel.fn, supports, specialize=specialize))
    x = torch.randn(8, 4)
    with metalcore.use_backend("triton"):
        y, _ = _repeat(lambda: rms_norm_fwd(x, None, 1e-6, 0.0))
        assert specialized == [((8, 4), (4, 1), torch.float32, False)] and recording_kernel == []
        torch.testing.assert_close(y, 2 * rms_norm_fwd.reference(x, None, 1e-6, 0.0)[0])
        x.mul_(3)                                            # data is read per call, never cached
        torch.testing.assert_close(rms_norm_fwd(x, None, 1e-6, 0.0)[0], 2 * rms_norm_fwd.reference(x, None, 1e-6, 0.0)[0])
        _repeat(lambda: rms_norm_fwd(torch.randn(4, 8).mT, None, 1e-6, 0.0))
        _repeat(lambda: rms_norm_fwd(x.double(), None, 1e-6, 0.0))
        _repeat(lambda: rms_norm_fwd(x.clone().requires_grad_(), None, 1e-6, 0.0))
    assert specialized[1:] == [((8, 4), (1, 8), torch.float32, False), ((8, 4), (4, 1), torch.float64, False),
                               ((8, 4), (4, 1), torch.float32, True)]


def test_a_kernel_that_declines_to_specialize_serves_as_itself(recording_kernel, monkeypatch):
    kernel = rms_norm_fwd.kernels["triton"]
    monkeypatch.setitem(rms_norm_fwd.kernels, "triton",
                        _Kernel(kernel.fn, kernel.supports, specialize=lambda *args: None))
    with metalcore.use_backend("triton"):
        _repeat(lambda: rms_norm_fwd(torch.randn(2, 4), None, 1e-6, 0.0))
    assert recording_kernel == [((2, 4), torch.float32, True)] * 3


def test_a_changed_dtype_misses_the_cache(recording_kernel):
    with metalcore.use_backend("triton"):
        _repeat(lambda: rms_norm_fwd(torch.randn(2, 4), None, 1e-6, 0.0))
        rms_norm_fwd(torch.randn(2, 4, dtype=torch.float64), None, 1e-6, 0.0)
        rms_norm_fwd(torch.randn(2, 4), None, 1e-6, 0.0)
    assert [c[1] for c in recording_kernel] == [torch.float32] * 4


def test_a_changed_device_misses_the_cache():
    x = torch.randn(3, 5)
    _repeat(lambda: rms_norm_fwd(x, None, 1e-6, 0.0))
    y, rstd = rms_norm_fwd(x.to("meta"), None, 1e-6, 0.0)     # the fake implementation answers
    assert y.device.type == "meta" and y.shape == (3, 5) and rstd.shape == (3,)


def test_a_changed_requires_grad_misses_the_cache():
    x = torch.randn(3, 5, dtype=torch.float64)
    y, _ = _repeat(lambda: rms_norm_fwd(x, None, 1e-6, 0.0))
    assert y.grad_fn is None
    xg = x.clone().requires_grad_()
    y, _ = rms_norm_fwd(xg, None, 1e-6, 0.0)
    assert y.grad_fn is not None
    (g,) = torch.autograd.grad(y.sum(), xg)
    torch.autograd.gradcheck(lambda t: rms_norm_fwd(t, None, 1e-6, 0.0)[0], (xg,))
    with torch.no_grad():
        assert rms_norm_fwd(xg, None, 1e-6, 0.0)[0].grad_fn is None
    assert g.shape == x.shape


def test_bad_input_after_a_good_one_of_the_same_shape_still_raises():
    A = torch.eye(3).expand(2, 3, 3).clone()
    _repeat(lambda: metalcore.linalg.cholesky(A))
    bad = A.clone()
    bad[1, 2, 2] = -1.0                                        # data changes the answer, not the plan
    with pytest.raises(torch.linalg.LinAlgError, match=r"(?i)batch element 1"):
        metalcore.linalg.cholesky(bad)
    with pytest.raises(TypeError, match="A must have dtype"):
        metalcore.linalg.cholesky(A.to(torch.int64))


def test_a_mutated_tensor_is_seen():
    x = torch.randn(4, 6)
    first, _ = _repeat(lambda: rms_norm_fwd(x, None, 1e-6, 0.0))
    first = first.clone()
    x.mul_(-3.0).add_(1.0)
    again, _ = rms_norm_fwd(x, None, 1e-6, 0.0)
    torch.testing.assert_close(again, rms_norm_fwd.reference(x, None, 1e-6, 0.0)[0])
    assert not torch.allclose(first, again)


def test_use_backend_switches_paths_on_a_hot_key(recording_kernel):
    x = torch.randn(2, 4)
    _repeat(lambda: rms_norm_fwd(x, None, 1e-6, 0.0))          # auto on CPU: the reference
    assert recording_kernel == []
    with metalcore.use_backend("triton"):
        rms_norm_fwd(x, None, 1e-6, 0.0)
    assert len(recording_kernel) == 1
    rms_norm_fwd(x, None, 1e-6, 0.0)
    assert len(recording_kernel) == 1


def test_environment_changes_are_seen_on_a_hot_key(recording_kernel, monkeypatch):
    x = torch.randn(2, 4)
    monkeypatch.setenv("METALCORE_BACKEND", "triton")
    _repeat(lambda: rms_norm_fwd(x, None, 1e-6, 0.0))
    assert len(recording_kernel) == 3
    monkeypatch.setenv("METALCORE_BACKEND", "reference")
    rms_norm_fwd(x, None, 1e-6, 0.0)
    assert len(recording_kernel) == 3
    monkeypatch.setenv("METALCORE_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        rms_norm_fwd(x, None, 1e-6, 0.0)
    monkeypatch.setenv("METALCORE_BACKEND", "bogus")
    for _ in range(2):                                          # an invalid value raises every time
        with pytest.raises(ValueError, match="got 'bogus'"):
            rms_norm_fwd(x, None, 1e-6, 0.0)


def test_plugging_a_kernel_in_drops_the_cached_plans(recording_kernel, monkeypatch):
    x = torch.randn(2, 4)
    with metalcore.use_backend("triton"):
        _repeat(lambda: rms_norm_fwd(x, None, 1e-6, 0.0))
        assert len(recording_kernel) == 3
        monkeypatch.delitem(rms_norm_fwd.kernels, "triton")
        with pytest.raises(BackendUnavailableError, match="no triton kernel"):
            rms_norm_fwd(x, None, 1e-6, 0.0)


def test_autograd_and_plain_calls_observe_the_backend(recording_kernel):
    x = torch.randn(2, 4, requires_grad=True)
    with metalcore.use_backend("triton"), observe_backends() as served:
        y = metalcore.rms_norm(x, 4)
        y.sum().backward()
    assert served["rms_norm_fwd"] == "triton" and "rms_norm_bwd" in served
    assert x.grad is not None


# --- measured selection ----------------------------------------------------------------------------

@pytest.mark.parametrize("measured,automatic,expected", [
    (True, False, "triton"), (False, True, "reference"), (None, True, "triton"), (None, False, "reference")])
def test_the_measured_table_decides_before_the_kernels_rule(recording_kernel, monkeypatch, measured, automatic,
                                                             expected):
    asked = []

    def choice(op, backend, device, args):
        asked.append((op, backend, device.type))
        return measured

    kernel = rms_norm_fwd.kernels["triton"]
    monkeypatch.setitem(rms_norm_fwd.kernels, "triton", _Kernel(kernel.fn, kernel.supports, automatic))
    monkeypatch.setattr("metalcore._op.automatic_backend", lambda device: "triton")
    monkeypatch.setattr("metalcore._selection.measured_choice", choice)
    x = torch.randn(2, 4)
    with observe_backends() as served:
        _repeat(lambda: rms_norm_fwd(x, None, 1e-6, 0.0))
    assert served == {"rms_norm_fwd": expected}
    assert asked == [("rms_norm_fwd", "triton", "cpu")]          # once: the answer is in the plan
    # The table never overrides what a kernel can take.
    assert rms_norm_fwd.backend_for(torch.randn(2, 9), None, 1e-6, 0.0) == "reference"


# --- empty inputs: torch's answer, on every backend, without a launch ------------------------------

def _square(b, n):
    return torch.randn(b, n, n, dtype=torch.float64) + n * torch.eye(n, dtype=torch.float64)


def _spd(b, n):
    A = torch.randn(b, n, n, dtype=torch.float64)
    return A @ A.mT + n * torch.eye(n, dtype=torch.float64)


def _general(b, m, n):
    return torch.randn(b, m, n, dtype=torch.float64)


def _lower(b, n):
    return _square(b, n).tril()


def _reflectors(b, m, n, k):
    A, tau = torch.geqrf(torch.randn(b, m, n, dtype=torch.float64))
    return A, tau[..., :k]


# name -> (metalcore, torch, inputs for a zero in each dimension)
EMPTY = {
    "cholesky": (metalcore.linalg.cholesky, torch.linalg.cholesky, [(_spd, 0, 3), (_spd, 2, 0)]),
    "cholesky_ex": (metalcore.linalg.cholesky_ex, torch.linalg.cholesky_ex, [(_spd, 0, 3), (_spd, 2, 0)]),
    "eigh": (metalcore.linalg.eigh, torch.linalg.eigh, [(_spd, 0, 3), (_spd, 2, 0)]),
    "eigvalsh": (metalcore.linalg.eigvalsh, torch.linalg.eigvalsh, [(_spd, 0, 3), (_spd, 2, 0)]),
    "solve": (metalcore.linalg.solve, torch.linalg.solve,
              [(lambda b, n, k: (_square(b, n), _general(b, n, k)), b, n, k) for b, n, k in
               ((0, 3, 2), (2, 0, 2), (2, 3, 0))]),
    "solve_ex": (metalcore.linalg.solve_ex, torch.linalg.solve_ex,
                 [(lambda b, n, k: (_square(b, n), _general(b, n, k)), b, n, k) for b, n, k in
                  ((0, 3, 2), (2, 0, 2), (2, 3, 0))]),
    "solve_triangular": (lambda A, B: metalcore.linalg.solve_triangular(A, B, upper=False),
                         lambda A, B: torch.linalg.solve_triangular(A, B, upper=False),
                         [(lambda b, n, k: (_lower(b, n), _general(b, n, k)), b, n, k) for b, n, k in
                          ((0, 3, 2), (2, 0, 2), (2, 3, 0))]),
    "cholesky_solve": (metalcore.linalg.cholesky_solve, torch.cholesky_solve,
                       [(lambda b, n, k: (_general(b, n, k), _lower(b, n)), b, n, k) for b, n, k in
                        ((0, 3, 2), (2, 0, 2), (2, 3, 0))]),
    "qr": (lambda A: metalcore.linalg.qr(A, mode="complete"), lambda A: torch.linalg.qr(A, mode="complete"),
           [(_general, 0, 3, 2), (_general, 2, 0, 3), (_general, 2, 3, 0)]),
    "qr_r": (lambda A: metalcore.linalg.qr(A, mode="r"), lambda A: torch.linalg.qr(A, mode="r"),
             [(_general, 0, 3, 2), (_general, 2, 0, 3), (_general, 2, 3, 0)]),
    "svd": (metalcore.linalg.svd, torch.linalg.svd, [(_general, 0, 3, 2), (_general, 2, 0, 3), (_general, 2, 3, 0)]),
    "svdvals": (metalcore.linalg.svdvals, torch.linalg.svdvals,
                [(_general, 0, 3, 2), (_general, 2, 0, 3), (_general, 2, 3, 0)]),
    "householder_product": (metalcore.linalg.householder_product, torch.linalg.householder_product,
                            [(_reflectors, b, m, n, k) for b, m, n, k in
                             ((0, 4, 3, 2), (2, 0, 0, 0), (2, 4, 0, 0), (2, 4, 3, 0))]),
}
EMPTY_CASES = [(name, i) for name, (_, _, cases) in EMPTY.items() for i in range(len(cases))]


@pytest.fixture(params=["reference", "triton", "metal"])
def any_backend(request, monkeypatch):
    """Every backend, asked for explicitly. Empty inputs never reach a kernel, so neither the Triton
    interpreter nor the shader executor has to run here; only the request must be honoured."""
    if request.param == "triton":
        if not triton_importable():
            pytest.skip("triton is not importable")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    with metalcore.use_backend(request.param):
        yield request.param


@pytest.mark.parametrize("name,case", EMPTY_CASES, ids=[f"{n}-{i}" for n, i in EMPTY_CASES])
def test_a_zero_in_any_dimension_gives_torchs_answer_without_a_launch(any_backend, name, case):
    ours, theirs, cases = EMPTY[name]
    make, *sizes = cases[case]
    inputs = make(*sizes)
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    assert any(t.numel() == 0 for t in inputs)
    with observe_backends() as served:
        got = ours(*inputs)
    assert set(served.values()) <= {"reference"}, served
    want = theirs(*inputs)
    got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w)


def _f(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def _rms_bwd(R, N):
    x, w = _f(R, N), _f(N)
    return _f(R, N), x, w, rms_norm_fwd.reference(x, w, 1e-6, 0.0)[1], 0.0


def _sdpa(B, H, L, S, E):
    return _f(B, H, L, E), _f(B, H // 2, S, E), _f(B, H // 2, S, E), None, True, 0.5


def _sdpa_bwd(B, H, L, S, E):
    q, k, v, mask, causal, scale = _sdpa(B, H, L, S, E)
    out, lse = sdpa_fwd.reference(q, k, v, mask, causal, scale)
    return torch.randn_like(out), q, k, v, out, lse, mask, causal, scale


def _targets(N, V):
    """Class indices, or only ignored rows (-100) when there is no class to point at."""
    return torch.randint(0, V, (N,)) if V else torch.full((N,), -100)


def _flce(T, Hd, V):
    return (_f(T, Hd), _f(V, Hd), _targets(T, V), _f(V), None, -100, 0.1, 1e-3, 2.0, "sum", 64, True, True, True)


def _adamw(R, N):
    shapes = [(R, N), (N,)]
    return ([_f(*s) for s in shapes], [_f(*s) for s in shapes], [_f(*s) for s in shapes],
            [_f(*s).abs() for s in shapes], [], [torch.tensor(2.0) for _ in shapes], 1e-3, 0.9, 0.999, 1e-8, 1e-2,
            False, False)


# Every registered op without a public torch twin in EMPTY (and, for those, the op itself too):
# op name -> (arguments from sizes, sizes each with a zero somewhere).
EMPTY_OPS = {
    "rms_norm_fwd": (lambda R, N: (_f(R, N), _f(N), 1e-6, 0.0), [(0, 5), (3, 0)]),
    "rms_norm_bwd": (_rms_bwd, [(0, 5), (3, 0)]),
    "fused_add_rms_norm_fwd": (lambda R, N: (_f(R, N), _f(R, N), _f(N), 1e-6, 1.0), [(0, 5), (3, 0)]),
    "gelu_fwd": (lambda R, N: (_f(R, N), "tanh"), [(0, 5), (3, 0)]),
    "gelu_bwd": (lambda R, N: (_f(R, N), _f(R, N), "none"), [(0, 5), (3, 0)]),
    "silu_fwd": (lambda R, N: (_f(R, N),), [(0, 5), (3, 0)]),
    "silu_bwd": (lambda R, N: (_f(R, N), _f(R, N)), [(0, 5), (3, 0)]),
    "swiglu_fwd": (lambda R, N: (_f(R, N), _f(R, N)), [(0, 5), (3, 0)]),
    "swiglu_bwd": (lambda R, N: (_f(R, N), _f(R, N), _f(R, N)), [(0, 5), (3, 0)]),
    "rope_fwd": (lambda B, H, S, D: (_f(B, H, S, D), _f(B, 1, S, D), _f(1, S, D), _f(1, S, D)),
                 [(0, 2, 3, 4), (2, 0, 3, 4), (2, 2, 0, 4), (2, 2, 3, 0)]),
    "rope_bwd": (lambda B, H, S, D: (_f(B, H, S, D), _f(B, 1, S, D), _f(1, S, D), _f(1, S, D)),
                 [(0, 2, 3, 4), (2, 0, 3, 4), (2, 2, 0, 4), (2, 2, 3, 0)]),
    "sdpa_fwd": (_sdpa, [(0, 2, 3, 4, 8), (2, 0, 3, 4, 8), (2, 2, 0, 4, 8), (2, 2, 3, 0, 8), (2, 2, 3, 4, 0)]),
    "sdpa_bwd": (_sdpa_bwd, [(0, 2, 3, 4, 8), (2, 0, 3, 4, 8), (2, 2, 0, 4, 8), (2, 2, 3, 0, 8), (2, 2, 3, 4, 0)]),
    "cross_entropy_chunk_": (lambda N, V: (_f(N, V), _targets(N, V), torch.tensor(0.5, dtype=torch.float64), -100,
                                           0.1, 1e-3, 2.0, True), [(0, 5), (3, 0)]),
    "fused_linear_cross_entropy_fwd": (_flce, [(0, 4, 5), (3, 0, 5), (3, 4, 0)]),
    "fused_linear_cross_entropy_bwd": (lambda T, Hd, V: (_f(T), *_flce(T, Hd, V)[:3], _f(V), -100, 0.1, 0.0, 3.0, 64,
                                                         True, True, True), [(0, 4, 5), (3, 0, 5), (3, 4, 0)]),
    "adamw_step_": (_adamw, [(0, 5), (3, 0)]),
    "geqr2": (lambda B, M, N: (_f(B, M, N),), [(0, 4, 3), (2, 0, 3), (2, 4, 0)]),
    "larft": (lambda B, M, K: (_f(B, M, K).tril(-1), _f(B, K)), [(0, 4, 3), (2, 0, 0), (2, 4, 0)]),
    "larfb": (lambda B, M, K, P: (_f(B, M, K).tril(-1), _f(B, K, K).triu(), _f(B, M, P), True, False),
              [(0, 4, 3, 2), (2, 0, 0, 2), (2, 4, 0, 2), (2, 4, 3, 0)]),
    "gram_poly": (lambda B, M, K: (_f(B, M, K), -4.775, 2.0315), [(0, 4, 3), (2, 0, 3), (2, 4, 0)]),
}
EMPTY_OP_CASES = [(name, sizes) for name, (_, cases) in EMPTY_OPS.items() for sizes in cases]


def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    return x


def _flat(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _flat(v)]
    return []


@pytest.mark.parametrize("name,sizes", EMPTY_OP_CASES, ids=[f"{n}-{'x'.join(map(str, s))}" for n, s in EMPTY_OP_CASES])
def test_every_op_answers_a_zero_in_any_dimension_without_a_launch(any_backend, name, sizes):
    """Each op itself, a zero in each of its dimensions in turn: the reference answers on every backend
    (in-place ops leave their arguments as the reference does). An op built on another (the fused
    linear cross-entropy on its chunk op) may hand that op non-empty pieces (the bias's logits when
    the hidden size is 0), which run where that op runs."""
    op, (make, _) = registered_ops()[name], EMPTY_OPS[name]
    args = make(*sizes)
    assert any(t.numel() == 0 for t in _flat(args))
    ours, theirs = _clone(args), _clone(args)
    with observe_backends() as served:
        got = op(*ours)
    assert served[name] == "reference", served
    want = op.reference(*theirs)
    for g, w in zip(_flat((got, ours)), _flat((want, theirs)), strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, equal_nan=True)


def test_every_op_has_an_empty_case():
    """Every registered op is in EMPTY_OPS; the linalg twins of torch functions are in EMPTY too."""
    assert set(registered_ops()) == set(EMPTY_OPS) | {"cholesky_ex", "eigh", "solve_ex", "solve_triangular",
                                                      "cholesky_solve", "qr", "svd", "householder_product"}
    assert {"cholesky_ex", "eigh", "solve_ex", "solve_triangular", "cholesky_solve", "qr", "svd",
            "householder_product"} <= set(EMPTY)


# --- oversized batches are split by the op core ----------------------------------------------------

def test_the_reference_splits_batches_above_its_limit(monkeypatch):
    A = _spd(7, 5).reshape(7, 1, 5, 5)
    whole = torch.linalg.eigh(A)
    monkeypatch.setitem(eigh_op.max_batch, "cpu", 3)
    metalcore._op.clear_plans()
    with observe_backends():
        L, Q = metalcore.linalg.eigh(A)
        values = metalcore.linalg.eigvalsh(A)                     # the (0,) placeholder stays one
    assert L.shape == (7, 1, 5) and Q.shape == (7, 1, 5, 5)
    # LAPACK runs matrix by matrix either way; only the last bits may differ.
    torch.testing.assert_close(L, whole.eigenvalues, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Q.abs(), whole.eigenvectors.abs(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(values, whole.eigenvalues, rtol=1e-12, atol=1e-12)
    # Gradients flow through the split call as through the whole one.
    X = A.clone().requires_grad_()
    (gX,) = torch.autograd.grad(metalcore.linalg.eigvalsh(X).sum(), X)
    torch.testing.assert_close(gX, torch.eye(5, dtype=torch.float64).expand_as(A))


@pytest.fixture
def eigh_chunks(monkeypatch):
    """The batch sizes of the calls that reach eigh's reference."""
    sizes = []
    reference = eigh_op.reference

    def recording(A, UPLO, compute_v):
        sizes.append(A.shape[0])
        return reference(A, UPLO, compute_v)

    monkeypatch.setattr(eigh_op, "reference", recording)
    return sizes


def test_calls_are_split_into_chunks_of_the_limit(monkeypatch, eigh_chunks):
    sizes = eigh_chunks
    monkeypatch.setitem(eigh_op.max_batch, "cpu", 4)
    metalcore._op.clear_plans()
    metalcore.linalg.eigh(_spd(10, 3))
    assert sizes == [4, 4, 2]
    sizes.clear()
    metalcore.linalg.eigh(_spd(4, 3))
    assert sizes == []  # within the limit: no chunks, and automatic selection calls torch.linalg.eigh itself
    with metalcore.use_backend("reference"):
        metalcore.linalg.eigh(_spd(4, 3))
    assert sizes == [4]


def test_a_limit_may_depend_on_the_inputs(monkeypatch, eigh_chunks):
    sizes = eigh_chunks
    monkeypatch.setitem(eigh_op.max_batch, "cpu", lambda A, UPLO, compute_v: 4 if A.shape[-1] == 3 else None)
    metalcore._op.clear_plans()
    metalcore.linalg.eigh(_spd(10, 3))
    assert sizes == [4, 4, 2]
    sizes.clear()
    metalcore.linalg.eigh(_spd(10, 2))
    assert sizes == []  # no limit for these inputs: torch.linalg.eigh takes the whole batch


def test_eighs_cuda_limit_covers_only_the_sides_cusolver_fails_on():
    # syevjBatched (2 <= n <= 32) fails at 65536 matrices; n = 1 and n > 32 take the whole batch.
    limit = eigh_op.max_batch["cuda"]
    assert [limit(torch.empty(0, n, n), "L", True) for n in (1, 2, 32, 33, 128)] == [None, 32768, 32768, None, None]


def test_a_kernels_batch_limit_splits_its_launches(monkeypatch):
    if not triton_importable():
        pytest.skip("triton is not importable")
    kernel = cholesky_ex_op.kernels["triton"]
    sizes = []

    def recording(A, upper, check_errors):
        sizes.append(A.shape[0])
        return kernel.fn(A, upper, check_errors)

    # A split batch runs the kernel's own function per chunk, never one specialized to the whole batch.
    monkeypatch.setitem(cholesky_ex_op.kernels, "triton",
                        _Kernel(recording, kernel.supports, kernel.automatic, max_batch=2,
                                specialize=kernel.specialize))
    monkeypatch.setattr(cholesky_ex_op, "_batched", (0,))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    A = _spd(5, 4)
    A[3, 1, 1] = -50.0
    with metalcore.use_backend("triton"):
        L, info = metalcore.linalg.cholesky_ex(A)
        with pytest.raises(torch.linalg.LinAlgError, match=r"batch element 3"):
            metalcore.linalg.cholesky(A)
    assert sizes[:3] == [2, 2, 1]
    want = torch.linalg.cholesky_ex(A)
    assert torch.equal(info, want.info)
    ok = want.info == 0
    torch.testing.assert_close(L[ok], want.L[ok])


# --- the kernel module list ------------------------------------------------------------------------

def test_the_kernel_module_list_matches_the_files():
    """Every ``<op>_triton.py`` / ``<op>_metal.py`` that plugs a kernel or an alternative path in
    (``.implement(``, ``@register_path(``) is loaded, and every listed module exists; private
    helpers (``_small_triton.py``) are not listed."""
    for suffix, listed in (("triton", _kernels.TRITON_MODULES), ("metal", _kernels.METAL_MODULES)):
        found = set()
        for path in ROOT.rglob(f"*_{suffix}.py"):
            if path.name.startswith("_") or not re.search(r"\.implement\(|@register_path\(", path.read_text()):
                continue
            found.add("metalcore." + ".".join(path.relative_to(ROOT).with_suffix("").parts))
        assert found == set(listed), f"{suffix}: missing {sorted(found - set(listed))}, " \
                                     f"stale {sorted(set(listed) - found)}"
        assert len(listed) == len(set(listed))


# --- the direct launch of compiled Triton kernels ---------------------------------------------------

@pytest.fixture
def fake_compiled(monkeypatch):
    """A LazyKernel whose compiled twin is a stand-in for Triton 3.6's JITFunction: its binder
    specializes integers on divisibility by 16 and its run() 'compiles' (counts) and returns a
    kernel whose launcher records the arguments it is called with."""
    _triton = pytest.importorskip("metalcore._triton")
    if not _triton.FAST_LAUNCH:
        pytest.skip("the direct launch is for Triton 3.6")
    direct = []

    class Kernel:
        function, packed_metadata = "function", "metadata"

        def run(self, *args):
            direct.append(args)

    class Jit:
        pre_run_hooks: list = []

        def __init__(self):
            self.runs = []
            self.device_caches = {0: ({}, {}, None, None, self.binder)}

        def binder(self, *args, **options):
            return {f"a{i}": a for i, a in enumerate(args)}, [("i32", a % 16 == 0) for a in args], options

        def run(self, *args, grid, warmup, **options):
            self.runs.append((grid, args, options))
            return Kernel()

        def __getitem__(self, grid):
            return lambda *args, **options: self.run(*args, grid=grid, warmup=False, **options)

    kernel = _triton.LazyKernel(lambda: None)
    kernel.compiled = Jit()
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(_triton, "_current_device", lambda: 0)
    monkeypatch.setattr(_triton, "_raw_stream", lambda device: 1234)
    monkeypatch.setattr(_triton, "triton_interpreting", lambda: False)
    return kernel, direct


def test_a_compiled_variant_is_launched_directly_after_its_first_run(fake_compiled):
    kernel, direct = fake_compiled
    kernel[(3,)](5, 7, num_warps=4)
    assert len(kernel.compiled.runs) == 1 and direct == []
    kernel[(3, 2)](5, 7, num_warps=4)
    assert direct == [(3, 2, 1, 1234, "function", "metadata", None, None, None, 5, 7)]
    kernel[(3,)](16, 7, num_warps=4)                      # another specialization: run() again
    kernel[(3,)](5, 7, num_warps=8)                       # other options: run() again
    assert len(kernel.compiled.runs) == 3 and len(direct) == 1


class _Pointer:
    """A stand-in tensor argument: what a bound launch reads of a tensor is its data pointer."""

    def __init__(self, address):
        self.address = address

    def data_ptr(self):
        return self.address

    def __mod__(self, m):   # the fake binder specializes every argument on divisibility by 16
        return self.address % m


def test_a_bound_launch_passes_data_pointers_to_the_launcher_after_its_first_run(fake_compiled, monkeypatch):
    from metalcore import _triton

    kernel, direct = fake_compiled
    launch = kernel.bind((3,), None, 7, None, num_warps=4)
    launch(_Pointer(4096), _Pointer(8192))                 # compiles (run), then binds
    assert len(kernel.compiled.runs) == 1 and direct == []
    launch(_Pointer(1024), _Pointer(2048))
    assert direct == [(3, 1, 1, 1234, "function", "metadata", None, None, None, 1024, 7, 2048)]
    launch(_Pointer(1032), _Pointer(2048))                 # another alignment: the unbound launch
    assert len(kernel.compiled.runs) == 2 and len(direct) == 1
    launch(_Pointer(512), _Pointer(64))
    assert direct[-1][-3:] == (512, 7, 64) and len(kernel.compiled.runs) == 2
    monkeypatch.setattr(_triton, "FAST_LAUNCH", False)     # how host_overhead.py times Triton's own run()
    launch(_Pointer(512), _Pointer(64))
    assert len(direct) == 2 and len(kernel.compiled.runs) == 3


def test_a_bound_launch_on_another_device_launches_unbound(fake_compiled, monkeypatch):
    from metalcore import _triton

    kernel, direct = fake_compiled
    launch = kernel.bind((1,), None, 5)
    launch(_Pointer(256)), launch(_Pointer(256))
    assert len(direct) == 1
    monkeypatch.setattr(_triton, "_current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    kernel.compiled.device_caches[1] = kernel.compiled.device_caches[0]
    launch(_Pointer(256))
    assert len(direct) == 1 and len(kernel.compiled.runs) == 2


def test_registered_launch_hooks_keep_the_full_launch(fake_compiled):
    from triton import knobs

    kernel, direct = fake_compiled
    kernel[(1,)](5, 7)
    hook = lambda metadata: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        kernel[(1,)](5, 7)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert len(kernel.compiled.runs) == 2 and direct == []


@pytest.mark.gpu
def test_direct_launches_match_triton_run_on_cuda(monkeypatch):
    from metalcore import _triton

    A = _spd(64, 8).float().cuda()
    L = torch.linalg.cholesky(A)
    B = torch.randn(64, 8, 3, device="cuda")
    x, w = torch.randn(4, 4096, device="cuda", dtype=torch.bfloat16), torch.randn(4096, device="cuda")
    calls = [lambda: metalcore.linalg.cholesky(A), lambda: metalcore.linalg.solve_triangular(L, B, upper=False),
             lambda: metalcore.linalg.solve(A, B), lambda: metalcore.rms_norm(x, (4096,), w.bfloat16(), 1e-6)]
    with metalcore.use_backend("triton"):
        monkeypatch.setattr(_triton, "FAST_LAUNCH", False)
        want = [call() for call in calls]
        monkeypatch.setattr(_triton, "FAST_LAUNCH", True)
        for _ in range(2):                                  # the first run compiles, the second is direct
            got = [call() for call in calls]
    for g, w_ in zip(got, want):
        assert torch.equal(g, w_)


def test_a_tensor_subclass_runs_the_library_op_once():
    class Tagged(torch.Tensor):
        pass

    x = torch.randn(3, 4).as_subclass(Tagged)
    with observe_backends() as served:
        y, _ = rms_norm_fwd(x, None, 1e-6, 0.0)
    assert served == {"rms_norm_fwd": "reference"}
    torch.testing.assert_close(y.as_subclass(torch.Tensor), rms_norm_fwd.reference(x.as_subclass(torch.Tensor),
                                                                                    None, 1e-6, 0.0)[0])


# --- where the reference would serve, the public training functions call torch's fused op ---------

def _public_training_calls():
    x = torch.randn(4, 64)
    w = torch.randn(64)
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)
    angle = torch.randn(1, 3, 8)
    return {
        "rms_norm_fwd": lambda: metalcore.rms_norm(x, (64,), w, 1e-6),
        "fused_add_rms_norm_fwd": lambda: metalcore.fused_add_rms_norm(x, x.flip(0), w, 1e-6),
        "gelu_fwd": lambda: metalcore.metal_gelu(x),
        "silu_fwd": lambda: metalcore.metal_silu(x),
        "swiglu_fwd": lambda: metalcore.swiglu(x, x.flip(0)),
        "rope_fwd": lambda: metalcore.apply_rotary_pos_emb(q, k, angle.cos(), angle.sin()),
    }


@pytest.mark.parametrize("op", sorted(_public_training_calls()))
def test_automatic_reference_is_torchs_fused_op(op):
    """On the CPU automatic selection picks the reference, so the public function runs torch's own
    op (no metalcore op executes); forcing the reference (the oracle) runs the op, and both agree."""
    call = _public_training_calls()[op]
    ran = []
    with observing(lambda name, backend: ran.append(name)):
        fused = call()
    assert op not in ran
    with metalcore.use_backend("reference"), observing(lambda name, backend: ran.append(name)):
        reference = call()
    assert op in ran
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)


def test_prefers_torch_only_under_automatic_selection():
    from metalcore.nn.rms_norm import rms_norm_fwd

    x = torch.randn(2, 8)
    assert rms_norm_fwd.plan(x, None, 1e-6, 0.0).prefers_torch
    with metalcore.use_backend("reference"):
        assert not rms_norm_fwd.plan(x, None, 1e-6, 0.0).prefers_torch


# --- the torch route: a call signature that took torch's op calls it before any check -------------

@pytest.fixture
def checks(monkeypatch):
    """How many times cholesky's full path validated its argument (its check_matrix calls)."""
    module = importlib.import_module("metalcore.linalg.cholesky")   # the attribute is the function
    calls = []
    check_matrix = module.check_matrix

    def counting(fn, name, A, **kwargs):
        calls.append(name)
        return check_matrix(fn, name, A, **kwargs)

    monkeypatch.setattr(module, "check_matrix", counting)
    return calls


def test_the_torch_route_skips_the_checks_on_a_hit(checks):
    A = _spd(2, 4)
    first = metalcore.linalg.cholesky(A)
    assert len(checks) == 1
    for _ in range(3):
        again = metalcore.linalg.cholesky(A)
    assert len(checks) == 1
    assert torch.equal(again, first) and torch.equal(again, torch.linalg.cholesky(A))


@pytest.mark.parametrize("change", ["stride", "dtype", "device", "requires_grad", "shape", "flag", "grad mode"])
def test_a_changed_signature_misses_the_torch_route_and_is_checked_again(checks, change):
    A = _spd(2, 4)
    Ag = A.clone().requires_grad_()
    base = {"grad mode": lambda: metalcore.linalg.cholesky(Ag)}.get(change, lambda: metalcore.linalg.cholesky(A))
    changed = {"stride": lambda: metalcore.linalg.cholesky(A.mT.contiguous().mT),   # same values, column-major
               "dtype": lambda: metalcore.linalg.cholesky(A.float()),
               "device": lambda: metalcore.linalg.cholesky(A.to("meta")),
               "requires_grad": lambda: metalcore.linalg.cholesky(Ag),
               "shape": lambda: metalcore.linalg.cholesky(_spd(3, 4)),
               "flag": lambda: metalcore.linalg.cholesky(A, upper=True),
               "grad mode": torch.no_grad()(lambda: metalcore.linalg.cholesky(Ag))}[change]
    _repeat(base)
    assert len(checks) == 1
    changed()
    assert len(checks) == 2
    base()                                                      # the first signature still hits
    assert len(checks) == 2


def test_the_route_key_tells_apart_a_change_of_any_argument():
    """The key is one flat tuple (built without a loop for one or two positional tensors): calls that
    differ in any tensor's metadata, any other argument's type or value, or where an argument sits
    (position, keyword, which name) never share it; the same call again does."""
    from metalcore._route import _key

    A, B = torch.randn(2, 3, 3), torch.randn(2, 3, 2)
    calls = {
        "base": ((A, B), {}),
        "first's requires_grad": ((A.clone().requires_grad_(), B), {}),
        "second's shape": ((A, torch.randn(2, 3, 4)), {}),
        "second's stride": ((A, B.mT.contiguous().mT), {}),
        "second's dtype": ((A, B.double()), {}),
        "second's device": ((A, B.to("meta")), {}),
        "second's requires_grad": ((A, B.clone().requires_grad_()), {}),
        "swapped": ((B, A), {}),
        "a keyword": ((A, B), {"upper": False}),
        "its value": ((A, B), {"upper": True}),
        "its type": ((A, B), {"upper": 0}),
        "another name": ((A, B), {"left": False}),
        "a positional flag": ((A, B, False), {}),
        "the tensor by keyword": ((A,), {"B": B}),
        "a tensor keyword of another name": ((A,), {"X": B}),
        "one tensor": ((A,), {}),
        "one flag": ((A, False), {}),
        "a tuple": ((A, (2, 3, 2)), {}),
        "a tuple keyword": ((A,), {"B": (2, 3, 2)}),
        "no tensor": ((False,), {}),
        "nothing": ((), {}),
    }
    keys = {name: _key(args, kwargs) for name, (args, kwargs) in calls.items()}
    assert len(set(keys.values())) == len(keys)
    assert _key((A.clone(), B.clone()), {}) == keys["base"]
    assert _key((A, B), {"upper": False}) == keys["a keyword"]
    with torch.no_grad():
        assert _key((A, B), {}) != keys["base"] and _key((A,), {}) != keys["one tensor"]


def test_bad_input_after_a_routed_call_still_raises_metalcores_error():
    A = _spd(2, 3)
    _repeat(lambda: metalcore.linalg.cholesky(A))
    with pytest.raises(TypeError, match="metalcore.linalg.cholesky: A must have dtype"):
        metalcore.linalg.cholesky(A.to(torch.int64))
    with pytest.raises(ValueError, match="metalcore.linalg.cholesky: A must be a square matrix"):
        metalcore.linalg.cholesky(torch.randn(2, 3, 4))
    B = torch.randn(2, 3, 2, dtype=torch.float64)
    _repeat(lambda: metalcore.linalg.solve(A, B))
    with pytest.raises(TypeError, match="expected all tensors to have the same dtype"):
        metalcore.linalg.solve(A, B.float())
    for _ in range(2):                                          # a failed key is never recorded
        with pytest.raises(ValueError, match="B must have 3 rows"):
            metalcore.linalg.solve(A, torch.randn(2, 4, 2, dtype=torch.float64))


def test_a_mutated_tensor_is_seen_on_the_torch_route():
    A = _spd(2, 4)
    x, w = torch.randn(3, 8), torch.randn(8)
    _repeat(lambda: (metalcore.linalg.cholesky(A), metalcore.rms_norm(x, (8,), w, 1e-6)))
    A.mul_(4.0)
    x.mul_(-3.0).add_(1.0)
    torch.testing.assert_close(metalcore.linalg.cholesky(A), torch.linalg.cholesky(A))
    torch.testing.assert_close(metalcore.rms_norm(x, (8,), w, 1e-6), F.rms_norm(x, (8,), w, 1e-6))


def test_an_explicit_backend_and_dispatch_modes_keep_the_op_on_a_routed_signature():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    A = _spd(2, 4)
    _repeat(lambda: metalcore.linalg.cholesky(A))
    with observe_backends() as served:
        metalcore.linalg.cholesky(A)
        assert served == {}                                     # torch's own op, no metalcore op
        with metalcore.use_backend("reference"):
            metalcore.linalg.cholesky(A)
        assert served == {"cholesky_ex": "reference"}
        served.clear()
        with Passthrough():
            metalcore.linalg.cholesky(A)
        assert served == {"cholesky_ex": "reference"}


def test_a_forced_call_is_recorded_under_its_forcing(checks):
    """An explicit backend (and a forced path) is part of the route's key: a repeated forced call
    skips the checks as an automatic one does, runs the backend it asked for, and another forcing of
    the same signature is decided on the full path again."""
    from metalcore import _selection

    A = _spd(2, 4)
    with metalcore.use_backend("reference"):
        first = metalcore.linalg.cholesky(A)
        with observe_backends() as served:
            again = _repeat(lambda: metalcore.linalg.cholesky(A))
        assert served == {"cholesky_ex": "reference"} and len(checks) == 1
        with _selection.use_path("cholesky_ex", "kernel"):
            metalcore.linalg.cholesky(A)
        assert len(checks) == 2                                 # another forcing: decided again
    assert torch.equal(again, first)
    metalcore.linalg.cholesky(A)
    assert len(checks) == 3                                     # automatic: its own key
    torch.testing.assert_close(first, torch.linalg.cholesky(A))


def test_a_tensor_subclass_never_takes_the_torch_route():
    class Tagged(torch.Tensor):
        pass

    x = torch.randn(3, 4).as_subclass(Tagged)
    for _ in range(3):                                          # keyed by identity, so never recorded
        with observe_backends() as served:
            metalcore.rms_norm(x, 4)
        assert served == {"rms_norm_fwd": "reference"}


def test_torch_compile_keeps_the_op_on_a_routed_signature():
    A = _spd(2, 4)
    _repeat(lambda: metalcore.linalg.cholesky(A))
    compiled = torch.compile(metalcore.linalg.cholesky, backend="eager", fullgraph=True)
    with observe_backends() as served:
        L = compiled(A)
    assert served == {"cholesky_ex": "reference"}
    torch.testing.assert_close(L, torch.linalg.cholesky(A))


def test_out_on_a_routed_signature_takes_the_full_path():
    A = _spd(2, 4).float()
    L, B = torch.linalg.cholesky(A), torch.randn(2, 4, 3)
    _repeat(lambda: (metalcore.linalg.cholesky(A), metalcore.linalg.cholesky_solve(B, L)))
    out = torch.empty(0)
    assert metalcore.linalg.cholesky(A, out=out) is out
    torch.testing.assert_close(out, L)
    wide = torch.empty(2, 4, 3, dtype=torch.float64)            # cholesky_solve's out may be wider, as in torch
    metalcore.linalg.cholesky_solve(B, L, out=wide)
    torch.testing.assert_close(wide, torch.cholesky_solve(B, L).double())
    with pytest.raises(RuntimeError, match="out must have the result's dtype"):
        metalcore.linalg.cholesky(A, out=torch.empty(0, dtype=torch.float64))
    assert torch.equal(metalcore.linalg.cholesky(A, out=None), L)


def _routed_calls():
    A, M = _spd(2, 4), torch.randn(2, 5, 3, dtype=torch.float64)
    L, B = torch.linalg.cholesky(A), torch.randn(2, 4, 2, dtype=torch.float64)
    x, w = torch.randn(3, 8), torch.randn(8)
    q, k, angle = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 3, 8)
    return {
        "cholesky": lambda: metalcore.linalg.cholesky(A), "cholesky_ex": lambda: metalcore.linalg.cholesky_ex(A),
        "solve": lambda: metalcore.linalg.solve(A, B[..., 0]), "solve_ex": lambda: metalcore.linalg.solve_ex(A, B),
        "solve_triangular": lambda: metalcore.linalg.solve_triangular(L, B, upper=False, left=True),
        "cholesky_solve": lambda: metalcore.linalg.cholesky_solve(B, L),
        "eigh": lambda: metalcore.linalg.eigh(A, "u"), "eigvalsh": lambda: metalcore.linalg.eigvalsh(A),
        "svd": lambda: metalcore.linalg.svd(M, False), "svdvals": lambda: metalcore.linalg.svdvals(M),
        "qr": lambda: metalcore.linalg.qr(M, mode="complete"),
        "rms_norm": lambda: metalcore.rms_norm(x, 8, w), "fused_add_rms_norm": lambda: metalcore.fused_add_rms_norm(
            x, x.flip(0), w, 1e-5),
        "gelu": lambda: metalcore.metal_gelu(x.mT, "tanh"), "silu": lambda: metalcore.metal_silu(x),
        "swiglu": lambda: metalcore.swiglu(x, x.flip(0)),
        "rope": lambda: metalcore.apply_rotary_pos_emb(q, k, angle.cos(), angle.sin()),
        "rope seq-first": lambda: metalcore.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), angle.cos(),
                                                                 angle.sin(), unsqueeze_dim=2),
    }


@pytest.mark.parametrize("name", sorted(_routed_calls()))
def test_every_routed_function_gives_the_full_paths_result_without_its_plan(name, monkeypatch):
    """The first call decides on the full path (one plan); later ones call torch's op straight
    away (no plan) and return exactly what the full path returned."""
    from metalcore._op import MetalcoreOp

    call = _routed_calls()[name]
    plans = []
    plan = MetalcoreOp.plan
    monkeypatch.setattr(MetalcoreOp, "plan", lambda op, *args: plans.append(op.name) or plan(op, *args))
    first = call()
    assert len(plans) == 1
    again = [call() for _ in range(2)][-1]
    assert len(plans) == 1
    for a, b in zip(*(r if isinstance(r, tuple) else (r,) for r in (first, again))):
        assert torch.equal(a, b)


def _kernel_calls():
    """Public functions whose op arguments are their own tensors, each as (inputs, call)."""
    A = _spd(3, 5)
    L, B = torch.linalg.cholesky(A), torch.randn(3, 5, 2, dtype=torch.float64)
    M = torch.randn(3, 6, 4, dtype=torch.float64)
    return {
        "cholesky": ((A,), lambda A: metalcore.linalg.cholesky(A, upper=True)),
        "cholesky_ex": ((A,), lambda A: metalcore.linalg.cholesky_ex(A)),
        "solve": ((A, B), lambda A, B: metalcore.linalg.solve(A, B, left=True)),
        "solve_ex": ((A, B), lambda A, B: metalcore.linalg.solve_ex(A, B)),
        "solve_triangular": ((L, B), lambda L, B: metalcore.linalg.solve_triangular(L, B, upper=False)),
        "cholesky_solve": ((B, L), lambda B, L: metalcore.linalg.cholesky_solve(B, L, False)),
        "qr": ((M,), lambda M: metalcore.linalg.qr(M, "reduced")),
        # Vectors up to sign: compared through what they reconstruct.
        "eigh": ((A,), lambda A: _eigh_invariants(metalcore.linalg.eigh(A, "U"))),
        "eigvalsh": ((A,), lambda A: metalcore.linalg.eigvalsh(A)),
        "svd": ((M,), lambda M: _svd_invariants(metalcore.linalg.svd(M, False))),
        "svdvals": ((M,), lambda M: metalcore.linalg.svdvals(M)),
    }


def _eigh_invariants(LQ):
    L, Q = LQ
    return L, Q @ torch.diag_embed(L) @ Q.mT


def _svd_invariants(USVh):
    U, S, Vh = USVh
    return S, U @ torch.diag_embed(S) @ Vh


@pytest.mark.skipif(not triton_importable(), reason="triton is not importable")
@pytest.mark.parametrize("name", sorted(_kernel_calls()))
def test_a_repeated_kernel_call_skips_the_checks_and_plan(name, monkeypatch):
    """Where automatic selection runs metalcore's kernel, the first call of a signature takes the
    full path and later ones call the op with the plan it decided (no checks, no plan lookup), with
    the same results, reading new data; another stride pattern with the same key takes the full path
    again. Automatic selection is made to pick Triton on CPU tensors (the interpreter)."""
    from metalcore._op import MetalcoreOp

    monkeypatch.setattr("metalcore._op.automatic_backend", lambda device: "triton")
    monkeypatch.setattr("metalcore._selection.measured_choice", lambda *args: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    inputs, call = _kernel_calls()[name]
    plans = []
    plan = MetalcoreOp.plan
    monkeypatch.setattr(MetalcoreOp, "plan", lambda op, *args: plans.append(op.name) or plan(op, *args))
    reference = _routed_reference(call)

    def planned(*args):
        before = len(plans)
        result = call(*args)
        return result, len(plans) - before

    with observe_backends() as served:
        first, looked_up = planned(*inputs)
    assert set(served.values()) == {"triton"} and looked_up == 1
    _assert_same(first, reference(*inputs))
    for x in inputs:
        x.mul_(1.5)                                             # new data, same tensors
    again, looked_up = planned(*inputs)
    assert looked_up == 0, "the repeated call took the recorded kernel call"
    _assert_same(again, reference(*inputs))
    # Two non-contiguous layouts of the same shapes: one key for the route, other strides, so each
    # takes the full path once and its own recorded call after.
    column_major = [torch.empty_strided(x.shape, (x.shape[-1] * x.shape[-2], 1, x.shape[-2]), dtype=x.dtype).copy_(x)
                    for x in inputs]
    batch_inner = [x.transpose(0, 1).contiguous().transpose(0, 1) for x in inputs]
    for layout in (column_major, batch_inner):
        assert planned(*layout)[1] == 1
        result, looked_up = planned(*layout)
        assert looked_up == 0
        _assert_same(result, reference(*layout))


def _routed_reference(call):
    """The same call through the reference backend (the oracle)."""
    def reference(*args):
        with metalcore.use_backend("reference"):
            return call(*args)
    return reference


def _assert_same(got, want):
    for g, w in zip(*(r if isinstance(r, tuple) else (r,) for r in (got, want))):
        torch.testing.assert_close(g, w)


def test_the_kernel_path_looks_its_plan_up_once(recording_kernel, monkeypatch):
    from metalcore._op import MetalcoreOp

    lookups = []
    lookup = MetalcoreOp._plan
    monkeypatch.setattr(MetalcoreOp, "_plan", lambda op, args: lookups.append(op.name) or lookup(op, args))
    with metalcore.use_backend("triton"):
        metalcore.rms_norm(torch.randn(2, 4), 4)
    assert lookups == ["rms_norm_fwd"] and len(recording_kernel) == 1


def test_the_torch_route_is_dropped_with_the_plans(recording_kernel, monkeypatch):
    """A kernel plugged in, ``clear_plans`` and a selection table reloaded all reach the routed
    signatures (here automatic selection is made to pick Triton on CPU tensors)."""
    from metalcore import _selection
    from metalcore._op import clear_plans

    x = torch.randn(2, 4)
    kernel = rms_norm_fwd.kernels["triton"]
    del rms_norm_fwd.kernels["triton"]
    monkeypatch.setattr("metalcore._op.automatic_backend", lambda device: "triton")
    _repeat(lambda: metalcore.rms_norm(x, 4))                   # no kernel: torch's op, recorded
    assert recording_kernel == []
    rms_norm_fwd.kernels["triton"] = kernel                     # plugged in
    metalcore.rms_norm(x, 4)
    assert len(recording_kernel) == 1

    measured = [False]
    monkeypatch.setattr(_selection, "measured_choice", lambda *args: measured[0])
    clear_plans()
    for forget in (clear_plans, _selection.reload):
        _repeat(lambda: metalcore.rms_norm(x, 4))               # a kernel rule the key cannot see
        ran = len(recording_kernel)
        measured[0] = True
        metalcore.rms_norm(x, 4)
        assert len(recording_kernel) == ran                     # the route still holds ...
        forget()
        metalcore.rms_norm(x, 4)
        assert len(recording_kernel) == ran + 1                 # ... until the decisions are dropped
        measured[0] = False
        clear_plans()
