"""Householder primitives with LAPACK semantics: ``geqr2``, ``larft``, ``larfb``, ``householder_product``.

A Householder reflector is ``H = I − τ v vᴴ``. A sequence of ``k`` of them is stored LAPACK's way
(``storev='C'``): the vectors are the columns of ``V`` ``(*, m, k)``, unit lower trapezoidal — the
unit diagonal is implicit and the entries above it are never read — with the scalars in ``tau``
``(*, k)``. The block form (``direct='F'``) is ``H₁ H₂ ⋯ H_k = I − V T Vᴴ`` with ``T`` ``(*, k, k)``
upper triangular.

* ``geqr2(A) -> (QR, tau)``: the compact QR of ``torch.geqrf`` (``R`` on and above the diagonal of
  ``QR``, the reflectors below it). Not differentiable, like ``torch.geqrf``.
* ``larft(V, tau) -> T``: the triangular factor of the block reflector.
* ``larfb(V, T, C, left, transpose)``: applies ``H = I − V T Vᴴ`` (``Hᴴ`` when ``transpose``) to ``C``
  from the left (``H C``) or the right (``C H``), like ``torch.ormqr``.
* ``householder_product(A, tau) -> Q``: the first ``n`` columns of ``H₁ ⋯ H_k`` (twin of
  ``torch.linalg.householder_product``).

The backward of ``larft``, ``larfb`` and ``householder_product`` recomputes the op through the plain
PyTorch composites below (``torch.func.vjp``), whatever backend ran the forward.
"""

import torch
from torch import Tensor

from metalcore._op import metalcore_op
from metalcore._validation import LINALG_DTYPES, check_matrix, check_same_device, check_same_dtype, check_tensor
from metalcore.linalg._common import write_out


def _unit_lower(V: Tensor) -> Tensor:
    """The reflectors of ``V`` ``(*, m, k)``: its strict lower part plus the implicit unit diagonal."""
    m, k = V.shape[-2:]
    return V.tril(-1) + torch.eye(m, k, dtype=V.dtype, device=V.device)


def larft_composite(V: Tensor, tau: Tensor) -> Tensor:
    """``T = (I + diag(τ) S)⁻¹ diag(τ)`` with ``S = striu(Vᴴ V)``.

    This is ``T⁻¹ = diag(1/τ) + striu(VᴴV)`` (Schreiber & Van Loan 1989; LAPACK's ``larft``
    recurrence is its column-by-column back substitution) written so that ``τ_i = 0`` needs no special
    case: the unit triangular ``I + diag(τ) S`` is always invertible, and row and column ``i`` of ``T``
    come out zero, as LAPACK sets them.
    """
    Vu = _unit_lower(V)
    k = tau.shape[-1]
    DS = tau.unsqueeze(-1) * (Vu.mH @ Vu).triu(1)
    eye = torch.eye(k, dtype=V.dtype, device=V.device)
    return torch.linalg.solve_triangular(eye + DS, torch.diag_embed(tau), upper=True, unitriangular=True)


def larfb_composite(V: Tensor, T: Tensor, C: Tensor, left: bool, transpose: bool) -> Tensor:
    """``C − V T Vᴴ C`` (left) or ``C − C V T Vᴴ`` (right), ``Tᴴ`` for ``T`` when ``transpose``; only
    the upper triangle of ``T`` is read."""
    Vu = _unit_lower(V)
    T = T.triu()
    if transpose:
        T = T.mH
    if left:
        return C - Vu @ (T @ (Vu.mH @ C))
    return C - ((C @ Vu) @ T) @ Vu.mH


def householder_product_composite(A: Tensor, tau: Tensor) -> Tensor:
    """``(I − V T Vᴴ)`` applied to the first ``n`` columns of the identity, ``V`` = first ``k`` columns of ``A``."""
    m, n = A.shape[-2:]
    k = tau.shape[-1]
    V = A[..., :k]
    eye = torch.eye(m, n, dtype=A.dtype, device=A.device)
    return larfb_composite(V, larft_composite(V, tau), eye, True, False)


def _vjp_autograd(op, composite, n_tensors: int) -> None:
    """Register, as ``op``'s backward, the vector-Jacobian product of ``composite`` (the same function in
    plain PyTorch) over the op's first ``n_tensors`` arguments; the rest are flags."""

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:n_tensors])
        ctx.flags = tuple(inputs[n_tensors:])

    def backward(ctx, grad):
        _, vjp = torch.func.vjp(lambda *tensors: composite(*tensors, *ctx.flags), *ctx.saved_tensors)
        return (*vjp(grad), *(None for _ in ctx.flags))

    op.register_autograd(backward, setup_context=setup_context)


# --- geqr2 ----------------------------------------------------------------------------------------

@metalcore_op("geqr2")
def geqr2_op(A: Tensor) -> tuple[Tensor, Tensor]:
    """Reference: LAPACK ``geqrf`` through ``torch.geqrf`` (the blocked ``geqr2``: same factorization and storage)."""
    QR, tau = torch.geqrf(A)
    return QR.contiguous(), tau.contiguous()


@geqr2_op.register_fake
def _(A):
    *batch, m, n = A.shape
    return A.new_empty(A.shape), A.new_empty(*batch, torch.sym_min(m, n))


def _geqr2_backward(ctx, gQR, gtau):
    raise NotImplementedError("the derivative for metalcore geqr2 is not implemented (as for torch.geqrf); "
                              "differentiate through metalcore.linalg.qr instead")


def _geqr2_setup(ctx, inputs, output):
    pass


geqr2_op.register_autograd(_geqr2_backward, setup_context=_geqr2_setup)


def geqr2(A: Tensor):
    """Compact Householder QR, the output of ``torch.geqrf``: ``(QR, tau)``.

    ``A``: ``(*, m, n)`` float32/float64. ``QR`` ``(*, m, n)`` holds ``R`` on and above the diagonal
    and the reflectors ``v_i`` below it (unit diagonal implicit); ``tau`` ``(*, min(m, n))``.
    ``Q = householder_product(QR[..., :k], tau)`` with ``k = min(m, n)``. Not differentiable.

    >>> QR, tau = metalcore.geqr2(torch.randn(4, 6, 3, dtype=torch.float64))
    """
    A = check_matrix("metalcore.geqr2", "A", A)
    return torch.return_types.geqrf(geqr2_op(A))


# --- larft ----------------------------------------------------------------------------------------

@metalcore_op("larft")
def larft_op(V: Tensor, tau: Tensor) -> Tensor:
    """Reference: :func:`larft_composite`."""
    return larft_composite(V, tau).contiguous()


@larft_op.register_fake
def _(V, tau):
    k = tau.shape[-1]
    return V.new_empty(*V.shape[:-2], k, k)


_vjp_autograd(larft_op, larft_composite, 2)


def _check_reflectors(fn: str, V, tau) -> tuple[Tensor, Tensor]:
    V = check_matrix(fn, "V", V)
    tau = check_tensor(fn, "tau", tau, dtypes=LINALG_DTYPES, min_dim=1)
    check_same_device(fn, V=V, tau=tau)
    check_same_dtype(fn, V=V, tau=tau)
    m, k = V.shape[-2:]
    if tau.shape[-1] != k or m < k:
        raise ValueError(f"{fn}: V must be (*, m, k) with m >= k reflectors and tau (*, k); got V of shape "
                         f"{tuple(V.shape)} and tau of shape {tuple(tau.shape)}")
    if tau.shape[:-1] != V.shape[:-2]:
        raise ValueError(f"{fn}: the batch dimensions of tau {tuple(tau.shape[:-1])} must equal those of V "
                         f"{tuple(V.shape[:-2])}")
    return V, tau


def larft(V: Tensor, tau: Tensor) -> Tensor:
    """Triangular factor of a block reflector (LAPACK ``larft``, ``direct='F'``, ``storev='C'``).

    ``V``: ``(*, m, k)``, ``m ≥ k``, unit lower trapezoidal (diagonal and upper part not read);
    ``tau``: ``(*, k)``. Returns ``T`` ``(*, k, k)`` upper triangular with
    ``H₁ ⋯ H_k = I − V T Vᴴ``, ``H_i = I − τ_i v_i v_iᴴ``. A zero ``τ_i`` (``H_i = I``) gives a zero
    row and column ``i``, as in LAPACK.

    >>> QR, tau = metalcore.geqr2(A); T = metalcore.larft(QR, tau)   # A tall, (*, m, n)
    """
    V, tau = _check_reflectors("metalcore.larft", V, tau)
    return larft_op(V, tau)


# --- larfb ----------------------------------------------------------------------------------------

@metalcore_op("larfb")
def larfb_op(V: Tensor, T: Tensor, C: Tensor, left: bool, transpose: bool) -> Tensor:
    """Reference: :func:`larfb_composite`."""
    return larfb_composite(V, T, C, left, transpose).contiguous()


@larfb_op.register_fake
def _(V, T, C, left, transpose):
    return C.new_empty(C.shape)


_vjp_autograd(larfb_op, larfb_composite, 3)


def larfb(V: Tensor, T: Tensor, C: Tensor, left: bool = True, transpose: bool = False) -> Tensor:
    """Apply a block reflector (LAPACK ``larfb``, ``direct='F'``, ``storev='C'``).

    With ``H = I − V T Vᴴ``: returns ``H C`` (``left``), ``C H`` (not ``left``), and ``Hᴴ`` in place
    of ``H`` when ``transpose`` — the argument names of ``torch.ormqr``, so
    ``larfb(V, larft(V, tau), C, left, transpose) == torch.ormqr(V, tau, C, left, transpose)``.

    ``V``: ``(*, m, k)`` unit lower trapezoidal (``m`` = rows of ``C`` when ``left``, its columns
    otherwise); ``T``: ``(*, k, k)``, only its upper triangle is read; ``C``: ``(*, p, q)``. Batch
    dimensions broadcast.
    """
    fn = "metalcore.larfb"
    V = check_matrix(fn, "V", V)
    T = check_matrix(fn, "T", T, square=True)
    C = check_matrix(fn, "C", C)
    check_same_device(fn, V=V, T=T, C=C)
    check_same_dtype(fn, V=V, T=T, C=C)
    m, k = V.shape[-2:]
    if m < k or T.shape[-1] != k:
        raise ValueError(f"{fn}: V must be (*, m, k) with m >= k and T (*, k, k); got V of shape "
                         f"{tuple(V.shape)} and T of shape {tuple(T.shape)}")
    if (C.shape[-2] if left else C.shape[-1]) != m:
        side = "rows" if left else "columns"
        raise ValueError(f"{fn}: C must have {m} {side} to match V of shape {tuple(V.shape)} (left={left}); "
                         f"got C of shape {tuple(C.shape)}")
    try:
        batch = torch.broadcast_shapes(V.shape[:-2], T.shape[:-2], C.shape[:-2])
    except RuntimeError:
        raise ValueError(f"{fn}: the batch dimensions of V {tuple(V.shape[:-2])}, T {tuple(T.shape[:-2])} "
                         f"and C {tuple(C.shape[:-2])} cannot be broadcast together") from None
    V, T, C = (x.expand(*batch, *x.shape[-2:]) for x in (V, T, C))
    return larfb_op(V, T, C, bool(left), bool(transpose))


# --- householder_product --------------------------------------------------------------------------

@metalcore_op("householder_product")
def householder_product_op(A: Tensor, tau: Tensor) -> Tensor:
    """Reference: LAPACK ``orgqr`` (cuSOLVER on CUDA) through ``torch.linalg.householder_product``."""
    return torch.linalg.householder_product(A, tau).contiguous()


@householder_product_op.register_fake
def _(A, tau):
    return A.new_empty(A.shape)


_vjp_autograd(householder_product_op, householder_product_composite, 2)


def householder_product(A: Tensor, tau: Tensor, *, out=None) -> Tensor:
    """Twin of ``torch.linalg.householder_product``: the first ``n`` columns of ``H₁ ⋯ H_k``.

    ``A``: ``(*, m, n)`` with ``m ≥ n``, its first ``k`` columns the reflectors (unit lower
    trapezoidal; the rest of ``A`` is not read); ``tau``: ``(*, k)`` with ``k ≤ n`` and the same batch
    dimensions. Differentiable in ``A`` and ``tau``.

    >>> QR, tau = torch.geqrf(A); Q = metalcore.linalg.householder_product(QR, tau)
    """
    fn = "metalcore.linalg.householder_product"
    A = check_matrix(fn, "A", A)
    tau = check_tensor(fn, "tau", tau, dtypes=LINALG_DTYPES, min_dim=1)
    check_same_device(fn, A=A, tau=tau)
    check_same_dtype(fn, A=A, tau=tau)
    m, n = A.shape[-2:]
    if m < n:
        raise ValueError(f"{fn}: A must have at least as many rows as columns; got shape {tuple(A.shape)}")
    if tau.dim() != A.dim() - 1 or tau.shape[:-1] != A.shape[:-2]:
        raise ValueError(f"{fn}: tau must have shape (*, k) with the batch dimensions of A "
                         f"{tuple(A.shape[:-2])}; got tau of shape {tuple(tau.shape)}")
    if tau.shape[-1] > n:
        raise ValueError(f"{fn}: tau must hold at most n = {n} scalars (one per column of A); "
                         f"got tau of shape {tuple(tau.shape)}")
    return write_out(fn, householder_product_op(A, tau), out, cast=True)
