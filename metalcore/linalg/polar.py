r"""The polar decomposition's orthogonal factor: ``A = U_p H`` with ``U_p = U Vᴴ`` from ``A = U S Vᴴ``.

Three methods, one contract (``polar(A, method=...)``, batched over leading dimensions):

* ``'svd'`` — the exact factor through metalcore's SVD. The accurate one (LAPACK-level
  orthogonality); use it when the factor itself is the answer.
* ``'newton_schulz'`` — Muon's quintic iteration (Jordan et al., https://kellerjordan.github.io/posts/muon/),
  ``X ← a X + (b G + c G²) X`` with ``G = X Xᵀ`` and torch.optim.Muon's coefficients
  ``(a, b, c) = (3.4445, −4.7750, 2.0315)``, 5 steps in bf16. The coefficients maximise the slope
  at zero rather than converge: singular values land in roughly [0.7, 1.2], not at 1 — which Muon's
  authors found does not hurt training, and which buys a 5-step, matmul-only iteration.
* ``'polar_express'`` — Polar Express (Amsel, Persson, Musco & Gower, "The Polar Express: Optimal
  Matrix Sign Methods and Their Application to the Muon Algorithm", arXiv:2505.16932): a different
  odd quintic per step, each the minimax-optimal polynomial for the interval of singular values the
  previous steps leave, so it grows small singular values fast and ends closer to 1 (measured, κ = 4:
  σ in [0.86, 1.14], half Newton–Schulz's distance to the exact factor). The 5 coefficient triples
  are those the paper's code produces for bf16 with a 2% safety factor and cushion (as used in
  KellerJordan/modded-nanogpt); the input is scaled by ``(1 + 0.02)·‖A‖_F`` to match them. Only 5
  steps are published, so ``steps`` is at most 5.

The iterative methods normalise by the Frobenius norm (an upper bound on the spectral norm, so all
singular values start in (0, 1]) and iterate on the wide orientation (``m ≤ n``, transposing tall
inputs), so the Gram product ``X Xᵀ`` is the smaller ``min(m, n)²`` matrix.
"""

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from metalcore._validation import FLOAT_DTYPES, check_choice, check_matrix
from metalcore.linalg.svd import svd_op
from metalcore.linalg.syrk import gram_poly_op

METHODS = ("svd", "newton_schulz", "polar_express")

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


def polar_express(A: Tensor, *, steps: int = len(POLAR_EXPRESS_COEFFICIENTS), dtype: torch.dtype = torch.bfloat16,
                  eps: float = NS_EPS) -> Tensor:
    """Polar Express (arXiv:2505.16932) approximation of ``polar(A)`` for ``A (*, m, n)``: the first
    ``steps`` (≤ 5) of the published per-step optimal quintics, in ``dtype``. Five steps bring the
    singular values of a moderately conditioned input within about ±15% of 1 (measured [0.86, 1.14]
    at κ = 4, in bf16 and fp64 alike); fewer steps stop early, on the way there."""
    return _odd_quintic_iteration(A, POLAR_EXPRESS_COEFFICIENTS[:steps], 1.0 + POLAR_EXPRESS_SAFETY, dtype, eps)


def polar(A: Tensor, *, method: str = "svd", steps: Optional[int] = None, dtype: Optional[torch.dtype] = None,
          eps: Optional[float] = None) -> Tensor:
    """The orthogonal polar factor ``U Vᵀ`` of ``A`` ``(*, m, n)``: the matrix with orthonormal columns
    (rows, when m < n) nearest to ``A`` in the Frobenius norm — the update direction of Muon.

    ``method``:

    * ``'svd'`` (default) — exact, through metalcore's SVD; float32/float64. Differentiable where
      ``A`` has distinct nonzero singular values. ``steps``/``dtype``/``eps`` do not apply and raise.
    * ``'newton_schulz'`` — Muon's quintic iteration (``steps=5``, ``dtype=torch.bfloat16``,
      ``eps=1e-7``): fast, approximate (singular values in about [0.7, 1.2]).
    * ``'polar_express'`` — Polar Express's per-step optimal quintics (``steps ≤ 5``, default 5;
      ``dtype=torch.bfloat16``; ``eps=1e-7``): as cheap, about twice as close to the exact factor (σ within about ±15% of 1).

    The iterative methods accept fp16/bf16/fp32/fp64 ``A``, compute in ``dtype`` and return ``A``'s
    dtype. Why each exists and where the coefficients come from: the module docstring.

    >>> O = metalcore.polar(torch.randn(16, 64, 32))   # O.mT @ O == I
    >>> O = metalcore.polar(G, method="polar_express")  # Muon-style, bf16
    """
    fn = "metalcore.polar"
    check_choice(fn, "method", method, METHODS)
    if method == "svd":
        A = check_matrix(fn, "A", A)
        for name, value in (("steps", steps), ("dtype", dtype), ("eps", eps)):
            if value is not None:
                raise ValueError(f"{fn}: {name} applies only to the iterative methods ('newton_schulz', "
                                 f"'polar_express'), not to method='svd'; got {name}={value!r}")
        U, _, Vh = svd_op(A, False, True)
        return U @ Vh
    A = check_matrix(fn, "A", A, dtypes=FLOAT_DTYPES)
    max_steps = 99 if method == "newton_schulz" else len(POLAR_EXPRESS_COEFFICIENTS)
    steps = (NS_STEPS if method == "newton_schulz" else max_steps) if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= max_steps:
        why = "" if method == "newton_schulz" else " (the published Polar Express schedule has 5 steps)"
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
