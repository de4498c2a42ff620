"""metalcore.optim.SOAP against a per-parameter float64 reference written from the paper (Vyas et al.,
arXiv:2409.11321, and its reference code): 30 steps with refreshes, parameters and every state tensor."""

import io

import pytest
import torch

from metalcore.optim import SOAP, soap_update
from kronecker_reference import ReferenceSOAP

STEPS = 30


BASE = dict(lr=3e-3, betas=(0.95, 0.95), shampoo_beta=None, eps=1e-8, weight_decay=0.01, precondition_frequency=4,
            max_precond_dim=10000, merge_dims=False, precondition_1d=False, normalize_grads=False, correct_bias=True)
# Each configuration's first refresh comes once every Gram matrix has full rank: the QR of a
# rank-deficient GG·Q fills the null space from rounding noise (and the eigenvalue sort breaks ties of
# ~1e-17 there), so no two correct implementations agree on it. 5×12 needs 3 gradients for its 12×12
# side, the 7-vector with precondition_1d 7 (its Gram gains rank 1 per step).
CONFIGS = {
    "default-f4": {},
    "wd-shampoo_beta-f3": dict(weight_decay=0.1, shampoo_beta=0.9, betas=(0.9, 0.99), precondition_frequency=3),
    "merge-max8": dict(merge_dims=True, max_precond_dim=8),
    "1d-normalize-nobias-f8": dict(precondition_1d=True, normalize_grads=True, correct_bias=False, lr=1e-2,
                                   precondition_frequency=8),
    "one-sided-max6": dict(max_precond_dim=6, precondition_frequency=3),
}
# Matrices (square, tall, wide, a repeated shape), a conv kernel, 1-D and 0-D parameters.
SHAPES = [(6, 6), (6, 6), (5, 12), (9, 4), (4, 3, 2, 2), (7,), ()]


def run_pair(cfg, dtype, shapes=SHAPES, steps=STEPS, device="cpu"):
    params = [torch.randn(s, dtype=dtype, device=device, requires_grad=True) for s in shapes]
    refs = [ReferenceSOAP(p, cfg) for p in params]
    opt = SOAP(params, **cfg)
    for step in range(steps):
        grads = [torch.randn(p.shape, dtype=dtype) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.to(device)
        opt.step()
        for p, r, g in zip(params, refs, grads):
            if r.Q is None:
                r.first(g, opt.state[p]["Q"])
            else:
                r.step(g)
    return params, refs, opt


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_matches_float64_reference(config):
    """float64 parameters: the batched update and the per-parameter loop differ only by rounding."""
    cfg = {**BASE, **config}
    params, refs, opt = run_pair(cfg, torch.float64)
    for p, r in zip(params, refs):
        st = opt.state[p]
        assert st["step"] == r.t == STEPS - 1
        torch.testing.assert_close(p.detach(), r.p, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(st["exp_avg"], r.m, rtol=1e-8, atol=1e-11)
        torch.testing.assert_close(st["exp_avg_sq"], r.v, rtol=1e-8, atol=1e-14)
        for a, (gg, q) in enumerate(zip(st["GG"], st["Q"])):
            assert (gg is None) == (q is None) == (a not in r.axes)
            if a in r.axes:
                torch.testing.assert_close(gg, r.GG[a], rtol=1e-10, atol=1e-12)
                torch.testing.assert_close(q, r.Q[a], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_float32_tracks_float64_reference(device):
    """float32 against the float64 reference: Adam's 1/√v amplifies rounding in the smallest
    coordinates, so the bound is on the parameters' drift (1e-4 of a 30-step move of ~0.1)."""
    cfg = {**BASE, "merge_dims": True, "max_precond_dim": 8}
    params, refs, _ = run_pair(cfg, torch.float32, device=device)
    for p, r in zip(params, refs):
        torch.testing.assert_close(p.detach().cpu().double(), r.p, rtol=0, atol=1e-4)


def test_parameters_without_gradients_some_steps():
    """A parameter whose gradient is None on some steps is skipped then, and the stacks its
    same-shape neighbours share are rebuilt (state tensors are views into them): every parameter still
    follows its own reference, stepped only when it had a gradient."""
    cfg = {**BASE, "precondition_frequency": 3}
    shapes = [(6, 6), (6, 6), (6, 6), (5, 12)]
    params = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    refs = [ReferenceSOAP(p, cfg) for p in params]
    opt = SOAP(params, **cfg)
    for step in range(20):
        active = [i for i in range(len(params)) if not (i == 1 and step % 3 == 0) and not (i == 3 and step % 4 == 1)]
        grads = {i: torch.randn(params[i].shape, dtype=torch.float64) for i in active}
        for i, p in enumerate(params):
            p.grad = grads[i].clone() if i in grads else None
        opt.step()
        for i, g in grads.items():
            r = refs[i]
            r.first(g, opt.state[params[i]]["Q"]) if r.Q is None else r.step(g)
    for p, r in zip(params, refs):
        torch.testing.assert_close(p.detach(), r.p, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(opt.state[p]["exp_avg"], r.m, rtol=1e-8, atol=1e-11)


def test_merged_shape():
    """The reference's merge rule: consecutive dimensions while the product stays ≤ max_dim."""
    from metalcore.optim._preconditioner import merged_shape

    assert merged_shape((64, 32, 3, 3), 10000) == (6144, 3)
    assert merged_shape((8, 4, 3, 3), 1024) == (288,)
    assert merged_shape((50257, 768), 10000) == (50257, 768)
    assert merged_shape((1, 1), 4) == (1,)


def test_first_step_only_builds_bases():
    p = torch.randn(5, 7, requires_grad=True)
    before = p.detach().clone()
    opt = SOAP([p], weight_decay=0.5)
    p.grad = torch.randn_like(p)
    opt.step()
    assert torch.equal(p.detach(), before)
    assert opt.state[p]["step"] == 0 and all(q is not None for q in opt.state[p]["Q"])


def test_bases_are_batched_by_size():
    """One eigh call on the first step and one qr call per refresh for all parameters of a size."""
    import metalcore.optim.soap as soap_module

    calls = {"eigh": [], "qr": []}
    eigh, qr = soap_module.eigh, soap_module.qr

    def count(name, fn):
        def wrapped(A, *args, **kwargs):
            calls[name].append(tuple(A.shape))
            return fn(A, *args, **kwargs)
        return wrapped

    params = [torch.randn(s, requires_grad=True) for s in [(6, 6), (6, 10), (10, 6), (4, 4, 6)]]
    opt = SOAP(params, precondition_frequency=2)
    soap_module.eigh, soap_module.qr = count("eigh", eigh), count("qr", qr)
    try:
        for _ in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
    finally:
        soap_module.eigh, soap_module.qr = eigh, qr
    # sizes: 6 (left of 6x6, 6x10, right of 6x6, 10x6, last of 4x4x6), 10 (two), 4 (two)
    assert sorted(calls["eigh"]) == sorted([(5, 6, 6), (2, 10, 10), (2, 4, 4)])
    assert sorted(calls["qr"]) == sorted([(5, 6, 6), (2, 10, 10), (2, 4, 4)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_state_dict_save_load_continue_bit_exact(dtype):
    """Save, load into a fresh optimizer, continue: bit for bit; bf16 parameters keep float32 state
    through the load (torch's loader would cast it to bf16)."""
    cfg = {**BASE, "merge_dims": True, "max_precond_dim": 8, "precondition_frequency": 3}
    params = [torch.randn(s, dtype=dtype, requires_grad=True) for s in SHAPES]
    twins = [p.detach().clone().requires_grad_() for p in params]
    opt = SOAP(params, **cfg)
    grads = [[torch.randn_like(p) for p in params] for _ in range(16)]
    for gs in grads[:8]:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    for t, p in zip(twins, params):
        t.data.copy_(p.detach())
    resumed = SOAP(twins, **cfg)
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    for gs in grads[8:]:
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
                assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(value, other))
            else:
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(other))


def test_param_groups_and_closure():
    a, b = torch.randn(6, 6, requires_grad=True), torch.randn(6, 6, requires_grad=True)
    opt = SOAP([{"params": [a]}, {"params": [b], "lr": 0.0, "weight_decay": 0.0}], lr=1e-2)
    b0 = b.detach().clone()

    def closure():
        opt.zero_grad()
        loss = (a @ b).square().sum()
        loss.backward()
        return loss

    losses = [opt.step(closure).item() for _ in range(6)]
    assert torch.equal(b.detach(), b0)
    assert losses[-1] < losses[1]


BAD = [
    (dict(lr=-1.0), "learning rate"), (dict(betas=(1.0, 0.9)), "index 0"), (dict(betas=(0.9, -0.1)), "index 1"),
    (dict(betas=(0.9,)), "betas"), (dict(shampoo_beta=1.5), "shampoo_beta"), (dict(eps=-1e-8), "epsilon"),
    (dict(weight_decay=-0.1), "weight_decay"), (dict(precondition_frequency=0), "precondition_frequency"),
    (dict(precondition_frequency=2.5), "precondition_frequency"), (dict(max_precond_dim=0), "max_precond_dim"),
    (dict(merge_dims=1), "merge_dims"), (dict(lr=float("nan")), "learning rate"),
]


@pytest.mark.parametrize("kwargs,name", BAD, ids=[n for _, n in BAD])
def test_bad_hyperparameters(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SOAP([torch.randn(3, 3, requires_grad=True)], **kwargs)
    opt = SOAP([torch.randn(3, 3, requires_grad=True)])
    with pytest.raises(ValueError, match=name):
        opt.add_param_group({"params": [torch.randn(2, requires_grad=True)], **kwargs})


def test_functional_checks_lengths():
    with pytest.raises(ValueError, match="equal lengths"):
        soap_update([torch.randn(2, 2)], [], [{}], **{k: BASE[k] for k in BASE})
