"""Least squares ``min ‖A X − B‖_F`` (minimum-norm ``X`` when underdetermined or rank-deficient).

A composite over metalcore's registered ``qr`` and ``svd`` ops (no op of its own): autograd, every
backend and ``torch.compile`` come from those. The LAPACK driver names of ``torch.linalg.lstsq`` pick
the method:

* ``'gels'``: QR, for full-rank ``A``: ``X = R⁻¹ Qᴴ B`` (m ≥ n), or the minimum-norm
  ``X = Q R⁻ᴴ B`` from the QR of ``Aᴴ`` (m < n);
* ``'gelsy'``, ``'gelsd'``, ``'gelss'``: SVD, ``X = V diag(1/σ_i) Uᴴ B`` over the singular values
  ``σ_i > rcond · σ_max``; the others are treated as zero (``rank`` counts those kept). LAPACK's
  ``gelsy`` finds the rank by QR with column pivoting instead; the two agree unless a singular value
  sits at the threshold.

Which outputs are filled follows torch exactly (the others are empty tensors of shape ``(0,)``):
``residuals`` (``‖A x − b‖²`` per column) when m > n, the driver is not ``'gelsy'``, and — for
``'gelsd'``/``'gelss'`` — every matrix of ``A`` has full rank; ``rank`` for every driver but
``'gels'``; ``singular_values`` for ``'gelsd'`` and ``'gelss'``. ``rank`` and ``singular_values`` have
``A``'s batch shape, ``solution`` and ``residuals`` the broadcast batch shape.
"""

import torch
from torch import Tensor

from metalcore._validation import (LINALG_DTYPES, broadcast_batch_shape, check_choice, check_matrix, check_same_device,
                                   check_same_dtype, check_tensor)
from metalcore.linalg.pinv import PinvBackward, pseudo_inverse_values
from metalcore.linalg.qr import qr_op
from metalcore.linalg.svd import svd_op
from metalcore.linalg.triangular import solve_triangular

DRIVERS = ("gels", "gelsy", "gelsd", "gelss")


class RankError(ValueError, RuntimeError):
    """Too few dimensions: a ValueError by metalcore's convention, and the RuntimeError that
    ``torch.linalg.lstsq`` raises, so that code catching either keeps working."""
_FN = "metalcore.linalg.lstsq"


def _gels(A: Tensor, B: Tensor) -> Tensor:
    m, n = A.shape[-2:]
    if m >= n:
        Q, R = qr_op(A, "reduced")
        return solve_triangular(R, Q.mH @ B, upper=True)
    Q, R = qr_op(A.mH, "reduced")  # A = Rᴴ Qᴴ
    return Q @ solve_triangular(R.mH, B, upper=False)


def lstsq(A: Tensor, B: Tensor, rcond=None, *, driver=None):
    """Twin of ``torch.linalg.lstsq``: ``(solution, residuals, rank, singular_values)``.

    ``A``: ``(*, m, n)``; ``B``: ``(*, m, k)`` (batch dimensions broadcast), or ``(*, m)`` equal to
    ``A.shape[:-1]`` for a (batch of) vector(s). float32/float64. ``rcond``: relative threshold on
    the singular values for the SVD drivers; ``None`` means ``eps · max(m, n)`` and a negative value
    means ``eps`` (LAPACK's convention). ``driver``: ``None`` picks ``'gelsy'`` on the CPU and
    ``'gels'`` elsewhere, as torch does; unlike torch, every driver also runs on CUDA. Unlike torch,
    ``residuals`` and ``singular_values`` are differentiable too. Deciding whether to fill
    ``residuals`` for ``'gelsd'``/``'gelss'`` reads ``rank`` on the host, as torch does.

    >>> X = metalcore.linalg.lstsq(torch.randn(10, 6, 3), torch.randn(10, 6, 2)).solution
    """
    for name, x in (("A", A), ("B", B)):
        if isinstance(x, torch.Tensor) and x.dim() < (2 if name == "A" else 1):
            raise RankError(f"{_FN}: {name} must have at least {2 if name == 'A' else 1} dimensions; "
                            f"got shape {tuple(x.shape)}")
    A = check_matrix(_FN, "A", A)
    B = check_tensor(_FN, "B", B, dtypes=LINALG_DTYPES, min_dim=1)
    check_same_device(_FN, A=A, B=B)
    check_same_dtype(_FN, A=A, B=B)
    if driver is None:
        driver = "gelsy" if A.device.type == "cpu" else "gels"
    check_choice(_FN, "driver", driver, DRIVERS)
    vector = B.dim() == A.dim() - 1 and B.shape == A.shape[:-1]
    if vector:
        B = B.unsqueeze(-1)
    elif B.dim() != A.dim():
        raise ValueError(f"{_FN}: B must have the same number of dimensions as A {tuple(A.shape)}, or be a "
                         f"(batch of) vector(s) of shape A.shape[:-1]; got B of shape {tuple(B.shape)}")
    m, n = A.shape[-2:]
    if B.shape[-2] != m:
        raise ValueError(f"{_FN}: B must have {m} rows to match A of shape {tuple(A.shape)}; "
                         f"got B of shape {tuple(B.shape)}")
    broadcast_batch_shape(_FN, A, B)

    empty = A.new_empty(0)
    rank = torch.empty(0, dtype=torch.int64, device=A.device)
    singular_values = empty
    if driver == "gels":
        X = _gels(A, B)
    else:
        U, S, Vh = svd_op(A, False, True)
        eps = torch.finfo(A.dtype).eps
        rcond = eps * max(m, n) if rcond is None else (eps if rcond < 0 else float(rcond))
        keep = S > rcond * S[..., :1]
        # X = A⁺ B, with A⁺'s gradient from A and A⁺ alone: through the factors it is NaN when
        # singular values repeat (an A with orthonormal columns), see pinv.py.
        S_inv = pseudo_inverse_values(S.detach(), keep)
        A_pinv = (Vh.detach().mH * S_inv.unsqueeze(-2)) @ U.detach().mH
        X = (PinvBackward.apply(A, A_pinv) if A.requires_grad else A_pinv) @ B
        rank = keep.sum(-1)
        if driver != "gelsy":
            singular_values = S
    residuals = empty
    if m > n and driver != "gelsy" and (driver == "gels" or bool((rank == n).all())):
        residuals = (A @ X - B).pow(2).sum(-2)
    return torch.return_types.linalg_lstsq((X.squeeze(-1) if vector else X, residuals, rank, singular_values))
