r"""SVD of large and tall matrices at LAPACK accuracy from GEMM-rich pieces: the svd op's large-matrix path.

cuSOLVER's ``gesvd``/``gesdd`` spend most of their time in the memory-bound bidiagonalisation (1.12 s
for a 4096² fp32 matrix on an H100, under 1 TFLOP/s). This path keeps the work in QR, Cholesky,
triangular solves, GEMMs and one symmetric eigensolver (Nakatsukasa & Higham 2013, "QDWH-SVD"):

1. tall (``m > TALL_QR_RATIO · n``): ``A = Q R`` (metalcore's qr op), continue with the ``n × n`` ``R``;
   wide: work on ``Aᵀ`` and swap the factors at the end;
2. polar decomposition ``B = U_p H`` by QDWH (:func:`metalcore.linalg.polar.qdwh`), ``H = U_pᵀ B``
   symmetrised;
3. ``H = V Λ Vᵀ`` by metalcore's eigh op (its own routing and measured table: on CUDA cuSOLVER's
   batched ``XsyevBatched`` for batches of sides 64–512, ``syevd`` one matrix at a time otherwise);
   ``S = |Λ|`` sorted descending, and ``U = U_p V`` with the sign of each negative (rounding-level)
   eigenvalue moved into ``U``;
4. when some singular value lies below ``2ε·α`` (rank-deficient or numerically singular input, where
   the polar factor is only a partial isometry), ``U`` goes through one Householder QR (diagonal
   signs of ``R`` restored): a no-op up to rounding for the columns of nonzero singular values, it
   completes the columns of zero or tiny ones to an orthonormal set. ``full_matrices`` takes the
   complete Q of the same QR, or of step 1's.

Batches run as batched calls from start to end: one QDWH schedule for every matrix, computed on the
host from ``l0`` alone (:func:`metalcore.linalg.polar.qdwh_schedule`, never from the data), batched
QR (the triton backend's blocked QR from 8 matrices), Cholesky, triangular solves, GEMMs and the
eigh op. The one host synchronisation per call is step 4's test.

Accuracy: the polar factor and ``H`` are backward stable (Nakatsukasa & Higham 2013, Theorem 5.1), and
the symmetric eigensolvers are, so the residual and orthogonality ratios are LAPACK's. Singular values are accurate to
``ε‖A‖`` absolutely, like ``gesdd``'s — not the Gram matrix's ``ε‖A‖²/σ`` (squared condition number),
which is why there is no Gram-matrix mode here. fp32 products follow the user's
``torch.backends.cuda.matmul.allow_tf32`` (off by default; nothing here changes it): with TF32 on,
the user has opted into TF32's ~1e-3 relative rounding in every GEMM, and the ratios grow accordingly.

FLOPs (fp32, ``n × n``, default ``l0 = ε``: two QR-based and two Cholesky-based QDWH steps):
2 × 8.7 n³ + 2 × 4.3 n³ + 2 n³ (``H``) + 2 n³ (``U_p V``) ≈ 30 n³ (fp64: two QR-based and four
Cholesky-based steps, ≈ 39 n³; + 2.7 n³ for the completing QR when it runs), plus the eigensolver
(≈ 9 n³ with vectors, about half of it memory-bound tridiagonalisation). A tall
``m × n`` matrix adds its QR (≈ 4mn² − 4n³/3 with Q) and ``Q U`` (2mn²).

>>> U, S, Vh = svd_large(torch.randn(2048, 512, dtype=torch.float64), False, True)
"""

import torch
from torch import Tensor

from metalcore.linalg.eigh import eigh_op
from metalcore.linalg.polar import qdwh, spectral_norm_bound
from metalcore.linalg.qr import qr_op

# Smallest min(m, n) for which large_supported() chooses this path. cuSOLVER's gesdd costs 1.12 s at
# 4096² on the H100; the crossover below that is to be measured by bench/scripts/svd_large_check.py.
LARGE_MIN_N = 1024
# Above this aspect ratio, a QR first shrinks the QDWH iteration to the n × n factor R; nearer to square
# the extra QR (and the product Q U) costs more than iterating on the m × n matrix saves.
TALL_QR_RATIO = 1.15
# Smallest min(m, n) of the svd op's "qdwh" alternative path (metalcore/linalg/svd_triton.py): above
# n = 32 cuSOLVER's gesvd runs a batch one matrix at a time (64×256² fp32: 434 ms on the H100; fp64
# 65×4096, where the Jacobi kernel does not serve fp64 above 64: 9.1 s). Where it beats torch and the
# Jacobi kernel is the measured table's to say.
PATH_MIN_N = 33


def large_supported(A: Tensor) -> bool:
    """Whether the svd op should take this path for ``A``: float32/float64 with ``min(m, n) ≥ LARGE_MIN_N``.
    Any device works (the tests run it on the CPU); the choice of device is the caller's."""
    return A.dtype in (torch.float32, torch.float64) and A.dim() >= 2 and min(A.shape[-2:]) >= LARGE_MIN_N


def path_supported(A: Tensor, full_matrices: bool = False, compute_uv: bool = True) -> bool:
    """Whether the "qdwh" alternative path takes ``A``: float32/float64 with ``min(m, n) ≥ PATH_MIN_N``,
    any batch (the op's arguments, so that it serves as the path's ``supports``)."""
    return A.dtype in (torch.float32, torch.float64) and A.dim() >= 2 and min(A.shape[-2:]) >= PATH_MIN_N


def _signs(x: Tensor) -> Tensor:
    """±1 per entry, +1 for zero (so that a zero pivot leaves its column as it is)."""
    return torch.where(x < 0, -1.0, 1.0).to(x.dtype)


def _svd_tall(A: Tensor, full_matrices: bool, compute_uv: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``A (*, m, n)`` with ``m ≥ n`` → ``(U, S, Vh)`` as torch.linalg.svd returns them."""
    m, n = A.shape[-2:]
    qr_first = m > TALL_QR_RATIO * n
    Qa = None
    if qr_first:
        Qa, B = qr_op(A, "complete" if full_matrices and compute_uv else ("reduced" if compute_uv else "r"))
        B = B[..., :n, :]
    else:
        B = A
    Up = qdwh(B)
    H = Up.mT @ B
    H = 0.5 * (H + H.mT)
    if not compute_uv:
        S = eigh_op(H, "L", False)[0].abs().sort(dim=-1, descending=True).values
        return A.new_empty(0), S.contiguous(), A.new_empty(0)
    lam, V = eigh_op(H, "L", True)
    S, order = lam.abs().sort(dim=-1, descending=True)
    lam = lam.gather(-1, order)
    V = V.gather(-1, order.unsqueeze(-2).expand_as(V))
    U = Up @ (V * _signs(lam).unsqueeze(-2))
    # Complete the partial isometry's missing columns; see the module docstring, step 4. QDWH brings
    # every singular value of B/α at or above l0 = ε to 1, so only S ≤ 2ε·α (a factor 2 of
    # margin) leaves a column short. The test is this function's one host synchronisation (one per call,
    # whatever the batch; everything up to U = U_p V is queued by then): it skips a QR
    # of U (29 ms at 4096² fp32 on the H100, ~12% of the whole) for the usual full-rank input, and runs
    # it for the whole batch when any matrix needs it (a no-op up to rounding for the others).
    complete = full_matrices and not qr_first and m > n
    if complete or bool((S[..., -1:] <= 2 * torch.finfo(A.dtype).eps * spectral_norm_bound(B)[..., 0]).any()):
        Qu, Ru = qr_op(U, "complete" if complete else "reduced")
        d = _signs(Ru.diagonal(dim1=-2, dim2=-1))
        if complete:
            U = torch.cat([Qu[..., :n] * d.unsqueeze(-2), Qu[..., n:]], dim=-1)
        else:
            U = Qu * d.unsqueeze(-2)
    if qr_first:
        U = Qa[..., :n] @ U
        if full_matrices:
            U = torch.cat([U, Qa[..., n:]], dim=-1)
    return U.contiguous(), S.contiguous(), V.mT.contiguous()


def svd_large(A: Tensor, full_matrices: bool, compute_uv: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The svd op's contract (:func:`metalcore.linalg.svd.svd_op`) by QR + QDWH + eigh.

    ``A``: ``(*, m, n)`` float32/float64, any device. Returns ``(U, S, Vh)`` shaped as
    ``torch.linalg.svd(A, full_matrices)`` returns them, ``S`` descending; with ``compute_uv=False``,
    ``U`` and ``Vh`` are empty tensors of shape ``(0,)``, as the op's reference returns them.
    Meant for large matrices (:func:`large_supported`); correct at every size.
    """
    *batch, m, n = A.shape
    if min(m, n) == 0 or A.numel() == 0:
        # Nothing to iterate on; the reference handles empty shapes and batches exactly as torch does.
        if not compute_uv:
            return A.new_empty(0), torch.linalg.svdvals(A).contiguous(), A.new_empty(0)
        U, S, Vh = torch.linalg.svd(A, full_matrices=full_matrices)
        return U.contiguous(), S.contiguous(), Vh.contiguous()
    if m >= n:
        return _svd_tall(A, full_matrices, compute_uv)
    # A = (Aᵀ)ᵀ = (U' S V'ᵀ)ᵀ = V' S U'ᵀ.
    U, S, Vh = _svd_tall(A.mT, full_matrices, compute_uv)
    if not compute_uv:
        return U, S, Vh
    return Vh.mT.contiguous(), S, U.mT.contiguous()
