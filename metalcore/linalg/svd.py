"""Singular value decomposition ``A = U diag(S) Vᴴ``, singular values in descending order.

One registered op, ``metalcore::svd(A, full_matrices, compute_uv)``, serves ``linalg.svd``,
``linalg.svdvals`` and the top-level seed function :func:`seed_svd` (exported as ``metalcore.svd``).

Conventions, as in ``torch.linalg.svd``: ``U`` is ``(*, m, m)`` (``(*, m, k)`` when not
``full_matrices``), ``S`` is ``(*, k)`` with ``k = min(m, n)``, ``Vh`` is ``(*, n, n)`` (``(*, k, n)``).
The seed function returns ``V = Vhᴴ`` instead of ``Vh`` (``A = U diag(S) Vᵀ``), as the original
metalcore API did.
"""

import torch
from torch import Tensor

from metalcore._op import metalcore_op
from metalcore._validation import check_matrix
from metalcore.linalg._common import write_out

# The algorithms torch.linalg.svd's ``driver=`` may name; all of them are cuSOLVER's.
CUDA_DRIVERS = ("gesvd", "gesvdj", "gesvda")


@metalcore_op("svd")
def svd_op(A: Tensor, full_matrices: bool, compute_uv: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Reference: LAPACK ``gesdd`` (cuSOLVER on CUDA) through ``torch.linalg.svd``.

    Without ``compute_uv``, ``U`` and ``Vh`` are empty tensors of shape ``(0,)``, as in torch.
    """
    if not compute_uv:
        return A.new_empty(0), torch.linalg.svdvals(A).contiguous(), A.new_empty(0)
    U, S, Vh = torch.linalg.svd(A, full_matrices=full_matrices)
    return U.contiguous(), S.contiguous(), Vh.contiguous()


@svd_op.register_fake
def _(A, full_matrices, compute_uv):
    *batch, m, n = A.shape
    k = torch.sym_min(m, n)
    S = A.new_empty(*batch, k)
    if not compute_uv:
        return A.new_empty(0), S, A.new_empty(0)
    u, v = (m, n) if full_matrices else (k, k)
    return A.new_empty(*batch, m, u), S, A.new_empty(*batch, v, n)


def sort_columns(A: Tensor) -> tuple[Tensor, Tensor]:
    """``(A P, order)``: the columns of ``A`` ``(*, m, n)`` by descending ``max|a_ij|``, the cheap
    stand-in for QR with column pivoting in the Jacobi kernels' QR preconditioning (Drmač &
    Veselić). Without it, columns whose scales are graded in no particular order give an ``R`` on
    which one-sided Jacobi needs 24-35 sweeps (numpy model of the kernels, 64×64 fp64, column scales
    10^(-12..-30·U(0,1))), past the 30-sweep bound, so the answer was NaN; sorted, 5-7 sweeps
    (33×33 fp32 with rows and columns graded by 10^(-8·U): 5-6, against 13-99 unsorted and 17-99
    without QR). The max-norm needs no squares, so nothing overflows for huge-scaled input."""
    if A.shape[-2] == 0:
        return A, torch.arange(A.shape[-1], device=A.device).expand(A.shape[:-2] + A.shape[-1:])
    order = A.abs().amax(dim=-2).argsort(dim=-1, descending=True)
    return A.gather(-1, order.unsqueeze(-2).expand_as(A)), order


def unsort_columns(Vh: Tensor, order: Tensor) -> Tensor:
    """``Vᴴ`` of ``A`` from the ``Vᴴ`` of ``A P`` (:func:`sort_columns`): its column ``j`` goes to
    column ``order[j]``."""
    return Vh.new_empty(Vh.shape).scatter_(-1, order.unsqueeze(-2).expand_as(Vh), Vh)


def _setup(ctx, inputs, output):
    _, _, compute_uv = inputs
    ctx.compute_uv = compute_uv
    # Unused outputs must reach the backward as None, not zeros: with only gS given the gradient is
    # U diag(gS) Vh, finite even for repeated singular values, where the 1/E terms would give 0/0.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*output)


def svd_backward(gU: Tensor | None, gS: Tensor | None, gVh: Tensor | None, U: Tensor, S: Tensor,
                 Vh: Tensor) -> Tensor:
    """The adjoint of the reduced SVD, torch's ``svd_backward`` formula (real case).

    With ``E_ij = S_j² − S_i²`` (diagonal set to 1) and ``skew(X) = X − Xᴴ``::

        gA = U [(skew(Uᴴ gU) S + S skew(Vᴴ gV)) / E + diag(gS)] Vᴴ
             + (I − U Uᴴ) gU S⁻¹ Vᴴ          (m > n)
             + U S⁻¹ gVh (I − V Vᴴ)          (m < n)

    ``U``: ``(*, m, k)``, ``S``: ``(*, k)``, ``Vh``: ``(*, k, n)``. Finite only for distinct singular
    values when ``gU`` or ``gVh`` is given (the singular vectors are not differentiable otherwise).
    """
    m, n = U.shape[-2], Vh.shape[-1]
    if gU is None and gVh is None:
        if gS is None:
            return torch.zeros(*U.shape[:-2], m, n, dtype=U.dtype, device=U.device)
        return U @ (gS.unsqueeze(-1) * Vh) if m >= n else (U * gS.unsqueeze(-2)) @ Vh
    S2 = S * S
    k = S.shape[-1]
    E = S2.unsqueeze(-2) - S2.unsqueeze(-1) + torch.eye(k, dtype=S.dtype, device=S.device)
    if gU is not None:
        UhgU = U.mH @ gU
        UhgU = UhgU - UhgU.mH
    if gVh is not None:
        VhgV = Vh @ gVh.mH
        VhgV = VhgV - VhgV.mH
    if gU is not None and gVh is not None:
        inner = (UhgU * S.unsqueeze(-2) + S.unsqueeze(-1) * VhgV) / E
    elif gU is not None:
        inner = UhgU * (S.unsqueeze(-2) / E)
    else:
        inner = S.unsqueeze(-1) * (VhgV / E)
    if gS is not None:
        inner = inner + torch.diag_embed(gS)
    if m > n and gU is not None:
        gUSinv = gU / S.unsqueeze(-2)
        return (U @ inner + gUSinv - U @ (U.mH @ gUSinv)) @ Vh
    if m < n and gVh is not None:
        SinvgVh = gVh / S.unsqueeze(-1)
        return U @ (inner @ Vh + SinvgVh - (SinvgVh @ Vh.mH) @ Vh)
    return U @ (inner @ Vh) if m >= n else (U @ inner) @ Vh


def _backward(ctx, gU, gS, gVh):
    if not ctx.compute_uv:
        raise RuntimeError("metalcore svd: cannot differentiate an SVD computed with compute_uv=False "
                           "(the singular vectors are needed); use metalcore.linalg.svdvals, which "
                           "computes them when its input requires grad")
    U, S, Vh = ctx.saved_tensors
    # With full_matrices, the columns of U (rows of Vh) beyond k span the orthogonal complement in an
    # arbitrary basis; torch ignores their gradient, and so does metalcore.
    k = S.shape[-1]
    U, Vh = U[..., :k], Vh[..., :k, :]
    gU = None if gU is None else gU[..., :k]
    gVh = None if gVh is None else gVh[..., :k, :]
    return svd_backward(gU, gS, gVh, U, S, Vh), None, None


svd_op.register_autograd(_backward, setup_context=_setup)


def _check_driver(fn: str, A: Tensor, driver) -> None:
    if driver is None:
        return
    if A.device.type != "cuda":
        raise RuntimeError(f"{fn}: keyword argument driver= is only supported on CUDA inputs (it names a "
                           f"cuSOLVER algorithm); got driver={driver!r} for a tensor on {A.device.type}")
    if driver not in CUDA_DRIVERS:
        raise ValueError(f"{fn}: driver must be None or one of {', '.join(map(repr, CUDA_DRIVERS))}; "
                         f"got {driver!r}")


@svd_op.torch_route(torch.linalg.svd)
def svd(A: Tensor, full_matrices: bool = True, *, driver=None, out=None):
    """Twin of ``torch.linalg.svd``: ``(U, S, Vh)`` with ``A = U diag(S) Vh``, ``S`` descending.

    ``A``: ``(*, m, n)`` float32/float64. ``driver`` is accepted only for CUDA inputs, as in torch,
    where it names a cuSOLVER algorithm; metalcore's backends choose their own algorithm, so there it
    is validated and has no effect on the result (any driver computes the same decomposition).

    >>> U, S, Vh = metalcore.linalg.svd(torch.randn(100, 64, 64), full_matrices=False)
    """
    fn = "metalcore.linalg.svd"
    A = check_matrix(fn, "A", A)
    _check_driver(fn, A, driver)
    args = (A, bool(full_matrices), True)
    plan = svd_op.plan(*args)
    if plan.prefers_torch:
        return write_out(fn, svd.by_torch(A, full_matrices, driver=driver), out)
    svd.remember(lambda A, *_, **__: torch.return_types.linalg_svd(svd_op.call_planned(plan, A, *args[1:])))
    return torch.return_types.linalg_svd(write_out(fn, svd_op.call_planned(plan, *args), out))


@svd_op.torch_route(torch.linalg.svdvals)
def svdvals(A: Tensor, *, driver=None, out=None) -> Tensor:
    """Twin of ``torch.linalg.svdvals``: the singular values ``(*, min(m, n))``, descending.

    Differentiable like torch's: when ``A`` requires grad the singular vectors are computed too, so
    that the backward ``U diag(gS) Vh`` can run.
    """
    fn = "metalcore.linalg.svdvals"
    A = check_matrix(fn, "A", A)
    _check_driver(fn, A, driver)
    compute_uv = torch.is_grad_enabled() and A.requires_grad
    plan = svd_op.plan(A, False, compute_uv)
    if plan.prefers_torch:
        return write_out(fn, svdvals.by_torch(A, driver=driver), out)
    svdvals.remember(lambda A, *_, **__: svd_op.call_planned(plan, A, False, compute_uv)[1])
    _, S, _ = svd_op.call_planned(plan, A, False, compute_uv)
    return write_out(fn, S, out)


def seed_svd(A: Tensor, full_matrices: bool = False):
    """The top-level ``metalcore.svd``: ``(U, S, V)`` with ``A = U diag(S) Vᵀ``.

    Differs from :func:`metalcore.linalg.svd` in two ways, kept from the original metalcore API:
    it returns ``V`` (not ``Vh``) as a ``torch.return_types.svd``, and ``full_matrices`` defaults to
    ``False``. ``V`` is a transposed view of the op's contiguous ``Vh``.

    >>> U, S, V = metalcore.svd(torch.randn(8, 5, 3))
    >>> torch.allclose(U @ torch.diag_embed(S) @ V.mT, A)
    """
    A = check_matrix("metalcore.svd", "A", A)
    U, S, Vh = svd_op(A, bool(full_matrices), True)
    return torch.return_types.svd((U, S, Vh.mH))
