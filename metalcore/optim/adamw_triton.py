"""AdamW's multi-tensor step in Triton: one launch per parameter group, not per tensor.

Layers: ``_adamw_step_kernel`` → ``adamw_step_launch`` (plain tensors and floats) → the registered
``triton`` implementation of :func:`metalcore.optim.adamw.adamw_step_` (the math is in that module).

How one launch covers a group of tensors of different sizes: the host builds a small table, one
row per tensor (addresses of θ, g, m, v, v̂max; element count; the index of the tensor's first
block in the group), plus each tensor's bias-correction scalars, and copies it to the device with
one asynchronous copy per table. A persistent grid of ``P`` programs walks the tensors; global
block ``b`` goes to program ``b mod P``, so small tensors spread over programs instead of all
landing on program 0. The step counters are CPU scalars (the op's contract), so the bias
corrections are computed on the host with no device synchronisation.

Bytes: per element, read θ, g, m, v and write θ, m, v (and v̂max both ways with amsgrad): 28 bytes
for fp32 parameters, 22 for bf16. θ, m and v never leave registers in between, where the unfused
update makes about a dozen passes. ``sqrt`` and the two divisions are IEEE-rounded (``sqrt_rn``,
``div_rn``) as in torch's kernels, so trajectories agree with the reference to an ulp or so.

Parameters fp32/bf16/fp16 with fp32 moments; fp64 parameters stay on the reference.
"""

from __future__ import annotations

import math

import torch
import triton.language as tl
from torch import Tensor

from metalcore.nn._jit_triton import cdiv, helper, jit, program_slots
from metalcore.optim.adamw import adamw_step_

# Elements per block: 512 at 4 warps is one 16-byte fp32 vector per thread per stream (θ, g, m, v).
# Swept on an H100 (16.8M fp32 params in 64 tensors, bench/training_triton.md): 512/4 warps/8 per
# SM ran 174 us (89% of copy bandwidth); 1024/4 warps ran 260-270 us at every programs-per-SM
# setting, 2048/8 warps/2 per SM 178 us.
BLOCK = 512
NUM_WARPS = 4
# Persistent programs per SM (4 and 8 within 1%; 16 and 2 were 10-20% slower).
PROGRAMS_PER_SM = 8

_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
# Columns of the int64 table.
_P, _G, _M, _V, _VMAX, _NUMEL, _BASE = range(7)
_COLS = 7


@helper
def _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, mask, step_size, bias_correction2_sqrt, decay,
                 one_minus_beta1, beta2, one_minus_beta2, eps, P_DTYPE: tl.constexpr, AMSGRAD: tl.constexpr,
                 MAXIMIZE: tl.constexpr):
    """One block of one tensor; ``mask`` is None for full blocks (unmasked 16-byte accesses)."""
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask)
    v = tl.load(v_ptr + offs, mask=mask)
    if MAXIMIZE:
        g = -g
    p = p * decay
    m = m + one_minus_beta1 * (g - m)  # torch.lerp's formula for weights below 1/2
    v = v * beta2 + one_minus_beta2 * (g * g)
    if AMSGRAD:
        v_hat = tl.maximum(tl.load(vmax_ptr + offs, mask=mask), v)
        tl.store(vmax_ptr + offs, v_hat, mask=mask)
    else:
        v_hat = v
    denom = tl.div_rn(tl.sqrt_rn(v_hat), bias_correction2_sqrt) + eps
    p = p - step_size * tl.div_rn(m, denom)
    tl.store(p_ptr + offs, p.to(P_DTYPE), mask=mask)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)


@jit
def _adamw_step_kernel(TABLE, SCALARS, n_tensors, n_programs, decay, one_minus_beta1, beta2, one_minus_beta2, eps,
                       P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, AMSGRAD: tl.constexpr,
                       MAXIMIZE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    lanes = tl.arange(0, BLOCK)
    for t in range(0, n_tensors):
        row = TABLE + t * 7
        # Every address is 16-byte aligned (checked by the launcher): vector loads and stores.
        p_ptr = tl.multiple_of(tl.load(row + 0).to(tl.pointer_type(P_DTYPE)), 16)
        g_ptr = tl.multiple_of(tl.load(row + 1).to(tl.pointer_type(G_DTYPE)), 16)
        m_ptr = tl.multiple_of(tl.load(row + 2).to(tl.pointer_type(tl.float32)), 16)
        v_ptr = tl.multiple_of(tl.load(row + 3).to(tl.pointer_type(tl.float32)), 16)
        vmax_ptr = tl.multiple_of(tl.load(row + 4).to(tl.pointer_type(tl.float32)), 16)
        numel = tl.load(row + 5)
        base = tl.load(row + 6)
        step_size = tl.load(SCALARS + 2 * t)
        bias_correction2_sqrt = tl.load(SCALARS + 2 * t + 1)
        # First block of this tensor that belongs to this program: (base + b) mod P == pid.
        first = (pid - base % n_programs + n_programs) % n_programs
        full_blocks = numel // BLOCK
        for b in range(first, full_blocks, n_programs):
            _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, b * BLOCK + lanes, None, step_size,
                         bias_correction2_sqrt, decay, one_minus_beta1, beta2, one_minus_beta2, eps,
                         P_DTYPE, AMSGRAD, MAXIMIZE)
        if full_blocks * BLOCK < numel and (base + full_blocks) % n_programs == pid:
            offs = full_blocks * BLOCK + lanes
            _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, offs < numel, step_size,
                         bias_correction2_sqrt, decay, one_minus_beta1, beta2, one_minus_beta2, eps,
                         P_DTYPE, AMSGRAD, MAXIMIZE)


def adamw_step_launch(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                      exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor], steps: list[float], *,
                      lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                      amsgrad: bool, maximize: bool) -> None:
    """One AdamW step, in place, for tensors that share a device, a parameter dtype and a
    gradient dtype; ``steps[i]`` is the step number (from 1) of tensor ``i`` after this step."""
    device = params[0].device
    rows, scalars, blocks = [], [], 0
    for i, p in enumerate(params):
        vmax = max_exp_avg_sqs[i].data_ptr() if amsgrad else 0  # never dereferenced without amsgrad
        rows.append((p.data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr(),
                     vmax, p.numel(), blocks))
        blocks += cdiv(p.numel(), BLOCK)
        scalars.append((lr / (1.0 - beta1 ** steps[i]), math.sqrt(1.0 - beta2 ** steps[i])))
    if blocks == 0:
        return
    table = torch.tensor(rows, dtype=torch.int64)
    factors = torch.tensor(scalars, dtype=torch.float32)
    if device.type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)
        factors = factors.pin_memory().to(device, non_blocking=True)
    n_programs = max(1, min(blocks, program_slots(device) * PROGRAMS_PER_SM))
    _adamw_step_kernel[(n_programs,)](
        table, factors, len(params), n_programs, 1.0 - lr * weight_decay, 1.0 - beta1, beta2, 1.0 - beta2, eps,
        P_DTYPE=_TL[params[0].dtype], G_DTYPE=_TL[grads[0].dtype], AMSGRAD=amsgrad, MAXIMIZE=maximize,
        BLOCK=BLOCK, num_warps=NUM_WARPS)


def _supported(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *_scalars) -> bool:
    if not params:
        return True
    device = params[0].device
    state = [*exp_avgs, *exp_avg_sqs, *max_exp_avg_sqs]
    return (all(p.dtype in _PARAM_DTYPES for p in params)
            and all(g.dtype in _PARAM_DTYPES for g in grads)
            and all(s.dtype == torch.float32 for s in state)
            and all(t.device == device and t.is_contiguous() and t.data_ptr() % 16 == 0
                    for t in (*params, *grads, *state))
            and all(s.device.type == "cpu" for s in state_steps))


@adamw_step_.implement("triton", supports=_supported)
def _adamw_step_triton(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1,
                       beta2, eps, weight_decay, amsgrad, maximize):
    if not params:
        return
    torch._foreach_add_(state_steps, 1.0)
    steps = [s.item() for s in state_steps]  # CPU scalars: no device synchronisation
    # One launch per (parameter dtype, gradient dtype) present; a group normally has one.
    by_dtype: dict[tuple[torch.dtype, torch.dtype], list[int]] = {}
    for i, (p, g) in enumerate(zip(params, grads)):
        by_dtype.setdefault((p.dtype, g.dtype), []).append(i)
    for idx in by_dtype.values():
        adamw_step_launch(
            [params[i] for i in idx], [grads[i] for i in idx], [exp_avgs[i] for i in idx],
            [exp_avg_sqs[i] for i in idx], [max_exp_avg_sqs[i] for i in idx] if amsgrad else [],
            [steps[i] for i in idx], lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
            amsgrad=amsgrad, maximize=maximize)
