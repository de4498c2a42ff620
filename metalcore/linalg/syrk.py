r"""The symmetric products of one Newton–Schulz / Polar Express step: ``b·G + c·G²`` with ``G = X Xᵀ``.

Each step of the odd quintic iteration (:mod:`metalcore.linalg.polar`) is
``X ← a X + (b G + c G²) X``: three products, two of them symmetric. ``G = X Xᵀ`` is, and so is
``G² = G Gᵀ`` (``G`` being symmetric), so a kernel need only compute the tiles on and above the
diagonal of each and mirror them (BLAS ``syrk``): ``T(T+1)/2`` of ``T²`` output tiles, about half
the FLOPs (``(T+1)/(2T)`` of them: 0.52 at ``T = 32``, 0.56 at ``T = 8``). With ``m ≤ n`` (polar
iterates on the wide orientation) the step costs ``2m²n + 2m³ + 2m²n`` FLOP in plain products,
``m²n + m³ + 2m²n`` with the halves: 0.67× for a square matrix, at best a 1.5× faster step.

The registered op ``metalcore::gram_poly`` is internal (polar's building block, not a public
function): ``X`` ``(batch, m, n)``, any strides, floating point → ``b·G + c·G²`` ``(batch, m, m)``
contiguous in ``X``'s dtype, with ``G = X Xᵀ`` rounded to that dtype first (as the iteration always
did). The reference is the plain batched product ``torch.bmm`` then ``torch.baddbmm(G, G, G)``:
bit-identical to the iteration polar ran before this op existed, and on the CPU to
``torch.optim.Muon``'s (which multiplies ``G·G``; ``G·Gᵀ`` goes through another BLAS path there and
rounds differently in bf16). The Triton kernel (:mod:`metalcore.linalg.syrk_triton`) computes
``G`` and then ``b·G + c·G Gᵀ`` with the halved product, ``b·G`` fused into the second one's epilogue.
"""

import torch
from torch import Tensor

from metalcore._op import metalcore_op


@metalcore_op("gram_poly")
def gram_poly_op(X: Tensor, b: float, c: float) -> Tensor:
    """Reference: ``G = X Xᵀ`` then ``b·G + c·G G``, full batched products (not halved)."""
    G = torch.bmm(X, X.mT)
    return torch.baddbmm(G, G, G, beta=b, alpha=c)


@gram_poly_op.register_fake
def _(X, b, c):
    return X.new_empty(X.shape[0], X.shape[1], X.shape[1])


def _setup(ctx, inputs, output):
    X, b, c = inputs
    ctx.coefficients = (b, c)
    ctx.save_for_backward(X)


def _backward(ctx, g):
    """``dS = b dG + c (dG G + G dG)`` with symmetric ``G`` gives ``gG = b g + c (g G + G g)``; then
    ``dG = dX Xᵀ + X dXᵀ`` gives ``gX = (gG + gGᵀ) X``. ``G`` is recomputed (one product)."""
    (X,) = ctx.saved_tensors
    b, c = ctx.coefficients
    G = X @ X.mT
    gG = b * g + c * (g @ G + G @ g)
    return (gG + gG.mT) @ X, None, None


gram_poly_op.register_autograd(_backward, setup_context=_setup)
