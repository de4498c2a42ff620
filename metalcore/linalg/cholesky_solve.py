"""Solve ``A X = B`` given the Cholesky factor of ``A``: twin of ``torch.cholesky_solve``.

The registered op ``metalcore::cholesky_solve(B, L, upper)`` takes operands whose batch dimensions
are already broadcast; :func:`cholesky_solve` validates and broadcasts them as torch does. Only the
lower (``upper``: upper) triangle of ``L`` is read. Autograd uses torch's formula, built from the
op itself and two products, so backward passes run the same kernels.
"""

import torch
from torch import Tensor

from metalcore._op import metalcore_op
from metalcore._validation import (LINALG_DTYPES, broadcast_batch, check_choice, check_matrix,
                                   check_same_device, check_same_dtype)
from metalcore.linalg._common import write_out

_FN = "metalcore.linalg.cholesky_solve"


@metalcore_op("cholesky_solve")
def cholesky_solve_op(B: Tensor, L: Tensor, upper: bool) -> Tensor:
    """Reference: LAPACK/cuSOLVER ``potrs`` through ``torch.cholesky_solve``."""
    return torch.cholesky_solve(B, L, upper=upper).contiguous()


@cholesky_solve_op.register_fake
def _(B, L, upper):
    return B.new_empty(B.shape)


def _setup(ctx, inputs, output):
    B, L, upper = inputs
    ctx.upper = upper
    ctx.save_for_backward(L, output)


def _backward(ctx, gX):
    """gB = A⁻¹ gX (A = L Lᴴ is Hermitian); gL = −(gB Xᴴ + X gBᴴ) L (lower) or −U (gB Xᴴ + X gBᴴ)
    (upper): torch's ``cholesky_solve_backward``, unprojected, as torch returns it."""
    L, X = ctx.saved_tensors
    gB = cholesky_solve_op(gX, L, ctx.upper)
    gL = None
    if ctx.needs_input_grad[1]:
        common = gB @ X.mH
        common = common + common.mH
        gL = -(L @ common) if ctx.upper else -(common @ L)
    return gB, gL, None


cholesky_solve_op.register_autograd(_backward, setup_context=_setup)


@cholesky_solve_op.torch_route(torch.cholesky_solve)
def cholesky_solve(B: Tensor, L: Tensor, upper: bool = False, *, out=None) -> Tensor:
    """Twin of ``torch.cholesky_solve``: ``X`` with ``A X = B`` where ``A = L Lᴴ`` (``Uᴴ U`` when
    ``upper``).

    ``B``: ``(*, n, k)``; ``L``: ``(*, n, n)``, its lower (upper) triangle read; batch dimensions
    broadcast. float32/float64.

    >>> A = torch.randn(8, 16, 16, dtype=torch.float64); A = A @ A.mT + 16 * torch.eye(16)
    >>> X = metalcore.linalg.cholesky_solve(torch.randn(8, 16, 2, dtype=torch.float64), torch.linalg.cholesky(A))
    """
    L = check_matrix(_FN, "L", L, square=True)
    B = check_matrix(_FN, "B", B, dtypes=LINALG_DTYPES)
    check_same_device(_FN, B=B, L=L)
    check_same_dtype(_FN, B=B, L=L)
    check_choice(_FN, "upper", upper, (True, False))
    n = L.shape[-1]
    if B.shape[-2] != n:
        raise ValueError(f"{_FN}: B must have {n} rows to match L of shape {tuple(L.shape)}; "
                         f"got B of shape {tuple(B.shape)}")
    Lb, Bb = broadcast_batch(_FN, L, B, "L", "B")
    plan = cholesky_solve_op.plan(Bb, Lb, bool(upper))
    if plan.prefers_torch:
        return write_out(_FN, cholesky_solve.by_torch(B, L, upper), out, cast=True)
    if Bb is B and Lb is L:
        flag = bool(upper)
        cholesky_solve.remember(lambda B, L, *_, **__: cholesky_solve_op.call_planned(plan, B, L, flag))
    return write_out(_FN, cholesky_solve_op.call_planned(plan, Bb, Lb, bool(upper)), out, cast=True)
