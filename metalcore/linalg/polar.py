r"""The polar decomposition's orthogonal factor: ``A = U_p H`` with ``U_p = U Vᴴ`` from ``A = U S Vᴴ``.

Four methods, one contract (``polar(A, method=...)``, batched over leading dimensions):

* ``'svd'`` — the exact factor through metalcore's SVD. The accurate one (LAPACK-level
  orthogonality); use it when the factor itself is the answer.
* ``'qdwh'`` — QR-based dynamically weighted Halley (Nakatsukasa, Bai & Gygi, SIAM J. Matrix Anal.
  Appl. 31(5), 2010; Nakatsukasa & Higham, SIAM J. Sci. Comput. 35(3), 2013), as accurate as
  ``'svd'`` and built from QR, Cholesky, triangular solves and GEMMs only: the large-matrix method
  (:func:`qdwh`).
* ``'newton_schulz'`` — Muon's quintic iteration (Jordan et al., https://kellerjordan.github.io/posts/muon/),
  ``X ← a X + (b G + c G²) X`` with ``G = X Xᵀ`` and torch.optim.Muon's coefficients
  ``(a, b, c) = (3.4445, −4.7750, 2.0315)``, 5 steps in bf16. The coefficients maximise the slope
  at zero rather than converge: singular values land in roughly [0.7, 1.2], not at 1 — which Muon's
  authors found does not hurt training, and which buys a 5-step, matmul-only iteration.
* ``'polar_express'`` — Polar Express (Amsel, Persson, Musco & Gower, "The Polar Express: Optimal
  Matrix Sign Methods and Their Application to the Muon Algorithm", arXiv:2505.16932): a different
  odd quintic per step, each the minimax-optimal polynomial for the interval ``[ℓ, u]`` of singular
  values the previous steps leave (found by the Remez exchange, :func:`polar_express_schedule`).
  Starting from ``X₀ = A / ‖A‖_F`` the interval is ``[σ_min/‖A‖_F, 1]``, and a schedule reaches 1 only
  from the ``ℓ₀`` it was designed for: a square n×n Gaussian has ``σ_min/‖A‖_F`` near ``1/n²``, and
  below 1e-5 in 1 of 1000 draws at n = 64 (measured). Two schedules:

  - the default: designed for ``ℓ₀ = 1e-7`` (:data:`POLAR_EXPRESS_L0`), 13 steps (12 bring the
    interval within 0.02 of 1 in exact arithmetic; one more absorbs bf16 rounding, which left one
    n = 128 matrix in 1000 at σ = 0.75 with 12). Measured on 1000 square Gaussians each at n = 16,
    64, 128 (200 at 256): σ in [0.995, 1.005] in bf16, 1 ± 1e-6 in fp32.
  - ``steps=k`` (1 ≤ k ≤ 5): the first k of the 5 published bf16 steps for ``ℓ₀ = 1e-3``
    (:data:`POLAR_EXPRESS_COEFFICIENTS`, as used in KellerJordan/modded-nanogpt and by
    :class:`metalcore.optim.Muon`), the input scaled by ``(1 + 0.02)·‖A‖_F``: 5 steps put σ within
    about ±15% of 1 when ``σ_min ≥ 1e-3·‖A‖_F`` (measured [0.86, 1.14] at κ = 4) and leave smaller
    ones short (a square 128×128 Gaussian: σ_min below 0.85 in 92% of draws) — which Muon, like
    Newton–Schulz, tolerates, at 5/13 of the cost.

The iterative methods normalise by the Frobenius norm (an upper bound on the spectral norm, so all
singular values start in (0, 1]) and iterate on the wide orientation (``m ≤ n``, transposing tall
inputs), so the Gram product ``X Xᵀ`` is the smaller ``min(m, n)²`` matrix.
"""

import functools
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from metalcore._validation import FLOAT_DTYPES, check_choice, check_matrix
from metalcore.linalg.qr import qr_op
from metalcore.linalg.svd import svd_op
from metalcore.linalg.syrk import gram_poly_op

METHODS = ("svd", "qdwh", "newton_schulz", "polar_express")

# torch.optim.Muon's defaults (from KellerJordan/Muon).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7

# Polar Express, arXiv:2505.16932: per-step minimax quintics for bf16 (safety factor 2e-2, cushion 2),
# as published with the paper's code and used in KellerJordan/modded-nanogpt.
POLAR_EXPRESS_COEFFICIENTS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
POLAR_EXPRESS_SAFETY = 2e-2

# The default schedule (module docstring): designed for σ_min ≥ 1e-7·‖A‖_F, 13 steps. The paper's
# cushion keeps the first steps' polynomials from being optimised for an interval so wide that they
# would be flat near 0 (its value, 0.02407, from the paper's code), and a 1% safety factor on every
# step but the last keeps σ that rounding pushed past the interval's top from growing.
POLAR_EXPRESS_L0 = 1e-7
POLAR_EXPRESS_STEPS = 13
_CUSHION = 0.02407327424182761
_SCHEDULE_SAFETY = 1e-2


def _solve4(rows: list[list[float]], rhs: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting on a 4×4 system (Python floats: the schedule is
    computed once, on the host, and never touches the device)."""
    m = [row[:] + [b] for row, b in zip(rows, rhs)]
    for i in range(4):
        pivot = max(range(i, 4), key=lambda r: abs(m[r][i]))
        m[i], m[pivot] = m[pivot], m[i]
        for r in range(4):
            if r != i:
                f = m[r][i] / m[i][i]
                m[r] = [x - f * y for x, y in zip(m[r], m[i])]
    return [m[i][4] / m[i][i] for i in range(4)]


def _optimal_odd_quintic(lo: float, hi: float) -> tuple[float, float, float]:
    """``p(x) = a x + b x³ + c x⁵`` minimising ``max |1 − p(x)|`` on ``[lo, hi]``: by Chebyshev's
    theorem ``1 − p`` equioscillates at ``lo``, the two critical points ``q < r`` and ``hi``; the Remez
    exchange solves for ``(a, b, c, E)`` at the current points, then moves ``q, r`` to the roots of
    ``p'`` (converges in a few rounds)."""
    if lo / hi >= 1 - 5e-6:  # a point interval: the Newton–Schulz quintic, flat at hi
        return 15 / 8 / hi, -10 / 8 / hi ** 3, 3 / 8 / hi ** 5
    q, r = (3 * lo + hi) / 4, (lo + 3 * hi) / 4
    previous = None
    for _ in range(100):
        a, b, c, err = _solve4([[x, x ** 3, x ** 5, sign] for x, sign in ((lo, 1), (q, -1), (r, 1), (hi, -1))],
                               [1.0] * 4)
        root = (9 * b * b - 20 * a * c) ** 0.5
        q, r = ((-3 * b - root) / (10 * c)) ** 0.5, ((-3 * b + root) / (10 * c)) ** 0.5
        if previous is not None and abs(previous - err) <= 1e-15:
            break
        previous = err
    return a, b, c


@functools.lru_cache(maxsize=None)
def polar_express_schedule(l0: float, steps: int) -> tuple[tuple[float, float, float], ...]:
    """The Polar Express coefficients ``(a, b, c)`` of ``steps`` steps for singular values in
    ``[l0, 1]`` (arXiv:2505.16932, Algorithm 1): step k takes the optimal quintic for the current
    ``[ℓ, u]`` (``ℓ`` raised to ``cushion·u`` when smaller), rescaled so that ``p(ℓ)`` and ``p(u)`` sit
    symmetrically about 1; the next interval is ``[p(ℓ), 2 − p(ℓ)]``. Reproduces the paper's published
    table for ``l0 = 1e-3`` (8.28721, −23.59589, 17.30039; 4.10706, ...), before the safety factor."""
    lo, hi, out = float(l0), 1.0, []
    for _ in range(steps):
        a, b, c = _optimal_odd_quintic(max(lo, _CUSHION * hi), hi)
        k = 2 / ((a * lo + b * lo ** 3 + c * lo ** 5) + (a * hi + b * hi ** 3 + c * hi ** 5))
        a, b, c = a * k, b * k, c * k
        out.append((a, b, c))
        lo = a * lo + b * lo ** 3 + c * lo ** 5
        hi = 2 - lo
    s = 1 + _SCHEDULE_SAFETY
    return tuple((a / s, b / s ** 3, c / s ** 5) for a, b, c in out[:-1]) + (out[-1],)


def _odd_quintic_iteration(A: Tensor, coefficients: Sequence[tuple[float, float, float]], scale: float,
                           dtype: torch.dtype, eps: float) -> Tensor:
    """``X ← a X + (b G + c G²) X``, ``G = X Xᵀ``, one ``(a, b, c)`` per step, from
    ``X₀ = A / (scale·‖A‖_F + eps)`` in ``dtype``; returns ``dtype``, shape of ``A``."""
    tall = A.shape[-2] > A.shape[-1]
    X = A.to(dtype)
    if tall:
        X = X.mT
    batch, (m, n) = X.shape[:-2], X.shape[-2:]
    X = X.reshape(-1, m, n)
    # Muon clamps the norm (torch: ``X / max(‖X‖, eps)``); Polar Express adds eps after its safety
    # scale. Both keep a zero matrix at zero.
    norm = X.norm(dim=(-2, -1), keepdim=True)
    X = X / (norm * scale + eps) if scale != 1.0 else X / norm.clamp(min=eps)
    for a, b, c in coefficients:
        # b·G + c·G², G = X Xᵀ (batch, m, m), m the smaller side: two symmetric products, which the
        # op's Triton kernel computes by halves (metalcore/linalg/syrk.py).
        X = torch.baddbmm(X, gram_poly_op(X, b, c), X, beta=a)
    X = X.reshape(*batch, m, n)
    return X.mT if tall else X


def newton_schulz(A: Tensor, *, coefficients: tuple[float, float, float] = NS_COEFFICIENTS, steps: int = NS_STEPS,
                  dtype: torch.dtype = torch.bfloat16, eps: float = NS_EPS) -> Tensor:
    """Muon's quintic Newton–Schulz approximation of ``polar(A)`` for ``A (*, m, n)``, computed and
    returned in ``dtype`` (bf16 by default, as in Muon: the iteration is self-correcting, so bf16
    matmuls cost nothing in quality). One fixed ``(a, b, c)`` for every step; singular values of
    the result land in about [0.7, 1.2] with the default coefficients (module docstring)."""
    if len(coefficients) != 3:
        raise ValueError(f"metalcore.polar: coefficients must be a tuple of exactly 3 values; got {coefficients!r}")
    return _odd_quintic_iteration(A, [tuple(coefficients)] * steps, 1.0, dtype, eps)


def polar_express(A: Tensor, *, steps: Optional[int] = None, dtype: torch.dtype = torch.bfloat16,
                  eps: float = NS_EPS) -> Tensor:
    """Polar Express (arXiv:2505.16932) approximation of ``polar(A)`` for ``A (*, m, n)``, in ``dtype``.

    ``steps=None``: the 13-step schedule for ``σ_min ≥ 1e-7·‖A‖_F`` (:data:`POLAR_EXPRESS_L0`), which
    brings every singular value of such an input within 0.5% of 1 in bf16 (measured on square
    Gaussians, module docstring). ``steps=k`` (1 ≤ k ≤ 5): the first k published bf16 steps (Muon's
    choice: within about ±15% of 1 only for ``σ_min ≥ 1e-3·‖A‖_F``)."""
    if steps is None:
        coefficients = polar_express_schedule(POLAR_EXPRESS_L0, POLAR_EXPRESS_STEPS)
        return _odd_quintic_iteration(A, coefficients, 1.0 + _SCHEDULE_SAFETY, dtype, eps)
    return _odd_quintic_iteration(A, POLAR_EXPRESS_COEFFICIENTS[:steps], 1.0 + POLAR_EXPRESS_SAFETY, dtype, eps)


# Nakatsukasa & Higham 2013, §4: the Cholesky-based QDWH step is as stable as the QR-based one once
# its weight c_k is at most 100, since then κ(I + c XᵀX) ≤ 101.
QDWH_CHOLESKY_MAX_C = 100.0
# A guard, not a tuning knob: from any l0 ≥ 1e-38 the schedule reaches 1 − ℓ ≤ ε in at most 7 steps.
QDWH_MAX_STEPS = 10


def qdwh_schedule(l0: float, dtype: torch.dtype) -> list[tuple[float, float, float]]:
    """The weights ``(a, b, c)`` of each QDWH step, from ``l0``, a lower bound on the smallest singular
    value of the scaled start ``X₀ = A / α`` (whose largest is at most 1).

    Step k maps the interval ``[ℓ_k, 1]`` that holds the singular values into ``[ℓ_{k+1}, 1]`` with the
    best rational function of type (3, 2) (Nakatsukasa, Bai & Gygi 2010, eq. 3.7–3.10)::

        d = (4(1 − ℓ²)/ℓ⁴)^{1/3},  a = √(1 + d) + ½ √(8 − 4d + 8(2 − ℓ²)/(ℓ²√(1 + d))),
        b = (a − 1)²/4,  c = a + b − 1,  ℓ_{k+1} = ℓ (a + bℓ²)/(1 + cℓ²).

    The schedule depends on ``l0`` alone, so it is computed here in Python floats and the iteration
    never synchronises with the device. It stops once ``1 − ℓ_k ≤ ε(dtype)`` with a Cholesky-based
    (``c ≤ 100``) last step, whose near-Halley weights (a, b, c ≈ 3, 1, 3) also clean up rounding.
    Steps: 4 for fp32 and 6 for fp64 from ``l0 = ε`` (the default); 3 and 4 from ``l0 = 0.1``.
    """
    eps = torch.finfo(dtype).eps
    ell = min(max(float(l0), 1e-38), 1.0)
    steps = []
    while len(steps) < QDWH_MAX_STEPS:
        ell2 = ell * ell
        d = (4.0 * (1.0 - ell2) / (ell2 * ell2)) ** (1.0 / 3.0)
        a = (1.0 + d) ** 0.5 + 0.5 * (8.0 - 4.0 * d + 8.0 * (2.0 - ell2) / (ell2 * (1.0 + d) ** 0.5)) ** 0.5
        b = (a - 1.0) ** 2 / 4.0
        c = a + b - 1.0
        steps.append((a, b, c))
        ell = min(ell * (a + b * ell2) / (1.0 + c * ell2), 1.0)
        if 1.0 - ell <= eps and c <= QDWH_CHOLESKY_MAX_C:
            break
    return steps


def spectral_norm_bound(A: Tensor) -> Tensor:
    """An upper bound on ``‖A‖₂`` per matrix, shape ``(*, 1, 1)``: ``min(‖A‖_F, √(‖A‖₁ ‖A‖_∞))``, both
    bounds computed without squaring the entries (so 1e25-scaled fp32 input does not overflow). It
    exceeds ``‖A‖₂`` by at most ``√min(m, n)``; QDWH needs an upper bound (a singular value above 1
    would not converge), and the cost of a loose one is only a smaller effective ``ℓ₀``."""
    amax = A.abs().amax(dim=(-2, -1), keepdim=True)
    scale = torch.where(amax > 0, amax, torch.ones_like(amax))
    fro = torch.linalg.matrix_norm(A / scale, keepdim=True) * scale
    one = A.abs().sum(dim=-2).amax(dim=-1)
    inf = A.abs().sum(dim=-1).amax(dim=-1)
    return torch.minimum(fro, (one.sqrt() * inf.sqrt())[..., None, None])


def qdwh_step(X: Tensor, a: float, b: float, c: float) -> Tensor:
    """One QDWH step ``X ← X (a I + b XᵀX)(I + c XᵀX)⁻¹`` on ``X (*, m, n)``, ``m ≥ n``, with the weights
    of :func:`qdwh_schedule`: QR-based while ``c > QDWH_CHOLESKY_MAX_C``, Cholesky-based after. The
    whole batch takes the same weights, so every matrix runs the same batched QR/Cholesky/GEMM calls."""
    m, n = X.shape[-2:]
    eye = torch.eye(n, dtype=X.dtype, device=X.device)
    if c > QDWH_CHOLESKY_MAX_C:
        # [√c X; I] = [Q₁; Q₂] R  ⇒  X ← (b/c) X + (a − b/c)/√c · Q₁ Q₂ᵀ  (eq. 3.13 of the 2010 paper).
        # The qr op routes this (m + n) × n matrix by its larger side: at fp64 n = 33-64 the square
        # 66-128 points send it to torch's per-matrix loop, and the qdwh svd of 256 such matrices
        # takes ~5× its time with the kernel's QR (bench/linalg_triton.md v12).
        Q, _ = qr_op(torch.cat([c ** 0.5 * X, eye.expand(*X.shape[:-2], n, n)], dim=-2), "reduced")
        return (b / c) * X + ((a - b / c) / c ** 0.5) * (Q[..., :m, :] @ Q[..., m:, :].mT)
    # The same step as X Z⁻¹ with Z = I + c XᵀX = L Lᵀ: a Gram product, a Cholesky factorisation and
    # two triangular solves, all GEMM-rich. cholesky_ex, not cholesky: NaN input must come out as NaN,
    # not as an exception from deep inside the iteration.
    L, _ = torch.linalg.cholesky_ex(torch.add(eye, X.mT @ X, alpha=c))
    Y = torch.linalg.solve_triangular(L.mT, X, upper=True, left=False)
    Y = torch.linalg.solve_triangular(L, Y, upper=False, left=False)
    return (b / c) * X + (a - b / c) * Y


def qdwh_start(A: Tensor) -> Tensor:
    """``X₀ = A / α`` with ``α`` = :func:`spectral_norm_bound` per matrix (a zero matrix stays zero)."""
    alpha = spectral_norm_bound(A)
    return A / torch.where(alpha > 0, alpha, torch.ones_like(alpha))


def _qdwh_tall(A: Tensor, l0: float) -> Tensor:
    """QDWH on ``A (*, m, n)`` with ``m ≥ n``; returns the polar factor, shape of ``A``."""
    X = qdwh_start(A)
    for a, b, c in qdwh_schedule(l0, A.dtype):
        X = qdwh_step(X, a, b, c)
    return X


def qdwh(A: Tensor, *, l0: Optional[float] = None) -> Tensor:
    r"""The polar factor of ``A (*, m, n)`` (float32/float64) by QDWH, batched over leading dimensions.

    ``X₀ = A/α`` with ``α`` an upper bound on ``‖A‖₂`` (:func:`spectral_norm_bound`); the QR-based
    step while its weight ``c > 100``, then the Cholesky-based one (:func:`qdwh_schedule`). ``l0``
    must be a lower bound on ``σ_min(A)/α``; the default ``ε`` of the dtype covers every matrix whose
    condition number times ``α/‖A‖₂`` (at most ``√min(m, n)``) is below ``1/ε`` at the cost of 4
    steps in fp32, 6 in fp64. A larger, still valid ``l0`` saves the expensive QR-based steps
    (``l0 = 0.1``: none, and 3 Cholesky-based steps in fp32, 4 in fp64).

    Singular values of ``A/α`` below ``l0`` are not brought all the way to 1: exact zeros stay zero
    and values between 0 and ``l0·α`` land in ``[0, 1)``. So for rank-deficient ``A`` the result is
    ``U_r V_rᵀ`` on the range of ``A`` (exact there) plus a contraction on the numerical null space —
    a partial isometry when the null singular values are exact zeros — and ``A = U H`` still holds
    with ``H = UᵀA`` positive semidefinite. (:func:`metalcore.linalg.svd_large.svd_large` completes
    those directions to an orthonormal set.) A zero matrix gives zero, NaN
    gives NaN. Wide inputs are iterated on as ``Aᵀ`` (the smaller Gram matrix).

    A batch runs as one: every matrix takes the same schedule (from ``l0``, a Python number, so there
    is no host synchronisation and no per-matrix loop), each step one batched QR or Cholesky and a few
    batched GEMMs/triangular solves (:func:`qdwh_step`).

    Flops per step for ``n × n``: QR-based ≈ 8.7 n³ (QR of the ``2n × n`` stack, forming its Q,
    ``Q₁Q₂ᵀ``), Cholesky-based ≈ 4.3 n³ (``XᵀX``, ``potrf``, two ``trsm``).

    >>> U = qdwh(torch.randn(8, 256, 128, dtype=torch.float64))  # U.mT @ U == I to ~1e-15
    """
    fn = "metalcore.linalg.polar.qdwh"
    A = check_matrix(fn, "A", A)
    eps = torch.finfo(A.dtype).eps
    l0 = eps if l0 is None else l0
    if isinstance(l0, bool) or not isinstance(l0, (int, float)) or not 0.0 < l0 <= 1.0:
        raise ValueError(f"{fn}: l0 must be a number in (0, 1], a lower bound on sigma_min(A) / ||A||_2; got {l0!r}")
    if A.shape[-2] < A.shape[-1]:
        return _qdwh_tall(A.mT, l0).mT
    return _qdwh_tall(A, l0)


def polar(A: Tensor, *, method: str = "svd", steps: Optional[int] = None, dtype: Optional[torch.dtype] = None,
          eps: Optional[float] = None) -> Tensor:
    """The orthogonal polar factor ``U Vᵀ`` of ``A`` ``(*, m, n)``: the matrix with orthonormal columns
    (rows, when m < n) nearest to ``A`` in the Frobenius norm — the update direction of Muon.

    ``method``:

    * ``'svd'`` (default) — exact, through metalcore's SVD; float32/float64. Differentiable where
      ``A`` has distinct nonzero singular values. ``steps``/``dtype``/``eps`` do not apply and raise.
    * ``'qdwh'`` — as exact, by QDWH (:func:`qdwh`: QR, Cholesky and GEMMs; 4 steps in fp32, 6 in
      fp64); float32/float64, the large-matrix method. ``steps``/``dtype``/``eps`` raise here too.
    * ``'newton_schulz'`` — Muon's quintic iteration (``steps=5``, ``dtype=torch.bfloat16``,
      ``eps=1e-7``): fast, approximate (singular values in about [0.7, 1.2]).
    * ``'polar_express'`` — Polar Express's per-step optimal quintics (``dtype=torch.bfloat16``,
      ``eps=1e-7``): by default 13 steps that bring σ within 0.5% of 1 for any input with
      ``σ_min ≥ 1e-7·‖A‖_F`` (square Gaussians included); ``steps=k ≤ 5`` runs the first k published
      steps instead, as cheap as Newton–Schulz and within about ±15% of 1 for ``σ_min ≥ 1e-3·‖A‖_F``.

    The iterative methods accept fp16/bf16/fp32/fp64 ``A``, compute in ``dtype`` and return ``A``'s
    dtype. Why each exists and where the coefficients come from: the module docstring.

    >>> O = metalcore.polar(torch.randn(16, 64, 32))   # O.mT @ O == I
    >>> O = metalcore.polar(G, method="polar_express")  # Muon-style, bf16
    """
    fn = "metalcore.polar"
    check_choice(fn, "method", method, METHODS)
    if method in ("svd", "qdwh"):
        A = check_matrix(fn, "A", A)
        for name, value in (("steps", steps), ("dtype", dtype), ("eps", eps)):
            if value is not None:
                raise ValueError(f"{fn}: {name} applies only to the iterative methods ('newton_schulz', "
                                 f"'polar_express'), not to method={method!r}; got {name}={value!r}")
        if method == "qdwh":
            return qdwh(A)
        U, _, Vh = svd_op(A, False, True)
        return U @ Vh
    A = check_matrix(fn, "A", A, dtypes=FLOAT_DTYPES)
    max_steps = 99 if method == "newton_schulz" else len(POLAR_EXPRESS_COEFFICIENTS)
    if method == "newton_schulz" and steps is None:
        steps = NS_STEPS
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= max_steps):
        why = "" if method == "newton_schulz" else (" (the published Polar Express schedule has 5 steps; "
                                                    "steps=None runs the 13-step default)")
        raise ValueError(f"{fn}: steps must be an integer in [1, {max_steps}] for method={method!r}{why}; got {steps!r}")
    dtype = torch.bfloat16 if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{fn}: dtype must be one of float16, bfloat16, float32, float64; got {dtype!r}")
    eps = NS_EPS if eps is None else float(eps)
    if not eps >= 0.0:
        raise ValueError(f"{fn}: eps must be >= 0; got {eps!r}")
    if method == "newton_schulz":
        O = newton_schulz(A, steps=steps, dtype=dtype, eps=eps)
    else:
        O = polar_express(A, steps=steps, dtype=dtype, eps=eps)
    return O.to(A.dtype)
