"""metalcore.optim.Shampoo against a per-block float64 reference written from the papers (Gupta et al.,
arXiv:1802.09568; distributed Shampoo, arXiv:2309.06497): 30 steps with refreshes, parameters and
every state tensor."""

import io

import pytest
import torch

from metalcore.optim import Shampoo, shampoo_update
from kronecker_reference import ReferenceShampoo

STEPS = 30


BASE = dict(lr=1e-2, betas=(0.9, 0.999), epsilon=1e-10, weight_decay=0.0, max_preconditioner_dim=4,
            precondition_frequency=3, start_preconditioning_step=None, use_bias_correction=True, grafting="adam",
            grafting_beta2=0.999, grafting_epsilon=1e-8, merge_dims=True)
CONFIGS = {
    "adam-graft-f3": {},
    "sgd-graft-wd-start5": dict(grafting="sgd", weight_decay=0.1, start_preconditioning_step=5, betas=(0.0, 0.99)),
    "no-graft-adagrad-f1": dict(grafting=None, betas=(0.5, 1.0), precondition_frequency=1, lr=1e-3),
    "no-merge-big-blocks-nobias": dict(merge_dims=False, max_preconditioner_dim=8, use_bias_correction=False),
}
# Blocks of 4: a square matrix, matrices with edge blocks on one or both sides and a repeated shape,
# a conv kernel (merged to (4, 3, 4) at B = 4), 1-D and 0-D parameters.
SHAPES = [(4, 4), (10, 7), (10, 7), (3, 9), (4, 3, 2, 2), (7,), ()]


def run_pair(cfg, dtype, shapes=SHAPES, steps=STEPS, device="cpu"):
    params = [torch.randn(s, dtype=dtype, device=device, requires_grad=True) for s in shapes]
    refs = [ReferenceShampoo(p, cfg) for p in params]
    opt = Shampoo(params, **cfg)
    for _ in range(steps):
        grads = [torch.randn(p.shape, dtype=dtype) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.to(device)
        opt.step()
        for r, g in zip(refs, grads):
            r.step(g)
    return params, refs, opt


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_matches_float64_reference(config):
    """float64 parameters: the batched update and the per-block loop differ only by rounding."""
    cfg = {**BASE, **config}
    params, refs, opt = run_pair(cfg, torch.float64)
    for p, r in zip(params, refs):
        st = opt.state[p]
        assert st["step"] == r.t == STEPS
        torch.testing.assert_close(p.detach(), r.p, rtol=1e-9, atol=1e-11)
        if cfg["betas"][0] > 0:
            torch.testing.assert_close(st["exp_avg"], r.m, rtol=1e-10, atol=1e-12)
        assert ("exp_avg" in st) == (cfg["betas"][0] > 0)
        assert ("exp_avg_sq" in st) == (cfg["grafting"] == "adam")
        if cfg["grafting"] == "adam":
            torch.testing.assert_close(st["exp_avg_sq"], r.v, rtol=1e-10, atol=1e-12)
        for ours, theirs in ((st["factors"], r.blocks_as_state(r.F)), (st["inv_roots"], r.blocks_as_state(r.R))):
            assert [t.shape for t in ours] == [t.shape for t in theirs]
            for x, y in zip(ours, theirs):
                torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_float32_tracks_float64_reference(device):
    """float32 with ε = 1e-6 (the inverse 4th root of a rank-deficient factor turns ε = 1e-12 into a
    10³ gain on rounding noise): parameters within 1e-4 of the float64 reference after 30 steps."""
    cfg = {**BASE, "epsilon": 1e-6}
    params, refs, _ = run_pair(cfg, torch.float32, device=device)
    for p, r in zip(params, refs):
        torch.testing.assert_close(p.detach().cpu().double(), r.p, rtol=0, atol=1e-4)


def test_parameters_without_gradients_some_steps():
    """A parameter whose gradient is None on some steps is skipped then (its step count lags), and the
    stacks its same-shape blocks share are rebuilt: every parameter still follows its own reference."""
    cfg = {**BASE, "precondition_frequency": 2}
    shapes = [(8, 8), (8, 8), (8, 6), (4, 4)]
    params = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    refs = [ReferenceShampoo(p, cfg) for p in params]
    opt = Shampoo(params, **cfg)
    for step in range(16):
        active = [i for i in range(len(params)) if not (i == 1 and step % 3 == 0) and not (i == 2 and step % 5 == 1)]
        grads = {i: torch.randn(params[i].shape, dtype=torch.float64) for i in active}
        for i, p in enumerate(params):
            p.grad = grads[i].clone() if i in grads else None
        opt.step()
        for i, g in grads.items():
            refs[i].step(g)
    for p, r in zip(params, refs):
        assert opt.state[p]["step"] == r.t
        torch.testing.assert_close(p.detach(), r.p, rtol=1e-9, atol=1e-11)


def test_refresh_is_one_eigh_per_size():
    import metalcore.optim.shampoo as shampoo_module

    calls = []
    eigh = shampoo_module.eigh

    def counted(A, *args, **kwargs):
        calls.append(tuple(A.shape))
        return eigh(A, *args, **kwargs)

    params = [torch.randn(s, requires_grad=True) for s in [(8, 8), (8, 6), (6, 8)]]
    opt = Shampoo(params, max_preconditioner_dim=4, precondition_frequency=2)
    shampoo_module.eigh = counted
    try:
        for _ in range(2):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
    finally:
        shampoo_module.eigh = eigh
    # blocks of 4x4: 4 + 2 + 2, of 4x2: 2, of 2x4: 2 -> 4x4 factors 2*8 + 2 + 2 = 20, 2x2 factors 4
    assert sorted(calls) == [(4, 2, 2), (20, 4, 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_state_dict_save_load_continue_bit_exact(dtype):
    """Save, load into a fresh optimizer, continue: bit for bit; bf16 parameters keep float32 state
    through the load (torch's loader would cast it to bf16)."""
    cfg = {**BASE, "precondition_frequency": 2}
    params = [torch.randn(s, dtype=dtype, requires_grad=True) for s in SHAPES]
    twins = [p.detach().clone().requires_grad_() for p in params]
    opt = Shampoo(params, **cfg)
    grads = [[torch.randn_like(p) for p in params] for _ in range(12)]
    for gs in grads[:5]:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    for t, p in zip(twins, params):
        t.data.copy_(p.detach())
    resumed = Shampoo(twins, **cfg)
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    for gs in grads[5:]:
        for ps, o in ((params, opt), (twins, resumed)):
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            o.step()
    for p, t in zip(params, twins):
        assert torch.equal(p, t)
        for key, value in opt.state[p].items():
            other = resumed.state[t][key]
            for x in value if isinstance(value, list) else [value]:
                assert not isinstance(x, torch.Tensor) or x.dtype == torch.float32
            if isinstance(value, list):
                assert all(torch.equal(a, b) for a, b in zip(value, other))
            else:
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(other))


def test_param_groups_and_closure():
    a, b = torch.randn(6, 6, requires_grad=True), torch.randn(6, 6, requires_grad=True)
    opt = Shampoo([{"params": [a]}, {"params": [b], "lr": 0.0}], lr=1e-2, precondition_frequency=2)
    b0 = b.detach().clone()

    def closure():
        opt.zero_grad()
        loss = (a @ b).square().sum()
        loss.backward()
        return loss

    losses = [opt.step(closure).item() for _ in range(8)]
    assert torch.equal(b.detach(), b0)
    assert losses[-1] < losses[0]


BAD = [
    (dict(lr=-1.0), "learning rate"), (dict(betas=(1.0, 0.9)), "index 0"), (dict(betas=(0.9, 1.5)), "index 1"),
    (dict(betas=0.9), "betas"), (dict(epsilon=0.0), "epsilon"), (dict(weight_decay=-1.0), "weight_decay"),
    (dict(max_preconditioner_dim=0), "max_preconditioner_dim"),
    (dict(precondition_frequency=0), "precondition_frequency"),
    (dict(start_preconditioning_step=0), "start_preconditioning_step"), (dict(grafting="adagrad"), "grafting"),
    (dict(grafting_beta2=1.0), "grafting_beta2"), (dict(grafting_epsilon=-1.0), "grafting_epsilon"),
    (dict(merge_dims="yes"), "merge_dims"),
]


@pytest.mark.parametrize("kwargs,name", BAD, ids=[n for _, n in BAD])
def test_bad_hyperparameters(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Shampoo([torch.randn(3, 3, requires_grad=True)], **kwargs)
    opt = Shampoo([torch.randn(3, 3, requires_grad=True)])
    with pytest.raises(ValueError, match=name):
        opt.add_param_group({"params": [torch.randn(2, requires_grad=True)], **kwargs})


def test_functional_checks_lengths():
    options = {**BASE, "start_preconditioning_step": 3}
    with pytest.raises(ValueError, match="equal lengths"):
        shampoo_update([torch.randn(2, 2)], [], [{}], **options)
