"""Moore–Penrose pseudoinverse ``A⁺``, through metalcore's ``svd`` (``eigh`` when ``hermitian``).

A composite over the registered ops, as torch's own ``linalg.pinv`` is over its ``svd``/``eigh``:
``A⁺ = V diag(σ_i⁺) Uᴴ`` with ``σ_i⁺ = 1/σ_i`` for ``σ_i > max(atol, rtol · σ_max)`` and 0 otherwise.

The gradient is not taken through the factors: ``svd``'s and ``eigh``'s backward divide by
``σ_i² − σ_j²`` and are NaN for repeated singular values (``pinv(eye(3))``), although ``A⁺`` itself is
smooth there. :class:`PinvBackward` gives ``A⁺`` the derivative of the pseudoinverse in terms of
``A`` and ``A⁺`` only (Golub & Pereyra 1973, the formula of torch's ``pinv_backward``), which is
finite wherever the rank is locally constant; ``lstsq``'s SVD drivers share it.
"""

import torch
from torch import Tensor

from metalcore._validation import check_matrix
from metalcore.linalg._common import write_out
from metalcore.linalg.eigh import eigh_op
from metalcore.linalg.svd import svd_op


class PinvBackward(torch.autograd.Function):
    """``apply(A, P)`` returns ``P`` = ``A⁺`` (computed without autograd) with ``dA⁺/dA`` as its gradient.

    For ``A`` ``(*, m, n)`` and the incoming gradient ``G`` of ``A⁺`` ``(*, n, m)``:
    ``∇A = −A⁺ᴴ G A⁺ᴴ + (I − A A⁺) Gᴴ A⁺ A⁺ᴴ + A⁺ᴴ A⁺ Gᴴ (I − A⁺ A)``.
    """

    @staticmethod
    def forward(A: Tensor, P: Tensor) -> Tensor:
        return P.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        A, P = inputs
        ctx.save_for_backward(A, P)

    @staticmethod
    def backward(ctx, G):
        A, P = ctx.saved_tensors
        Ph, Gh = P.mH, G.mH
        grad = -Ph @ G @ Ph
        grad = grad + (Gh @ (P @ Ph) - A @ (P @ (Gh @ (P @ Ph))))
        grad = grad + ((Ph @ P) @ Gh - (Ph @ P) @ (Gh @ P) @ A)
        return grad, None


def pseudo_inverse_values(S: Tensor, keep: Tensor) -> Tensor:
    """``1/S`` where ``keep``, 0 elsewhere (no 1/0 is ever formed)."""
    return torch.where(keep, 1 / torch.where(keep, S, 1), 0)


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


def pinv(A: Tensor, rcond=None, hermitian: bool = False, *, atol=None, rtol=None, out=None) -> Tensor:
    """Twin of ``torch.linalg.pinv``: ``A⁺`` ``(*, n, m)`` of ``A`` ``(*, m, n)``.

    Singular values at or below ``max(atol, rtol · σ_max)`` are treated as zero. ``atol`` and
    ``rtol`` are floats or real tensors broadcasting with ``A``'s batch shape; by default ``atol = 0``
    and ``rtol = eps · max(m, n)``, and ``rtol = 0`` when only a positive ``atol`` is given — torch's
    rules. ``rcond`` (positional, torch's older form) is ``rtol`` under its former name. With
    ``hermitian=True``, ``A`` must be symmetric and only its lower triangle is read (the singular
    values are then ``|eigenvalues|``). float32/float64; differentiable wherever the rank does not
    change under small perturbations (repeated singular values included).

    >>> A_pinv = metalcore.linalg.pinv(torch.randn(8, 5, 3))
    """
    fn = "metalcore.linalg.pinv"
    A = check_matrix(fn, "A", A)
    if rcond is not None:
        if rtol is not None:
            raise TypeError(f"{fn}: give rtol or its former name rcond, not both")
        rtol = rcond
    m, n = A.shape[-2:]
    atol_t, rtol_t = _tolerance(fn, "atol", atol, A), _tolerance(fn, "rtol", rtol, A)
    if atol_t is None:
        atol_t = torch.zeros((), dtype=torch.float64, device=A.device)
    if rtol_t is None:
        default = torch.tensor(torch.finfo(A.dtype).eps * max(m, n), dtype=torch.float64, device=A.device)
        rtol_t = torch.where(atol_t > 0, 0.0, default) if atol is not None else default
    if hermitian and m != n:
        raise ValueError(f"{fn}: A must be square when hermitian=True; got shape {tuple(A.shape)}")
    if m == 0 or n == 0:
        # Still a function of A (torch's empty result has a grad_fn too), with an empty gradient.
        return write_out(fn, A.mT * 0, out, cast=True)
    with torch.no_grad():
        if hermitian:
            L, Q = eigh_op(A, "L", True)
            S = L.abs()
            largest = S.amax(-1, keepdim=True)
        else:
            U, S, Vh = svd_op(A, False, True)
            largest = S[..., :1]
        keep = S > torch.maximum(atol_t.unsqueeze(-1), rtol_t.unsqueeze(-1) * largest)
        inv = pseudo_inverse_values(L if hermitian else S, keep).to(A.dtype)
        P = (Q * inv.unsqueeze(-2)) @ Q.mH if hermitian else (Vh.mH * inv.unsqueeze(-2)) @ U.mH
    return write_out(fn, PinvBackward.apply(A, P) if A.requires_grad else P, out, cast=True)
