"""AdamW's Triton multi-tensor step against the reference op (itself tested against
torch.optim.AdamW): parameters and every piece of optimizer state after several steps, for each
parameter dtype, amsgrad, maximize, and tensor sizes 0, 1, 31, 33, 4097 in one group."""

import pytest
import torch

from metalcore.optim.adamw import adamw_step_, state_dtype
from oracle import assert_close

SIZES = ((1,), (31,), (0,), (3, 11), (4097,), (33,))
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)


def make_group(dtype, device, amsgrad, sizes=SIZES):
    params = [torch.randn(s, device=device).to(dtype) for s in sizes]
    state = dict(
        params=params,
        exp_avgs=[torch.zeros_like(p, dtype=state_dtype(p)) for p in params],
        exp_avg_sqs=[torch.zeros_like(p, dtype=state_dtype(p)) for p in params],
        max_exp_avg_sqs=[torch.zeros_like(p, dtype=state_dtype(p)) for p in params] if amsgrad else [],
        state_steps=[torch.tensor(0.0) for _ in params],
    )
    return state


def clone(state):
    return {k: [t.clone() for t in v] for k, v in state.items()}


def assert_same_state(ours, ref):
    """Every list of the group (parameters and optimizer state) against the reference's, in float64."""
    for key in ours:
        for got, want in zip(ours[key], ref[key]):
            assert_close(got, want.double(), got.dtype)


def step(op, state, grads, amsgrad, maximize):
    op(state["params"], grads, state["exp_avgs"], state["exp_avg_sqs"], state["max_exp_avg_sqs"],
       state["state_steps"], HYPER["lr"], HYPER["beta1"], HYPER["beta2"], HYPER["eps"], HYPER["weight_decay"],
       amsgrad, maximize)


@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
def test_adamw_steps_match_the_reference(dtype, amsgrad, maximize, device):
    ours = make_group(dtype, device, amsgrad)
    ref = clone(ours)
    probe = [torch.zeros_like(p) for p in ours["params"]]
    assert adamw_step_.backend_for(ours["params"], probe, ours["exp_avgs"], ours["exp_avg_sqs"], ours["max_exp_avg_sqs"],
                                   ours["state_steps"], 1e-2, 0.9, 0.99, 1e-8, 0.1, amsgrad, maximize) == "triton"
    for _ in range(3):
        grads = [torch.randn_like(p) for p in ours["params"]]
        step(adamw_step_, ours, grads, amsgrad, maximize)
        step(adamw_step_.reference, ref, grads, amsgrad, maximize)
    assert all(got.dtype == want.dtype for key in ours for got, want in zip(ours[key], ref[key]))
    assert_same_state(ours, ref)
    assert [s.item() for s in ours["state_steps"]] == [3.0] * len(SIZES)


def test_mixed_dtypes_and_unequal_steps_in_one_group(device):
    """Tensors of one group may differ in dtype (one launch each) and in step count (a parameter
    that joined late): each gets its own bias corrections."""
    group = make_group(torch.float32, device, False, sizes=((5,), (4097,)))
    extra = make_group(torch.bfloat16, device, False, sizes=((33,),))
    for k in group:
        group[k] += extra[k]
    group["state_steps"][1].fill_(7.0)
    ref = clone(group)
    grads = [torch.randn_like(p) for p in group["params"]]
    step(adamw_step_, group, grads, False, False)
    step(adamw_step_.reference, ref, grads, False, False)
    assert_same_state(group, ref)


def test_many_blocks_spread_over_programs(device, monkeypatch):
    """More blocks than programs, blocks of each tensor starting on different programs."""
    import importlib
    kernels = importlib.import_module("metalcore.optim.adamw_triton")
    monkeypatch.setattr(kernels, "BLOCK", 16)
    group = make_group(torch.float32, device, True, sizes=((100,), (7,), (61,)))
    ref = clone(group)
    grads = [torch.randn_like(p) for p in group["params"]]
    step(adamw_step_, group, grads, True, False)
    step(adamw_step_.reference, ref, grads, True, False)
    assert_same_state(group, ref)


def test_grads_are_not_written(device):
    group = make_group(torch.float32, device, False)
    grads = [torch.randn_like(p) for p in group["params"]]
    before = [g.clone() for g in grads]
    step(adamw_step_, group, grads, False, True)
    assert all(torch.equal(a, b) for a, b in zip(grads, before))


def test_empty_group(device):
    step(adamw_step_, make_group(torch.float32, device, False, sizes=()), [], False, False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_gpu_full_size(dtype, device):
    sizes = [(4096, 1024)] * 16 + [(4096,)] * 16
    ours = make_group(dtype, device, True, sizes=sizes)
    ref = clone(ours)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in ours["params"]]
        step(adamw_step_, ours, grads, True, False)
        step(adamw_step_.reference, ref, grads, True, False)
    assert_same_state(ours, ref)


def test_opcheck_on_the_triton_backend(device):
    from metalcore._op import registered_ops
    group = make_group(torch.bfloat16, device, True, sizes=((33,), (5, 3)))
    grads = [torch.randn_like(p) for p in group["params"]]
    args = (group["params"], grads, group["exp_avgs"], group["exp_avg_sqs"], group["max_exp_avg_sqs"],
            group["state_steps"], 1e-2, 0.9, 0.99, 1e-8, 0.1, True, False)
    torch.library.opcheck(registered_ops()["adamw_step_"].custom_op, args)


def test_misaligned_tensors_use_the_reference(device):
    """The kernel issues 16-byte accesses; a view that starts mid-vector goes to the reference."""
    group = make_group(torch.float32, device, False, sizes=((9,),))
    group["params"] = [torch.randn(10, device=device)[1:]]
    args = (group["params"], [torch.randn(9, device=device)], group["exp_avgs"], group["exp_avg_sqs"], [],
            group["state_steps"], 1e-2, 0.9, 0.99, 1e-8, 0.1, False, False)
    assert adamw_step_.backend_for(*args) == "reference"


def test_launch_plan_is_reused_and_gradients_rechecked(device):
    """The group's table is built once; a gradient re-created at the same address with another
    layout (here a transposed view of the same memory) is noticed and sent to the reference."""
    import importlib
    kernels = importlib.import_module("metalcore.optim.adamw_triton")
    group = make_group(torch.float32, device, False, sizes=((4, 6), (33,)))
    ref = clone(group)
    memory = torch.randn(24, device=device)
    grads = [memory.view(4, 6), torch.randn(33, device=device)]
    step(adamw_step_, group, grads, False, False)
    step(adamw_step_.reference, ref, grads, False, False)
    key = kernels._plan_key(group["params"], grads, group["exp_avgs"], group["exp_avg_sqs"], [], False)
    plan = kernels._PLANS[key]
    step(adamw_step_, group, grads, False, False)
    step(adamw_step_.reference, ref, grads, False, False)
    assert kernels._PLANS[key] is plan
    grads[0] = memory.view(6, 4).t()
    assert grads[0].data_ptr() == memory.data_ptr() and not grads[0].is_contiguous()
    args = (group["params"], grads, group["exp_avgs"], group["exp_avg_sqs"], [], group["state_steps"],
            1e-2, 0.9, 0.99, 1e-8, 0.1, False, False)
    assert adamw_step_.backend_for(*args) == "reference"
    step(adamw_step_, group, grads, False, False)
    step(adamw_step_.reference, ref, grads, False, False)
    assert_same_state(group, ref)


def test_packed_step_counters(device):
    """Counters packed in one buffer (as MetalAdamW keeps them) advance like separate ones."""
    from metalcore.optim.adamw import shared_step_buffer
    group = make_group(torch.float32, device, False, sizes=((5,), (7,), (3,)))
    buffer = torch.tensor([0.0, 4.0, 0.0])
    group["state_steps"] = [buffer[i] for i in range(3)]
    assert shared_step_buffer(group["state_steps"]) is buffer
    ref = clone(group)
    ref["state_steps"] = [torch.tensor(t) for t in (0.0, 4.0, 0.0)]
    for _ in range(2):
        grads = [torch.randn_like(p) for p in group["params"]]
        step(adamw_step_, group, grads, False, False)
        step(adamw_step_.reference, ref, grads, False, False)
    assert buffer.tolist() == [2.0, 6.0, 2.0]
    assert_same_state(group, ref)
