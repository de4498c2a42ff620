"""Eigendecomposition of symmetric matrices ``A = Q diag(L) Qᴴ``, eigenvalues ascending.

One registered op, ``metalcore::eigh(A, UPLO, compute_v)``, serves ``linalg.eigh``,
``linalg.eigvalsh`` and the top-level ``eigh``. Only the ``UPLO`` triangle of ``A`` is read
(``'L'``: lower, ``'U'``: upper), as in LAPACK; the other one may hold anything.
"""

import torch
from torch import Tensor

from metalcore._op import metalcore_op
from metalcore._validation import check_choice, check_matrix
from metalcore.linalg._common import write_out
from metalcore.linalg.cusolver_batched import MAX_BATCH


def _cuda_batch_limit(A: Tensor, UPLO: str, compute_v: bool) -> int | None:
    """torch.linalg.eigh on CUDA raises CUSOLVER_STATUS_INTERNAL_ERROR at a batch of 65536 matrices of
    side 2 <= n <= 32 (H100, torch 2.11; 4096 works), where cuSOLVER's batched Jacobi (syevjBatched)
    takes the whole batch at once: the op core hands it at most 32768 at a time, half the failing
    size. Each chunk is still one library call of thousands of matrices. Outside those sides torch
    takes the whole batch (65536×1×1 in 95 µs, where two chunks each sorted cost 414 µs; n > 32 is a
    loop of syevd calls), so nothing is split there."""
    return MAX_BATCH if 2 <= A.shape[-1] <= 32 else None


@metalcore_op("eigh", batched=("A",), max_batch={"cuda": _cuda_batch_limit})
def eigh_op(A: Tensor, UPLO: str, compute_v: bool) -> tuple[Tensor, Tensor]:
    """Reference: LAPACK ``syevd`` (cuSOLVER on CUDA) through ``torch.linalg.eigh``.

    Without ``compute_v``, the eigenvectors are an empty tensor of shape ``(0,)``, as in torch.
    """
    if not compute_v:
        L = torch.linalg.eigvalsh(A, UPLO=UPLO)
        return (L.sort(dim=-1).values if A.is_cuda else L).contiguous(), A.new_empty(0)
    L, Q = torch.linalg.eigh(A, UPLO=UPLO)
    if A.is_cuda:
        # cuSOLVER's batched Jacobi (syevjBatched, n <= 32) can return clustered eigenvalues a few
        # ulps out of order (seen on the H100, fp32, 1000×32); the contract is ascending.
        L, order = L.sort(dim=-1)
        Q = Q.gather(-1, order.unsqueeze(-2).expand_as(Q))
    return L.contiguous(), Q.contiguous()


@eigh_op.register_fake
def _(A, UPLO, compute_v):
    L = A.new_empty(A.shape[:-1])
    return L, (A.new_empty(A.shape) if compute_v else A.new_empty(0))


def _setup(ctx, inputs, output):
    ctx.compute_v = inputs[2]
    # Unused outputs reach the backward as None: with only gL the gradient Q diag(gL) Qᴴ is finite for
    # repeated eigenvalues, where the 1/E term would give 0/0.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*output)


def eigh_backward(gL: Tensor | None, gQ: Tensor | None, L: Tensor, Q: Tensor) -> Tensor:
    """The adjoint of the symmetric eigendecomposition, torch's convention (``linalg_eig_backward``).

    ``gA = Q (diag(gL) + skew(Qᴴ gQ) / E) Qᴴ`` with ``E_ij = L_j − L_i`` off the diagonal and
    ``skew(X) = ½(X − Xᴴ)``, the projection onto the tangent space of the orthogonal group (it
    removes the part of ``gQ`` that no perturbation of ``A`` can produce). The result is symmetric —
    the gradient with respect to a symmetric ``A`` — not restricted to the triangle that was read.
    Finite only for distinct eigenvalues when ``gQ`` is given.
    """
    if gQ is None:
        if gL is None:
            return torch.zeros_like(Q)
        return (Q * gL.unsqueeze(-2)) @ Q.mH
    n = L.shape[-1]
    QhgQ = Q.mH @ gQ
    QhgQ = 0.5 * (QhgQ - QhgQ.mH)
    # L_j − L_i vanishes on the diagonal; adding I sets it to 1 there, where QhgQ is zero.
    E = L.unsqueeze(-2) - L.unsqueeze(-1) + torch.eye(n, dtype=L.dtype, device=L.device)
    inner = QhgQ / E
    if gL is not None:
        inner = inner + torch.diag_embed(gL)
    return Q @ (inner @ Q.mH)


def _backward(ctx, gL, gQ):
    if not ctx.compute_v:
        raise RuntimeError("metalcore eigh: cannot differentiate an eigendecomposition computed with "
                           "compute_v=False (the eigenvectors are needed); use metalcore.linalg.eigvalsh, "
                           "which computes them when its input requires grad")
    L, Q = ctx.saved_tensors
    return eigh_backward(gL, gQ, L, Q), None, None


eigh_op.register_autograd(_backward, setup_context=_setup)


def _uplo(fn: str, UPLO) -> str:
    # torch accepts either case.
    check_choice(fn, "UPLO", UPLO.upper() if isinstance(UPLO, str) else UPLO, ("L", "U"))
    return UPLO.upper()


@eigh_op.torch_route(torch.linalg.eigh)
def eigh(A: Tensor, UPLO: str = "L", *, out=None):
    """Twin of ``torch.linalg.eigh``: ``(eigenvalues, eigenvectors)`` with ``A = Q diag(L) Qᴴ``.

    ``A``: ``(*, n, n)`` float32/float64, symmetric (only the ``UPLO`` triangle is read).
    ``eigenvalues``: ``(*, n)`` ascending; ``eigenvectors``: ``(*, n, n)``, orthonormal columns.

    >>> X = torch.randn(64, 32, 32); L, Q = metalcore.linalg.eigh(X @ X.mT)
    """
    fn = "metalcore.linalg.eigh"
    A = check_matrix(fn, "A", A, square=True)
    uplo = _uplo(fn, UPLO)
    plan = eigh_op.plan(A, uplo, True)
    if plan.prefers_torch:
        return write_out(fn, eigh.by_torch(A, UPLO), out)
    eigh.remember(lambda A, *_, **__: torch.return_types.linalg_eigh(eigh_op.call_planned(plan, A, uplo, True)))
    return torch.return_types.linalg_eigh(write_out(fn, eigh_op.call_planned(plan, A, uplo, True), out))


@eigh_op.torch_route(torch.linalg.eigvalsh)
def eigvalsh(A: Tensor, UPLO: str = "L", *, out=None) -> Tensor:
    """Twin of ``torch.linalg.eigvalsh``: the eigenvalues ``(*, n)`` of symmetric ``A``, ascending.

    Differentiable like torch's: when ``A`` requires grad the eigenvectors are computed too, so that
    the backward ``Q diag(gL) Qᴴ`` can run.
    """
    fn = "metalcore.linalg.eigvalsh"
    A = check_matrix(fn, "A", A, square=True)
    compute_v = torch.is_grad_enabled() and A.requires_grad
    uplo = _uplo(fn, UPLO)
    plan = eigh_op.plan(A, uplo, compute_v)
    if plan.prefers_torch:
        return write_out(fn, eigvalsh.by_torch(A, UPLO), out)
    eigvalsh.remember(lambda A, *_, **__: eigh_op.call_planned(plan, A, uplo, compute_v)[0])
    L, _ = eigh_op.call_planned(plan, A, uplo, compute_v)
    return write_out(fn, L, out)
