"""Moore–Penrose pseudoinverse ``A⁺``, through metalcore's ``svd`` (``eigh`` when ``hermitian``).

A composite over the registered ops, as torch's own ``linalg.pinv`` is over its ``svd``/``eigh``:
``A⁺ = V diag(σ_i⁺) Uᴴ`` with ``σ_i⁺ = 1/σ_i`` for ``σ_i > max(atol, rtol · σ_max)`` and 0 otherwise.
"""

import torch
from torch import Tensor

from metalcore._validation import check_matrix
from metalcore.linalg._common import write_out
from metalcore.linalg.eigh import eigh_op
from metalcore.linalg.svd import svd_op


def _tolerance(fn: str, name: str, tol, A: Tensor) -> Tensor | None:
    if tol is None:
        return None
    if isinstance(tol, Tensor):
        if tol.is_complex():
            raise TypeError(f"{fn}: {name} must be a real tensor or number; got dtype {tol.dtype}")
        return tol.to(device=A.device, dtype=torch.float64)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)):
        raise TypeError(f"{fn}: {name} must be a float, a real tensor or None; got {type(tol).__name__}")
    return torch.tensor(float(tol), dtype=torch.float64, device=A.device)


def pinv(A: Tensor, *, atol=None, rtol=None, hermitian: bool = False, out=None) -> Tensor:
    """Twin of ``torch.linalg.pinv``: ``A⁺`` ``(*, n, m)`` of ``A`` ``(*, m, n)``.

    Singular values at or below ``max(atol, rtol · σ_max)`` are treated as zero. ``atol`` and
    ``rtol`` are floats or real tensors broadcasting with ``A``'s batch shape; by default ``atol = 0``
    and ``rtol = eps · max(m, n)``, and ``rtol = 0`` when only a positive ``atol`` is given — torch's
    rules. With ``hermitian=True``, ``A`` must be symmetric and only its lower triangle is read (the
    singular values are then ``|eigenvalues|``). float32/float64; differentiable where ``A`` has
    distinct nonzero singular values (eigenvalues when ``hermitian``).

    >>> A_pinv = metalcore.linalg.pinv(torch.randn(8, 5, 3))
    """
    fn = "metalcore.linalg.pinv"
    A = check_matrix(fn, "A", A)
    m, n = A.shape[-2:]
    atol_t, rtol_t = _tolerance(fn, "atol", atol, A), _tolerance(fn, "rtol", rtol, A)
    if atol_t is None:
        atol_t = torch.zeros((), dtype=torch.float64, device=A.device)
    if rtol_t is None:
        default = torch.tensor(torch.finfo(A.dtype).eps * max(m, n), dtype=torch.float64, device=A.device)
        rtol_t = torch.where(atol_t > 0, 0.0, default) if atol is not None else default
    if m == 0 or n == 0:
        return write_out(fn, A.new_zeros(*A.shape[:-2], n, m), out)
    if hermitian:
        if m != n:
            raise ValueError(f"{fn}: A must be square when hermitian=True; got shape {tuple(A.shape)}")
        L, Q = eigh_op(A, "L", True)
        S = L.abs()
        largest = S.amax(-1, keepdim=True)
    else:
        U, S, Vh = svd_op(A, False, True)
        largest = S[..., :1]
    keep = S > torch.maximum(atol_t.unsqueeze(-1), rtol_t.unsqueeze(-1) * largest)
    # The inner where keeps 1/0 out of the graph: its gradient would turn the masked zeros into NaN.
    values = L if hermitian else S
    inv = torch.where(keep, 1 / torch.where(keep, values, 1), 0).to(A.dtype)
    result = (Q * inv.unsqueeze(-2)) @ Q.mH if hermitian else (Vh.mH * inv.unsqueeze(-2)) @ U.mH
    return write_out(fn, result, out)
