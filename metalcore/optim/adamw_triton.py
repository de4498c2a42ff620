"""AdamW's multi-tensor step in Triton: one launch per parameter group, not per tensor.

Layers: ``_adamw_step_kernel`` → a cached launch plan per group (``_plan``) → the registered
``triton`` implementation of :func:`metalcore.optim.adamw.adamw_step_` (the math is in that module).

How one launch covers a group of tensors of different sizes: the host builds a small table, one
row per tensor (addresses of θ, g, m, v, v̂max; element count; the index of the tensor's first
block in the group) and copies it to the device once; it is kept for as long as the group's
tensors stay at the same addresses (an optimizer's do). A persistent grid of ``P`` programs walks
the tensors; global block ``b`` goes to program ``b mod P``, so small tensors spread over programs
instead of all landing on program 0. The step counters are CPU scalars (the op's contract), so the
bias corrections are computed on the host with no device synchronisation: when every tensor of the
launch is at the same step (the usual case) they are two kernel arguments, otherwise a per-tensor
table uploaded for that step.

Bytes: per element, read θ, g, m, v and write θ, m, v (and v̂max both ways with amsgrad): 28 bytes
for fp32 parameters, 22 for bf16. θ, m and v never leave registers in between, where the unfused
update makes about a dozen passes. ``sqrt`` and the two divisions are IEEE-rounded (``sqrt_rn``,
``div_rn``) as in torch's kernels, so trajectories agree with the reference to an ulp or so.

Parameters fp32/bf16/fp16 with fp32 moments, every tensor walkable as flat memory
(:func:`metalcore.optim.adamw.flat_walkable`: a transposed parameter with its gradient and state
qualifies, a transposed-view gradient of a contiguous parameter does not) and 16-byte aligned; other
groups (fp64, mixed layouts) stay on the reference.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import triton.language as tl
from torch import Tensor

from metalcore._backend import triton_interpreting
from metalcore._triton import cdiv, helper, jit, program_slots
from metalcore.optim.adamw import adamw_step_, advance_steps, flat_walkable, same_strides

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
def _to_bf16_nearest_even(x):
    """fp32 → bf16 rounded to nearest even by integer ops: what ``.to(tl.bfloat16)`` compiles to
    (cvt.rn), for Triton 3.6's interpreter, whose cast truncates (bf16 parameters drifted 0.57 from
    torch's over 50 steps at lr 1e-2, each step's rounding biased toward zero). NaN stays NaN."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return tl.where(x != x, x.to(tl.bfloat16), rounded)


@helper
def _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, mask, step_size, bias_correction2_sqrt, decay,
                 one_minus_beta1, beta2, one_minus_beta2, eps, P_DTYPE: tl.constexpr, AMSGRAD: tl.constexpr,
                 MAXIMIZE: tl.constexpr, BF16_BY_HAND: tl.constexpr):
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
    if BF16_BY_HAND:
        tl.store(p_ptr + offs, _to_bf16_nearest_even(p), mask=mask)
    else:
        tl.store(p_ptr + offs, p.to(P_DTYPE), mask=mask)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)


@jit
def _adamw_step_kernel(TABLE, SCALARS, n_tensors, n_programs, step_size_all, bias_correction2_sqrt_all, decay,
                       one_minus_beta1, beta2, one_minus_beta2, eps, P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
                       UNIFORM_STEP: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
                       BF16_BY_HAND: tl.constexpr, BLOCK: tl.constexpr):
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
        if UNIFORM_STEP:
            step_size = step_size_all
            bias_correction2_sqrt = bias_correction2_sqrt_all
        else:
            step_size = tl.load(SCALARS + 2 * t)
            bias_correction2_sqrt = tl.load(SCALARS + 2 * t + 1)
        # First block of this tensor that belongs to this program: (base + b) mod P == pid.
        first = (pid - base % n_programs + n_programs) % n_programs
        full_blocks = numel // BLOCK
        for b in range(first, full_blocks, n_programs):
            _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, b * BLOCK + lanes, None, step_size,
                         bias_correction2_sqrt, decay, one_minus_beta1, beta2, one_minus_beta2, eps,
                         P_DTYPE, AMSGRAD, MAXIMIZE, BF16_BY_HAND)
        if full_blocks * BLOCK < numel and (base + full_blocks) % n_programs == pid:
            offs = full_blocks * BLOCK + lanes
            _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, offs < numel, step_size,
                         bias_correction2_sqrt, decay, one_minus_beta1, beta2, one_minus_beta2, eps,
                         P_DTYPE, AMSGRAD, MAXIMIZE, BF16_BY_HAND)


@dataclass(frozen=True)
class _Launch:
    """One kernel launch of a group's step: the tensors of one (parameter, gradient) dtype pair."""
    index: tuple[int, ...]  # positions of its tensors in the group's lists
    table: Tensor  # int64 (len(index), 7) on the device: the rows described in the module docstring
    n_programs: int
    p_dtype: torch.dtype
    g_dtype: torch.dtype
    contiguous: bool  # every parameter contiguous (else dense in another order: gradients need their strides)


# Launch plans by the group's addresses: an optimizer steps the same tensors every time, so the
# validation and the device table are built once, not at every step (they were ~60% of a 64-tensor
# step's host time). The key holds every address the table holds and every tensor's element count,
# so a hit can only differ from a fresh build in what sits at those addresses: never a smaller
# tensor (a kernel would write past its end), but possibly a new gradient (zero_grad with
# set_to_none re-creates them) of another dtype or layout, checked again on every hit.
_PLANS: dict[tuple[Any, ...], tuple[_Launch, ...]] = {}
_MAX_PLANS = 64


def _plan_key(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad: bool) -> tuple[Any, ...]:
    ptr, numel = Tensor.data_ptr, Tensor.numel
    tensors = (*params, *grads, *exp_avgs, *exp_avg_sqs, *max_exp_avg_sqs)
    # BLOCK and PROGRAMS_PER_SM shape the table (tuning scripts and tests change them).
    return (BLOCK, PROGRAMS_PER_SM, amsgrad, len(params), *map(ptr, tensors), *map(numel, tensors))


def _valid(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad: bool) -> bool:
    device = params[0].device
    state = [*exp_avgs, *exp_avg_sqs, *(max_exp_avg_sqs if amsgrad else ())]
    lists = (grads, exp_avgs, exp_avg_sqs, *((max_exp_avg_sqs,) if amsgrad else ()))
    return (all(len(lst) == len(params) for lst in lists)
            and all(p.dtype in _PARAM_DTYPES for p in params)
            and all(g.dtype in _PARAM_DTYPES for g in grads)
            and all(s.dtype == torch.float32 for s in state)
            and all(t.device == device and t.data_ptr() % 16 == 0 for t in (*params, *grads, *state))
            and flat_walkable(params, *lists))


def _build_plan(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad: bool) -> tuple[_Launch, ...]:
    device = params[0].device
    by_dtype: dict[tuple[torch.dtype, torch.dtype], list[int]] = {}
    for i, (p, g) in enumerate(zip(params, grads)):
        by_dtype.setdefault((p.dtype, g.dtype), []).append(i)
    launches = []
    for (p_dtype, g_dtype), index in by_dtype.items():
        rows, blocks = [], 0
        for i in index:
            vmax = max_exp_avg_sqs[i].data_ptr() if amsgrad else 0  # never dereferenced without amsgrad
            rows.append((params[i].data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(),
                         exp_avg_sqs[i].data_ptr(), vmax, params[i].numel(), blocks))
            blocks += cdiv(params[i].numel(), BLOCK)
        if blocks == 0:
            continue
        n_programs = max(1, min(blocks, program_slots(device) * PROGRAMS_PER_SM))
        launches.append(_Launch(tuple(index), _to_device(torch.tensor(rows, dtype=torch.int64), device),
                                n_programs, p_dtype, g_dtype, all(params[i].is_contiguous() for i in index)))
    return tuple(launches)


def _to_device(table: Tensor, device: torch.device) -> Tensor:
    return table.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else table


def _plan(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad: bool) -> Optional[tuple[_Launch, ...]]:
    """The group's launches, or None when the kernel cannot take these tensors."""
    key = _plan_key(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad)
    plan = _PLANS.get(key)
    if plan is not None and _grad_dtypes_match(plan, grads) and (
            all(map(Tensor.is_contiguous, grads)) if all(launch.contiguous for launch in plan)
            else all(map(same_strides, grads, params))):
        return plan
    if not _valid(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad):
        return None
    return _remember(key, _build_plan(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad))


def _grad_dtypes_match(plan: tuple[_Launch, ...], grads: list[Tensor]) -> bool:
    if len(plan) == 1:  # one dtype pair, the usual case: one pass in C (a generator costs 1 µs a tensor)
        return set(map(_dtype, grads)) == {plan[0].g_dtype}
    return all(grads[i].dtype == launch.g_dtype for launch in plan for i in launch.index)


_dtype = operator.attrgetter("dtype")


# The plan found by the last ``_supported`` call, for the launch that follows it: the dispatcher
# asks ``supports`` and then runs the kernel with the same argument lists, and the key alone costs
# ~0.13 µs a tensor (about 130 µs for 200 tensors' 1000 addresses and counts on this project's CPU).
# It holds the list objects themselves, so an identity match cannot be a recycled id.
_last: tuple[Any, ...] = (None, None, None)


def _remember(key: tuple[Any, ...], plan: tuple[_Launch, ...]) -> tuple[_Launch, ...]:
    if len(_PLANS) >= _MAX_PLANS:  # tensors of finished runs: forget the oldest
        del _PLANS[next(iter(_PLANS))]
    _PLANS[key] = plan
    return plan


def _supported(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2, eps,
               weight_decay, amsgrad, maximize) -> bool:
    global _last
    if not params:
        return True
    plan = _plan(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad)
    if plan is None:
        return False
    _last = (params, grads, plan)  # held until the launch that follows (or the next call) clears it
    return True


@adamw_step_.implement("triton", supports=_supported)
def _adamw_step_triton(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1,
                       beta2, eps, weight_decay, amsgrad, maximize):
    global _last
    if not params:
        return
    last_params, last_grads, plan = _last
    _last = (None, None, None)
    if last_params is not params or last_grads is not grads:
        plan = _plan(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad)
    steps = advance_steps(state_steps)
    for launch in plan:
        launch_steps = [steps[i] for i in launch.index]
        uniform = launch_steps.count(launch_steps[0]) == len(launch_steps)
        if uniform:  # the usual case: bias corrections travel as two kernel arguments
            scalars = launch.table  # not read
        else:
            scalars = _to_device(torch.tensor([_bias_corrections(t, lr, beta1, beta2) for t in launch_steps],
                                              dtype=torch.float32), params[0].device)
        step_size, bias_correction2_sqrt = _bias_corrections(launch_steps[0], lr, beta1, beta2)
        _adamw_step_kernel[(launch.n_programs,)](
            launch.table, scalars, len(launch.index), launch.n_programs, step_size, bias_correction2_sqrt,
            1.0 - lr * weight_decay, 1.0 - beta1, beta2, 1.0 - beta2, eps,
            P_DTYPE=_TL[launch.p_dtype], G_DTYPE=_TL[launch.g_dtype], UNIFORM_STEP=uniform, AMSGRAD=amsgrad,
            MAXIMIZE=maximize, BF16_BY_HAND=launch.p_dtype == torch.bfloat16 and triton_interpreting(),
            BLOCK=BLOCK, num_warps=NUM_WARPS)


def _bias_corrections(step: float, lr: float, beta1: float, beta2: float) -> tuple[float, float]:
    """``(γ / (1 − β₁ᵗ), √(1 − β₂ᵗ))`` in float64 on the host."""
    return lr / (1.0 - beta1 ** step), math.sqrt(1.0 - beta2 ** step)
