"""Cholesky factorization ``A = L Lᴴ`` of symmetric positive-definite matrices.

One registered op, ``metalcore::cholesky_ex(A, upper, check_errors)``, serves ``cholesky`` and
``cholesky_ex``; with ``check_errors`` it raises ``torch.linalg.LinAlgError`` naming the first batch
element whose leading minor is not positive (inside the op, so it also works under torch.compile).
Only the lower triangle of ``A`` is read (the upper one when ``upper=True``), as in LAPACK.
"""

import torch
from torch import Tensor

from metalcore._op import metalcore_op
from metalcore._validation import check_choice, check_matrix
from metalcore.linalg._common import raise_for_info, write_out
from metalcore.linalg.triangular import solve_triangular


def _check(result, A, upper, check_errors):
    if check_errors:
        raise_for_info("linalg.cholesky", result[1], lambda k: (
            "The factorization could not be completed because the input is not positive-definite "
            f"(the leading minor of order {k} is not positive-definite)."))


@metalcore_op("cholesky_ex", check=_check)
def cholesky_ex_op(A: Tensor, upper: bool, check_errors: bool) -> tuple[Tensor, Tensor]:
    """Reference: LAPACK/cuSOLVER ``potrf`` through ``torch.linalg.cholesky_ex``."""
    L, info = torch.linalg.cholesky_ex(A, upper=upper)
    return L.contiguous(), info


@cholesky_ex_op.register_fake
def _(A, upper, check_errors):
    return A.new_empty(A.shape), A.new_empty(A.shape[:-2], dtype=torch.int32)


def _setup(ctx, inputs, output):
    ctx.upper = inputs[1]
    ctx.save_for_backward(output[0])


def _backward(ctx, gL, _ginfo):
    """gA = L⁻ᴴ Φ(Lᴴ gL) L⁻¹ with Φ(X) = ½(tril(X) + tril(X, -1)ᴴ): the adjoint of the Cholesky JVP
    dL = L Φ(L⁻¹ dA L⁻ᴴ) (Murray 2016, "Differentiation of the Cholesky decomposition")."""
    (L,) = ctx.saved_tensors
    if ctx.upper:
        L, gL = L.mH, gL.mH
    P = (L.mH @ gL).tril()
    P = 0.5 * (P + P.tril(-1).mH)
    gA = solve_triangular(L.mH, P, upper=True, left=True)
    return solve_triangular(L, gA, upper=False, left=False), None, None


cholesky_ex_op.register_autograd(_backward, setup_context=_setup)


def _check_args(fn: str, A, upper) -> Tensor:
    A = check_matrix(fn, "A", A, square=True)
    check_choice(fn, "upper", upper, (True, False))
    return A


@cholesky_ex_op.torch_route(torch.linalg.cholesky_ex)
def cholesky_ex(A: Tensor, *, upper: bool = False, check_errors: bool = False, out=None):
    """Twin of ``torch.linalg.cholesky_ex``: ``(L, info)`` without synchronising with the device.

    ``A``: ``(*, n, n)`` float32/float64. ``info[b] = k > 0`` when the leading minor of order ``k`` of
    batch element ``b`` is not positive-definite (``L`` is then incomplete, as in LAPACK).
    """
    fn = "metalcore.linalg.cholesky_ex"
    A = _check_args(fn, A, upper)
    plan = cholesky_ex_op.plan(A, upper, check_errors)
    if plan.prefers_torch:
        return write_out(fn, cholesky_ex.by_torch(A, upper=upper, check_errors=check_errors), out)
    cholesky_ex.remember(lambda A, **_: torch.return_types.linalg_cholesky_ex(
        cholesky_ex_op.call_planned(plan, A, upper, check_errors)))
    result = cholesky_ex_op.call_planned(plan, A, upper, check_errors)
    return write_out(fn, torch.return_types.linalg_cholesky_ex(result), out)


@cholesky_ex_op.torch_route(torch.linalg.cholesky)
def cholesky(A: Tensor, *, upper: bool = False, out=None) -> Tensor:
    """Twin of ``torch.linalg.cholesky``: ``L`` with ``A = L Lᴴ`` (``Uᴴ U`` when ``upper``).

    ``A``: ``(*, n, n)``, float32/float64. Raises ``torch.linalg.LinAlgError`` naming the batch
    element when a matrix is not positive-definite.

    >>> A = torch.randn(10, 32, 32, dtype=torch.float64); A = A @ A.mT + 32 * torch.eye(32)
    >>> L = metalcore.linalg.cholesky(A)
    """
    fn = "metalcore.linalg.cholesky"
    A = _check_args(fn, A, upper)
    plan = cholesky_ex_op.plan(A, upper, True)
    if plan.prefers_torch:
        return write_out(fn, cholesky.by_torch(A, upper=upper), out)
    cholesky.remember(lambda A, **_: cholesky_ex_op.call_planned(plan, A, upper, True)[0])
    L, _ = cholesky_ex_op.call_planned(plan, A, upper, True)
    return write_out(fn, L, out)
