"""The polar decomposition's orthogonal factor: ``A = U_p H`` with ``U_p = U Vᴴ`` from ``A = U S Vᴴ``."""

from torch import Tensor

from metalcore._validation import check_choice, check_matrix
from metalcore.linalg.svd import svd_op

METHODS = ("svd",)


def polar(A: Tensor, *, method: str = "svd") -> Tensor:
    """The orthogonal polar factor ``U Vᵀ`` of ``A`` ``(*, m, n)``: the matrix with orthonormal columns
    (rows, when m < n) nearest to ``A`` in the Frobenius norm — the update direction of Muon.

    ``method='svd'`` computes it through metalcore's SVD (the only method for now). Differentiable
    where ``A`` has distinct nonzero singular values. float32/float64.

    >>> O = metalcore.polar(torch.randn(16, 64, 32))   # O.mT @ O == I
    """
    fn = "metalcore.polar"
    A = check_matrix(fn, "A", A)
    check_choice(fn, "method", method, METHODS)
    U, _, Vh = svd_op(A, False, True)
    return U @ Vh
