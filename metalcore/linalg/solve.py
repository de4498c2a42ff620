"""General linear solve ``A X = B`` (``X A = B`` when ``left=False``) by LU with partial pivoting.

One registered op, ``metalcore::solve_ex(A, B, left, check_errors)``, serves ``linalg.solve``,
``linalg.solve_ex`` and the top-level ``solve``. The op takes ``B`` as a matrix ``(*, n, k)``
(``(*, k, n)`` when not ``left``) whose batch dimensions broadcast with ``A``'s; the public functions
turn vector right-hand sides into matrices first, by torch's rule: ``B`` is a (batch of) vector(s)
when ``B.ndim == 1``, or when ``B.ndim == A.ndim - 1`` and ``B.shape == A.shape[:-1]``.

``info`` has ``A``'s batch shape (one LU per matrix of ``A``, however ``B`` broadcasts), as in torch:
``info[b] = i > 0`` when ``U[i-1, i-1]`` of the LU of ``A[b]`` is exactly zero.
"""

import torch
from torch import Tensor

from metalcore._op import metalcore_op
from metalcore._validation import (LINALG_DTYPES, broadcast_batch_shape, check_matrix, check_same_device,
                                   check_same_dtype, check_tensor)
from metalcore.linalg._common import raise_for_info, write_out


def _check(result, A, B, left, check_errors):
    if check_errors:
        raise_for_info("linalg.solve", result[1],
                       lambda _: "The solver failed because the input matrix is singular.")


@metalcore_op("solve_ex", check=_check)
def solve_ex_op(A: Tensor, B: Tensor, left: bool, check_errors: bool) -> tuple[Tensor, Tensor]:
    """Reference: LAPACK ``getrf`` + ``getrs`` (cuSOLVER/MAGMA on CUDA) through ``torch.linalg.solve_ex``."""
    if B.dim() < A.dim():
        # Leading unit dimensions keep torch from reading B as a batch of vectors (same broadcast).
        B = B.reshape((1,) * (A.dim() - B.dim()) + tuple(B.shape))
    X, info = torch.linalg.solve_ex(A, B, left=left)
    return X.contiguous(), info


@solve_ex_op.register_fake
def _(A, B, left, check_errors):
    batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
    return B.new_empty(*batch, *B.shape[-2:]), A.new_empty(A.shape[:-2], dtype=torch.int32)


def _setup(ctx, inputs, output):
    A, B, left, _ = inputs
    ctx.left = left
    ctx.shapes = (A.shape, B.shape)
    ctx.save_for_backward(A, output[0])


def _backward(ctx, gX, _ginfo):
    """gB = A⁻ᴴ gX (left) or gX A⁻ᴴ (right); gA = −gB Xᴴ (left) or −Xᴴ gB (right); both summed over
    the batch dimensions along which the input was broadcast."""
    A, X = ctx.saved_tensors
    a_shape, b_shape = ctx.shapes
    gB, _ = solve_ex_op(A.mH, gX, ctx.left, False)
    gA = None
    if ctx.needs_input_grad[0]:
        gA = (-(gB @ X.mH) if ctx.left else -(X.mH @ gB)).sum_to_size(a_shape)
    return gA, gB.sum_to_size(b_shape), None, None


solve_ex_op.register_autograd(_backward, setup_context=_setup)


def _as_matrices(fn: str, A, B, left: bool) -> tuple[Tensor, Tensor, bool]:
    """Validate; return ``A``, ``B`` as a matrix stack, and whether ``B`` was a (batch of) vector(s)."""
    A = check_matrix(fn, "A", A, square=True)
    B = check_tensor(fn, "B", B, dtypes=LINALG_DTYPES, min_dim=1)
    check_same_device(fn, A=A, B=B)
    check_same_dtype(fn, A=A, B=B)
    vector = B.dim() == 1 or (B.dim() == A.dim() - 1 and B.shape == A.shape[:-1])
    if vector:
        if not left:
            raise ValueError(f"{fn}: B of shape {tuple(B.shape)} is read as a (batch of) vector(s), which "
                             "is only supported with left=True (as in torch); for X A = B pass B of "
                             "shape (*, k, n)")
        B = B.unsqueeze(-1)
    n = A.shape[-1]
    if (B.shape[-2] if left else B.shape[-1]) != n:
        side = "rows" if left else "columns"
        raise ValueError(f"{fn}: B must have {n} {side} to match A of shape {tuple(A.shape)} "
                         f"(left={left}); got B of shape {tuple(B.shape[:-1] if vector else B.shape)}")
    broadcast_batch_shape(fn, A, B)
    return A, B, vector


@solve_ex_op.torch_route(torch.linalg.solve_ex)
def solve_ex(A: Tensor, B: Tensor, *, left: bool = True, check_errors: bool = False, out=None):
    """Twin of ``torch.linalg.solve_ex``: ``(result, info)`` without synchronising with the device.

    ``info`` (int32, ``A.shape[:-2]``) is nonzero where ``A`` is exactly singular; ``check_errors``
    raises ``torch.linalg.LinAlgError`` naming the batch element instead.
    """
    fn = "metalcore.linalg.solve_ex"
    Am, Bm, vector = _as_matrices(fn, A, B, bool(left))
    args = (Am, Bm, bool(left), bool(check_errors))
    plan = solve_ex_op.plan(*args)
    if plan.prefers_torch:
        return write_out(fn, solve_ex.by_torch(A, B, left=left, check_errors=check_errors), out)
    if not vector and Am is A and Bm is B:
        flags = args[2:]
        solve_ex.remember(lambda A, B, **_: torch.return_types.linalg_solve_ex(
            solve_ex_op.call_planned(plan, A, B, *flags)))
    X, info = solve_ex_op.call_planned(plan, *args)
    return torch.return_types.linalg_solve_ex(write_out(fn, ((X.squeeze(-1) if vector else X), info), out))


@solve_ex_op.torch_route(torch.linalg.solve)
def solve(A: Tensor, B: Tensor, *, left: bool = True, out=None) -> Tensor:
    """Twin of ``torch.linalg.solve``: ``X`` with ``A X = B`` (``X A = B`` if not ``left``).

    ``A``: ``(*, n, n)``; ``B``: ``(*, n, k)``, ``(*, k, n)`` when not ``left``, or a (batch of)
    vector(s) ``(*, n)`` (see the module docstring for torch's rule). Batch dimensions broadcast.
    float32/float64. Raises ``torch.linalg.LinAlgError`` naming the batch element when a matrix of
    ``A`` is singular.

    >>> X = metalcore.linalg.solve(torch.randn(8, 3, 3), torch.randn(8, 3))
    """
    fn = "metalcore.linalg.solve"
    Am, Bm, vector = _as_matrices(fn, A, B, bool(left))
    args = (Am, Bm, bool(left), True)
    plan = solve_ex_op.plan(*args)
    if plan.prefers_torch:
        return write_out(fn, solve.by_torch(A, B, left=left), out)
    if not vector and Am is A and Bm is B:
        flags = args[2:]
        solve.remember(lambda A, B, **_: solve_ex_op.call_planned(plan, A, B, *flags)[0])
    X, _ = solve_ex_op.call_planned(plan, *args)
    return write_out(fn, X.squeeze(-1) if vector else X, out)
