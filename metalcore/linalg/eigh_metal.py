"""Symmetric eigendecomposition on Metal: the host side of ``jacobi_eigh_<dtype>`` in
``shaders/jacobi.metal``.

Layers: the shader → :func:`eigh_launch` → the ``metal`` implementation of ``metalcore::eigh``
(declared in :mod:`metalcore.linalg.eigh`), which serves ``linalg.eigh``, ``linalg.eigvalsh`` and
the top-level ``eigh``.

The algorithm is that of :mod:`metalcore.linalg.eigh_triton`: parallel two-sided Jacobi in the
round-robin ordering, on the matrix divided by ``max|a|``, rotating a pair while
``|a_pq| > √n·ε·√|a_pp|·√|a_qq|`` (scale-invariant), at most ``MAX_SWEEPS`` sweeps; a matrix that
does not converge, or holds NaN/Inf, comes back as all NaN without touching the rest of the batch.

One difference: the Triton kernel also stops rotating entries below an absolute floor ``ε·max|a|``,
added after pairs of small diagonal entries kept rotating on the H100 (up to n = 128, float32 and
float64). That floor gives up the relative accuracy of small eigenvalues (a graded ``D B D`` with
eigenvalues down to 1e-10 showed errors of 1e6 ``n·ε·|λ|`` with an absolute threshold here, against 3
without), and this kernel does not need it: its 2×2 block updates in a packed symmetric tile
converged in 10-14 sweeps on 16 matrices each of every hard family at n = 63 and 64.
One threadgroup per matrix holds the read triangle packed (8.1 KiB at n = 64) and the eigenvectors
(16 KiB) in threadgroup memory: float32 with ``n`` up to ``METALCORE_LINALG_MAX_N`` (64); float64
(no such type on Apple GPUs) and larger matrices stay on the reference through ``supports``, unless
an alternative path takes them (the two-stage solver, :mod:`metalcore.linalg.eigh_twostage_metal`,
when forced by ``use_path`` or chosen by a measured table).
"""

import math

import torch
from torch import Tensor

from metalcore import _metal, _selection
from metalcore.linalg._small_metal import fits, threads_for
from metalcore.linalg.eigh import eigh_op

SHADER = "jacobi"
# Jacobi converges quadratically once the off-diagonal is small: the test families of
# tests/linalg_matrices.py took 4-14 sweeps at n <= 64 in float32 (14: ill-conditioned, rank-deficient
# and graded at n = 63, 64; 16 matrices each). 30 is LAPACK gesvj's bound; more means an input Jacobi
# cannot finish, reported as NaN.
MAX_SWEEPS = 30


def eigh_launch(A: Tensor, upper: bool, compute_v: bool) -> tuple[Tensor, Tensor]:
    """``(L, Q)`` of symmetric ``A`` ``(*, n, n)`` float32, ``n <= METALCORE_LINALG_MAX_N``, reading
    the upper (``upper``) or lower triangle; ``L`` ascending, ``Q`` empty unless ``compute_v``."""
    n = A.shape[-1]
    L = _metal.empty(A.shape[:-1], dtype=A.dtype, device=A.device)
    Q = _metal.empty(A.shape, dtype=A.dtype, device=A.device) if compute_v else A.new_empty(0)
    nb = math.prod(A.shape[:-2])
    A3 = A.reshape(nb, n, n).contiguous()
    if nb == 0 or n == 0:
        return L, Q
    finfo = torch.finfo(A.dtype)
    tg = threads_for(n * n)
    lib = _metal.library(SHADER, A.device)
    # A buffer of zero size is not passed to a kernel: one dummy element stands in for Q.
    _metal.launch(lib, f"jacobi_eigh_{_metal.dtype_suffix(A.dtype)}", A3, L, Q if compute_v else A3.new_empty(1),
                  n, int(upper), int(compute_v), math.sqrt(n) * finfo.eps, finfo.tiny / finfo.eps, MAX_SWEEPS,
                  threads=nb * tg, group_size=tg)
    return L, Q


def _supported(A: Tensor, UPLO: str, compute_v: bool) -> bool:
    # Above the tile only where an alternative path takes the input (forced, or a measured table's:
    # the two-stage solver, metalcore/linalg/eigh_twostage_metal.py); else the reference, as before.
    return fits(A) or _selection.route("eigh", "metal", (A, UPLO, compute_v)) is not None


@eigh_op.implement("metal", supports=_supported)
def _eigh_metal(A: Tensor, UPLO: str, compute_v: bool) -> tuple[Tensor, Tensor]:
    return eigh_launch(A, UPLO == "U", compute_v)
