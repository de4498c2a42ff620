r"""Randomized truncated SVD, a drop-in twin of ``torch.svd_lowrank``.

Halko, Martinsson & Tropp, "Finding structure with randomness", SIAM Review 53(2), 2011
(arXiv:0909.4061): Algorithm 4.4 (randomized subspace iteration) for an orthonormal basis ``Q``
``(*, m, q)`` of the approximate range of ``A``, then Algorithm 5.1 (the SVD of the small
``B = Qᵀ A`` ``(*, q, n)``). The QR re-orthonormalisation after every product keeps the power
iteration from collapsing onto the leading singular vector in floating point. Products are torch
GEMMs; the QRs and the small SVD are metalcore's ``qr`` and ``svd`` ops, so each runs on the
backend the op picks for its device.

Accuracy (HMT 2011, Corollary 10.10): with ``q = k + p`` columns (oversampling ``p ≥ 2``) and ``i =
niter`` power iterations, the rank-``q`` approximation ``U diag(S) Vᵀ = Q Qᵀ A`` satisfies

    E‖A − Q Qᵀ A‖₂ ≤ [(1 + √(k/(p−1))) σ_{k+1}^{2i+1} + (e√(k+p)/p) (Σ_{j>k} σ_j^{2(2i+1)})^{1/2}]^{1/(2i+1)},

so the error approaches the optimal ``σ_{k+1}`` at a rate set by the spectral decay: each power step
raises the gap ``σ_{k+1}/σ_j`` to a higher odd power. The leading singular values are accurate when
the spectrum decays well past ``q``; the trailing ones of the ``q`` returned are underestimates.
Set ``q`` a few above the rank you need, as torch's documentation advises.
"""

from typing import Optional

import torch
from torch import Tensor

from metalcore._validation import check_matrix, check_same_device, check_same_dtype, check_tensor
from metalcore.linalg.qr import qr_op
from metalcore.linalg.svd import svd_op


def _range_basis(A: Tensor, q: int, niter: int, M: Optional[Tensor]) -> Tensor:
    """HMT Algorithm 4.4 for ``A − M`` (never forming it): ``Q (*, m, q)`` with orthonormal columns."""
    # The same draw as torch.svd_lowrank's (one (n, q) Gaussian shared across the batch), so that under
    # one seed both compute the same basis.
    R = torch.randn(A.shape[-1], q, dtype=A.dtype, device=A.device)
    X = A @ R if M is None else A @ R - M @ R
    Q, _ = qr_op(X, "reduced")
    for _ in range(niter):
        X = A.mT @ Q if M is None else A.mT @ Q - M.mT @ Q
        Q, _ = qr_op(X, "reduced")
        X = A @ Q if M is None else A @ Q - M @ Q
        Q, _ = qr_op(X, "reduced")
    return Q


def svd_lowrank(A: Tensor, q: Optional[int] = 6, niter: Optional[int] = 2,
                M: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    r"""Twin of ``torch.svd_lowrank``: ``(U, S, V)`` with ``A − M ≈ U diag(S) Vᵀ``.

    ``A``: dense ``(*, m, n)`` float32/float64; ``q`` (default 6) the number of singular triplets,
    ``q ≤ min(m, n)``; ``niter`` (default 2) power iterations; ``M`` broadcastable to ``A`` (a mean
    to subtract, never subtracted in place). Returns ``U (*, m, q)``, ``S (*, q)`` descending,
    ``V (*, n, q)`` — ``V``, not ``Vh``, as torch returns it. Random: seed torch's generator for
    repeatable results (same seed, same random matrix as torch's). Error bound: the module docstring.

    >>> U, S, V = metalcore.linalg.svd_lowrank(W, q=32)   # W ≈ U diag(S) Vᵀ
    """
    fn = "metalcore.linalg.svd_lowrank"
    A = check_matrix(fn, "A", A)
    q = 6 if q is None else q
    niter = 2 if niter is None else niter
    m, n = A.shape[-2:]
    if isinstance(q, bool) or not isinstance(q, int) or not 0 <= q <= min(m, n):
        raise ValueError(f"{fn}: q must be an integer in [0, min(m, n)] = [0, {min(m, n)}]; got {q!r}")
    if isinstance(niter, bool) or not isinstance(niter, int) or niter < 0:
        raise ValueError(f"{fn}: niter must be a non-negative integer; got {niter!r}")
    if M is not None:
        M = check_tensor(fn, "M", M)
        check_same_dtype(fn, A=A, M=M)
        check_same_device(fn, A=A, M=M)
        M = M.broadcast_to(A.shape)
    # Work on the tall orientation: the basis is taken of the smaller side's dimension.
    wide = m < n
    if wide:
        A = A.mT
        M = None if M is None else M.mT
    Q = _range_basis(A, q, niter, M)
    B = Q.mT @ A if M is None else Q.mT @ A - Q.mT @ M
    U, S, Vh = svd_op(B, False, True)
    U, V = Q @ U, Vh.mT
    return (V, S, U) if wide else (U, S, V)
