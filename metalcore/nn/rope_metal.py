"""RoPE on Metal: the host side of ``rope_<dtype>`` in ``shaders/rope.metal`` (the math is in rope.py).

One launch per direction rotates ``q`` and ``k`` together, one thread per rotated pair, every tensor
addressed through its strides (no copies; outputs laid out like the inputs, as the reference's
``empty_like``). float32, float16 and bfloat16 with math in float32; ``q``, ``k`` and the outputs
share one dtype, so the kernel covers the inputs whose ``promote_types(x.dtype, cos.dtype)`` is
``x``'s dtype: equal dtypes (Hugging Face's case), or float32 ``x`` with 16-bit ``cos``/``sin``
(widened to float32 here, exactly). A 16-bit ``x`` with wider ``cos`` (float32 output), float64, odd
head dims and shapes that only broadcast stay on the reference.
"""

import torch
from torch import Tensor

from metalcore import _metal
from metalcore.nn.rope import rope_bwd, rope_fwd

_SHADER = "rope"


def _output(x: Tensor) -> Tensor:
    """``empty_like(x)`` (the reference's layout), poisoned like :func:`metalcore._metal.empty`."""
    out = torch.empty_like(x)
    if _metal.poison_outputs:
        out.fill_(float("nan"))
    return out


def rope_launch(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *, backward: bool) -> tuple[Tensor, Tensor]:
    """``q`` (B, Hq, S, D), ``k`` (B, Hk, S, D), ``cos``/``sin`` (B or 1, S, D), any strides; returns
    ``(q_out, k_out)`` shaped and laid out like ``q``/``k``: the rotation, or its adjoint when ``backward``."""
    q_out, k_out = _output(q), _output(k)
    B, Hq, S, D = q.shape
    Hk = k.shape[1]
    half_dim = D // 2
    if B * S == 0 or half_dim == 0 or Hq + Hk == 0:
        return q_out, k_out
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    # A (1, S, D) cos/sin is shared by every batch entry: stride 0 over the batch.
    cs = [cos.stride(0) if cos.shape[0] > 1 else 0, *cos.stride()[1:]]
    ss = [sin.stride(0) if sin.shape[0] > 1 else 0, *sin.stride()[1:]]
    strides = [*q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(), *cs, *ss]
    # Threadgroups of METALCORE_ELEMENTWISE_GROUP threads: all pairs of a head (up to that many) and
    # as many heads of one position as fill the rest.
    group = _metal.constants()["METALCORE_ELEMENTWISE_GROUP"]
    gx = min(half_dim, group)
    gy = min(Hq + Hk, group // gx)
    _metal.launch(_metal.library(_SHADER, q.device), f"rope_{_metal.dtype_suffix(q.dtype)}",
                  q, k, q_out, k_out, cos, sin, strides, S, half_dim, Hq, Hk, B * S, int(backward),
                  threads=(half_dim, Hq + Hk, B * S), group_size=(gx, gy, 1))
    return q_out, k_out


def _supports(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> bool:
    if q.dtype not in _metal.KERNEL_DTYPES or k.dtype != q.dtype or sin.dtype != cos.dtype:
        return False
    if cos.dtype not in _metal.KERNEL_DTYPES or torch.promote_types(q.dtype, cos.dtype) != q.dtype:
        return False
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3:
        return False
    B, _, S, D = q.shape
    if B * S >= 2**31:  # flat positions are 32-bit in the kernel (element offsets are 64-bit)
        return False
    shapes_ok = (k.shape[0] == B and tuple(k.shape[2:]) == (S, D) and D % 2 == 0 and sin.shape == cos.shape
                 and cos.shape[0] in (1, B) and tuple(cos.shape[1:]) == (S, D))
    return shapes_ok and _metal.has_kernel(_metal.library(_SHADER, q.device), f"rope_{_metal.dtype_suffix(q.dtype)}")


@rope_fwd.implement("metal", supports=_supports)
def _rope_fwd_metal(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    return rope_launch(q, k, cos, sin, backward=False)


@rope_bwd.implement("metal", supports=_supports)
def _rope_bwd_metal(dq_out: Tensor, dk_out: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    return rope_launch(dq_out, dk_out, cos, sin, backward=True)
