import copy
import math

import pytest
import torch
from torch import nn
from torch.testing._internal.common_optimizers import OptimizerErrorEnum, optim_db

from metalcore.optim import CombinedOptimizer, MetalAdamW, Muon, MuonWithAuxAdamW, muon_param_groups, muon_update
from oracle import assert_close, assert_lapack_ratio, orthogonality_ratio

STEPS = 20
SHAPES = [(33, 31), (16, 64), (33, 31), (8, 8), (16, 64), (65, 17)]  # repeated shapes batch together


def make_params(shapes=SHAPES, dtype=torch.float32):
    return [torch.randn(s, dtype=dtype, requires_grad=True) for s in shapes]


def clone(params):
    return [p.detach().clone().requires_grad_() for p in params]


def gradient_stream(params, steps=STEPS):
    return [[torch.randn_like(p) for p in params] for _ in range(steps)]


def step_with(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()


CONFIGS = {
    "default": dict(),
    "no-nesterov-rms": dict(lr=0.02, nesterov=False, adjust_lr_fn="match_rms_adamw", weight_decay=0.0),
    "custom": dict(lr=3e-3, momentum=0.9, weight_decay=0.05, ns_coefficients=(2.0, -1.5, 0.5), ns_steps=3,
                   adjust_lr_fn="original", eps=1e-6),
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_matches_torch_muon(config):
    """Newton–Schulz mode against torch.optim.Muon, 20 steps, parameters and momentum buffers.

    The momentum buffers are fp32 and computed identically: float32 tolerance. The parameters receive
    bf16 updates (torch's iteration runs in bf16, and so does ours); our batched matmuls (baddbmm over
    a stack) and torch's per-matrix addmm may round differently, by about one bf16 ulp of an O(1)
    update entry, and ``lr·adjust`` ≤ 0.02·√4 scales that into the parameters, accumulating over 20
    steps: the bf16 table entry (atol 2e-2) bounds 20 × 0.04 × 7.8e-3 = 6e-3 with room to spare.
    In practice the two agree bit for bit on CPU (the same kernels), which the first check shows."""
    params = make_params()
    reference = clone(params)
    ours, theirs = Muon(params, **config), torch.optim.Muon(reference, **config)
    for grads in gradient_stream(params):
        step_with(ours, params, grads)
        step_with(theirs, reference, grads)
    for p, q in zip(params, reference):
        assert_close(p.detach(), q.detach().double(), torch.bfloat16)
        assert set(ours.state[p]) == set(theirs.state[q]) == {"momentum_buffer"}
        assert_close(ours.state[p]["momentum_buffer"], theirs.state[q]["momentum_buffer"].double(), torch.float32)
    # Max observed difference on CPU: 0 (the same bf16 kernels underneath).
    assert max((p - q).abs().max().item() for p, q in zip(params, reference)) < 1e-6


def test_state_dict_interchanges_with_torch():
    params = make_params()
    theirs = torch.optim.Muon(clone(params), lr=0.02)
    ref_params = theirs.param_groups[0]["params"]
    for grads in gradient_stream(params, 3):
        step_with(theirs, ref_params, grads)
    ours = Muon(params, lr=0.02, orthogonalize="polar_express")
    ours.load_state_dict(theirs.state_dict())
    assert ours.param_groups[0]["orthogonalize"] == "polar_express"
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(ours.state[p]["momentum_buffer"], theirs.state[q]["momentum_buffer"])
    back = torch.optim.Muon(clone(params), lr=0.02)
    back.load_state_dict(ours.state_dict())  # torch keeps the extra group key and ignores it


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_svd_mode_updates_are_orthonormal(dtype):
    """'svd' orthogonalization: with momentum 0, no decay and lr 1 (adjust 'original' = √max(1, A/B)),
    the step divided by the LR factor is the exact polar factor: orthonormal rows (wide) or columns
    (tall) by LAPACK's ratio."""
    params = make_params([(40, 24), (24, 40), (40, 24), (32, 32)], dtype)
    before = [p.detach().clone() for p in params]
    opt = Muon(params, lr=1.0, momentum=0.0, nesterov=False, weight_decay=0.0, orthogonalize="svd")
    step_with(opt, params, gradient_stream(params, 1)[0])
    for p, p0 in zip(params, before):
        A, B = p.shape
        O = (p0 - p.detach()).double() / max(1.0, A / B) ** 0.5
        assert_lapack_ratio(orthogonality_ratio(O, dtype, rows=A < B), f"svd update {A}x{B}")


def test_svd_mode_zero_gradient_gives_zero_update():
    p = torch.randn(6, 4, requires_grad=True)
    p0 = p.detach().clone()
    opt = Muon([p], lr=0.1, weight_decay=0.0, orthogonalize="svd")
    p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(p.detach(), p0, atol=0, rtol=0)


@pytest.mark.parametrize("orthogonalize", ["newton_schulz", "polar_express", "svd"])
def test_batching_matches_one_at_a_time(orthogonalize):
    """Same-shape parameters are stacked into one polar call; the result equals stepping each alone
    within float32's TOL (the SVD of a stack may take another LAPACK path than one matrix)."""
    params = make_params()
    singles = clone(params)
    batched = Muon(params, lr=0.02, orthogonalize=orthogonalize)
    alone = [Muon([q], lr=0.02, orthogonalize=orthogonalize) for q in singles]
    for grads in gradient_stream(params, 3):
        step_with(batched, params, grads)
        for opt, q, g in zip(alone, singles, grads):
            step_with(opt, [q], [g])
    for p, q in zip(params, singles):
        assert_close(p.detach(), q.detach().double(), torch.float32)


def test_conv_weights_are_flattened():
    """A (out, in, kh, kw) kernel is orthogonalized as the (out, in·kh·kw) matrix, LR adjusted by that
    shape: the same as Muon on the flattened 2-D parameter."""
    conv = torch.randn(8, 3, 3, 3, requires_grad=True)
    flat = conv.detach().reshape(8, 27).clone().requires_grad_()
    a, b = Muon([conv], lr=0.02), Muon([flat], lr=0.02)
    for _ in range(3):
        g = torch.randn(8, 3, 3, 3)
        conv.grad, flat.grad = g.clone(), g.reshape(8, 27).clone()
        a.step(), b.step()
    torch.testing.assert_close(conv.detach().reshape(8, 27), flat.detach(), atol=0, rtol=0)
    assert a.state[conv]["momentum_buffer"].shape == conv.shape


def test_muon_update_functional():
    p, g, buf = torch.randn(5, 7), torch.randn(5, 7), torch.zeros(5, 7)
    q = p.clone()
    muon_update([p], [g], [buf], lr=0.1, weight_decay=0.0, momentum=0.0, nesterov=False, orthogonalize="svd")
    torch.testing.assert_close(buf, g)
    U, _, Vh = torch.linalg.svd(g.double(), full_matrices=False)
    assert_close(p, q.double() - 0.1 * U @ Vh, torch.float32)
    with pytest.raises(ValueError, match="equal lengths"):
        muon_update([p], [], [buf], lr=0.1, weight_decay=0.0, momentum=0.0, nesterov=False)


BAD = [
    (dict(lr=-1.0), r"Learning rate should be >= 0 but is: -1.0"),
    (dict(momentum=-0.5), r"momentum should be >= 0 but is: -0.5"),
    (dict(weight_decay=-0.1), r"weight decay should be >= 0 but is: -0.1"),
    (dict(adjust_lr_fn="sqrt"), r"Adjust learning rate function sqrt is not supported"),
    (dict(ns_steps=100), r"ns_steps must be an integer in \[1, 100\).*got 100"),
    (dict(ns_steps=0), r"ns_steps must be an integer .*got 0"),
    (dict(ns_coefficients=(1.0, 2.0)), r"Coefficients must be a tuple of exactly 3 values; got \(1.0, 2.0\)"),
    (dict(eps=-1e-7), r"eps should be >= 0 but is: -1e-07"),
    (dict(orthogonalize="qr"), r"orthogonalize must be one of 'newton_schulz', 'polar_express', 'svd'; got 'qr'"),
    (dict(lr=torch.tensor([0.1, 0.2])), r"Tensor lr must be 1-element"),
    (dict(orthogonalize="polar_express", ns_steps=6), r"ns_steps must be at most 5 with .*polar_express.*got 6"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[next(iter(k)) + "-" + str(i) for i, (k, _) in enumerate(BAD)])
def test_bad_hyperparameters_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Muon([torch.randn(3, 3, requires_grad=True)], **kwargs)
    with pytest.raises(ValueError, match=message):  # per-group values are checked too
        Muon([torch.randn(3, 3, requires_grad=True)]).add_param_group(
            dict(params=[torch.randn(2, 2, requires_grad=True)], **kwargs))


def test_bf16_parameters():
    """bf16 parameters and gradients: the state is bf16 like torch's, and the step matches torch's."""
    params = make_params(dtype=torch.bfloat16)
    reference = clone(params)
    ours, theirs = Muon(params, lr=0.02), torch.optim.Muon(reference, lr=0.02)
    for grads in gradient_stream(params, 5):
        step_with(ours, params, grads)
        step_with(theirs, reference, grads)
    for p, q in zip(params, reference):
        assert ours.state[p]["momentum_buffer"].dtype == torch.bfloat16
        assert_close(p.detach(), q.detach().double(), torch.bfloat16)


def test_vectors_rejected():
    with pytest.raises(ValueError, match=r"Muon only supports parameters with at least 2 dimensions.*\[5\]"):
        Muon([torch.randn(5, requires_grad=True)])


def test_save_load_continue_is_exact():
    """Save after 7 steps, load into a fresh optimizer over copied parameters, continue: identical to
    the uninterrupted 20-step run, bit for bit."""
    for orthogonalize in ("newton_schulz", "svd"):
        params = make_params()
        stream = gradient_stream(params)
        opt = Muon(params, lr=0.02, orthogonalize=orthogonalize)
        resumed_params = None
        for t, grads in enumerate(stream):
            if t == 7:
                resumed_params = clone(params)
                resumed = Muon(resumed_params, lr=0.02, orthogonalize=orthogonalize)
                resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
            step_with(opt, params, grads)
            if resumed_params is not None:
                step_with(resumed, resumed_params, grads)
        for p, q in zip(params, resumed_params):
            torch.testing.assert_close(p, q, atol=0, rtol=0)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, x):
        return self.net(x)


class TinyLM(nn.Module):
    """Embedding → 2-layer TransformerEncoder (causal) → LayerNorm → lm_head tied to the embedding."""

    def __init__(self, vocab=32, d=32, tied=True):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight

    def forward(self, idx):
        mask = nn.Transformer.generate_square_subsequent_mask(idx.shape[1])
        return self.lm_head(self.norm(self.encoder(self.embed(idx), mask=mask, is_causal=True)))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_param_groups_split(tied):
    model = TinyLM(tied=tied)
    groups = muon_param_groups(model, lr=0.02, adamw_lr=1e-3, weight_decay=0.01)
    muon_ids = {id(p) for p in groups[0]["params"]}
    adamw_ids = {id(p) for p in groups[1]["params"]}
    assert groups[0]["use_muon"] and not groups[1]["use_muon"]
    assert not muon_ids & adamw_ids and muon_ids | adamw_ids == {id(p) for p in model.parameters()}
    assert id(model.embed.weight) in adamw_ids and id(model.lm_head.weight) in adamw_ids
    assert all(p.ndim >= 2 for p in groups[0]["params"])
    enc = model.encoder.layers[0]
    assert {id(enc.self_attn.in_proj_weight), id(enc.linear1.weight), id(enc.linear2.weight)} <= muon_ids
    assert {id(enc.norm1.weight), id(enc.linear1.bias), id(model.norm.weight)} <= adamw_ids
    assert len(groups[1]["params"]) == sum(1 for _ in model.parameters()) - len(groups[0]["params"])


def test_param_groups_conv():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    groups = muon_param_groups(model)
    assert [tuple(p.shape) for p in groups[0]["params"]] == [(8, 3, 3, 3), (10, 288)]


def train(model, opt, batch, loss_fn, steps, scheduler=None):
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model, *batch)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


def mse(model, x, y):
    return nn.functional.mse_loss(model(x), y)


def next_token(model, idx):
    logits = model(idx[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))


def test_combined_loss_falls_on_mlp():
    model = MLP()
    x = torch.randn(128, 16)
    y = torch.sin(x[:, :1] * 2) + x[:, 1:2] ** 2
    opt = MuonWithAuxAdamW(muon_param_groups(model, lr=0.05, adamw_lr=3e-3))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50)
    losses = train(model, opt, (x, y), mse, 50, sched)
    assert losses[-1] < 0.4 * losses[0], (losses[0], losses[-1])


def test_combined_loss_falls_on_tiny_transformer():
    model = TinyLM()
    # A learnable sequence task: each row counts up from a random start, modulo the vocabulary.
    idx = (torch.randint(0, 32, (16, 1)) + torch.arange(17)) % 32
    opt = MuonWithAuxAdamW(muon_param_groups(model, lr=0.02, adamw_lr=3e-3, orthogonalize="polar_express"))
    losses = train(model, opt, (idx,), next_token, 30)
    # Well below the start (≈26: tied N(0, 1) embeddings give large logits) and below half the
    # loss of a uniform guess, log 32 = 3.47, so the model has learned the task, not only the scale.
    assert losses[-1] < 0.5 * losses[0] and losses[-1] < 0.5 * math.log(32), (losses[0], losses[-1])


def test_combined_matches_separate_optimizers_and_round_trips():
    """The combined optimizer's step is exactly Muon on its groups and MetalAdamW on the others; one
    state_dict holds both kinds of state; save → load → continue is exact; schedulers see all groups."""
    torch.manual_seed(0)
    model = MLP()
    twin = copy.deepcopy(model)
    x, y = torch.randn(32, 16), torch.randn(32, 1)
    opt = CombinedOptimizer(muon_param_groups(model, lr=0.02, adamw_lr=1e-3, weight_decay=0.01))
    groups = muon_param_groups(twin, lr=0.02, adamw_lr=1e-3, weight_decay=0.01)
    muon = Muon(groups[0]["params"], lr=0.02, weight_decay=0.01)
    adamw = MetalAdamW(groups[1]["params"], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)
    for _ in range(3):
        for m in (model, twin):
            m.zero_grad()
            mse(m, x, y).backward()
        opt.step(), muon.step(), adamw.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0)
    state = opt.state_dict()
    kinds = {frozenset(s) for s in state["state"].values()}
    assert kinds == {frozenset({"momentum_buffer"}), frozenset({"step", "exp_avg", "exp_avg_sq"})}

    resumed_model = copy.deepcopy(model)
    resumed = MuonWithAuxAdamW(muon_param_groups(resumed_model, lr=0.02, adamw_lr=1e-3, weight_decay=0.01))
    resumed.load_state_dict(copy.deepcopy(state))
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (opt, resumed)]
    for _ in range(4):
        for m, o, s in ((model, opt, scheds[0]), (resumed_model, resumed, scheds[1])):
            o.zero_grad()
            mse(m, x, y).backward()
            o.step()
            s.step()
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0)
    assert [g["lr"] for g in opt.param_groups] == [0.02 * 0.25, 1e-3 * 0.25]
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_combined_rejects_bad_groups():
    w, b = torch.randn(4, 4, requires_grad=True), torch.randn(4, requires_grad=True)
    with pytest.raises(ValueError, match="use_muon"):
        MuonWithAuxAdamW([dict(params=[w], lr=0.1, weight_decay=0.0)])
    with pytest.raises(ValueError, match="needs 'lr'"):
        MuonWithAuxAdamW([dict(params=[w], use_muon=True, weight_decay=0.0)])
    with pytest.raises(ValueError, match=r"at least 2 dimensions"):
        MuonWithAuxAdamW([dict(params=[b], use_muon=True, lr=0.1, weight_decay=0.0)])
    with pytest.raises(ValueError, match=r"momentum should be >= 0 but is: -1"):
        MuonWithAuxAdamW([dict(params=[w], use_muon=True, lr=0.1, weight_decay=0.0, momentum=-1)])
    with pytest.raises(ValueError, match=r"Invalid beta parameter at index 1: 1.5"):
        MuonWithAuxAdamW([dict(params=[b], use_muon=False, lr=0.1, weight_decay=0.0, betas=(0.9, 1.5))])


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 2, 3)], ids=["0-rows", "0-cols", "conv-0-out"])
def test_zero_size_matrices_step_like_torch(shape):
    """A matrix with no rows (a filtered or not-yet-grown layer) steps like torch.optim.Muon: a
    momentum buffer of its shape, nothing to update, the other parameters unaffected. (Stacking it
    for the batched iteration used to raise.) With no columns, torch's LR adjustment divides by zero;
    here it is the same no-op."""
    params = [torch.randn(shape, requires_grad=True), *make_params([(8, 8)])]
    reference = clone(params)
    ours = Muon(params, lr=0.02)
    theirs = torch.optim.Muon(reference[1:], lr=0.02)  # torch takes 2-D parameters only
    for grads in gradient_stream(params, 3):
        step_with(ours, params, grads)
        step_with(theirs, reference[1:], grads[1:])
    assert ours.state[params[0]]["momentum_buffer"].shape == shape
    torch.testing.assert_close(params[1], reference[1], atol=0, rtol=0)
    if shape[0] == 0 and len(shape) == 2:
        empty = torch.randn(shape, requires_grad=True)
        empty.grad = torch.randn(shape)
        opt = torch.optim.Muon([empty])
        opt.step()
        assert opt.state[empty]["momentum_buffer"].shape == shape


def test_a_bad_shape_group_raises_before_anything_is_written():
    """A momentum buffer of the wrong shape (a stale checkpoint) in the second shape group raises,
    and neither the first group's parameters nor any momentum buffer has moved: the step is checked
    whole before it writes."""
    params = make_params([(8, 8), (8, 8), (6, 4)])
    opt = Muon(params, lr=0.02)
    step_with(opt, params, gradient_stream(params, 1)[0])
    opt.state[params[2]]["momentum_buffer"] = torch.zeros(4, 6)
    before = [p.detach().clone() for p in params]
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in params]
    with pytest.raises(RuntimeError, match=r"size mismatch: momentum_buffers\[2\] has shape \(4, 6\), params\[2\] has "
                                           r"shape \(6, 4\)"):
        step_with(opt, params, gradient_stream(params, 1)[0])
    for p, p0, b0 in zip(params, before, buffers):
        assert torch.equal(p.detach(), p0)
        assert torch.equal(opt.state[p]["momentum_buffer"], b0)


# --- torch's own OptimizerInfo inputs (torch.testing._internal.common_optimizers) --------------------
MUON_INFO = next(info for info in optim_db if info.optim_cls is torch.optim.Muon)


@pytest.mark.parametrize("optim_input", [pytest.param(i, id=i.desc.replace(" ", "-"))
                                         for i in MUON_INFO.optim_inputs_func(device="cpu")])
def test_torch_optimizer_info_configurations(optim_input):
    """Each configuration torch tests its Muon with, through metalcore's Muon and torch.optim.Muon side
    by side: parameters (bf16 iteration, as test_matches_torch_muon) and momentum buffers."""
    params = make_params()
    reference = clone(params)
    ours = Muon(params, **copy.deepcopy(optim_input.kwargs))
    theirs = torch.optim.Muon(reference, **copy.deepcopy(optim_input.kwargs))
    for grads in gradient_stream(params, 5):
        step_with(ours, params, grads)
        step_with(theirs, reference, grads)
    for p, q in zip(params, reference):
        assert_close(p.detach(), q.detach().double(), torch.bfloat16)
        assert_close(ours.state[p]["momentum_buffer"], theirs.state[q]["momentum_buffer"].double(), torch.float32)


def muon_error_cases():
    cases = []
    for error_input in MUON_INFO.optim_error_inputs_func(device="cpu", dtype=torch.float32):
        desc = error_input.optimizer_error_input.desc
        marks = []
        if desc == "only support 2D parameters":
            marks = [pytest.mark.xfail(strict=True, reason="deliberate: parameters with more than 2 dimensions "
                                       "(conv kernels) are orthogonalized as (out, in*kh*kw) matrices, the published "
                                       "recipes' choice, where torch raises")]
        cases.append(pytest.param(error_input, id=desc.replace(" ", "-"), marks=marks))
    return cases


@pytest.mark.parametrize("error_input", muon_error_cases())
def test_torch_optimizer_info_error_inputs(error_input):
    """torch's own check (test_optim.py's test_errors): the exception type and a regex search."""
    optim_input = error_input.optimizer_error_input
    if error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
        expect = pytest.warns if issubclass(error_input.error_type, Warning) else pytest.raises
        with expect(error_input.error_type, match=error_input.error_regex):
            Muon(optim_input.params, **optim_input.kwargs)
    else:
        optimizer = Muon(optim_input.params, **optim_input.kwargs)
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            optimizer.step()
