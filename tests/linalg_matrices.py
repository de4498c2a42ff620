"""Test matrices for the small-matrix kernels, built in float64 and rounded to the working dtype.

Each family is a known hard case for LAPACK-style algorithms: ill-conditioned (singular values
spread geometrically up to ``cond``), rank-deficient (exact zeros in the spectrum), clustered and
repeated singular values/eigenvalues, graded (rows and columns scaled over many orders of
magnitude), and tiny- or huge-scaled (near the under/overflow thresholds of the dtype's squares).

``"well"`` (singular values in [0.5, 1.5], not in KINDS) is for comparing values with torch's by the 2x
rule: on an ill-conditioned solve both errors are κ·ε times a factor set by the rounding order, and
the kernels' LU measured 0.1-0.7x torch's error in the median but over 2x on ~5% of Gaussian matrices
of side 16-33 (κ ~ 100-1500). Ill-conditioned inputs are judged by LAPACK's ratios instead.
"""

import torch

from metalcore import _metal

SIZES = (1, 2, 3, 5, 8, 16, 31, 33)
BATCHES = ((), (0,), (7,), (2, 3))
DTYPES = (torch.float32, torch.float64)
KINDS = ("random", "ill", "rank", "cluster", "graded", "tiny", "huge")
# The families the Metal kernels' hard-input tests run.
HARD = ("ill", "cluster", "graded", "tiny", "huge")

# The Metal linalg kernels' sizes stop at METALCORE_LINALG_MAX_N (64, the largest float32 tile that
# leaves room in Apple's 32 KiB of threadgroup memory); beyond it, and for float64, the ops stay on
# the reference.
METAL_MAX_N = _metal.constants()["METALCORE_LINALG_MAX_N"]
METAL_SIZES = (1, 2, 3, 5, 16, 31, 33, METAL_MAX_N)
# Each size meets two of the four batch shapes (i and i + 2 mod 4), so each batch shape meets half
# the sizes, and every op's cases include (), (0,), (7,) and (2, 3) and the size limit.
METAL_CASES = [(BATCHES[(i + j) % 4], n) for i, n in enumerate(METAL_SIZES) for j in (0, 2)]


def case_id(batch, *dims) -> str:
    return "B" + ("x".join(map(str, batch)) or "none") + "-" + "x".join(map(str, dims))


def max_cond(dtype) -> float:
    """Condition numbers the tests go up to: 1e6 in fp32 (as the issue asks), 1e12 in fp64."""
    return 1e6 if dtype == torch.float32 else 1e12


def scale_of(kind, dtype) -> float:
    """Tiny/huge scales whose squares would under/overflow: 1e-25/1e25 in fp32 (squares beyond the
    1e±38 range), 1e-200/1e200 in fp64."""
    if kind == "tiny":
        return 1e-25 if dtype == torch.float32 else 1e-200
    if kind == "huge":
        return 1e25 if dtype == torch.float32 else 1e200
    return 1.0


def orthogonal(batch, n):
    Q, R = torch.linalg.qr(torch.randn(*batch, n, n, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1)).unsqueeze(-2)


def spectrum(kind, batch, k, dtype):
    """``k`` positive values, descending, for one of the families."""
    i = torch.arange(k, dtype=torch.float64)
    if kind == "ill":
        s = max_cond(dtype) ** (-i / max(k - 1, 1))
    elif kind == "rank":
        s = torch.where(i < k // 2, 1.0 + torch.rand(k, dtype=torch.float64), 0.0)
    elif kind == "cluster":
        s = 1.0 + torch.where(i < k // 2, 0.0, 1.0) + 1e-9 * torch.rand(k, dtype=torch.float64)
    else:
        s = 0.5 + torch.rand(k, dtype=torch.float64)
    s = s.sort(descending=True).values
    return s.expand(*batch, k).clone()


def general(kind, batch, m, n, dtype):
    """An ``m × n`` matrix of the family ``kind``."""
    k = min(m, n)
    if kind in ("random", "tiny", "huge", "graded"):
        A = torch.randn(*batch, m, n, dtype=torch.float64)
        if kind == "graded":
            A = A * torch.logspace(0, -6, m, dtype=torch.float64)[:, None] * torch.logspace(0, -3, n, dtype=torch.float64)
    else:
        s = spectrum(kind, batch, k, dtype)
        A = orthogonal(batch, m)[..., :k] @ (s.unsqueeze(-1) * orthogonal(batch, n)[..., :k, :])
    return (A * scale_of(kind, dtype)).to(dtype)


def symmetric(kind, batch, n, dtype):
    """A symmetric ``n × n`` matrix of the family (indefinite: eigenvalue signs are random)."""
    if kind in ("random", "tiny", "huge", "graded"):
        A = torch.randn(*batch, n, n, dtype=torch.float64)
        A = A + A.mT
        if kind == "graded":
            d = torch.logspace(0, -4, n, dtype=torch.float64)
            A = d[:, None] * A * d
    else:
        lam = spectrum(kind, batch, n, dtype)
        if kind != "rank":
            lam = lam * torch.where(torch.rand(*batch, n) < 0.5, -1.0, 1.0).double()
        Q = orthogonal(batch, n)
        A = (Q * lam.unsqueeze(-2)) @ Q.mT
        A = 0.5 * (A + A.mT)
    return (A * scale_of(kind, dtype)).to(dtype)


def spd(kind, batch, n, dtype):
    """A symmetric positive-definite ``n × n`` matrix of the family."""
    if kind in ("random", "tiny", "huge", "graded"):
        X = torch.randn(*batch, n, n, dtype=torch.float64)
        A = X @ X.mT / n + torch.eye(n, dtype=torch.float64)
        if kind == "graded":
            d = torch.logspace(0, -4, n, dtype=torch.float64)
            A = d[:, None] * A * d
    else:
        lam = spectrum("cluster" if kind == "cluster" else "ill", batch, n, dtype)
        Q = orthogonal(batch, n)
        A = (Q * lam.unsqueeze(-2)) @ Q.mT
        A = 0.5 * (A + A.mT)
    return (A * scale_of(kind, dtype)).to(dtype)


def eps(dtype) -> float:
    return torch.finfo(dtype).eps


def fro(x):
    return torch.linalg.matrix_norm(x.double(), ord="fro")


def solve_ratio(A, X, B, dtype) -> float:
    """LAPACK's solve test ratio ‖B − A X‖ / (‖A‖ ‖X‖ n ε), worst over the batch (left solves)."""
    if B.numel() == 0:
        return 0.0
    n = A.shape[-1]
    num = fro(B.double() - A.double() @ X.double())
    den = (fro(A) * fro(X)).clamp_min(torch.finfo(torch.float64).tiny) * n * eps(dtype)
    return (num / den).max().item()
