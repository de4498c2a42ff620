"""AdamW on Metal: the host side of ``shaders/adamw.metal`` (the math is in adamw.py).

One dispatch per parameter group and dtype — per ``METALCORE_ADAMW_MAX_TENSORS`` tensors, since a
list of tensors travels as a pointer array in ``setBytes`` data, which Metal caps at 4 KiB. The
step counters are CPU scalars (the op's contract): the host increments them and computes each
tensor's bias corrections, so nothing synchronises with the device.

Supported: fp32/bf16/fp16 parameters with gradients of the same dtype and float32 moments, all
walkable as flat memory (:func:`metalcore.optim.adamw.flat_walkable`); anything else (fp64, a
transposed-view gradient) runs on the reference.
"""

import math

import torch
from torch import Tensor

from metalcore import _metal
from metalcore.optim.adamw import adamw_step_, advance_steps, flat_walkable

_SHADER = "adamw"


def _supported(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2, eps,
               weight_decay, amsgrad, maximize) -> bool:
    if not params:
        return True
    states = (exp_avgs, exp_avg_sqs) + ((max_exp_avg_sqs,) if amsgrad else ())
    for i, p in enumerate(params):
        if p.dtype not in _metal.KERNEL_DTYPES or grads[i].dtype != p.dtype or p.numel() >= 2**31:
            return False
        if any(s[i].dtype != torch.float32 for s in states):
            return False
    if not flat_walkable(params, grads, *states):
        return False
    if any(p.dtype == torch.bfloat16 for p in params):  # bfloat kernels need Metal 3.1 (macOS 14)
        return _metal.has_kernel(_metal.library(_SHADER, params[0].device), "adamw_step_bfloat")
    return True


@adamw_step_.implement("metal", supports=_supported)
def _adamw_step_metal(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                      max_exp_avg_sqs: list[Tensor], state_steps: list[Tensor], lr: float, beta1: float,
                      beta2: float, eps: float, weight_decay: float, amsgrad: bool, maximize: bool) -> None:
    if not params:
        return
    steps = advance_steps(state_steps)
    c = _metal.constants()
    block, threads, chunk = c["METALCORE_ADAMW_BLOCK"], c["METALCORE_ADAMW_THREADS"], c["METALCORE_ADAMW_MAX_TENSORS"]
    lib = _metal.library(_SHADER, params[0].device)
    vmax = max_exp_avg_sqs if amsgrad else exp_avg_sqs  # never read without amsgrad
    decay = 1.0 - lr * weight_decay if weight_decay != 0 else 1.0
    flags = int(amsgrad) | (int(maximize) << 1)
    for dtype in dict.fromkeys(p.dtype for p in params):
        index = [i for i, p in enumerate(params) if p.dtype == dtype]
        for start in range(0, len(index), chunk):
            ids = index[start:start + chunk]
            blocks = [-(-params[i].numel() // block) for i in ids]
            starts = [0]
            for b in blocks[:-1]:
                starts.append(starts[-1] + b)
            total = starts[-1] + blocks[-1]
            if total == 0:
                continue
            _metal.launch(
                lib, f"adamw_step_{_metal.dtype_suffix(dtype)}",
                [params[i] for i in ids], [grads[i] for i in ids], [exp_avgs[i] for i in ids],
                [exp_avg_sqs[i] for i in ids], [vmax[i] for i in ids], [params[i].numel() for i in ids], starts,
                [-lr / (1.0 - beta1 ** steps[i]) for i in ids], [math.sqrt(1.0 - beta2 ** steps[i]) for i in ids],
                len(ids), float(decay), float(1.0 - beta1), float(beta2), float(1.0 - beta2), float(eps), flags,
                threads=total * threads, group_size=threads)
