"""RMSNorm in Triton: forward, backward and the fused residual add (Gemma's ``offset`` included).

Layers, as in Liger Kernel: ``_<op>_kernel`` (Triton) → ``<op>_launch`` (plain tensors in and out)
→ the registered ``triton`` implementation of the op declared in :mod:`metalcore.nn.rms_norm`.

Two layouts, picked by the row length ``n``:

* ``n <= MAX_FUSED_N``: the whole row (or, for short rows, a ``[ROWS, BLOCK_N]`` tile of several
  rows) sits in registers, so ``x`` is read once and ``y`` written once: the byte floor.
* longer rows (up to 65,536 and beyond): a loop over ``LOOP_BLOCK_N`` chunks. The forward makes
  two passes over the row (sum of squares, then scale); the second pass mostly hits L2, since a
  row is at most a few hundred KB and all resident programs' rows fit in the H100's 50 MB L2.

The backward's weight gradient ``dw = Σ_rows dy·x̂`` is a reduction over rows. Each program
accumulates its rows' share in fp32 registers and writes one row of a ``(programs, n)`` fp32
buffer; a second small reduction (``sum(0)``) finishes it. No atomics: the order of additions is
fixed by the launch shape, so ``dw`` is bitwise reproducible run to run (fp32 atomics are not),
and the buffer is small (programs ≈ 2× SMs, i.e. ~1 MB/K columns against the 2·rows·n·bytes of
the main pass).

Inputs: ``x`` (rows, n) fp32/bf16/fp16 (fp64 stays on the reference); ``weight`` (n,) fp32/bf16/
fp16 or None. Statistics and arithmetic are fp32; ``rstd`` is fp32.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton.language as tl
from torch import Tensor

from metalcore._triton import cdiv, jit, next_power_of_2, program_slots, warps_for
from metalcore.nn.rms_norm import fused_add_rms_norm_fwd, rms_norm_bwd, rms_norm_fwd

# Rows up to this length are held whole in registers (8192 fp32 values over 16 warps: 16 a
# thread); longer rows take the looped kernels in chunks of LOOP_BLOCK_N.
MAX_FUSED_N = 8192
LOOP_BLOCK_N = 4096
# Short rows are packed several to a program so that each program still moves ~TILE_ELEMENTS
# elements (forward) or BWD_TILE_ELEMENTS (backward, whose programs loop over row tiles).
TILE_ELEMENTS = 4096
BWD_TILE_ELEMENTS = 4096
# Backward programs per SM: each loops over row tiles and owns one row of the dw partial-sum
# buffer. H100, bf16 4096x4096: 2 per SM 55 us; 1, 4 and 8 per SM 61-69 us (a bigger partial
# buffer, or too few programs in flight).
BWD_PROGRAMS_PER_SM = 2

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

@jit
def _rms_norm_fwd_kernel(X, R, W, Y, H, RSTD, n_rows, n_cols, eps, offset,
                         BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
                         HAS_W: tl.constexpr, HAS_R: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < n_cols)[None, :]
    offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0)
    if HAS_R:
        # h is rounded to x's dtype first, as the unfused model computes and stores it.
        x = (x.to(tl.float32) + tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)).to(X.dtype.element_ty)
        tl.store(H + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / n_cols + eps)
    y = xf * rstd[:, None]
    if HAS_W:
        w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        y = y * (w + offset)[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@jit
def _rms_norm_fwd_looped_kernel(X, R, W, Y, H, RSTD, n_cols, eps, offset,
                                BLOCK_N: tl.constexpr, HAS_W: tl.constexpr, HAS_R: tl.constexpr):
    row = tl.program_id(0)
    base = row.to(tl.int64) * n_cols
    cols = tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        c = start + cols
        m = c < n_cols
        x = tl.load(X + base + c, mask=m, other=0.0)
        if HAS_R:
            x = (x.to(tl.float32) + tl.load(R + base + c, mask=m, other=0.0).to(tl.float32)).to(X.dtype.element_ty)
            tl.store(H + base + c, x, mask=m)
        xf = x.to(tl.float32)
        acc += xf * xf
    rstd = tl.rsqrt(tl.sum(acc, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    if HAS_R:
        # The second pass reads back h written above by other threads of this program.
        tl.debug_barrier()
    for start in range(0, n_cols, BLOCK_N):
        c = start + cols
        m = c < n_cols
        if HAS_R:
            xf = tl.load(H + base + c, mask=m, other=0.0).to(tl.float32)
        else:
            xf = tl.load(X + base + c, mask=m, other=0.0).to(tl.float32)
        y = xf * rstd
        if HAS_W:
            y = y * (tl.load(W + c, mask=m, other=0.0).to(tl.float32) + offset)
        tl.store(Y + base + c, y.to(Y.dtype.element_ty), mask=m)


@jit
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DW_PARTIAL, n_rows, n_cols, offset, n_tiles, n_programs,
                         BLOCK_N: tl.constexpr, ROWS: tl.constexpr, HAS_W: tl.constexpr):
    """Whole rows in registers; program p takes row tiles p, p + P, p + 2P, ... and leaves its
    share of dw in DW_PARTIAL[p]."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    if HAS_W:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32) + offset
        dw = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    for tile in range(pid, n_tiles, n_programs):
        rows = tile * ROWS + tl.arange(0, ROWS)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        xhat = x * rstd[:, None]
        if HAS_W:
            g = dy * w[None, :]
            dw += dy * xhat
        else:
            g = dy
        c = tl.sum(g * xhat, axis=1) / n_cols
        dx = rstd[:, None] * (g - xhat * c[:, None])
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
    if HAS_W:
        tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, tl.sum(dw, axis=0), mask=col_mask)


@jit
def _rms_norm_bwd_dot_kernel(DY, X, W, RSTD, C, n_cols, offset, BLOCK_N: tl.constexpr, HAS_W: tl.constexpr):
    """Long rows, pass 1: C[row] = mean(g·x̂) with g = dy·(w + offset)."""
    row = tl.program_id(0)
    base = row.to(tl.int64) * n_cols
    cols = tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        c = start + cols
        m = c < n_cols
        g = tl.load(DY + base + c, mask=m, other=0.0).to(tl.float32)
        if HAS_W:
            g = g * (tl.load(W + c, mask=m, other=0.0).to(tl.float32) + offset)
        acc += g * tl.load(X + base + c, mask=m, other=0.0).to(tl.float32)
    tl.store(C + row, tl.sum(acc, axis=0) * tl.load(RSTD + row) / n_cols)


@jit
def _rms_norm_bwd_looped_kernel(DY, X, W, RSTD, C, DX, DW_PARTIAL, n_rows, n_cols, offset, n_programs,
                                BLOCK_N: tl.constexpr, HAS_W: tl.constexpr):
    """Long rows, pass 2: program (chunk, p) takes columns of one chunk in rows p, p + P, ..."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    pid = tl.program_id(1)
    if HAS_W:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32) + offset
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    for row in range(pid, n_rows, n_programs):
        offs = tl.cast(row, tl.int64) * n_cols + cols
        x = tl.load(X + offs, mask=col_mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=col_mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = x * rstd
        if HAS_W:
            g = dy * w
            dw += dy * xhat
        else:
            g = dy
        dx = rstd * (g - xhat * tl.load(C + row))
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=col_mask)
    if HAS_W:
        tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, dw, mask=col_mask)


# --------------------------------------------------------------------------------------------
# Launchers: plain tensors in, plain tensors out
# --------------------------------------------------------------------------------------------

def _tile(n: int, elements: int) -> tuple[int, int]:
    """(BLOCK_N, ROWS) for the register-resident kernels: whole rows, ~``elements`` per tile."""
    block_n = next_power_of_2(n)
    return block_n, max(1, min(256, elements // block_n))


def rms_norm_fwd_launch(x: Tensor, weight: Optional[Tensor], eps: float, offset: float,
                        residual: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """``(y, h, rstd)`` for ``x`` of shape (rows, n); ``h = x + residual`` (None without one)."""
    x = x.contiguous()
    rows, n = x.shape
    y = torch.empty_like(x)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    h = torch.empty_like(x) if residual is not None else None
    if rows == 0:
        return y, h, rstd
    w = weight.contiguous() if weight is not None else x  # dummy pointer when HAS_W is False
    r = residual.contiguous() if residual is not None else x
    h_out = h if h is not None else y
    flags = dict(HAS_W=weight is not None, HAS_R=residual is not None)
    if n <= MAX_FUSED_N:
        block_n, tile_rows = _tile(n, TILE_ELEMENTS)
        _rms_norm_fwd_kernel[(cdiv(rows, tile_rows),)](
            x, r, w, y, h_out, rstd, rows, n, eps, offset, BLOCK_N=block_n, ROWS=tile_rows,
            num_warps=warps_for(block_n * tile_rows), **flags)
    else:
        _rms_norm_fwd_looped_kernel[(rows,)](
            x, r, w, y, h_out, rstd, n, eps, offset, BLOCK_N=LOOP_BLOCK_N,
            num_warps=warps_for(LOOP_BLOCK_N), **flags)
    return y, h, rstd


def rms_norm_bwd_launch(dy: Tensor, x: Tensor, weight: Optional[Tensor], rstd: Tensor,
                        offset: float) -> tuple[Tensor, Tensor]:
    """``(dx, dw)``; ``dw`` is empty (``x.new_empty(0)``) when ``weight`` is None."""
    dy, x, rstd = dy.contiguous(), x.contiguous(), rstd.contiguous()
    rows, n = x.shape
    dx = torch.empty_like(x)
    has_w = weight is not None
    w = weight.contiguous() if has_w else x
    slots = program_slots(x.device) * BWD_PROGRAMS_PER_SM
    if n <= MAX_FUSED_N:
        block_n, tile_rows = _tile(n, BWD_TILE_ELEMENTS)
        programs = max(1, min(slots, cdiv(rows, tile_rows)))
        partial = torch.empty((programs, n) if has_w else (0,), dtype=torch.float32, device=x.device)
        if rows > 0:
            _rms_norm_bwd_kernel[(programs,)](
                dy, x, w, rstd, dx, partial, rows, n, offset, cdiv(rows, tile_rows), programs,
                BLOCK_N=block_n, ROWS=tile_rows,
                HAS_W=has_w, num_warps=warps_for(block_n * tile_rows))
    else:
        chunks = cdiv(n, LOOP_BLOCK_N)
        programs = max(1, min(rows, cdiv(slots * 2, chunks)))
        partial = torch.empty((programs, n) if has_w else (0,), dtype=torch.float32, device=x.device)
        if rows > 0:
            c = torch.empty(rows, dtype=torch.float32, device=x.device)
            warps = warps_for(LOOP_BLOCK_N)
            _rms_norm_bwd_dot_kernel[(rows,)](dy, x, w, rstd, c, n, offset, BLOCK_N=LOOP_BLOCK_N,
                                              HAS_W=has_w, num_warps=warps)
            _rms_norm_bwd_looped_kernel[(chunks, programs)](
                dy, x, w, rstd, c, dx, partial, rows, n, offset, programs, BLOCK_N=LOOP_BLOCK_N, HAS_W=has_w,
                num_warps=warps)
    if not has_w:
        return dx, x.new_empty(0)
    if rows == 0:
        return dx, torch.zeros_like(weight)
    return dx, partial.sum(0).to(weight.dtype)


# --------------------------------------------------------------------------------------------
# Registered implementations
# --------------------------------------------------------------------------------------------

def _ok(x: Tensor, weight: Optional[Tensor]) -> bool:
    return (x.dtype in _DTYPES and x.dim() == 2 and x.shape[-1] >= 1
            and (weight is None or weight.dtype in _DTYPES))


@rms_norm_fwd.implement("triton", supports=lambda x, weight, eps, offset: _ok(x, weight))
def _rms_norm_fwd_triton(x, weight, eps, offset):
    y, _, rstd = rms_norm_fwd_launch(x, weight, eps, offset)
    return y, rstd


@rms_norm_bwd.implement("triton", supports=lambda dy, x, weight, rstd, offset:
                        _ok(x, weight) and dy.dtype == x.dtype and rstd.dtype == torch.float32)
def _rms_norm_bwd_triton(dy, x, weight, rstd, offset):
    return rms_norm_bwd_launch(dy, x, weight, rstd, offset)


@fused_add_rms_norm_fwd.implement("triton", supports=lambda x, residual, weight, eps, offset:
                                  _ok(x, weight) and residual.dtype == x.dtype)
def _fused_add_rms_norm_fwd_triton(x, residual, weight, eps, offset):
    return rms_norm_fwd_launch(x, weight, eps, offset, residual)
