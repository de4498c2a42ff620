"""Flash attention on Metal: the host side of ``shaders/attention.metal`` (the contract and the
reference are in attention.py; the algorithm is that of attention_triton.py).

Layers: ``sdpa_fwd_<dtype>`` / ``sdpa_bwd_dq_<dtype>`` + ``sdpa_bwd_dkdv_<dtype>`` →
:func:`sdpa_fwd_launch` / :func:`sdpa_bwd_launch` (plain tensors) → the ``metal`` implementations of
``metalcore::sdpa_fwd`` and ``metalcore::sdpa_bwd``.

Scope (``supports``): q/k/v float32, float16 or bfloat16 in one dtype, computed in float32; head
dims ``E`` and ``Ev`` from 1 to 128 (each its own); causal or not; grouped-query attention; any
sequence lengths; ``attn_mask`` bool, float32 or the inputs' dtype, each dimension 1 or full. float64
and larger head dims run on the reference. Inputs and the mask are read through their strides; the
outputs are contiguous.

The backward launches the dQ kernel first: it also writes ``delta = rowsum(dO ∘ O)`` per query row,
which the dK/dV kernel then reads (launches on one queue run in order).

>>> with metalcore.use_backend("metal"):
...     out, lse = sdpa_fwd(q, k, v, None, True, 0.125)
"""

import math
from typing import Optional

import torch
from torch import Tensor

from metalcore import _metal
from metalcore.nn.attention import sdpa_bwd, sdpa_fwd

_SHADER = "attention"
# SIMD-groups per threadgroup, one row each (512 threads): threadgroup memory does not depend on it
# (see the shader's header), so it is chosen for occupancy; a side with fewer rows gets fewer.
ROWS_PER_GROUP = 16
# The kernels work in base 2 (exp2): the host hands them scale · log2(e).
_LOG2E = math.log2(math.e)


def max_head_dim() -> int:
    """``ATTN_MAX_HEAD_DIM`` of the shader: the head dims its register rows hold (4 per lane)."""
    return _metal.constants(_SHADER)["ATTN_MAX_HEAD_DIM"]


def _supports(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor]) -> bool:
    if q.dtype not in _metal.KERNEL_DTYPES or not q.dtype == k.dtype == v.dtype:
        return False
    if not (q.dim() == k.dim() == v.dim() == 4 and k.shape[:3] == v.shape[:3] and k.shape[0] == q.shape[0]
            and k.shape[-1] == q.shape[-1] and k.shape[1] > 0 and q.shape[1] % k.shape[1] == 0):
        return False
    if not (0 < q.shape[-1] <= max_head_dim() and 0 < v.shape[-1] <= max_head_dim()):
        return False
    if attn_mask is not None and (attn_mask.dim() != 4 or attn_mask.dtype not in (torch.bool, torch.float32, q.dtype)):
        return False
    if q.dtype == torch.bfloat16:  # bfloat kernels need Metal 3.1 (macOS 14)
        return _metal.has_kernel(_metal.library(_SHADER, q.device), "sdpa_fwd_bfloat")
    return True


def _mask_args(attn_mask: Optional[Tensor], q: Tensor) -> tuple[list[Tensor], int, list[int]]:
    """The shader's three mask buffers (bool as bytes, float32, the inputs' dtype: one real, the
    others one-element placeholders), its ``mask_kind`` and its strides (0 on broadcast dimensions)."""
    placeholders = [q.new_zeros(1, dtype=torch.uint8), q.new_zeros(1, dtype=torch.float32), q.new_zeros(1)]
    kinds = _metal.constants(_SHADER)
    if attn_mask is None:
        return placeholders, kinds["ATTN_MASK_NONE"], [0, 0, 0, 0]
    strides = [0 if size == 1 else stride for size, stride in zip(attn_mask.shape, attn_mask.stride())]
    if attn_mask.dtype == torch.bool:
        placeholders[0], kind = attn_mask.view(torch.uint8), kinds["ATTN_MASK_BOOL"]
    elif attn_mask.dtype == torch.float32:
        placeholders[1], kind = attn_mask, kinds["ATTN_MASK_FLOAT"]
    else:
        placeholders[2], kind = attn_mask, kinds["ATTN_MASK_INPUT_DTYPE"]
    return placeholders, kind, strides


def _grid(rows: int, batch: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """``threads``/``group_size`` for one SIMD-group per row, up to ROWS_PER_GROUP rows a threadgroup."""
    per_group = min(ROWS_PER_GROUP, rows)
    simd = _metal.constants()["METALCORE_SIMD_WIDTH"]
    return (math.ceil(rows / per_group) * per_group * simd, batch), (per_group * simd, 1)


def _common(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], is_causal: bool) -> tuple[list, list]:
    """Mask buffers, and the strides + sizes every kernel takes after its tensors."""
    B, H, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    masks, kind, mask_strides = _mask_args(attn_mask, q)
    strides = [*q.stride(), *k.stride(), *v.stride(), *mask_strides]
    return masks, [strides, H, H // Hkv, L, S, E, Ev, int(is_causal), kind]


def sdpa_fwd_launch(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], is_causal: bool,
                    scale: float) -> tuple[Tensor, Tensor]:
    """``q`` (B, H, L, E), ``k`` (B, Hkv, S, E), ``v`` (B, Hkv, S, Ev), any strides; ``Hkv`` divides
    ``H``. Returns ``out`` (B, H, L, Ev) contiguous in q's dtype and ``lse`` (B, H, L) float32."""
    B, H, L, _ = q.shape
    S, Ev = k.shape[2], v.shape[3]
    out = _metal.empty((B, H, L, Ev), dtype=q.dtype, device=q.device)
    lse = _metal.empty((B, H, L), dtype=torch.float32, device=q.device)
    if B * H * L == 0:
        return out, lse
    if S == 0:  # nothing to attend: torch's safe softmax gives 0, and lse is −inf
        return out.zero_(), lse.fill_(-math.inf)
    masks, sizes = _common(q, k, v, attn_mask, is_causal)
    threads, group = _grid(L, B * H)
    _metal.launch(_metal.library(_SHADER, q.device), f"sdpa_fwd_{_metal.dtype_suffix(q.dtype)}", q, k, v, *masks,
                  out, lse, *sizes, float(scale) * _LOG2E, threads=threads, group_size=group)
    return out, lse


def sdpa_bwd_launch(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                    attn_mask: Optional[Tensor], is_causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk, dv)``, contiguous, in the inputs' dtypes; shapes as :func:`sdpa_fwd_launch`."""
    B, H, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    dq = _metal.empty((B, H, L, E), dtype=q.dtype, device=q.device)
    dk = _metal.empty((B, Hkv, S, E), dtype=k.dtype, device=k.device)
    dv = _metal.empty((B, Hkv, S, Ev), dtype=v.dtype, device=v.device)
    if B * H * L == 0 or S == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    dout, out, lse = dout.contiguous(), out.contiguous(), lse.contiguous()
    delta = _metal.empty((B, H, L), dtype=torch.float32, device=q.device)
    masks, sizes = _common(q, k, v, attn_mask, is_causal)
    lib, suffix = _metal.library(_SHADER, q.device), _metal.dtype_suffix(q.dtype)
    scales = (float(scale) * _LOG2E, float(scale))
    threads, group = _grid(L, B * H)
    _metal.launch(lib, f"sdpa_bwd_dq_{suffix}", q, k, v, *masks, dout, out, lse, dq, delta, *sizes, *scales,
                  threads=threads, group_size=group)
    threads, group = _grid(S, B * Hkv)
    _metal.launch(lib, f"sdpa_bwd_dkdv_{suffix}", q, k, v, *masks, dout, lse, delta, dk, dv, *sizes, *scales,
                  threads=threads, group_size=group)
    return dq, dk, dv


# Chosen automatically on MPS like the other Metal kernels, although never timed (no Apple hardware
# here; bench/scripts/metal_attention_check.py measures it against the reference and torch's SDPA).
# The reason is memory: the reference stores the L × S scores, and its backward P and dS beside them
# (each 2 GiB of float32 at B=1, H=32, L=S=4096), which these kernels never do. Speed is an estimate
# only: without simdgroup_matrix a query-key pair costs about 25 instructions on each of 32 lanes
# (the dot's FMAs, a simd_sum, exp2, the V update), the same order as the reference's matmuls plus its
# passes over the stored scores.
@sdpa_fwd.implement("metal", supports=lambda q, k, v, attn_mask, is_causal, scale: _supports(q, k, v, attn_mask),
                    automatic=True)
def _sdpa_fwd_metal(q, k, v, attn_mask, is_causal, scale):
    return sdpa_fwd_launch(q, k, v, attn_mask, is_causal, scale)


@sdpa_bwd.implement("metal", supports=lambda dout, q, k, v, out, lse, attn_mask, is_causal, scale:
                    _supports(q, k, v, attn_mask) and dout.dtype == out.dtype == q.dtype
                    and lse.dtype == torch.float32, automatic=True)
def _sdpa_bwd_metal(dout, q, k, v, out, lse, attn_mask, is_causal, scale):
    return sdpa_bwd_launch(dout, q, k, v, out, lse, attn_mask, is_causal, scale)
