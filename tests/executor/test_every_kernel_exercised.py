"""Every kernel in shaders/*.metal (each dtype instantiation) is launched through the executor, and
agrees with its op's reference on a small input by the suite's rule for reductions (twice the error of
the reference run in the same dtype, both against the reference in float64).

This is the Metal backend's coverage, not an op's contract (those are the ``metal`` cases of
tests/<area>/test_<op>.py): the test drives the kernels itself through the ops (so it holds under
pytest-xdist, where the op tests run in other processes); metalcore._metal records every launch. A
new kernel that no op here reaches fails the test: add its op to DRIVERS.
"""

import torch

from backends import expected_backend

import metalcore
from metalcore import _metal, _selection
from metalcore.linalg.cholesky import cholesky_ex_op
from metalcore.linalg.cholesky_solve import cholesky_solve_op
from metalcore.linalg.eigh import eigh_op
from metalcore.linalg.householder import geqr2_op, householder_product_op, larfb_op, larft_op
from metalcore.linalg.qr import qr_op
from metalcore.linalg.solve import solve_ex_op
from metalcore.linalg.svd import svd_op
from metalcore.linalg.syrk import gram_poly_op
from metalcore.linalg.triangular import solve_triangular_op
from metalcore.nn.activations import gelu_bwd, gelu_fwd, silu_bwd, silu_fwd
from metalcore.nn.attention import sdpa_bwd, sdpa_fwd
from metalcore.nn.cross_entropy import cross_entropy_chunk_
from metalcore.nn.rms_norm import fused_add_rms_norm_fwd, rms_norm_bwd, rms_norm_fwd
from metalcore.nn.rope import rope_bwd, rope_fwd
from metalcore.nn.swiglu import swiglu_bwd, swiglu_fwd
from metalcore.optim.adamw import adamw_step_
from oracle import assert_lapack_ratio, assert_within_torch_error, float64, orthogonality_ratio, residual_ratio
from tolerances import TOL

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _check(op, *args):
    with metalcore.use_backend("metal"):
        assert op.backend_for(*args) == expected_backend("metal", *args), op.name
        got = _tuple(op(*args))
    same = _tuple(op.reference(*args))
    want = _tuple(op.reference(*map(float64, args)))
    for a, b, c in zip(got, same, want):
        if not a.is_floating_point():  # linalg's info
            assert torch.equal(a, b), op.name
            continue
        assert a.dtype == b.dtype, op.name
        assert_within_torch_error(a, b, c)


def _rms_norm(dtype):
    x, r, w = torch.randn(5, 40).to(dtype), torch.randn(5, 40).to(dtype), torch.randn(40)
    _check(rms_norm_fwd, x, w, 1e-6, 0.0)
    _check(fused_add_rms_norm_fwd, x, r, w, 1e-6, 1.0)
    rstd = rms_norm_fwd.reference(x, w, 1e-6, 0.0)[1]
    _check(rms_norm_bwd, torch.randn_like(x), x, w, rstd, 0.0)


def _activations(dtype):
    x, dy = torch.randn(50).to(dtype), torch.randn(50).to(dtype)
    for approximate in ("none", "tanh"):
        _check(gelu_fwd, x, approximate)
        _check(gelu_bwd, dy, x, approximate)
    _check(silu_fwd, x)
    _check(silu_bwd, dy, x)
    _check(swiglu_fwd, x, dy)
    _check(swiglu_bwd, dy, x, torch.randn(50).to(dtype))


def _adamw(dtype):
    params = [torch.randn(n).to(dtype) for n in (3, 1100)]
    state = (params, [torch.randn_like(p) for p in params], [torch.zeros(p.shape) for p in params],
             [torch.zeros(p.shape) for p in params], [], [torch.tensor(0.0) for _ in params])
    ref = [[t.clone() for t in lst] for lst in state]
    hyper = (1e-2, 0.9, 0.999, 1e-8, 0.01, False, False)
    with metalcore.use_backend("metal"):
        assert adamw_step_.backend_for(*state, *hyper) == expected_backend("metal", *state, *hyper)
        adamw_step_(*state, *hyper)
    adamw_step_.reference(*ref, *hyper)
    for a, b in zip(state[0] + state[2] + state[3], ref[0] + ref[2] + ref[3]):
        torch.testing.assert_close(a, b, **TOL[a.dtype])


def _linalg(dtype):
    if dtype != torch.float32:  # the linalg shaders are float32 only (Metal has no float64)
        return
    X = torch.randn(3, 6, 6)
    _check(cholesky_ex_op, X @ X.mT + 6 * torch.eye(6), False, False)
    _check(cholesky_solve_op, torch.randn(3, 6, 2), torch.linalg.cholesky(X @ X.mT + 6 * torch.eye(6)), False)
    _check(solve_triangular_op, X + 6 * torch.eye(6), torch.randn(3, 6, 2), True, True, False)
    _check(solve_ex_op, X + 6 * torch.eye(6), torch.randn(3, 6, 2), True, False)
    _check(qr_op, X[..., :4], "reduced")
    # A side beyond the tile: the blocked QR, whose panels run geqr2_panel (needs triton, as CI has).
    _check(qr_op, torch.randn(_metal.constants()["METALCORE_LINALG_MAX_N"] + 6, 5), "reduced")
    # Values only: eigen- and singular vectors are defined up to sign, so they are not compared here.
    _check(eigh_op, X @ X.mT, "L", False)
    # Above the tile, the two-stage path (forced: it is not automatic on Metal): the values by the rule,
    # and with vectors (every stage's shader runs) LAPACK's residual and orthogonality ratios.
    G = torch.randn(2, 70, 70)
    G = G @ G.mT
    with _selection.use_path("eigh", "twostage"):
        _check(eigh_op, G, "L", False)
        with metalcore.use_backend("metal"):
            L, Q = eigh_op(G, "L", True)
    assert_lapack_ratio(residual_ratio(G.double(), (Q.double() * L.double().unsqueeze(-2)) @ Q.double().mT,
                                       torch.float32), "two-stage eigh residual")
    assert_lapack_ratio(orthogonality_ratio(Q, torch.float32), "two-stage eigh Q")
    _check(svd_op, X[..., :4], False, False)
    QR, tau = torch.geqrf(X[..., :4])
    T = larft_op.reference(QR, tau)
    _check(geqr2_op, X[..., :4])
    _check(householder_product_op, QR, tau)
    _check(larft_op, QR, tau)
    _check(larfb_op, QR, T, torch.randn(3, 6, 2), True, False)


def _rope(dtype):
    q, k, cos, sin = (torch.randn(1, h, 5, 6).to(dtype) for h in (3, 1, 1, 1))
    _check(rope_fwd, q, k, cos[:, 0], sin[:, 0])
    _check(rope_bwd, q, k, cos[:, 0], sin[:, 0])


def _gram(dtype):
    _check(gram_poly_op, (torch.randn(2, 5, 7) / 7**0.5).to(dtype), -4.775, 2.0315)


def _attention(dtype):
    q, k, v = torch.randn(1, 2, 5, 8).to(dtype), torch.randn(1, 1, 7, 8).to(dtype), torch.randn(1, 1, 7, 8).to(dtype)
    _check(sdpa_fwd, q, k, v, None, True, 0.35)
    out, lse = sdpa_fwd.reference(q, k, v, None, True, 0.35)
    _check(sdpa_bwd, torch.randn_like(out), q, k, v, out, lse, None, True, 0.35)


def _cross_entropy(dtype):
    # The kernel overwrites its logits with the gradient: each run gets its own copy.
    logits, target = torch.randn(4, 37).to(dtype), torch.tensor([0, 36, -100, 5])
    with metalcore.use_backend("metal"):
        assert cross_entropy_chunk_.backend_for(logits, target, torch.tensor(0.5), -100, 0.1, 1e-3, 3.0, True) == expected_backend("metal", logits, target, torch.tensor(0.5), -100, 0.1, 1e-3, 3.0, True)
        got = logits.clone()
        loss = cross_entropy_chunk_(got, target, torch.tensor(0.5), -100, 0.1, 1e-3, 3.0, True)
    same, want = logits.clone(), logits.double()
    same_loss = cross_entropy_chunk_.reference(same, target, torch.tensor(0.5), -100, 0.1, 1e-3, 3.0, True)
    want_loss = cross_entropy_chunk_.reference(want, target, torch.tensor(0.5, dtype=torch.float64), -100, 0.1,
                                               1e-3, 3.0, True)
    assert_within_torch_error(loss, same_loss, want_loss)
    assert_within_torch_error(got, same, want)


DRIVERS = (_rms_norm, _activations, _adamw, _linalg, _rope, _gram, _attention, _cross_entropy)


def test_every_shader_kernel_is_launched(executor, metal_outputs_poisoned):
    for drive in DRIVERS:
        for dtype in DTYPES:
            drive(dtype)
    kernels = {(name, k) for name in _metal.shader_names() for k in dir(_metal.library(name, torch.device("cpu")))}
    assert kernels, "no kernels found in shaders/"
    missing = sorted(f"{name}.metal: {k}" for name, k in kernels if k not in _metal.launched)
    assert not missing, "kernels that no op launched:\n  " + "\n  ".join(missing)
