"""shaders/adamw.metal through the metal backend on CPU tensors (the shader executor), against the
reference step, on parameters and every piece of optimizer state, over several steps."""

import pytest
import torch

import metalcore
from metalcore.optim.adamw import adamw_step_, state_dtype
from tolerances import TOL

SHAPES = [(1,), (31,), (33,), (4097,), (3, 700), (0,), (8193,)]


def _state(dtype, amsgrad):
    params = [torch.randn(s).to(dtype) for s in SHAPES]
    grads = [torch.randn(s).to(dtype) for s in SHAPES]
    m = [torch.randn(s, dtype=state_dtype(p)) * 0.1 for s, p in zip(SHAPES, params)]
    v = [torch.rand(s, dtype=state_dtype(p)) * 0.01 for s, p in zip(SHAPES, params)]
    vmax = [t * 1.5 for t in v] if amsgrad else []
    steps = [torch.tensor(float(k)) for k in range(len(SHAPES))]
    return params, grads, m, v, vmax, steps


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
@pytest.mark.parametrize("maximize,weight_decay", [(False, 0.1), (True, 0.0)], ids=["decay", "maximize"])
def test_adamw_step_matches_reference(executor, dtype, amsgrad, maximize, weight_decay):
    ours = _state(dtype, amsgrad)
    ref = [[t.clone() for t in lst] for lst in ours]
    hyper = (1e-2, 0.9, 0.999, 1e-8, weight_decay, amsgrad, maximize)
    for _ in range(3):
        with metalcore.use_backend("metal"):
            assert adamw_step_.backend_for(*ours, *hyper) == "metal"
            adamw_step_(*ours, *hyper)
        adamw_step_.reference(*ref, *hyper)
    names = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps")
    for name, got, want in zip(names, ours, ref):
        for k, (a, b) in enumerate(zip(got, want)):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, **TOL[a.dtype], msg=lambda m: f"{name}[{k}]: {m}")


def test_mixed_dtypes_in_one_group_and_many_tensors(executor):
    # 300 tensors: two dispatches for the float ones (256 per dispatch), one for the half ones.
    params = [torch.randn(5) for _ in range(300)] + [torch.randn(7).half() for _ in range(3)]
    grads = [torch.randn_like(p) for p in params]
    m = [torch.zeros(p.shape) for p in params]
    v = [torch.zeros(p.shape) for p in params]
    steps = [torch.tensor(0.0) for _ in params]
    state = (params, grads, m, v, [], steps)
    ref = [[t.clone() for t in lst] for lst in state]
    hyper = (1e-3, 0.9, 0.99, 1e-8, 0.01, False, False)
    with metalcore.use_backend("metal"):
        adamw_step_(*state, *hyper)
    adamw_step_.reference(*ref, *hyper)
    for a, b in zip(params + m + v, ref[0] + ref[2] + ref[3]):
        torch.testing.assert_close(a, b, **TOL[a.dtype])


def test_float64_and_noncontiguous_stay_on_the_reference(executor):
    p = [torch.randn(4, dtype=torch.float64)]
    args = (p, [torch.randn(4, dtype=torch.float64)], [torch.zeros(4, dtype=torch.float64)],
            [torch.zeros(4, dtype=torch.float64)], [], [torch.tensor(0.0)], 1e-3, 0.9, 0.999, 1e-8, 0.0, False, False)
    with metalcore.use_backend("metal"):
        assert adamw_step_.backend_for(*args) == "reference"
