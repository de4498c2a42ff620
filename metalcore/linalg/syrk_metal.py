r"""``alpha·A Aᵀ + beta·C`` on Metal, upper tiles only: the host side of ``syrk_<dtype>`` in
``shaders/gram.metal``, and the ``metal`` implementation of ``metalcore::gram_poly`` (two launches,
``G = syrk(X)`` then ``syrk(G, C=G, alpha=c, beta=b) = b·G + c·G Gᵀ``, as the Triton twin does).

Why upper tiles only rather than a plain tiled product: the tile-pair enumeration costs one square
root per threadgroup, and it halves the multiply-adds (``T(T+1)/2`` of ``T²`` tiles) and makes ``G``
exactly symmetric, which ``G² = G Gᵀ`` in the second launch needs for ``b·G + c·G²`` to stay
symmetric to the bit, as the Triton kernel's result is.

bf16/fp16/fp32 inputs, fp32 accumulation; ``G`` is rounded to the input dtype between the launches,
as the reference does. Not chosen automatically on MPS: without ``simdgroup_matrix`` (which the
shader executor cannot run, so the shader does not use it) the kernel multiplies with scalar FMAs,
and whether half the FLOPs at that rate beats MPS's full matrix product needs timing on a Mac that
this project does not have; ``metalcore.use_backend("metal")`` runs it.
"""

import math

from torch import Tensor

from metalcore import _metal
from metalcore.linalg.syrk import gram_poly_op

_SHADER = "gram"


def _tile() -> tuple[int, int]:
    """``(GRAM_BLOCK, GRAM_SIDE)`` from shaders/gram.metal: rows of an output tile and threads per side
    of a threadgroup, defined once, in the shader."""
    consts = _metal.constants(_SHADER)
    return consts["GRAM_BLOCK"], consts["GRAM_SIDE"]


def syrk_launch(A: Tensor, C: Tensor | None, alpha: float, beta: float) -> Tensor:
    """``alpha·A Aᵀ + beta·C`` for ``A`` ``(batch, m, k)`` (any strides) and ``C`` ``(batch, m, m)``
    or ``None``; float32/float16/bfloat16. Returns ``(batch, m, m)`` contiguous in ``A``'s dtype."""
    batch, m, k = A.shape
    out = _metal.empty((batch, m, m), dtype=A.dtype, device=A.device)
    if out.numel() == 0:
        return out
    has_c = C is not None and beta != 0.0  # torch.baddbmm's rule: beta = 0 ignores C, NaN included
    block, side = _tile()
    tiles = math.ceil(m / block)
    pairs = tiles * (tiles + 1) // 2
    c_strides = list(C.stride()) if has_c else [0, 0, 0]
    _metal.launch(_metal.library(_SHADER, A.device), f"syrk_{_metal.dtype_suffix(A.dtype)}",
                  A, C if has_c else A, out, [*A.stride(), *c_strides], m, k, float(alpha), float(beta), int(has_c),
                  threads=(pairs * side, side, batch), group_size=(side, side, 1))
    return out


def _supports(X: Tensor, b: float, c: float) -> bool:
    if X.dtype not in _metal.KERNEL_DTYPES or X.dim() != 3 or X.shape[1] >= 2**16:
        return False  # m < 2^16 keeps tile-pair indices and m·m offsets inside the kernel's 32/64 bits
    return _metal.has_kernel(_metal.library(_SHADER, X.device), f"syrk_{_metal.dtype_suffix(X.dtype)}")


@gram_poly_op.implement("metal", supports=_supports, automatic=False)
def _gram_poly_metal(X: Tensor, b: float, c: float) -> Tensor:
    G = syrk_launch(X, None, 1.0, 0.0)
    return syrk_launch(G, G, c, b)  # G is exactly symmetric (see above), so G² = G Gᵀ
