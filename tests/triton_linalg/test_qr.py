"""Householder QR kernel (metalcore/linalg/qr_triton.py): qr in every mode, geqr2 and
householder_product against LAPACK's test ratios and torch, on square, tall and wide matrices of
every hard family; NaN isolation; gradients through the kernels."""

import importlib

import pytest
import torch

import metalcore
from linalg_matrices import BATCHES, DTYPES, KINDS, SIZES, case_id, general, scale_of
from metalcore.linalg.householder import geqr2, geqr2_op, householder_product_op
from metalcore.linalg.qr import qr_op
from oracle import assert_lapack_ratio, orthogonality_ratio, residual_ratio


def qr_module():
    return importlib.import_module("metalcore.linalg.qr_triton")


def check_qr(A, mode, what):
    dtype = A.dtype
    m, n = A.shape[-2:]
    k = min(m, n)
    Q, R = metalcore.linalg.qr(A, mode=mode)
    Qt, Rt = torch.linalg.qr(A.cpu(), mode=mode)
    assert Q.shape == Qt.shape and R.shape == Rt.shape and R.is_contiguous()
    assert torch.equal(R, R.triu()), f"{what}: R must be upper triangular"
    if mode == "r":
        assert Q.numel() == 0
        # |R| is unique up to row signs: compare with the reduced mode's R, which is checked below.
        _, R2 = metalcore.linalg.qr(A, mode="reduced")
        assert torch.equal(R, R2)
        return
    assert_lapack_ratio(orthogonality_ratio(Q, dtype), f"{what} QᵀQ")
    s = A.abs().amax().clamp_min(torch.finfo(dtype).tiny).item() if A.numel() else 1.0
    Qk = Q[..., :k] if mode == "complete" else Q
    assert_lapack_ratio(residual_ratio(A.double() / s, Qk.double() @ (R[..., :k, :].double() / s), dtype), f"{what} A−QR")


QR_SHAPES = [(m, n) for n in SIZES for m in (n, n + 3 if n < 31 else 33, max(n - 2, 1))]
QR_CASES = [(BATCHES[i % 4], m, n, ("reduced", "complete", "r")[i % 3]) for i, (m, n) in enumerate(QR_SHAPES)
            if (m, n) != (33, 33)]


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,m,n,mode", QR_CASES, ids=[f"{case_id(b, m, n)}-{mode}" for b, m, n, mode in QR_CASES])
def test_qr_lapack_ratios(batch, m, n, mode, dtype, device):
    A = general("random", batch, m, n, dtype).to(device)
    assert qr_op.backend_for(A, mode) == ("reference" if A.numel() == 0 else "triton")
    check_qr(A, mode, f"qr {case_id(batch, m, n)} {mode}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS[1:])
def test_qr_hard_matrices(kind, dtype, device):
    for m, n in ((12, 12), (13, 6)):
        A = general(kind, (2,), m, n, dtype).to(device)
        check_qr(A, "reduced", f"qr {kind} {m}x{n}")


def test_qr_rank_deficient_and_zero_matrices(device):
    A = torch.randn(3, 9, 6, dtype=torch.float64, device=device)
    A[0, :, 2] = 0.0           # a zero column: H = I at that step (τ = 0)
    A[1] = 0.0                 # all zero: Q = I
    A[2, :, 4] = A[2, :, 1]    # repeated column
    Q, R = metalcore.linalg.qr(A, mode="complete")
    assert orthogonality_ratio(Q, torch.float64) < 30
    torch.testing.assert_close(Q[1], torch.eye(9, dtype=torch.float64, device=device))
    torch.testing.assert_close(Q @ R, A)


def test_qr_matches_lapack_signs(device):
    """Same algorithm as LAPACK geqr2/org2r, so Q and R match torch (not just up to signs)."""
    A = torch.randn(5, 10, 7, dtype=torch.float64, device=device)
    for got, want in zip(metalcore.linalg.qr(A), torch.linalg.qr(A)):
        torch.testing.assert_close(got, want)


def test_geqr2_and_householder_product(device):
    for m, n in ((7, 7), (9, 4), (4, 9)):
        A = torch.randn(2, 3, m, n, dtype=torch.float64, device=device)
        assert geqr2_op.backend_for(A) == "triton"
        QR, tau = geqr2(A)
        QRt, taut = torch.geqrf(A)
        torch.testing.assert_close(QR, QRt)
        torch.testing.assert_close(tau, taut)
        if m >= n:
            # Junk above the diagonal must not be read.
            V = QRt + torch.full_like(QRt, float("nan")).triu()
            assert householder_product_op.backend_for(V, taut) == "triton"
            torch.testing.assert_close(metalcore.linalg.householder_product(V, taut[..., :n - 1]),
                                       torch.linalg.householder_product(QRt, taut[..., :n - 1]))


def test_qr_nan_stays_in_its_batch_element(device):
    A = torch.randn(5, 6, 6, device=device)
    A[3, 4, 1] = float("nan")
    Q, R = metalcore.linalg.qr(A)
    assert Q[3].isnan().any() and R[3].isnan().any()
    good = [0, 1, 2, 4]
    assert Q[good].isfinite().all() and R[good].isfinite().all()
    for got, want in zip((Q[good], R[good]), torch.linalg.qr(A[good])):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m,n", [(6, 6), (7, 4), (4, 7)], ids=str)
def test_qr_gradient_runs_the_kernels(m, n, device, launches):
    A = torch.randn(2, m, n, dtype=torch.float64, device=device, requires_grad=True)
    calls = launches(qr_module(), "householder_launch")
    Q, R = metalcore.linalg.qr(A)
    gQ, gR = torch.randn_like(Q), torch.randn_like(R)
    ours, = torch.autograd.grad((Q, R), A, (gQ, gR))
    theirs, = torch.autograd.grad(torch.linalg.qr(A), A, (gQ, gR))
    torch.testing.assert_close(ours, theirs)
    assert calls


def test_qr_really_runs_the_interpreted_kernel():
    k = qr_module()._householder_kernel
    k.interpreted = None
    metalcore.linalg.qr(torch.randn(3, 4))
    assert k.interpreted is not None and k.compiled is None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,m,n", [((500,), 16, 16), ((1000,), 32, 32), ((100,), 64, 64), ((4096,), 8, 8),
                                       ((64,), 128, 128), ((10000,), 3, 3), ((50,), 128, 40), ((50,), 40, 128)],
                         ids=str)
def test_gpu_qr_full_size(batch, m, n, dtype, device):
    for kind in KINDS:
        A = general(kind, batch, m, n, dtype).to(device)
        check_qr(A, "reduced", f"qr {kind} {case_id(batch, m, n)}")
    check_qr(general("random", batch, m, n, dtype).to(device), "complete", "qr complete")


# --- matrices beyond the register tile: the blocked QR (metalcore/linalg/qr_blocked.py) -------------

@pytest.fixture
def small_tile(monkeypatch):
    """Route every side over 16 to the blocked path, with 8-column panels."""
    module = qr_module()
    monkeypatch.setattr(module, "SMALL_MAX", 16)
    monkeypatch.setattr(module, "BLOCK_NB", 8)
    return module


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,m,n,mode", [((), 40, 24, "reduced"), ((2,), 24, 40, "complete"), ((3,), 40, 24, "r"),
                                            ((2,), 12, 12, "reduced")], ids=str)
def test_large_qr_goes_blocked(small_tile, launches, batch, m, n, mode, dtype, device):
    A = general("random", batch, m, n, dtype).to(device)
    calls = launches(importlib.import_module("metalcore.linalg.qr_blocked"), "qr_blocked")
    assert qr_op.backend_for(A, mode) == ("reference" if A.numel() == 0 else "triton")
    check_qr(A, mode, f"qr {case_id(batch, m, n)} {mode}")
    assert bool(calls) == (max(m, n) > 16)


def test_large_geqr2_and_householder_product_go_blocked(small_tile):
    A = torch.randn(2, 37, 21, dtype=torch.float64)
    QR, tau = geqr2(A)
    for got, want in zip((QR, tau), torch.geqrf(A)):
        torch.testing.assert_close(got, want)
    assert householder_product_op.backend_for(QR, tau) == "triton"
    torch.testing.assert_close(metalcore.linalg.householder_product(QR, tau[..., :15]),
                               torch.linalg.householder_product(QR, tau[..., :15]))


def test_large_qr_gradient_through_the_blocked_path(small_tile):
    A = torch.randn(2, 30, 20, dtype=torch.float64, requires_grad=True)
    Q, R = metalcore.linalg.qr(A)
    gQ, gR = torch.randn_like(Q), torch.randn_like(R)
    ours, = torch.autograd.grad((Q, R), A, (gQ, gR))
    theirs, = torch.autograd.grad(torch.linalg.qr(A), A, (gQ, gR))
    torch.testing.assert_close(ours, theirs)


def test_blocked_qr_is_automatic_only_above_the_measured_crossover(monkeypatch):
    """Until the H100 shows the blocked QR at least as fast as cuSOLVER (BLOCKED_AUTO_MIN_SIDE set),
    a large matrix runs it only when the triton backend is requested explicitly."""
    module = qr_module()
    A = torch.empty(200, 150)
    with metalcore.use_backend("auto"):
        monkeypatch.setattr(module, "BLOCKED_AUTO_MIN_SIDE", None)
        assert not module._supports(A, "reduced")
        monkeypatch.setattr(module, "BLOCKED_AUTO_MIN_SIDE", 150)
        assert module._supports(A, "reduced")
        assert not module._supports(A[:, :149], "reduced")
        assert module._supports(A[:100, :100], "reduced")   # the register-tile kernel
    monkeypatch.setattr(module, "BLOCKED_AUTO_MIN_SIDE", None)
    assert module._supports(A, "reduced")                  # the triton backend is requested here


@pytest.mark.gpu
@pytest.mark.parametrize("batch,m,n", [((), 4096, 4096), ((), 11008, 4096), ((8,), 1024, 1024), ((2,), 300, 700)],
                         ids=str)
def test_gpu_blocked_qr_full_size(batch, m, n, device):
    """The blocked path at the sizes it exists for (the triton backend is requested explicitly by
    the fixture); hard families built on the device (the CPU oracle's fp64 QR of 11008² is minutes)."""
    g = torch.Generator(device=device).manual_seed(0)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(*batch, m, k, device=device, generator=g, dtype=torch.float64))[0]
    W = torch.linalg.qr(torch.randn(*batch, n, k, device=device, generator=g, dtype=torch.float64))[0]
    i = torch.arange(k, device=device, dtype=torch.float64)
    for kind, s in (("random", None), ("ill", 1e6 ** (-i / (k - 1))), ("rank", (i < k // 2).double())):
        A = (torch.randn(*batch, m, n, device=device, generator=g) if s is None else ((U * s) @ W.mT).float())
        assert qr_op.backend_for(A, "reduced") == "triton"
        Q, R = metalcore.linalg.qr(A)
        assert Q.shape == (*batch, m, k) and R.shape == (*batch, k, n) and torch.equal(R, R.triu())
        assert_lapack_ratio(orthogonality_ratio(Q, torch.float32), f"blocked qr {kind} {case_id(batch, m, n)} QᵀQ")
        assert_lapack_ratio(residual_ratio(A, Q.double() @ R.double(), torch.float32),
                            f"blocked qr {kind} {case_id(batch, m, n)} A−QR")


@pytest.mark.parametrize("shape", [(2, 0, 3), (2, 3, 0), (0, 0, 0)], ids=str)
def test_qr_of_empty_matrices_in_a_batch(shape, device):
    A = torch.randn(*shape, device=device)
    for mode in ("reduced", "complete", "r"):
        for got, want in zip(metalcore.linalg.qr(A, mode=mode), torch.linalg.qr(A, mode=mode)):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want)
    QR, tau = geqr2(A)
    assert QR.shape == A.shape and tau.shape == torch.geqrf(A)[1].shape
    if shape[1] >= shape[2]:
        torch.testing.assert_close(metalcore.linalg.householder_product(A, tau),
                                   torch.linalg.householder_product(A, tau))
