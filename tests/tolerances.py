"""The suite's one tolerance table (DESIGN.md §6). Loosen an entry only with a written reason.

Elementwise ops are compared with the float64 oracle using ``TOL[dtype]``. Reductions and linear
algebra use the relative rule instead: the error of metalcore's result against the float64 oracle
may be at most ``TORCH_ERROR_FACTOR`` times the error of PyTorch run in the same dtype (plus
``ABS_FLOOR[dtype]`` so that two exact results compare equal). Decompositions are judged by LAPACK's
test ratios, which must stay at most ``LAPACK_RATIO_MAX``.
"""

import torch

TOL = {
    # A few ulps of float64, scaled by the ~1e2 rounding steps of a short reduction.
    torch.float64: dict(atol=1e-12, rtol=1e-10),
    # float32 ulp is 1.2e-7; 1e-5 leaves ~80 ulps for accumulation over rows of up to ~8k.
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    # bf16 keeps 8 mantissa bits (ulp 7.8e-3): one rounding of the output plus one of each input.
    torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2),
    # fp16 keeps 11 bits (ulp 9.8e-4), same reasoning as bf16.
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}

TORCH_ERROR_FACTOR = 2.0

ABS_FLOOR = {
    torch.float64: 1e-13,
    torch.float32: 1e-6,
    torch.bfloat16: 1e-2,
    torch.float16: 1e-3,
}

LAPACK_RATIO_MAX = 30.0
