"""Arguments for ``torch.library.opcheck`` on every metalcore.optim op (tests/test_opcheck.py runs them).

The optimizer step is not differentiable: no input requires grad.
"""

from collections.abc import Callable

import torch

import metalcore.optim  # noqa: F401  (registers the optimizer ops)


def adamw_args(amsgrad: bool, maximize: bool, dtype: torch.dtype = torch.float64) -> tuple:
    shapes = [(33, 31), (1,), (5,)]
    state = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    params = [torch.randn(s, dtype=dtype) for s in shapes]
    grads = [torch.randn(s, dtype=dtype) for s in shapes]
    exp_avgs = [torch.randn(s, dtype=state) for s in shapes]
    exp_avg_sqs = [torch.rand(s, dtype=state) for s in shapes]
    max_exp_avg_sqs = [v + torch.rand(s, dtype=state) for v, s in zip(exp_avg_sqs, shapes)] if amsgrad else []
    steps = [torch.tensor(float(n), dtype=torch.float32) for n in (3, 3, 1)]
    return (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, 1e-3, 0.9, 0.999, 1e-8, 1e-2,
            amsgrad, maximize)


SAMPLES: dict[str, list[Callable[[], tuple]]] = {
    "adamw_step_": [
        lambda: adamw_args(amsgrad=False, maximize=False),
        lambda: adamw_args(amsgrad=True, maximize=True),
        lambda: adamw_args(amsgrad=True, maximize=False, dtype=torch.bfloat16),
    ],
}
