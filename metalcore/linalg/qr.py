"""QR decomposition ``A = Q R``: ``Q`` with orthonormal columns, ``R`` upper triangular.

One registered op, ``metalcore::qr(A, mode)``, serves ``linalg.qr`` and the top-level seed names
``qr`` and ``qr_batched`` (the same function: every metalcore op is batched). Modes, as in
``torch.linalg.qr`` (``k = min(m, n)``):

* ``'reduced'``:  ``Q`` ``(*, m, k)``, ``R`` ``(*, k, n)``;
* ``'complete'``: ``Q`` ``(*, m, m)``, ``R`` ``(*, m, n)``;
* ``'r'``:        ``Q`` empty (shape ``(0,)``), ``R`` ``(*, k, n)``.
"""

import torch
from torch import Tensor

from metalcore._op import metalcore_op
from metalcore._validation import check_choice, check_matrix
from metalcore.linalg._common import write_out
from metalcore.linalg.triangular import solve_triangular

MODES = ("reduced", "complete", "r")


@metalcore_op("qr")
def qr_op(A: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """Reference: LAPACK ``geqrf`` + ``orgqr`` (cuSOLVER on CUDA) through ``torch.linalg.qr``."""
    Q, R = torch.linalg.qr(A, mode=mode)
    return Q.contiguous(), R.contiguous()


@qr_op.register_fake
def _(A, mode):
    *batch, m, n = A.shape
    k = torch.sym_min(m, n)
    if mode == "complete":
        return A.new_empty(*batch, m, m), A.new_empty(*batch, m, n)
    Q = A.new_empty(0) if mode == "r" else A.new_empty(*batch, m, k)
    return Q, A.new_empty(*batch, k, n)


def _setup(ctx, inputs, output):
    ctx.mode = inputs[1]
    ctx.save_for_backward(*output)


def _copyltu(M: Tensor) -> Tensor:
    """The symmetric matrix whose lower triangle is that of ``M``."""
    L = M.tril(-1)
    return L + L.mH + torch.diag_embed(M.diagonal(dim1=-2, dim2=-1))


def _qr_backward_tall(gQ: Tensor, gR: Tensor, Q: Tensor, R: Tensor) -> Tensor:
    """m ≥ n: ``M = R gRᴴ − gQᴴ Q``, ``gA = (gQ + Q copyltu(M)) R⁻ᴴ`` (Liao et al. 2019, eq. 23)."""
    M = R @ gR.mH - gQ.mH @ Q
    return solve_triangular(R.mH, gQ + Q @ _copyltu(M), upper=False, left=False)


def qr_backward(gQ: Tensor, gR: Tensor, Q: Tensor, R: Tensor) -> Tensor:
    """The adjoint of the reduced QR (``Q`` ``(*, m, k)``, ``R`` ``(*, k, n)``); needs a nonsingular
    leading ``k × k`` block of ``R``.

    For m < n, split ``A = [X | Y]`` and ``R = [U | V]`` with ``X = Q U`` square: then ``Y = Q V``,
    so ``gY = Q gV`` and ``gX`` is the square case applied to ``(gQ + Y gVᴴ, gU)``.
    """
    m, n = Q.shape[-2], R.shape[-1]
    if m >= n:
        return _qr_backward_tall(gQ, gR, Q, R)
    U, V = R[..., :m], R[..., m:]
    gU, gV = gR[..., :m], gR[..., m:]
    Y = Q @ V
    gX = _qr_backward_tall(gQ + Y @ gV.mH, gU, Q, U)
    return torch.cat([gX, Q @ gV], dim=-1)


def _backward(ctx, gQ, gR):
    Q, R = ctx.saved_tensors
    if ctx.mode == "r":
        raise RuntimeError("metalcore qr: the derivative of QR depends on Q, which is not computed when "
                           "mode='r'; use mode='reduced' if you are going to differentiate through qr")
    m, n = Q.shape[-2], R.shape[-1]
    if ctx.mode == "complete" and m > n:
        raise RuntimeError("metalcore qr: the QR decomposition is not differentiable when "
                           "mode='complete' and nrows > ncols (the extra columns of Q are arbitrary)")
    return qr_backward(gQ, gR, Q, R), None


qr_op.register_autograd(_backward, setup_context=_setup)


@qr_op.torch_route(torch.linalg.qr)
def qr(A: Tensor, mode: str = "reduced", *, out=None):
    """Twin of ``torch.linalg.qr``: ``(Q, R)`` with ``A = Q R``.

    ``A``: ``(*, m, n)`` float32/float64; ``mode`` one of ``'reduced'``, ``'complete'``, ``'r'`` (see
    the module docstring for the shapes). Differentiable in ``'reduced'`` mode, and in ``'complete'``
    mode when m ≤ n, as in torch.

    >>> Q, R = metalcore.linalg.qr(torch.randn(500, 16, 16))
    """
    fn = "metalcore.linalg.qr"
    A = check_matrix(fn, "A", A)
    check_choice(fn, "mode", mode, MODES)
    plan = qr_op.plan(A, mode)
    if plan.prefers_torch:
        return write_out(fn, qr.by_torch(A, mode), out)
    qr.remember(lambda A, *_, **__: torch.return_types.linalg_qr(qr_op.call_planned(plan, A, mode)))
    return torch.return_types.linalg_qr(write_out(fn, qr_op.call_planned(plan, A, mode), out))


# The original metalcore API named the batched QR separately; every metalcore op takes any number of
# batch dimensions, so it is the same function.
qr_batched = qr
