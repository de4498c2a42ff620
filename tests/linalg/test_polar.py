import pytest
import torch

from cases import BATCHES, DTYPES, noncontiguous, shape_id
from linalg_matrices import general, scale_of
from oracle import assert_lapack_ratio, assert_within_torch_error, eps, orthogonality_ratio, residual_ratio
from tolerances import LAPACK_RATIO_MAX
from metalcore.linalg.polar import METHODS, QDWH_CHOLESKY_MAX_C, polar, qdwh, qdwh_schedule, spectral_norm_bound

SHAPES = [(1, 1), (3, 2), (2, 3), (31, 16), (16, 33), (65, 65)]
CASES = [(b, m, n) for b in BATCHES for m, n in SHAPES if not (len(b) == 2 and max(m, n) > 33)]


def torch_polar(A):
    U, _, Vh = torch.linalg.svd(A, full_matrices=False)
    return U @ Vh


@pytest.mark.parametrize("method", ["svd", "qdwh"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,m,n", CASES, ids=[shape_id(b, m, n) for b, m, n in CASES])
def test_polar_factor(batch, m, n, dtype, method):
    A = torch.randn(*batch, m, n, dtype=torch.float64) + 2 * torch.eye(m, n, dtype=torch.float64)
    O = polar(noncontiguous(A.to(dtype)), method=method)
    assert O.shape == A.shape and O.dtype == dtype
    assert_lapack_ratio(orthogonality_ratio(O, dtype, rows=m < n), f"polar {shape_id(batch, m, n)}")
    # For full-rank A the factor is unique, so it is compared outright with the float64 oracle.
    assert_within_torch_error(O, torch_polar(A.to(dtype)), torch_polar(A))
    # The other factor, H = Oᵀ A (A Oᵀ when wide), is symmetric positive semidefinite.
    H = (O.mT @ A.to(dtype) if m >= n else A.to(dtype) @ O.mT).double()
    if H.numel():
        assert_lapack_ratio(residual_ratio(H, H.mT, dtype), f"polar {shape_id(batch, m, n)} H = Hᵀ")
        # Positive semidefinite up to rounding: no eigenvalue below −n·ε·‖H‖ in LAPACK's units.
        floor = LAPACK_RATIO_MAX * max(m, n) * eps(dtype) * torch.linalg.matrix_norm(H, ord=2).amax().item()
        assert (torch.linalg.eigvalsh(H) >= -floor).all()


def test_polar_rejects_bad_input():
    A = torch.randn(3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"metalcore.polar: method must be one of 'svd', 'qdwh', 'newton_schulz', "
                                         r"'polar_express'; got 'halley'"):
        polar(A, method="halley")
    with pytest.raises(TypeError, match=r"metalcore.polar: A must have dtype"):
        polar(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"metalcore.polar: A must have dtype"):
        polar(torch.ones(3, 3, dtype=torch.int64), method="newton_schulz")
    with pytest.raises(ValueError, match=r"metalcore.polar: A must be a matrix"):
        polar(torch.ones(3), method="polar_express")
    for method, steps in [("newton_schulz", 0), ("newton_schulz", 100), ("newton_schulz", 2.5), ("polar_express", 6),
                          ("polar_express", 0)]:
        with pytest.raises(ValueError, match=rf"metalcore.polar: steps must be an integer .* got {steps}"):
            polar(A, method=method, steps=steps)
    with pytest.raises(ValueError, match=r"metalcore.polar: steps applies only to the iterative methods"):
        polar(A, method="svd", steps=5)
    with pytest.raises(ValueError, match=r"metalcore.polar: dtype applies only .* not to method='qdwh'"):
        polar(A, method="qdwh", dtype=torch.float32)
    for l0 in (0.0, 1.5, -1e-3, True, "eps"):
        with pytest.raises(ValueError, match=r"qdwh: l0 must be a number in \(0, 1\]"):
            qdwh(A, l0=l0)
    with pytest.raises(TypeError, match=r"qdwh: A must have dtype"):
        qdwh(torch.ones(3, 3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"metalcore.polar: dtype must be one of"):
        polar(A, method="newton_schulz", dtype=torch.int32)
    with pytest.raises(ValueError, match=r"metalcore.polar: eps must be >= 0; got -1.0"):
        polar(A, method="polar_express", eps=-1.0)


ITERATIVE_SHAPES = [(64, 32), (32, 64), (48, 48), (1, 5), (33, 7)]


def well_conditioned(*shape, cond=4.0, dtype=torch.float64):
    """Random singular vectors, singular values spread evenly over [1/cond, 1] (times 3, to test scaling)."""
    *batch, m, n = shape
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(*batch, m, k, dtype=dtype))[0]
    V = torch.linalg.qr(torch.randn(*batch, n, k, dtype=dtype))[0]
    S = 3.0 * torch.linspace(1.0 / cond, 1.0, k, dtype=dtype)
    return (U * S) @ V.mT


def singular_values(O):
    return torch.linalg.svdvals(O.double())


@pytest.mark.parametrize("m,n", ITERATIVE_SHAPES, ids=lambda s: str(s))
def test_newton_schulz_band_and_matches_torch_muon(m, n):
    """Muon's quintic is not meant to converge: its authors state the singular values land in about
    [0.7, 1.2] (torch's docstring: "something like U S' Vᵀ"). The band is checked on Gaussian input
    (ill-conditioned, the hard case) and the result equals torch.optim.Muon's own iteration."""
    from torch.optim._muon import _zeropower_via_newtonschulz

    A = torch.randn(m, n)
    if min(m, n) > 1:  # a 1-row matrix has one singular value ‖a‖/‖a‖ = 1 from the start
        A[0] *= 1e-3  # one tiny direction: NS leaves it below the band, like torch's
    O = polar(A, method="newton_schulz")
    assert O.dtype == A.dtype and O.shape == A.shape
    torch.testing.assert_close(O, _zeropower_via_newtonschulz(A, (3.4445, -4.7750, 2.0315), 5, 1e-7).float(),
                               atol=0, rtol=0)
    s = singular_values(polar(torch.randn(m, n), method="newton_schulz"))
    assert 0.6 <= s.min() and s.max() <= 1.25, (s.min().item(), s.max().item())


@pytest.mark.parametrize("m,n", ITERATIVE_SHAPES, ids=lambda s: str(s))
def test_iterative_methods_against_svd(m, n):
    """Well-conditioned input (κ = 4), against the exact factor. Measured (bf16 and fp64 alike, so this
    is the methods' own error, not rounding): Polar Express puts σ in [0.86, 1.14], max error 0.047
    (0.088 for a single row, whose σ = 1/1.02 after the safety scaling); Newton–Schulz σ in
    [0.68, 1.14], max error 0.13 (0.21 for a single row). Five published Polar Express steps are not
    enough to converge from the smallest σ they are designed for (1e-3), so the band is not tighter."""
    A = well_conditioned(m, n)
    exact = polar(A)
    errors = {}
    for method, (lo, hi) in {"newton_schulz": (0.66, 1.2), "polar_express": (0.84, 1.16)}.items():
        for dtype in (torch.bfloat16, torch.float64):
            O = polar(A.float() if dtype == torch.bfloat16 else A, method=method, dtype=dtype).double()
            s = singular_values(O)
            assert lo <= s.min() and s.max() <= hi, (method, dtype, s.min().item(), s.max().item())
            errors[method, dtype] = (O - exact).abs().max().item()
    assert errors["polar_express", torch.bfloat16] < 0.1, errors
    assert errors["newton_schulz", torch.bfloat16] < 0.25, errors
    # Polar Express is the closer of the two: about half Newton–Schulz's error in every case measured.
    assert errors["polar_express", torch.float64] < 0.7 * errors["newton_schulz", torch.float64], errors


def test_polar_express_on_square_gaussians():
    """The default schedule's promise on the input that broke the 5-step one: 1000 square Gaussian
    matrices (σ_min/‖A‖_F down to ~1e-5 at n = 48), every singular value within ±15% of 1 in bf16
    (measured: [0.995, 1.005]). The published 5 steps left 17% of such draws below 0.85."""
    torch.manual_seed(0)
    A = torch.randn(1000, 48, 48)
    s = singular_values(polar(A, method="polar_express"))
    assert s.min() >= 0.85 and s.max() <= 1.15, (s.min().item(), s.max().item())
    short = singular_values(polar(A, method="polar_express", steps=5)).amin(-1)
    assert (short < 0.85).float().mean() > 0.05  # why the default is longer: the 5-step band needs σ_min ≥ 1e-3‖A‖_F


def test_polar_express_schedule_reproduces_the_paper():
    """The Remez construction gives the paper's published coefficients for ℓ₀ = 1e-3 (before its
    safety factor), and its last steps approach the Newton–Schulz quintic (15/8, −10/8, 3/8)."""
    from metalcore.linalg import polar as polar_module

    raw = polar_module.polar_express_schedule(1e-3, 8)
    safety = 1 + polar_module._SCHEDULE_SAFETY
    first = tuple(c * safety ** k for c, k in zip(raw[0], (1, 3, 5)))
    assert first == pytest.approx((8.28721201814563, -23.595886519098837, 17.300387312530933), rel=1e-9)
    second = tuple(c * safety ** k for c, k in zip(raw[1], (1, 3, 5)))
    assert second == pytest.approx((4.107059111542203, -2.9478499167379106, 0.5448431082926601), rel=1e-9)
    assert raw[-1] == pytest.approx((1.875, -1.25, 0.375), rel=1e-4)


@pytest.mark.parametrize("method", ["newton_schulz", "polar_express"])
def test_iterative_methods_batched(method):
    """Leading dims (including batch 0): each matrix as if alone (same fp64 arithmetic, so to 1e-12)."""
    A = torch.randn(2, 3, 17, 9, dtype=torch.float64)
    O = polar(A, method=method, dtype=torch.float64)
    assert O.shape == A.shape
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(O[i, j], polar(A[i, j], method=method, dtype=torch.float64),
                                       atol=1e-12, rtol=0)
    assert polar(torch.randn(0, 4, 5), method=method).shape == (0, 4, 5)
    torch.testing.assert_close(polar(noncontiguous(A), method=method, dtype=torch.float64), O, atol=1e-12, rtol=0)


@pytest.mark.parametrize("method", ["newton_schulz", "polar_express"])
def test_iterative_methods_edge_inputs(method):
    """Zero stays zero (no division by zero); NaN in gives NaN out; bf16 in gives bf16 out."""
    assert (polar(torch.zeros(4, 6), method=method) == 0).all()
    assert polar(torch.full((3, 3), float("nan")), method=method).isnan().all()
    O = polar(torch.randn(5, 8, dtype=torch.bfloat16), method=method)
    assert O.dtype == torch.bfloat16


def test_orthogonality_error_report():
    """The orthogonality error ‖OᵀO − I‖ of each method on a 128×64 Gaussian matrix, asserted at the
    level each method is built for: svd and qdwh at LAPACK level, polar_express at bf16 level, NS within its band."""
    A = torch.randn(128, 64)
    errors = {m: (lambda O: (O.mT @ O - torch.eye(64, dtype=torch.float64)).abs().max().item())(
        polar(A, method=m).double()) for m in METHODS}
    assert errors["svd"] < 30 * 64 * torch.finfo(torch.float32).eps, errors
    assert errors["qdwh"] < 30 * 64 * torch.finfo(torch.float32).eps, errors
    assert errors["polar_express"] < 0.35, errors  # Gaussian κ is large: a few tiny σ are still on their way up
    assert errors["newton_schulz"] < 0.6, errors  # σ in [0.7, 1.2] allows |σ² − 1| up to 0.51


@pytest.mark.parametrize("m,n", [(5, 3), (3, 5), (4, 4)], ids=str)
def test_polar_gradcheck_and_matches_torch(m, n):
    A = torch.randn(2, m, n, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(polar, (A,))
    g = torch.randn(2, m, n, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(polar(A), A, g)[0], torch.autograd.grad(torch_polar(A), A, g)[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_qdwh_schedule(dtype):
    """At most 6 steps in fp64 and 4 in fp32 from the default l0 = ε (Nakatsukasa & Higham: 6 suffice
    for κ ≤ 1e16); QR-based steps only while c > 100; a Cholesky-based last step; 3 (fp32) or 4 steps from l0 = 0.1."""
    eps = torch.finfo(dtype).eps
    steps = qdwh_schedule(eps, dtype)
    assert len(steps) == (6 if dtype == torch.float64 else 4)
    cs = [c for _, _, c in steps]
    assert cs == sorted(cs, reverse=True) and cs[0] > QDWH_CHOLESKY_MAX_C >= cs[-1]
    assert len(qdwh_schedule(0.1, dtype)) == (4 if dtype == torch.float64 else 3)
    assert len(qdwh_schedule(1e-30, dtype)) <= 7
    # Driving the scalar map through the schedule takes every σ in [l0, 1] to within ε of 1.
    for sigma in (eps, 1e-3, 0.5, 1.0):
        for a, b, c in steps:
            sigma = sigma * (a + b * sigma ** 2) / (1 + c * sigma ** 2)
        assert abs(sigma - 1.0) <= 2 * eps


def test_spectral_norm_bound():
    A = torch.randn(5, 40, 23, dtype=torch.float64)
    A[0] = 0.0
    bound = spectral_norm_bound(A).squeeze(-1).squeeze(-1)
    norm2 = torch.linalg.matrix_norm(A, ord=2)
    assert (bound >= norm2).all() and (bound <= 23 ** 0.5 * norm2 + 1e-300).all()
    # No squaring of the entries: fp32 input near the top of its range gives a finite bound.
    assert spectral_norm_bound(torch.full((4, 4), 1e30)).isfinite().all()


QDWH_KINDS = ["random", "ill", "cluster", "tiny", "huge"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", QDWH_KINDS)
@pytest.mark.parametrize("m,n", [(16, 16), (33, 16), (16, 31)], ids=str)
def test_qdwh_hard_families(kind, m, n, dtype):
    """Up to κ = 1e6 (fp32) / 1e12 (fp64), clustered, and scaled near under/overflow: LAPACK-level
    orthogonality and A = U H with H symmetric positive semidefinite (residual ratio ≤ 30)."""
    A = general(kind, (3,), m, n, dtype)
    U = qdwh(A)
    what = f"qdwh {kind} {m}x{n} {dtype}"
    assert_lapack_ratio(orthogonality_ratio(U, dtype, rows=m < n), what + " orthogonality")
    H = U.mT @ A if m >= n else A @ U.mT
    H = 0.5 * (H + H.mT)
    # The oracle's Frobenius norm squares the entries; compare at unit scale so 1e200 does not overflow it.
    s = scale_of(kind, dtype)
    assert_lapack_ratio(residual_ratio(A / s, (U @ H if m >= n else H @ U) / s, dtype), what + " A = U H")
    lam = torch.linalg.eigvalsh(H.double())
    assert (lam >= -30 * max(m, n) * torch.finfo(dtype).eps * lam.abs().amax(-1, keepdim=True)).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,r", [(20, 12, 5), (12, 20, 3), (16, 16, 0)], ids=str)
def test_qdwh_rank_deficient(m, n, r, dtype):
    """On the range of A the factor is exact: U v_i = u_i for the r nonzero singular pairs. The rounding-level
    singular values (below l0·α) are mapped into [0, 1), not to 1, so U is a contraction there, and A = U H."""
    A = (torch.randn(2, m, r, dtype=torch.float64) @ torch.randn(2, r, n, dtype=torch.float64)).to(dtype)
    U = qdwh(A).double()
    Ur, _, Vrh = torch.linalg.svd(A.double(), full_matrices=False)
    Ur, Vr = Ur[..., :r], Vrh[..., :r, :].mT
    tol = LAPACK_RATIO_MAX * max(m, n) * torch.finfo(dtype).eps
    torch.testing.assert_close(U @ Vr if m >= n else U.mT @ Ur, Ur if m >= n else Vr, atol=tol, rtol=0)
    assert (torch.linalg.svdvals(U) <= 1 + tol).all()
    H = U.mT @ A.double() if m >= n else A.double() @ U.mT
    assert_lapack_ratio(residual_ratio(A, U @ H if m >= n else H @ U, dtype), "rank-deficient A = U H")


def test_qdwh_batched_edges():
    """Each matrix as if alone; a larger valid l0 (fewer steps) gives the same factor; zero → zero; NaN → NaN."""
    A = well_conditioned(2, 3, 17, 9, cond=10.0)
    U = qdwh(A)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(U[i, j], qdwh(A[i, j]), atol=1e-13, rtol=0)
    alpha = spectral_norm_bound(A)
    l0 = (torch.linalg.svdvals(A)[..., -1:].unsqueeze(-1) / alpha).min().item()
    torch.testing.assert_close(qdwh(A, l0=l0), U, atol=1e-13, rtol=0)
    assert qdwh(torch.randn(0, 4, 5)).shape == (0, 4, 5)
    assert (qdwh(torch.zeros(4, 6)) == 0).all()
    assert qdwh(torch.full((3, 3), float("nan"))).isnan().all()
