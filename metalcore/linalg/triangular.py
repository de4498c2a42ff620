"""Triangular solve (BLAS ``trsm``): ``A X = B`` or ``X A = B`` with ``A`` triangular.

The registered op ``metalcore::solve_triangular`` takes already-broadcast operands; the public
twin of ``torch.linalg.solve_triangular`` validates and broadcasts batch dimensions.
"""

import torch
from torch import Tensor

from metalcore._op import metalcore_op
from metalcore._validation import (LINALG_DTYPES, broadcast_batch, check_matrix, check_same_device,
                                   check_same_dtype)
from metalcore.linalg._common import write_out

_FN = "metalcore.linalg.solve_triangular"


@metalcore_op("solve_triangular")
def solve_triangular_op(A: Tensor, B: Tensor, upper: bool, left: bool, unitriangular: bool) -> Tensor:
    """Reference: ``torch.linalg.solve_triangular`` (LAPACK/cuBLAS ``trsm``)."""
    return torch.linalg.solve_triangular(A, B, upper=upper, left=left, unitriangular=unitriangular).contiguous()


@solve_triangular_op.register_fake
def _(A, B, upper, left, unitriangular):
    return B.new_empty(B.shape)


def _setup(ctx, inputs, output):
    A, B, upper, left, unitriangular = inputs
    ctx.flags = (upper, left, unitriangular)
    ctx.save_for_backward(A, output)


def _backward(ctx, gX):
    """gB = A⁻ᴴ gX (left) or gX A⁻ᴴ (right); gA = −gB Xᴴ (left) or −Xᴴ gB (right), projected onto
    the triangle that was read (the strict triangle when the diagonal is implicit)."""
    A, X = ctx.saved_tensors
    upper, left, unitriangular = ctx.flags
    gB = solve_triangular_op(A.mH, gX, not upper, left, unitriangular)
    gA = None
    if ctx.needs_input_grad[0]:
        gA = -(gB @ X.mH) if left else -(X.mH @ gB)
        diagonal = 1 if unitriangular else 0
        gA = gA.triu(diagonal) if upper else gA.tril(-diagonal)
    return gA, gB, None, None, None


solve_triangular_op.register_autograd(_backward, setup_context=_setup)


@solve_triangular_op.torch_route(torch.linalg.solve_triangular)
def solve_triangular(A: Tensor, B: Tensor, *, upper: bool, left: bool = True, unitriangular: bool = False,
                     out=None) -> Tensor:
    """Twin of ``torch.linalg.solve_triangular``: ``X`` with ``A X = B`` (``X A = B`` if not ``left``).

    ``A``: ``(*, n, n)`` triangular (only the ``upper``/lower triangle is read; its diagonal is taken
    as ones when ``unitriangular``). ``B``: ``(*, n, k)`` (``(*, k, n)`` when ``left=False``). Batch
    dimensions broadcast. float32/float64.
    """
    check_matrix(_FN, "A", A, square=True)
    check_matrix(_FN, "B", B, dtypes=LINALG_DTYPES)
    check_same_device(_FN, A=A, B=B)
    check_same_dtype(_FN, A=A, B=B)
    n = A.shape[-1]
    if (B.shape[-2] if left else B.shape[-1]) != n:
        side = "rows" if left else "columns"
        raise ValueError(f"{_FN}: B must have {n} {side} to match A of shape {tuple(A.shape)} "
                         f"(left={left}); got B of shape {tuple(B.shape)}")
    args = (*broadcast_batch(_FN, A, B), bool(upper), bool(left), bool(unitriangular))
    plan = solve_triangular_op.plan(*args)
    if plan.prefers_torch:
        return write_out(_FN, solve_triangular.by_torch(A, B, upper=upper, left=left, unitriangular=unitriangular), out)
    if args[0] is A and args[1] is B:
        flags = args[2:]
        solve_triangular.remember(lambda A, B, **_: solve_triangular_op.call_planned(plan, A, B, *flags))
    return write_out(_FN, solve_triangular_op.call_planned(plan, *args), out)


def trsm(A: Tensor, B: Tensor, upper: bool = False, left: bool = True, unitriangular: bool = False) -> Tensor:
    """BLAS-named triangular solve: ``X`` with ``A X = B`` (``X A = B`` if not ``left``).

    Same as :func:`solve_triangular`, with ``A`` lower-triangular by default.

    >>> L = torch.randn(8, 16, 16).tril() + 16 * torch.eye(16)
    >>> X = metalcore.trsm(L, torch.randn(8, 16, 4))
    """
    return solve_triangular(A, B, upper=upper, left=left, unitriangular=unitriangular)
