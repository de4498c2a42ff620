"""MetalAdamW and its op ``metalcore::adamw_step_``: the optimizer against torch.optim.AdamW (on
parameters and every piece of state, over many steps, including torch's own OptimizerInfo
configurations), and the op on each backend against the float64 oracle by the suite's one rule
(tests/oracle.py: at most 2x the error of the reference run in the working dtype).

Tests that take ``backend`` (tests/optim/conftest.py) run on the reference, the Triton interpreter
and the Metal executor with that backend requested; the ``test_triton_*`` tests are about the Triton
launch plans themselves."""

import copy
import gc
import importlib
import weakref

import pytest
import torch
from torch.testing._internal.common_optimizers import (
    OptimizerErrorEnum,
    _get_optim_inputs_including_global_cliquey_kwargs,
    optim_db,
)

from cases import noncontiguous
import metalcore
from metalcore.optim import MetalAdamW, adamw
from metalcore.optim.adamw import adamw_step_, shared_step_buffer, state_dtype
from oracle import assert_close, assert_within_torch_error

STEPS = 50
# The Triton interpreter takes ~0.25 s a step of make_params' group: 12 steps there (past the bias
# corrections' fastest change and two moment time constants of beta1) keep CI time reasonable.
INTERPRETED_STEPS = 12
STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def make_params(dtype):
    """Odd sizes, a single element, an empty tensor and a transposed (non-contiguous) leaf."""
    shapes = [(33, 31), (1,), (4097,), (0, 3)]
    params = [torch.randn(s, dtype=dtype, requires_grad=True) for s in shapes]
    params.append(noncontiguous(torch.randn(5, 7, dtype=dtype)).requires_grad_())
    return params


def clone(params, dtype=None):
    return [p.detach().to(dtype or p.dtype).clone().requires_grad_() for p in params]


def steps_for(backend):
    return INTERPRETED_STEPS if backend == "triton" else STEPS


def gradient_stream(params, steps=STEPS):
    """Synthetic gradients, the same for both optimizers; scale 1e-3..1e1 exercises eps and the moments."""
    return [[torch.randn_like(p, dtype=torch.float32) * 10.0 ** torch.randint(-3, 2, ()).item() for p in params]
            for _ in range(steps)]


def step_with(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = g.to(p.dtype)
    opt.step()


def assert_same_trajectory(ours, ours_params, theirs, theirs_params, dtype, state_dtype=None):
    for p, q in zip(ours_params, theirs_params):
        assert_close(p.detach(), q.detach().double(), dtype)
        s, t = ours.state[p], theirs.state[q]
        assert set(s) == set(t), (set(s), set(t))
        for key in s:
            assert s[key].shape == t[key].shape, key
            if key == "step":
                assert s[key].dtype == torch.float32 and s[key].device.type == "cpu"
                assert s[key].item() == t[key].item()
            else:
                assert s[key].dtype == (state_dtype or p.dtype), key
                assert_close(s[key], t[key].double(), state_dtype or dtype)


CONFIGS = {
    "default": dict(),
    "amsgrad": dict(amsgrad=True),
    "maximize": dict(maximize=True),
    "no-weight-decay": dict(weight_decay=0.0),
    "custom": dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, amsgrad=True, maximize=True),
}


def served_by(opt, group=0):
    """The backend that serves ``opt``'s next step of one group (with the gradients set now)."""
    lists = ([], [], [], [], [], [])
    opt._init_group(opt.param_groups[group], *lists)
    g = opt.param_groups[group]
    return adamw_step_.backend_for(*lists, g["lr"], *g["betas"], g["eps"], g["weight_decay"], g["amsgrad"],
                                   g["maximize"])


def kernel_expected(backend, dtype):
    """The backend a group of ``dtype`` parameters must be served by: the kernels take fp32/bf16/fp16."""
    return "reference" if dtype == torch.float64 else backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_matches_torch_adamw(config, dtype, backend):
    params = make_params(dtype)
    reference = clone(params)
    ours, theirs = MetalAdamW(params, **config), torch.optim.AdamW(reference, foreach=False, **config)
    for t, grads in enumerate(gradient_stream(params, steps_for(backend))):
        step_with(ours, params, grads)
        step_with(theirs, reference, grads)
        if t == 0:  # the transposed leaf and the empty tensor do not send the group elsewhere
            assert served_by(ours) == kernel_expected(backend, dtype)
    assert_same_trajectory(ours, params, theirs, reference, dtype)
    assert params[-1].stride() == ours.state[params[-1]]["exp_avg"].stride()  # state keeps the layout


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
def test_low_precision_params_update_in_float32(dtype, amsgrad, backend):
    """bf16/fp16 parameters: float32 moments, update in float32, one rounding per step. The reference
    is torch's AdamW on a float32 copy whose parameters are rounded to ``dtype`` after every step."""
    params = make_params(dtype)
    reference = clone(params, torch.float32)
    ours = MetalAdamW(params, lr=1e-2, amsgrad=amsgrad)
    theirs = torch.optim.AdamW(reference, lr=1e-2, amsgrad=amsgrad, foreach=False)
    for t, grads in enumerate(gradient_stream(params, steps_for(backend))):
        grads = [g.to(dtype) for g in grads]
        step_with(ours, params, grads)
        step_with(theirs, reference, grads)
        with torch.no_grad():
            for r in reference:
                r.copy_(r.to(dtype))
        if t == 0:
            assert served_by(ours) == backend
    assert_same_trajectory(ours, params, theirs, reference, dtype, state_dtype=torch.float32)


def test_param_groups_and_lr_scheduler():
    """Per-group hyperparameters, and OneCycleLR, which rewrites lr and betas[0] in every group each step."""
    params = make_params(torch.float32)
    reference = clone(params)

    def groups(ps):
        return [dict(params=ps[:2], lr=1e-2), dict(params=ps[2:4], lr=3e-3, amsgrad=True, weight_decay=0.0),
                dict(params=ps[4:])]

    ours, theirs = MetalAdamW(groups(params), lr=1e-3), torch.optim.AdamW(groups(reference), lr=1e-3, foreach=False)
    schedulers = [torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[3e-2, 1e-2, 5e-3], total_steps=STEPS)
                  for opt in (ours, theirs)]
    for grads in gradient_stream(params):
        step_with(ours, params, grads)
        step_with(theirs, reference, grads)
        for scheduler in schedulers:
            scheduler.step()
    assert ours.param_groups[0]["lr"] == theirs.param_groups[0]["lr"]
    assert ours.param_groups[1]["betas"] == theirs.param_groups[1]["betas"]
    assert_same_trajectory(ours, params, theirs, reference, torch.float32)


def test_closure_zero_grad_and_params_without_grad():
    torch.manual_seed(0)
    model, reference = torch.nn.Linear(31, 33), torch.nn.Linear(31, 33)
    reference.load_state_dict(model.state_dict())
    frozen = torch.nn.Parameter(torch.randn(3))  # never gets a gradient: skipped, no state
    ours = MetalAdamW([*model.parameters(), frozen], lr=1e-2)
    theirs = torch.optim.AdamW(reference.parameters(), lr=1e-2, foreach=False)
    x, y = torch.randn(16, 31), torch.randn(16, 33)

    def closure_for(net, opt):
        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(net(x), y)
            loss.backward()
            return loss
        return closure

    for _ in range(20):
        loss = ours.step(closure_for(model, ours))
        expected = theirs.step(closure_for(reference, theirs))
        torch.testing.assert_close(loss, expected)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)
    assert frozen not in ours.state
    ours.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    ours.step()  # nothing has a gradient: a no-op
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
def test_state_dict_round_trip_with_torch(amsgrad):
    params = make_params(torch.float32)
    stream = gradient_stream(params, 30)
    ours = MetalAdamW(params, lr=1e-2, amsgrad=amsgrad)
    for grads in stream[:10]:
        step_with(ours, params, grads)
    assert ours.state_dict()["param_groups"][0].keys() == torch.optim.AdamW(clone(params)).state_dict()[
        "param_groups"][0].keys()

    # ours -> torch: both continue and agree. (torch's loader keeps the given tensors where dtype and
    # device already match, so the state dict is deep-copied, as between two torch optimizers.)
    torch_params = clone(params)
    theirs = torch.optim.AdamW(torch_params, foreach=False)
    theirs.load_state_dict(copy.deepcopy(ours.state_dict()))
    assert theirs.param_groups[0]["lr"] == 1e-2 and theirs.param_groups[0]["amsgrad"] is amsgrad
    for grads in stream[10:20]:
        step_with(ours, params, grads)
        step_with(theirs, torch_params, grads)
    assert_same_trajectory(ours, params, theirs, torch_params, torch.float32)

    # torch -> ours: loads, keeps torch's implementation switches (they never change the math).
    back_params = clone(torch_params)
    back = MetalAdamW(back_params)
    back.load_state_dict(theirs.state_dict())
    assert back.param_groups[0]["foreach"] == theirs.param_groups[0]["foreach"]
    assert back.param_groups[0]["decoupled_weight_decay"] is True
    for grads in stream[20:]:
        step_with(back, back_params, grads)
        step_with(theirs, torch_params, grads)
    assert_same_trajectory(back, back_params, theirs, torch_params, torch.float32)


def test_step_counters_packed_and_checkpoint_resumes_exactly(tmp_path):
    """The group's counters become 0-d views of one buffer (one add per step); a checkpoint saved
    with torch.save and loaded into a fresh optimizer continues exactly like the uninterrupted run."""
    params = make_params(torch.float32)
    stream = gradient_stream(params, 8)
    ours = MetalAdamW(params, lr=1e-2)
    for grads in stream[:4]:
        step_with(ours, params, grads)
    steps = [ours.state[p]["step"] for p in params]
    assert shared_step_buffer(steps) is not None and [s.item() for s in steps] == [4.0] * len(params)
    assert all(s.dtype == torch.float32 and s.dim() == 0 for s in steps)
    torch.save(ours.state_dict(), tmp_path / "opt.pt")
    resumed_params = clone(params)
    resumed = MetalAdamW(resumed_params, lr=1e-2)
    resumed.load_state_dict(torch.load(tmp_path / "opt.pt"))
    for grads in stream[4:]:
        step_with(ours, params, grads)
        step_with(resumed, resumed_params, grads)
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(ours.state[p][key], resumed.state[q][key])


def test_state_dict_keeps_float32_moments_for_bfloat16_params():
    params = make_params(torch.bfloat16)
    ours = MetalAdamW(params, amsgrad=True)
    for grads in gradient_stream(params, 3):
        step_with(ours, params, grads)
    loaded_params = clone(params)
    loaded = MetalAdamW(loaded_params, amsgrad=True)
    loaded.load_state_dict(ours.state_dict())  # torch's loader alone would cast the moments to bf16
    for p, q in zip(params, loaded_params):
        for key in STATE_KEYS:
            assert loaded.state[q][key].dtype == torch.float32
            assert torch.equal(loaded.state[q][key], ours.state[p][key])
            if p.numel():  # copies: the two optimizers never share state
                assert loaded.state[q][key].data_ptr() != ours.state[p][key].data_ptr()
    # Into torch.optim.AdamW: torch casts to the parameters' dtype, as for any of its own state dicts.
    theirs = torch.optim.AdamW(clone(params))
    theirs.load_state_dict(ours.state_dict())
    assert theirs.state[theirs.param_groups[0]["params"][0]]["exp_avg"].dtype == torch.bfloat16


BAD_ARGS = [
    ("lr", dict(lr=-1e-3), "Invalid learning rate: -0.001"),
    ("eps", dict(eps=-1.0), "Invalid epsilon value: -1.0"),
    ("beta1", dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0: 1.0"),
    ("beta2", dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1: -0.1"),
    ("betas-arity", dict(betas=(0.9,)), r"betas must be a pair"),
    ("weight-decay", dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
    ("tensor-betas", dict(betas=(torch.tensor(0.9), torch.tensor(0.99))), "betas must be a float, not a Tensor"),
    ("tensor-eps", dict(eps=torch.tensor(1e-8)), "eps must be a float, not a Tensor"),
    ("tensor-lr-2", dict(lr=torch.tensor([1e-3, 1e-3])), "Tensor lr must be 1-element"),
    ("betas-mixed", dict(betas=(0.9, torch.tensor(0.99))), "betas must be either both floats or both Tensors"),
    ("capturable", dict(capturable=True), "capturable=True is not supported: CUDA-graph capture"),
    ("differentiable", dict(differentiable=True), "differentiable=True is not supported: the step is not diff"),
]


@pytest.mark.parametrize("kwargs,match", [b[1:] for b in BAD_ARGS], ids=[b[0] for b in BAD_ARGS])
def test_hyperparameter_validation(kwargs, match):
    with pytest.raises(ValueError, match="MetalAdamW: " + match):
        MetalAdamW([torch.zeros(2, requires_grad=True)], **kwargs)


def test_group_validation_and_unsupported_inputs():
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="MetalAdamW: Invalid learning rate: -1"):
        MetalAdamW([dict(params=[p], lr=-1)])
    with pytest.raises(ValueError, match="MetalAdamW: capturable=True is not supported"):
        MetalAdamW([dict(params=[p], capturable=True)])
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    opt = MetalAdamW(embedding.parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="MetalAdamW does not support sparse gradients"):
        opt.step()
    z = torch.zeros(2, dtype=torch.complex64, requires_grad=True)
    z.grad = torch.ones_like(z)
    with pytest.raises(TypeError, match="MetalAdamW: parameters must be real floating point"):
        MetalAdamW([z]).step()
    with pytest.raises(ValueError, match="metalcore.optim.adamw: exp_avgs must have one entry per parameter"):
        adamw([p], [p], [], [p], [], [torch.tensor(0.0)], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
              weight_decay=0.0, amsgrad=False, maximize=False)


def test_step_compiles_fullgraph():
    params = make_params(torch.float32)
    reference = clone(params)
    ours, eager = MetalAdamW(params, lr=1e-2, amsgrad=True), MetalAdamW(reference, lr=1e-2, amsgrad=True)
    compiled_step = torch.compile(ours.step, fullgraph=True)
    for grads in gradient_stream(params, 3):
        for p, g in zip(params, grads):
            p.grad = g
        compiled_step()
        step_with(eager, reference, grads)
    for p, q in zip(params, reference):
        torch.testing.assert_close(p, q)
        for key in STATE_KEYS:
            torch.testing.assert_close(ours.state[p][key], eager.state[q][key])


@pytest.mark.parametrize("kwargs", [dict(fused=True), dict(fused=False), dict(foreach=True), dict(foreach=False),
                                    dict(foreach=None, fused=None), dict(capturable=False, differentiable=False)],
                         ids=["fused", "not-fused", "foreach", "not-foreach", "none", "not-capturable"])
def test_implementation_flags_that_describe_the_step_are_accepted(kwargs):
    """torch's switches among implementations of the same math are accepted and kept in the groups
    (as torch keeps them); the step is the same fused op whatever they say."""
    params = make_params(torch.float32)
    reference = clone(params)
    ours, theirs = MetalAdamW(params, lr=1e-2, **kwargs), torch.optim.AdamW(reference, lr=1e-2, foreach=False)
    assert all(ours.param_groups[0][k] == v for k, v in kwargs.items())
    for grads in gradient_stream(params, 5):
        step_with(ours, params, grads)
        step_with(theirs, reference, grads)
    assert_same_trajectory(ours, params, theirs, reference, torch.float32)


def test_fused_and_foreach_together_raise_like_torch():
    p = [torch.zeros(2, requires_grad=True)]
    for cls in (torch.optim.AdamW, MetalAdamW):
        with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together"):
            cls(p, fused=True, foreach=True)


def test_state_dict_with_plain_number_steps_loads_and_continues():
    """Older checkpoints keep 'step' as a Python number; torch's AdamW converts it on load, and so
    must MetalAdamW (the next step used to raise AttributeError)."""
    params = make_params(torch.float32)
    stream = gradient_stream(params, 6)
    theirs = torch.optim.AdamW(clone(params), lr=1e-2, foreach=False)
    torch_params = theirs.param_groups[0]["params"]
    for grads in stream[:3]:
        step_with(theirs, torch_params, grads)
    saved = copy.deepcopy(theirs.state_dict())
    for state in saved["state"].values():
        state["step"] = int(state["step"].item())
    ours_params = [q.detach().clone().requires_grad_() for q in torch_params]
    ours = MetalAdamW(ours_params, lr=1e-2)
    ours.load_state_dict(saved)
    for grads in stream[3:]:
        step_with(ours, ours_params, grads)
        step_with(theirs, torch_params, grads)
    assert_same_trajectory(ours, ours_params, theirs, torch_params, torch.float32)


MISMATCHED_STATE = {
    "bigger-parameter": ((4, 4), (500, 500)),  # a kernel walking the 500x500 parameter would overrun the state
    "transposed": ((4, 6), (6, 4)),  # equal element counts: the moments would be applied transposed
    "resized-embedding": ((10, 3), (12, 3)),  # resume after resize_token_embeddings
}


@pytest.mark.parametrize("saved_shape,new_shape", MISMATCHED_STATE.values(), ids=MISMATCHED_STATE.keys())
def test_load_state_dict_with_mismatched_shapes_raises(saved_shape, new_shape, backend):
    """A state whose tensors do not match the parameters' shapes is refused at load time, before
    anything is loaded (torch's AdamW refuses it at the next step with a size mismatch); the
    optimizer then steps normally on its own state."""
    old = torch.randn(saved_shape, requires_grad=True)
    old_opt = MetalAdamW([old], amsgrad=True)
    old.grad = torch.randn_like(old)
    old_opt.step()
    p = torch.randn(new_shape, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    ours, theirs = MetalAdamW([p], lr=1e-2, amsgrad=True), torch.optim.AdamW([q], lr=1e-2, amsgrad=True, foreach=False)
    with pytest.raises(RuntimeError, match=r"size mismatch for 'exp_avg'.*state has shape \(%d, %d\)" % saved_shape):
        ours.load_state_dict(old_opt.state_dict())
    assert len(ours.state) == 0
    for grads in gradient_stream([p], 3):
        step_with(ours, [p], grads)
        step_with(theirs, [q], grads)
    assert_same_trajectory(ours, [p], theirs, [q], torch.float32)


def strided_leaves():
    """A non-dense parameter (the layout of a column slice: not contiguous in any order) and a
    contiguous one, whose gradients will arrive as transposed views (as a hook or an all-reduce can
    hand them over)."""
    sliced = torch.empty_strided((6, 5), (9, 1)).normal_().requires_grad_()
    plain = torch.randn(6, 5, requires_grad=True)
    return [sliced, plain]


def test_parameters_and_gradients_with_different_strides(backend):
    """Every layout gets torch's update on every backend (a kernel or torch's fused CPU step that walks
    memory flat used to apply the transposed gradient transposed: error 0.55 after 3 steps at lr 0.1)."""
    params = strided_leaves()
    reference = strided_leaves()
    with torch.no_grad():
        for r, p in zip(reference, params):
            r.copy_(p)
    ours, theirs = MetalAdamW(params, lr=0.1), torch.optim.AdamW(reference, lr=0.1, foreach=False)
    for _ in range(3):
        grads = [torch.randn(5, 6).t() for _ in params]  # transposed views, the strides of neither parameter
        step_with(ours, params, grads)
        step_with(theirs, reference, grads)
    assert_same_trajectory(ours, params, theirs, reference, torch.float32)


# --- torch's own OptimizerInfo inputs (torch.testing._internal.common_optimizers) --------------------
# Built for CUDA, the device with the most of them: every flag torch's machinery adds (foreach, fused,
# differentiable) and the capturable and Tensor-lr configurations. Each runs on CPU tensors here.
ADAMW_INFO = next(info for info in optim_db if info.optim_cls is torch.optim.AdamW)
UNSUPPORTED_FLAGS = {
    "capturable": "CUDA-graph capture of the step is not supported (step counters on the CPU, bias corrections "
                  "on the host): MetalAdamW raises ValueError",
    "differentiable": "the step is one fused op under no_grad, not differentiable: MetalAdamW raises ValueError",
}


def optim_info_cases(info, device="cuda"):
    cases = []
    for optim_input in _get_optim_inputs_including_global_cliquey_kwargs(device, torch.float32, info):
        refused = [flag for flag in UNSUPPORTED_FLAGS if optim_input.kwargs.get(flag)]
        marks = ([pytest.mark.xfail(raises=ValueError, strict=True, reason=UNSUPPORTED_FLAGS[refused[0]])]
                 if refused else [])
        cases.append(pytest.param(optim_input.kwargs, id=optim_input.desc.replace(" ", "-"), marks=marks))
    return cases


@pytest.mark.parametrize("kwargs", optim_info_cases(ADAMW_INFO))
def test_torch_optimizer_info_configurations(kwargs, backend):
    """Each configuration torch tests its AdamW with, through MetalAdamW and torch.optim.AdamW side by
    side: parameters and every piece of state after a few steps."""
    params = make_params(torch.float32)
    reference = clone(params)
    ours = MetalAdamW(params, **copy.deepcopy(kwargs))
    theirs = torch.optim.AdamW(reference, **copy.deepcopy(kwargs))
    for grads in gradient_stream(params, 5):
        step_with(ours, params, grads)
        step_with(theirs, reference, grads)
    assert served_by(ours) == backend
    assert_same_trajectory(ours, params, theirs, reference, torch.float32)


def optim_error_cases(info):
    cases = []
    for error_input in info.optim_error_inputs_func(device="cpu", dtype=torch.float32):
        desc = error_input.optimizer_error_input.desc
        cases.append(pytest.param(error_input, id=desc.replace(" ", "-")))
    return cases


def check_error_input(cls, error_input):
    """torch's own check (test_optim.py's test_errors): the exception type and a regex search."""
    optim_input = error_input.optimizer_error_input
    if error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
        expect = pytest.warns if issubclass(error_input.error_type, Warning) else pytest.raises
        with expect(error_input.error_type, match=error_input.error_regex):
            cls(optim_input.params, **optim_input.kwargs)
    else:
        optimizer = cls(optim_input.params, **optim_input.kwargs)
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            optimizer.step()


@pytest.mark.parametrize("error_input", optim_error_cases(ADAMW_INFO))
def test_torch_optimizer_info_error_inputs(error_input):
    check_error_input(MetalAdamW, error_input)


# --- the op, metalcore::adamw_step_, on each backend against the float64 oracle ---------------------
SIZES = ((1,), (31,), (0,), (3, 11), (4097,), (33,), (3, 700))
HYPER = (1e-2, 0.9, 0.99, 1e-8, 0.1)  # lr, beta1, beta2, eps, weight_decay
LISTS = ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps")


def make_group(dtype, amsgrad, sizes=SIZES, device="cpu"):
    """A group mid-training: random moments (v̂max ≥ v), step counts 0, 1, 2, ... per tensor."""
    params = [torch.randn(s, device=device).to(dtype) for s in sizes]
    exp_avg_sqs = [torch.rand(s, device=device, dtype=state_dtype(p)) * 0.01 for s, p in zip(sizes, params)]
    return dict(
        params=params,
        exp_avgs=[torch.randn(s, device=device, dtype=state_dtype(p)) * 0.1 for s, p in zip(sizes, params)],
        exp_avg_sqs=exp_avg_sqs,
        max_exp_avg_sqs=[v * 1.5 for v in exp_avg_sqs] if amsgrad else [],
        state_steps=[torch.tensor(float(k % 3)) for k in range(len(sizes))],
    )


def copy_group(group, dtype=None):
    """A copy; with ``dtype``, every floating tensor but the step counters in that dtype (the oracle)."""
    return {k: [t.clone() if dtype is None or k == "state_steps" else t.to(dtype) for t in v] for k, v in group.items()}


def op_args(group, grads, amsgrad, maximize):
    return (group["params"], grads, group["exp_avgs"], group["exp_avg_sqs"], group["max_exp_avg_sqs"],
            group["state_steps"], *HYPER, amsgrad, maximize)


def assert_group_within_torch_error(ours, same_dtype, oracle):
    """Every list of the group against the float64 oracle, by the suite's rule: at most twice the
    error of the reference run in the working dtype; step counters exactly."""
    for key in LISTS:
        for k, (got, want, exact) in enumerate(zip(ours[key], same_dtype[key], oracle[key])):
            assert got.dtype == want.dtype and got.shape == want.shape, (key, k)
            if key == "state_steps":
                assert got.item() == want.item() == exact.item(), (key, k)
            else:
                assert_within_torch_error(got, want, exact)


@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16, torch.float64), ids=str)
def test_op_steps_within_torch_error(dtype, amsgrad, maximize, backend):
    """Three steps of the op over sizes 0, 1, 31, 33, 3x11, 3x700, 4097 in one group, each tensor at
    its own step count; float64 is the reference's on every backend (no kernel takes it)."""
    ours = make_group(dtype, amsgrad)
    same_dtype, oracle = copy_group(ours), copy_group(ours, torch.float64)
    for t in range(3):
        grads = [torch.randn_like(p) for p in ours["params"]]
        if t == 0:
            assert adamw_step_.backend_for(*op_args(ours, grads, amsgrad, maximize)) == kernel_expected(backend, dtype)
        adamw_step_(*op_args(ours, grads, amsgrad, maximize))
        adamw_step_.reference(*op_args(same_dtype, grads, amsgrad, maximize))
        adamw_step_.reference(*op_args(oracle, [g.double() for g in grads], amsgrad, maximize))
    assert_group_within_torch_error(ours, same_dtype, oracle)


def test_op_mixed_dtypes_and_more_tensors_than_one_metal_dispatch(backend):
    """Tensors of several dtypes in one group (a launch each); on Metal 259 float32 ones, more than one
    dispatch takes (METALCORE_ADAMW_MAX_TENSORS = 256). Elsewhere 9: one Triton launch takes any
    number, and 259 cost 24 s under the interpreter."""
    group = make_group(torch.float32, False, sizes=[(5,)] * (259 if backend == "metal" else 9) + [(4097,)])
    for dtype in (torch.bfloat16, torch.float16):
        extra = make_group(dtype, False, sizes=((33,), (7, 3)))
        for key in group:
            group[key] += extra[key]
    same_dtype, oracle = copy_group(group), copy_group(group, torch.float64)
    grads = [torch.randn_like(p) for p in group["params"]]
    assert adamw_step_.backend_for(*op_args(group, grads, False, False)) == backend
    adamw_step_(*op_args(group, grads, False, False))
    adamw_step_.reference(*op_args(same_dtype, grads, False, False))
    adamw_step_.reference(*op_args(oracle, [g.double() for g in grads], False, False))
    assert_group_within_torch_error(group, same_dtype, oracle)


def test_op_reads_gradients_only(backend):
    group = make_group(torch.float32, True)
    grads = [torch.randn_like(p) for p in group["params"]]
    before = [g.clone() for g in grads]
    adamw_step_(*op_args(group, grads, True, True))
    assert all(torch.equal(a, b) for a, b in zip(grads, before))


def test_op_empty_group(backend):
    adamw_step_(*op_args(make_group(torch.float32, False, sizes=()), [], False, False))


def test_op_packed_step_counters(backend):
    """Counters packed in one buffer (as MetalAdamW keeps them) advance like separate ones."""
    group = make_group(torch.float32, False, sizes=((5,), (7,), (3,)))
    buffer = torch.tensor([0.0, 4.0, 0.0])
    group["state_steps"] = [buffer[i] for i in range(3)]
    assert shared_step_buffer(group["state_steps"]) is buffer
    same_dtype, oracle = copy_group(group), copy_group(group, torch.float64)
    for _ in range(2):
        grads = [torch.randn_like(p) for p in group["params"]]
        adamw_step_(*op_args(group, grads, False, False))
        adamw_step_.reference(*op_args(same_dtype, grads, False, False))
        adamw_step_.reference(*op_args(oracle, [g.double() for g in grads], False, False))
    assert buffer.tolist() == [2.0, 6.0, 2.0]
    assert_group_within_torch_error(group, same_dtype, oracle)


@pytest.mark.parametrize("bad", ["exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "grads"])
def test_op_refuses_tensors_of_another_shape_before_writing(bad, backend):
    """A state or gradient tensor whose shape is not its parameter's (here 6x4 for a 4x6 parameter:
    equal element counts, so only the shape tells) raises RuntimeError on every backend, with
    nothing written: no kernel walks it, and the reference checks before its first write."""
    group = make_group(torch.float32, True, sizes=((4, 6), (33,)))
    grads = [torch.randn_like(p) for p in group["params"]]
    if bad == "grads":
        grads[0] = torch.randn(6, 4)
    else:
        group[bad][0] = torch.rand(6, 4)
    before = copy_group(group)
    with pytest.raises(RuntimeError, match=rf"size mismatch: {bad}\[0\] has shape \(6, 4\), params\[0\] has shape"):
        adamw_step_(*op_args(group, grads, True, False))
    for key in LISTS:
        assert all(torch.equal(a, b) for a, b in zip(group[key], before[key])), key


def test_op_opcheck(backend):
    from metalcore._op import registered_ops
    group = make_group(torch.bfloat16, True, sizes=((33,), (5, 3)))
    grads = [torch.randn_like(p) for p in group["params"]]
    torch.library.opcheck(registered_ops()["adamw_step_"].custom_op, op_args(group, grads, True, False))


# --- the Triton kernel's launch plans ----------------------------------------------------------------

def triton_module():
    return importlib.import_module("metalcore.optim.adamw_triton")


def test_triton_many_blocks_spread_over_programs(triton_backend, device, monkeypatch):
    """More blocks than programs, blocks of each tensor starting on different programs."""
    monkeypatch.setattr(triton_module(), "BLOCK", 16)
    group = make_group(torch.float32, True, sizes=((100,), (7,), (61,)), device=device)
    same_dtype, oracle = copy_group(group), copy_group(group, torch.float64)
    grads = [torch.randn_like(p) for p in group["params"]]
    adamw_step_(*op_args(group, grads, True, False))
    adamw_step_.reference(*op_args(same_dtype, grads, True, False))
    adamw_step_.reference(*op_args(oracle, [g.double() for g in grads], True, False))
    assert_group_within_torch_error(group, same_dtype, oracle)


def test_triton_misaligned_tensors_use_the_reference(triton_backend, device):
    """The kernel issues 16-byte accesses; a view that starts mid-vector goes to the reference."""
    group = make_group(torch.float32, False, sizes=((9,),), device=device)
    group["params"] = [torch.randn(10, device=device)[1:]]
    assert adamw_step_.backend_for(*op_args(group, [torch.randn(9, device=device)], False, False)) == "reference"


def test_triton_launch_plan_is_reused_and_gradients_rechecked(triton_backend, device):
    """The group's table is built once; a gradient re-created at the same address with another
    layout (here a transposed view of the same memory) is noticed and sent to the reference."""
    kernels = triton_module()
    group = make_group(torch.float32, False, sizes=((4, 6), (33,)), device=device)
    same_dtype, oracle = copy_group(group), copy_group(group, torch.float64)
    memory = torch.randn(24, device=device)
    grads = [memory.view(4, 6), torch.randn(33, device=device)]

    def step():
        adamw_step_(*op_args(group, grads, False, False))
        adamw_step_.reference(*op_args(same_dtype, grads, False, False))
        adamw_step_.reference(*op_args(oracle, [g.double() for g in grads], False, False))

    step()
    key = kernels._plan_key(group["params"], grads, group["exp_avgs"], group["exp_avg_sqs"], [], False)
    plan = kernels._PLANS[key]
    step()
    assert kernels._PLANS[key] is plan
    grads[0] = memory.view(6, 4).t()
    assert grads[0].data_ptr() == memory.data_ptr() and not grads[0].is_contiguous()
    assert adamw_step_.backend_for(*op_args(group, grads, False, False)) == "reference"
    step()
    assert_group_within_torch_error(group, same_dtype, oracle)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_triton_gpu_full_size(dtype, triton_backend, device):
    group = make_group(dtype, True, sizes=[(4096, 1024)] * 16 + [(4096,)] * 16, device=device)
    same_dtype = copy_group(group)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in group["params"]]
        adamw_step_(*op_args(group, grads, True, False))
        adamw_step_.reference(*op_args(same_dtype, grads, True, False))
    for key in LISTS:
        for got, want in zip(group[key], same_dtype[key]):
            assert_close(got, want.double(), got.dtype)


def test_kernels_take_transposed_parameters_and_free_size_one_strides(backend):
    """The layouts that are flat in memory stay on the kernel: a transposed parameter with its
    autograd-style gradient and state (same strides), and a gradient whose size-1 dimension has
    another stride than the parameter's (torch leaves such strides free)."""
    params = [noncontiguous(torch.randn(5, 7)).requires_grad_(), torch.randn(1, 9, requires_grad=True)]
    grads = [torch.randn_like(params[0]), torch.randn(9, 1).t()]
    assert grads[1].is_contiguous() and grads[1].stride() != params[1].stride()
    reference = clone(params)
    ours, theirs = MetalAdamW(params, lr=1e-2), torch.optim.AdamW(reference, lr=1e-2, foreach=False)
    for _ in range(3):
        step_with(ours, params, grads)
        step_with(theirs, reference, grads)
    assert served_by(ours) == backend
    assert_same_trajectory(ours, params, theirs, reference, torch.float32)


# --- CPU and CUDA groups go straight to torch's fused kernel (metalcore/optim/adamw.py, torch_fused_applies).
# The CPU runs the route as CUDA does (torch._fused_adamw_ has a CPU kernel), device counter copies included.

_adamw_module = importlib.import_module("metalcore.optim.adamw")


@pytest.fixture
def routed_on_cpu(monkeypatch):
    """The number of tensors of each step that went to torch's fused kernel."""
    calls = []
    step = _adamw_module.torch_fused_step
    monkeypatch.setattr(_adamw_module, "torch_fused_step", lambda *args: (calls.append(len(args[0])), step(*args)))
    return calls


@pytest.fixture
def counters_copied_on_cpu(monkeypatch):
    """The CPU takes device copies of the step counters, as CUDA does."""
    monkeypatch.setattr(_adamw_module, "COUNTERS_ON_HOST", ())


@pytest.mark.parametrize("amsgrad,maximize", [(False, False), (True, True)])
def test_routed_step_equals_torch_fused_adamw(amsgrad, maximize, routed_on_cpu):
    torch.manual_seed(0)
    ours = [torch.randn(37, 5, requires_grad=True), torch.randn(100, requires_grad=True)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    hyper = dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, amsgrad=amsgrad, maximize=maximize)
    opt, ref = MetalAdamW(ours, **hyper), torch.optim.AdamW(theirs, **hyper, fused=True)
    for _ in range(4):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    assert routed_on_cpu == [2] * 4
    for p, q in zip(ours, theirs):  # the same kernel on the same inputs: equal to the bit
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq", *(("max_exp_avg_sq",) if amsgrad else ())):
            assert torch.equal(opt.state[p][key], ref.state[q][key])
        step = opt.state[p]["step"]
        assert step.device.type == "cpu" and step.dtype == torch.float32 and step.dim() == 0 and step.item() == 4


def test_routed_state_dict_round_trip_and_counters_follow_edits(routed_on_cpu, counters_copied_on_cpu):
    torch.manual_seed(1)
    params = [torch.randn(8, 3, requires_grad=True), torch.randn(5, requires_grad=True)]
    twin = [p.detach().clone().requires_grad_() for p in params]
    opt, ref = MetalAdamW(params, lr=1e-2), torch.optim.AdamW(twin, lr=1e-2, fused=True)

    def step_both():
        for p, q in zip(params, twin):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()

    step_both()
    step_both()
    saved = copy.deepcopy(opt.state_dict())
    assert all(s["step"].device.type == "cpu" and s["step"].item() == 2 for s in saved["state"].values())
    restored = MetalAdamW(params, lr=1e-2)
    restored.load_state_dict(saved)
    opt = restored
    step_both()  # a new buffer: the device copy is made afresh from the loaded counts
    # An edit of a counter (here, what another backend's step does) is seen at the next step.
    opt.state[params[0]]["step"].add_(0.0)
    step_both()
    for p, q in zip(params, twin):
        assert torch.equal(p, q)
        assert opt.state[p]["step"].item() == ref.state[q]["step"].item() == 4
    assert routed_on_cpu == [2] * 4


def test_routing_rule():
    rule = _adamw_module.triton_preferred
    # Host-bound points of the H100 grid go to torch's fused kernel ...
    for n, size in [(1, 4096), (1, 1 << 24), (8, 1 << 21), (64, 262144), (200, 83886), (200, 65536),
                    (1000, 65536), (64, 4096)]:
        assert not rule(n, n * size), (n, size)
    # ... the two where the Triton kernel's GPU time hid its host time stay on it.
    for n, size in [(64, 1 << 20), (200, 1 << 20)]:
        assert rule(n, n * size), (n, size)
    assert not rule(1000, 1000 * (1 << 20))  # 1000 tensors: the kernel's table walk loses on the GPU


def test_route_declines_what_torch_fused_does_not_take(routed_on_cpu):
    applies = _adamw_module.torch_fused_applies
    p = torch.randn(4, 6)
    lists = lambda *ts: [list(t) for t in ts]  # noqa: E731
    g, m, v = torch.randn(4, 6), torch.zeros(4, 6), torch.zeros(4, 6)
    assert applies(*lists([p], [g], [m], [v]), [], False)
    assert not applies(*lists([p], [g.t().contiguous().t()], [m], [v]), [], False)  # a strided gradient
    assert not applies(*lists([p.bfloat16()], [g.bfloat16()], [m], [v]), [], False)  # float32 moments
    assert not applies(*lists([p], [torch.randn(6, 4)], [m], [v]), [], False)  # another shape
    assert not applies(*lists([p], [g], [m], [v]), [], True)  # amsgrad without max_exp_avg_sqs
    with metalcore.use_backend("reference"):  # an explicit backend keeps the op
        assert not applies(*lists([p], [g], [m], [v]), [], False)


def test_routed_device_counters_do_not_outlive_the_optimizer(routed_on_cpu, counters_copied_on_cpu):
    param = torch.randn(3, requires_grad=True)
    param.grad = torch.randn(3)
    opt = MetalAdamW([param])
    opt.step()
    opt.step()
    assert len(_adamw_module._DEVICE_STEPS) >= 1
    buffer = weakref.ref(opt.state[param]["step"]._base)
    del opt
    gc.collect()
    assert buffer() is None


# --- the step's plan (metalcore/optim/adamw.py, GroupPlan): gathered once, checked every step --------
# Contiguous fp32/fp64 groups on the CPU go to torch's fused CPU kernel, as torch.optim.AdamW(fused=True)
# does, so the two are compared to the bit; whatever invalidates a plan must give torch's result.

def fused_twins(shapes=((37, 5), (100,), (1,), (0,), (3, 4, 5)), dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    ours = [torch.randn(s, dtype=dtype, requires_grad=True) for s in shapes]
    return ours, [p.detach().clone().requires_grad_() for p in ours]


def set_grads(ours, theirs, skip=()):
    for i, (p, q) in enumerate(zip(ours, theirs)):
        if i in skip:
            p.grad = q.grad = None
        else:
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()


def assert_bitwise_equal(opt, ours, ref, theirs):
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)
        assert set(opt.state[p]) == set(ref.state[q])
        for key, value in opt.state[p].items():
            if key == "step":
                assert value.device.type == "cpu" and value.dtype == torch.float32 and value.dim() == 0
            assert torch.equal(value, ref.state[q][key]), key


FUSED_CONFIGS = {
    "default": dict(),
    "weight-decay-maximize": dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, maximize=True),
    "amsgrad": dict(lr=1e-2, amsgrad=True, weight_decay=0.0),
    "tensor-lr": dict(lr=torch.tensor(1e-2), weight_decay=0.05, amsgrad=True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("config", FUSED_CONFIGS.values(), ids=FUSED_CONFIGS.keys())
def test_steps_equal_torch_fused_adamw_to_the_bit(config, dtype, routed_on_cpu):
    """Ten steps over two groups (the second with its own hyperparameters), an LR change between
    steps (in place for a tensor lr, as torch's schedulers do), each step through torch's kernel."""
    ours, theirs = fused_twins(dtype=dtype)

    def groups(ps):
        return [dict(params=ps[:3]), dict(params=ps[3:], lr=5e-3, weight_decay=0.2)]

    opt = MetalAdamW(groups(ours), **copy.deepcopy(config))
    ref = torch.optim.AdamW(groups(theirs), **copy.deepcopy(config), fused=True)
    for t in range(10):
        set_grads(ours, theirs)
        opt.step()
        ref.step()
        if t == 4:
            for o in (opt, ref):
                lr = o.param_groups[0]["lr"]
                if isinstance(lr, torch.Tensor):
                    lr.fill_(2e-3)
                else:
                    o.param_groups[0]["lr"] = 2e-3
    assert routed_on_cpu == [3, 2] * 10
    assert_bitwise_equal(opt, ours, ref, theirs)


def test_plan_is_reused_and_rebuilt_when_the_groups_or_state_change(routed_on_cpu):
    ours, theirs = fused_twins()
    opt = MetalAdamW([dict(params=ours[:3])], lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW([dict(params=theirs[:3])], lr=1e-2, weight_decay=0.1, fused=True)

    def step():
        set_grads(ours, theirs)
        opt.step()
        ref.step()
        return list(opt._plans)

    step()
    first = step()
    assert step() == first and first[0] is not None  # reused while nothing changes
    for o, ps in ((opt, ours), (ref, theirs)):
        o.add_param_group(dict(params=ps[3:], lr=3e-3))
    plans = step()
    assert plans[0] is first[0] and plans[1] is not None  # the new group gets a plan of its own
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    ref.load_state_dict(copy.deepcopy(ref.state_dict()))
    plans = step()
    assert plans[0] is not first[0]  # a load rebuilds from the loaded state
    assert step() == plans
    assert_bitwise_equal(opt, ours, ref, theirs)


def test_parameter_without_gradient_for_some_steps(routed_on_cpu):
    """A parameter that misses a gradient is skipped (its value and state untouched, its step count
    behind), then planned in again; one that never has one gets no state."""
    ours, theirs = fused_twins()
    opt = MetalAdamW(ours, lr=1e-2, amsgrad=True)
    ref = torch.optim.AdamW(theirs, lr=1e-2, amsgrad=True, fused=True)
    for t in range(10):
        set_grads(ours, theirs, skip={4} | ({1} if t in (3, 4, 7) else set()))
        before = ours[1].detach().clone()
        opt.step()
        ref.step()
        if t in (3, 4, 7):
            assert torch.equal(ours[1], before)
    assert ours[4] not in opt.state
    assert opt.state[ours[1]]["step"].item() == 7 and opt.state[ours[0]]["step"].item() == 10
    assert_bitwise_equal(opt, ours, ref, theirs)


def test_state_edits_between_steps_are_seen(routed_on_cpu):
    """A parameter's state replaced by an empty dict (torch starts it afresh), a moment replaced by
    another tensor, a step counter replaced, the whole state cleared: each is read at the next step."""
    ours, theirs = fused_twins()
    opt = MetalAdamW(ours, lr=1e-2)
    ref = torch.optim.AdamW(theirs, lr=1e-2, fused=True)
    edits = {
        2: lambda o, ps: o.state.__setitem__(ps[0], {}),
        4: lambda o, ps: o.state[ps[1]].__setitem__("exp_avg", torch.full_like(ps[1], 0.5)),
        6: lambda o, ps: o.state[ps[2]].__setitem__("step", torch.tensor(100.0)),
        8: lambda o, ps: o.state.clear(),
    }
    for t in range(10):
        set_grads(ours, theirs)
        opt.step()
        ref.step()
        if t in edits:
            edits[t](opt, ours)
            edits[t](ref, theirs)
    assert opt.state[ours[0]]["step"].item() == 1  # cleared after the 9th step
    assert_bitwise_equal(opt, ours, ref, theirs)


def test_parameters_converted_to_float64_and_state_reloaded(routed_on_cpu):
    """``model.double()`` keeps the Parameter objects and swaps their data; the state follows through
    load_state_dict (cast to the parameters' dtype, as torch's loader does)."""
    ours, theirs = fused_twins()
    opt = MetalAdamW(ours, lr=1e-2)
    ref = torch.optim.AdamW(theirs, lr=1e-2, fused=True)
    for t in range(8):
        if t == 4:
            for o, ps in ((opt, ours), (ref, theirs)):
                for p in ps:
                    p.data = p.data.double()
                o.load_state_dict(copy.deepcopy(o.state_dict()))
        set_grads(ours, theirs)
        opt.step()
        ref.step()
    assert all(opt.state[p]["exp_avg"].dtype == torch.float64 for p in ours)
    assert_bitwise_equal(opt, ours, ref, theirs)


def test_gradients_of_another_layout_for_a_step_take_the_op(routed_on_cpu):
    """Transposed-view gradients (a hook can hand them over) in the middle of planned steps go to the
    op, which honours strides (torch's fused CPU kernel would walk them flat), then back to torch's kernel."""
    torch.manual_seed(2)
    ours = [torch.randn(6, 5, requires_grad=True), torch.randn(7, requires_grad=True)]
    theirs = clone(ours)
    opt, ref = MetalAdamW(ours, lr=0.1), torch.optim.AdamW(theirs, lr=0.1, foreach=False)
    for t in range(5):
        grads = [torch.randn(5, 6).t() if t == 2 else torch.randn(6, 5), torch.randn(7)]
        step_with(opt, ours, grads)
        step_with(ref, theirs, grads)
    assert routed_on_cpu == [2, 2, 2, 2]
    assert_same_trajectory(opt, ours, ref, theirs, torch.float32)


def test_sparse_gradient_after_planned_steps_raises():
    embedding = torch.nn.Embedding(10, 3)
    opt = MetalAdamW(embedding.parameters())
    embedding.weight.grad = torch.randn(10, 3)
    opt.step()
    opt.step()
    embedding.weight.grad = torch.randn(10, 3).to_sparse()
    before = embedding.weight.detach().clone()
    with pytest.raises(RuntimeError, match="MetalAdamW does not support sparse gradients"):
        opt.step()
    assert torch.equal(embedding.weight, before)


def test_plans_are_not_pickled_and_rebuilt_after_a_copy(routed_on_cpu):
    ours, theirs = fused_twins()
    opt = MetalAdamW(ours, lr=1e-2)
    ref = torch.optim.AdamW(theirs, lr=1e-2, fused=True)
    for _ in range(2):
        set_grads(ours, theirs)
        opt.step()
        ref.step()
    assert "_plans" not in opt.__getstate__()
    twin = copy.deepcopy(opt)
    assert twin._plans == [] and twin.state_dict()["state"][0]["step"].item() == 2
    set_grads(ours, theirs)
    opt.step()
    ref.step()
    assert_bitwise_equal(opt, ours, ref, theirs)
