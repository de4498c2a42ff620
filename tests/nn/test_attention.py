"""metalcore.metal_scaled_dot_product_attention, on its two CPU paths (the ``path`` fixture):

* ``fused`` — the automatic choice on the CPU (and on CUDA): torch's fused SDPA, judged against
  metalcore's reference run in float64 (``use_backend("reference")``);
* ``reference`` — metalcore's ops forced by ``use_backend("reference")`` (the materialising oracle),
  judged against torch's SDPA run in float64.

So each path is checked against the other one's float64 implementation. The Triton and Metal kernels
of the same ops are tested in tests/triton/test_attention.py and tests/metal/test_shaders_attention.py."""

import contextlib
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import metalcore
from metalcore._op import observing
from metalcore.nn import metal_scaled_dot_product_attention as sdpa
from metalcore.nn.attention import _mask_for_fused_kernels, sdpa_bwd, sdpa_fwd
from oracle import assert_close, assert_within_torch_error

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
SIZES = ((1, 1), (31, 31), (33, 65), (65, 33), (3, 4097))  # (L, S): odd, L != S both ways, a long row
MASKS = ("none", "causal", "bool", "float")


@pytest.fixture(params=["fused", "reference"])
def path(request):
    """Which implementation the public function runs on these CPU tensors (see the module docstring)."""
    if request.param == "fused":
        yield "fused"
    else:
        with metalcore.use_backend("reference"):
            yield "reference"


@pytest.fixture
def ran_ops():
    """Names of the metalcore ops that ran (the op core reports every execution to its observers)."""
    ran: list[str] = []
    with observing(lambda op, backend: ran.append(op)):
        yield ran


def oracle64(path, fn_args, dout, **kwargs):
    """Output and gradients, in float64, of the implementation ``path`` is judged against."""
    leaves = [t.detach().double().requires_grad_() for t in fn_args]
    kwargs = as64(kwargs)
    if path == "reference":
        mask = kwargs.get("attn_mask")
        if mask is not None and mask.dim() == 1:  # torch's kernels index dim -2 of a mask; broadcasting allows 1-D
            kwargs["attn_mask"] = mask[None]
        return run(F.scaled_dot_product_attention, *leaves, dout.double(), **kwargs)
    with metalcore.use_backend("reference"):
        return run(sdpa, *leaves, dout.double(), **kwargs)


def leaf(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype).requires_grad_()


def make_mask(kind, B, L, S, dtype):
    """Keyword arguments for one mask kind; masks broadcast over heads (bool) or batch and heads (float)."""
    if kind == "causal":
        return dict(is_causal=True)
    if kind == "bool":
        return dict(attn_mask=torch.rand(B, 1, L, S) > 0.25)
    if kind == "float":
        bias = 2 * torch.randn(L, S)
        return dict(attn_mask=bias.masked_fill(torch.rand(L, S) < 0.1, float("-inf")).to(dtype))
    return {}


def run(fn, q, k, v, dout, **kwargs):
    """Output and (dq, dk, dv) of ``fn`` on leaves ``q, k, v``."""
    out = fn(q, k, v, **kwargs)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


def as64(kwargs):
    mask = kwargs.get("attn_mask")
    if mask is not None and mask.is_floating_point():
        return {**kwargs, "attn_mask": mask.double()}
    return kwargs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
@pytest.mark.parametrize("L,S", SIZES, ids=[f"L{L}-S{S}" for L, S in SIZES])
def test_sdpa_output_and_gradients(L, S, gqa, mask, dtype, path):
    B, Hq, Hkv, E, Ev = 2, 4, 2 if gqa else 4, 16, 8
    q, k, v = leaf(B, Hq, L, E, dtype=dtype), leaf(B, Hkv, S, E, dtype=dtype), leaf(B, Hkv, S, Ev, dtype=dtype)
    kwargs = dict(make_mask(mask, B, L, S, dtype), enable_gqa=gqa)
    dout = torch.randn(B, Hq, L, Ev, dtype=dtype)
    ours = run(sdpa, q, k, v, dout, **kwargs)
    assert ours[0].dtype == dtype and ours[0].shape == (B, Hq, L, Ev)
    expected = oracle64(path, (q, k, v), dout, **kwargs)
    names = ("out", "dq", "dk", "dv")
    if dtype == torch.float64:
        for name, a, e in zip(names, ours, expected):
            assert_close(a, e)
        return
    # A reduction: our error against float64 may be at most 2x torch's own in this dtype.
    theirs = run(F.scaled_dot_product_attention, q, k, v, dout, **kwargs)
    for name, a, t, e in zip(names, ours, theirs, expected):
        assert a.dtype == dtype, name
        assert_within_torch_error(a, t, e)


MASK_SHAPES = ((33,), (9, 33), (3, 9, 33), (2, 1, 9, 33), (2, 3, 1, 33), (1, 1, 9, 1))


@pytest.mark.parametrize("shape", MASK_SHAPES, ids=lambda s: "mask" + "x".join(map(str, s)))
def test_broadcast_masks_and_mask_gradient(shape, path):
    q, k, v = leaf(2, 3, 9, 8), leaf(2, 3, 33, 8), leaf(2, 3, 33, 8)
    dout = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    bool_mask = torch.rand(shape) > 0.3
    expected = oracle64(path, (q, k, v), dout, attn_mask=bool_mask)
    for a, e in zip(run(sdpa, q, k, v, dout, attn_mask=bool_mask), expected):
        assert_close(a, e)
    # A float mask that requires grad gets dZ summed over its broadcast dimensions.
    bias = leaf(*shape)
    ours = torch.autograd.grad(sdpa(q, k, v, attn_mask=bias), (q, k, v, bias), dout)
    other = F.scaled_dot_product_attention if path == "reference" else sdpa
    # torch's kernels index dim -2 of a mask; broadcasting rules allow a 1-D one, and metalcore does.
    bias_other = bias[None] if path == "reference" and len(shape) == 1 else bias
    with metalcore.use_backend("reference" if path == "fused" else "auto"):
        expected = torch.autograd.grad(other(q, k, v, attn_mask=bias_other), (q, k, v, bias), dout)
    for a, e in zip(ours, expected):
        assert_close(a, e)


def test_mask_gradient_float32_against_float64(path):
    q, k, v = (leaf(1, 2, 31, 16, dtype=torch.float32) for _ in range(3))
    bias = leaf(2, 31, 31, dtype=torch.float32)
    dout = torch.randn(1, 2, 31, 16)
    grads = torch.autograd.grad(sdpa(q, k, v, attn_mask=bias), (q, k, v, bias), dout)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    out64 = F.scaled_dot_product_attention(*leaves64[:3], attn_mask=leaves64[3])
    theirs = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, bias), (q, k, v, bias), dout)
    for a, t, e in zip(grads, theirs, torch.autograd.grad(out64, leaves64, dout.double())):
        assert_within_torch_error(a, t, e)


def test_float32_mask_with_bfloat16_inputs(path):
    q, k, v = (torch.randn(2, 2, 17, 8, dtype=torch.bfloat16) for _ in range(3))
    bias = torch.randn(17, 17)
    expected = oracle64(path, (q, k, v), torch.zeros(2, 2, 17, 8), attn_mask=bias)[0]
    assert_within_torch_error(sdpa(q, k, v, attn_mask=bias), F.scaled_dot_product_attention(q, k, v, bias), expected)


@pytest.mark.parametrize("kind", ["bool", "float", "finfo_min", "S0"])
def test_fully_masked_rows(kind, path):
    """Query row 1 attends nothing: output 0 and zero gradients (-inf or False everywhere). Hugging
    Face's finfo.min padding keeps the row finite, so it averages V (as torch's SDPA does); the
    gradients through such a row differ between torch's flash kernel (its lse has no digits left for
    ln S) and the math formulas, so that row gets no gradient here, as a padding row gets none in
    training (its label is ignored and no real token attends it)."""
    S = 0 if kind == "S0" else 6
    q, k, v = leaf(2, 2, 5, 8), leaf(2, 2, S, 8), leaf(2, 2, S, 8)
    mask = None
    if kind == "bool":
        mask = torch.rand(5, S) > 0.3
        mask[1] = False
    elif kind in ("float", "finfo_min"):
        mask = torch.randn(5, S, dtype=torch.float64)
        mask[1] = float("-inf") if kind == "float" else torch.finfo(torch.float64).min
    dout = torch.randn(2, 2, 5, 8, dtype=torch.float64)
    if kind == "finfo_min":
        dout[:, :, 1] = 0
    ours = run(sdpa, q, k, v, dout, attn_mask=mask)
    for a, e in zip(ours, oracle64(path, (q, k, v), dout, attn_mask=mask)):
        assert torch.isfinite(a).all()
        assert_close(a, e)
    if kind in ("bool", "float"):
        assert (ours[0][:, :, 1] == 0).all() and (ours[1][:, :, 1] == 0).all()
    if kind == "finfo_min":
        assert_close(ours[0][:, :, 1], v.detach().mean(-2))


def fused_gpu_masks(q, k, v, attn_mask):
    """What the public function runs on a GPU with a mask: the rewritten mask through torch's SDPA
    (its CPU kernel here), times the rows' "attends to something" flags."""
    mask, alive, sunk = _mask_for_fused_kernels(attn_mask, q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, mask)
    return (out if sunk is None else torch.where(sunk, v.mean(-2, keepdim=True), out)) * alive


@pytest.mark.parametrize("kind", ["bool", "float", "finfo_min", "minus_1e9", "nan"])
def test_gpu_mask_rewrite(kind):
    """The mask rewrite for torch's GPU kernels keeps metalcore's contract with no fully masked row left
    and every row's maximum at least -2^16 (cuDNN reads a bool False as -65504, and a finfo.min row
    overflows a kernel that scales by log2(e)): dead rows 0 with zero gradients, finfo.min rows the
    average of V (so are rows below -2^16: -1e9), NaN in a mask row NaN out, on the CPU kernel."""
    q, k, v = leaf(2, 2, 5, 8), leaf(2, 2, 6, 8), leaf(2, 2, 6, 8)
    if kind == "bool":
        mask = torch.rand(5, 6) > 0.3
        mask[1] = False
    else:
        mask = torch.randn(5, 6, dtype=torch.float64).masked_fill(torch.rand(5, 6) < 0.2, float("-inf"))
        mask[1] = float("-inf")
        mask[3] = {"float": 0.5, "finfo_min": torch.finfo(torch.float64).min, "minus_1e9": -1e9,
                   "nan": float("nan")}[kind]
    dout = torch.randn(2, 2, 5, 8, dtype=torch.float64)
    rewritten = _mask_for_fused_kernels(mask, q.dtype)[0]
    row_max = rewritten.amax(-1)
    assert ((row_max >= -2.0 ** 16) | row_max.isnan()).all()
    ours = run(fused_gpu_masks, q, k, v, dout, attn_mask=mask)
    if kind == "nan":
        assert ours[0][:, :, 3].isnan().all() and not ours[0][:, :, 2].isnan().any()
        return
    if kind in ("finfo_min", "minus_1e9"):
        dout[:, :, 3] = 0  # padding rows: no gradient through them (see test_fully_masked_rows)
        ours = run(fused_gpu_masks, q, k, v, dout, attn_mask=mask)
        assert_close(ours[0][:, :, 3], v.detach().mean(-2))
    with metalcore.use_backend("reference"):
        expected = run(sdpa, *(t.detach().requires_grad_() for t in (q, k, v)), dout,
                       attn_mask=mask if kind == "bool" else mask.masked_fill(mask.isfinite() & (mask < -2.0 ** 16),
                                                                   torch.finfo(mask.dtype).min))
    for a, e in zip(ours, expected):
        assert_close(a, e)
    assert (ours[0][:, :, 1] == 0).all() and (ours[1][:, :, 1] == 0).all()


def test_gpu_mask_rewrite_float32_mask_bfloat16_inputs_and_mask_gradient():
    """A float32 mask with bf16 inputs becomes bf16 (the memory-efficient kernel refuses another bias
    dtype); a mask that requires a gradient gets it through the rewrite (the shift is a constant per
    row, so dmask equals torch's), 0 on a fully masked row."""
    q, k, v = (torch.randn(2, 2, 7, 8, dtype=torch.bfloat16) for _ in range(3))
    bias = torch.randn(7, 9)
    rewritten, alive, _ = _mask_for_fused_kernels(bias, q.dtype)
    assert rewritten.dtype == torch.bfloat16 and alive.all()
    q, k, v = leaf(2, 2, 7, 8), leaf(2, 2, 9, 8), leaf(2, 2, 9, 8)
    bias = torch.randn(7, 9, dtype=torch.float64)
    bias[2] = float("-inf")
    bias.requires_grad_()
    out = fused_gpu_masks(q, k, v, bias)
    (dmask,) = torch.autograd.grad(out, bias, torch.randn_like(out))
    expected_bias = bias.detach().clone().requires_grad_()
    with metalcore.use_backend("reference"):
        expected = sdpa(q, k, v, attn_mask=expected_bias)
        (expected_dmask,) = torch.autograd.grad(expected, expected_bias, torch.ones_like(expected))
    assert_close(out, expected)
    (dmask,) = torch.autograd.grad(fused_gpu_masks(q, k, v, bias), bias, torch.ones_like(out))
    assert (dmask[2] == 0).all()
    assert_close(dmask, expected_dmask)


# (query shape, key shape, value shape, enable_gqa): leading dims, batch and head broadcasting.
LAYOUTS = [
    ((9, 8), (7, 8), (7, 5), False),
    ((3, 9, 8), (3, 7, 8), (3, 7, 5), False),
    ((2, 3, 4, 9, 8), (2, 3, 4, 7, 8), (2, 3, 4, 7, 5), False),
    ((2, 3, 4, 9, 8), (2, 3, 2, 7, 8), (2, 3, 2, 7, 5), True),
    ((2, 4, 9, 8), (1, 4, 7, 8), (2, 4, 7, 5), False),
    ((2, 4, 9, 8), (2, 1, 7, 8), (2, 1, 7, 5), False),
    ((2, 1, 9, 8), (2, 4, 7, 8), (2, 4, 7, 5), False),
    ((4, 9, 8), (2, 4, 7, 8), (2, 4, 7, 5), False),
    ((2, 6, 9, 8), (2, 3, 7, 8), (2, 2, 7, 5), True),
]


@pytest.mark.parametrize("qs,ks,vs,gqa", LAYOUTS, ids=[f"q{len(c[0])}d-k{c[1][:-2]}-v{c[2][:-2]}-gqa{int(c[3])}"
                                                       for c in LAYOUTS])
def test_leading_dims_and_broadcasting(qs, ks, vs, gqa, path):
    q, k, v = leaf(*qs), leaf(*ks), leaf(*vs)
    expected_out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    dout = torch.randn_like(expected_out)
    ours = run(sdpa, q, k, v, dout, is_causal=True, enable_gqa=gqa)
    assert ours[0].shape == expected_out.shape
    for a, e in zip(ours, oracle64(path, (q, k, v), dout, is_causal=True, enable_gqa=gqa)):
        assert_close(a, e)


def test_noncontiguous_seq_first_views_and_scale(path):
    """(B, S, H, D) projections viewed as (B, H, S, D), as Hugging Face's attention passes them."""
    q = torch.randn(2, 33, 4, 16, dtype=torch.float64).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 31, 2, 16, dtype=torch.float64).transpose(1, 2).requires_grad_()
    v = torch.randn(2, 31, 2, 16, dtype=torch.float64).transpose(1, 2).requires_grad_()
    dout = torch.randn(2, 4, 33, 16, dtype=torch.float64)
    kwargs = dict(is_causal=True, enable_gqa=True, scale=0.3)
    for a, e in zip(run(sdpa, q, k, v, dout, **kwargs), oracle64(path, (q, k, v), dout, **kwargs)):
        assert_close(a, e)


@pytest.mark.parametrize("shape", [(0, 4, 5, 8), (2, 4, 0, 8)], ids=["batch0", "L0"])
def test_empty(shape, path):
    q, k, v = leaf(*shape), leaf(shape[0], 2, 6, 8), leaf(shape[0], 2, 6, 8)
    out = sdpa(q, k, v, enable_gqa=True)
    assert out.shape == shape
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and (k.grad == 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_dropout(dtype, path):
    """Dropout on the probabilities, drawn as torch draws it from the same seed: torch's own SDPA on
    the fused path, the composite on the reference path (same draws as torch's math backend)."""
    q, k, v = leaf(2, 4, 9, 8, dtype=dtype), leaf(2, 2, 11, 8, dtype=dtype), leaf(2, 2, 11, 8, dtype=dtype)
    mask = torch.rand(9, 11) > 0.2
    dout = torch.randn(2, 4, 9, 8, dtype=dtype)
    torch.manual_seed(7)
    ours = run(sdpa, q, k, v, dout, attn_mask=mask, dropout_p=0.3, enable_gqa=True)
    torch.manual_seed(7)
    with sdpa_kernel(SDPBackend.MATH) if path == "reference" else contextlib.nullcontext():
        theirs = run(F.scaled_dot_product_attention, q, k, v, dout, attn_mask=mask, dropout_p=0.3, enable_gqa=True)
    for a, e in zip(ours, theirs):
        assert torch.isfinite(a).all()
        assert_close(a, e)
    without = run(sdpa, q, k, v, dout, attn_mask=mask, enable_gqa=True)
    assert (ours[0] - without[0]).abs().max() > 0.1  # dropout did drop something
    torch.testing.assert_close(sdpa(q, k, v, dropout_p=1.0, enable_gqa=True), torch.zeros(2, 4, 9, 8, dtype=dtype))


def test_gradcheck(path):
    q, k, v = leaf(1, 2, 3, 4), leaf(1, 1, 5, 4), leaf(1, 1, 5, 3)
    torch.autograd.gradcheck(lambda q, k, v: sdpa(q, k, v, is_causal=True, enable_gqa=True), (q, k, v))
    bias = leaf(3, 5)
    torch.autograd.gradcheck(lambda q, k, v, b: sdpa(q, k, v, attn_mask=b, enable_gqa=True), (q, k, v, bias))


def test_which_path_runs(ran_ops):
    """Automatic on the CPU: torch's fused SDPA, no metalcore op (forward or backward); forced
    reference: the ops."""
    q, k, v = leaf(1, 4, 5, 8), leaf(1, 2, 6, 8), leaf(1, 2, 6, 8)
    sdpa(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
    assert ran_ops == []
    with metalcore.use_backend("reference"):
        sdpa(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
    assert ran_ops == ["sdpa_fwd", "sdpa_bwd"]


def test_backward_runs_on_the_forwards_backend(monkeypatch, triton_backend):
    """A backend block around the forward only (as a user wraps the model call) keeps the backward on
    that backend: here the Triton kernels (interpreted), not the materialising reference."""
    ran = []

    def recording(name, fn):
        return lambda *args: ran.append(name) or fn(*args)

    kernel = sdpa_bwd.kernels["triton"]
    monkeypatch.setitem(sdpa_bwd.kernels, "triton", dataclasses.replace(kernel, fn=recording("triton", kernel.fn)))
    monkeypatch.setattr(sdpa_bwd, "reference", recording("reference", sdpa_bwd.reference))
    q, k, v = (torch.randn(1, 2, 9, 64, dtype=torch.float16, requires_grad=True) for _ in range(3))
    out = sdpa(q, k, v, is_causal=True)       # inside the fixture's use_backend("triton") block
    with metalcore.use_backend("auto"):       # the backward outside it
        out.float().sum().backward()
    assert ran == ["triton"]
    with metalcore.use_backend("reference"):  # and the other way round
        out = sdpa(q, k, v, is_causal=True)
    out.float().sum().backward()
    assert ran == ["triton", "reference"]


def test_op_keeps_lse_out_of_autograd_and_refuses_to_drop_mask_grad():
    q, k, v = leaf(1, 2, 3, 4), leaf(1, 2, 5, 4), leaf(1, 2, 5, 4)
    out, lse = sdpa_fwd(q, k, v, None, False, 0.5)
    assert out.requires_grad and not lse.requires_grad and lse.dtype == torch.float64
    torch.testing.assert_close(lse, torch.logsumexp(0.5 * q @ k.mT, -1))
    out, _ = sdpa_fwd(q, k, v, leaf(1, 1, 3, 5), False, 0.5)
    with pytest.raises(RuntimeError, match="does not differentiate attn_mask"):
        out.sum().backward()


def _qkv(**shapes):
    s = dict(q=(2, 4, 5, 8), k=(2, 4, 6, 8), v=(2, 4, 6, 8)) | shapes
    return torch.randn(s["q"]), torch.randn(s["k"]), torch.randn(s["v"])


BAD = [
    ("mask-and-causal", lambda: sdpa(*_qkv(), attn_mask=torch.ones(5, 6, dtype=torch.bool), is_causal=True),
     ValueError, "attn_mask must be None when is_causal=True"),
    ("gqa-not-dividing", lambda: sdpa(*_qkv(k=(2, 3, 6, 8), v=(2, 3, 6, 8)), enable_gqa=True),
     ValueError, r"with enable_gqa=True the number of heads in key \(3\)"),
    ("heads-without-gqa", lambda: sdpa(*_qkv(k=(2, 2, 6, 8), v=(2, 2, 6, 8))),
     ValueError, "pass enable_gqa=True"),
    ("mask-int", lambda: sdpa(*_qkv(), attn_mask=torch.ones(5, 6, dtype=torch.int64)),
     TypeError, "attn_mask must have dtype bool, float32, float32"),
    ("mask-shape", lambda: sdpa(*_qkv(), attn_mask=torch.ones(3, 5, 6)),
     ValueError, r"attn_mask of shape \(3, 5, 6\) must broadcast to the attention weights' shape \(2, 4, 5, 6\)"),
    ("mask-enlarges-batch", lambda: sdpa(*_qkv(), attn_mask=torch.ones(3, 2, 4, 5, 6)),
     ValueError, "attn_mask of shape"),
    ("dropout", lambda: sdpa(*_qkv(), dropout_p=1.5), ValueError, r"dropout_p must be in \[0, 1\]; got 1.5"),
    ("key-E", lambda: sdpa(*_qkv(k=(2, 4, 6, 7))), ValueError, "key's last dimension must equal query's"),
    ("value-S", lambda: sdpa(*_qkv(v=(2, 4, 7, 8))), ValueError, "value must have key's sequence length S=6"),
    ("batch", lambda: sdpa(*_qkv(k=(3, 4, 6, 8), v=(3, 4, 6, 8))), ValueError, "cannot be broadcast together"),
    ("dtype", lambda: sdpa(torch.randn(2, 5, 8), torch.randn(2, 6, 8, dtype=torch.float64), torch.randn(2, 6, 8)),
     TypeError, "expected all tensors to have the same dtype; got query is float32, key is float64"),
    ("rank", lambda: sdpa(torch.randn(8), torch.randn(6, 8), torch.randn(6, 8)),
     ValueError, "query must have at least 2 dimensions"),
    ("integer", lambda: sdpa(*(torch.ones(2, 3, dtype=torch.int64),) * 3), TypeError, "query must have dtype"),
]


@pytest.mark.parametrize("call,error,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs(call, error, match, path):
    with pytest.raises(error, match=r"metalcore\.metal_scaled_dot_product_attention: .*" + match):
        call()


def test_sdpa_compiles_fullgraph(path):
    q, k, v = (leaf(2, 4, 9, 8, dtype=torch.float32), leaf(2, 2, 9, 8, dtype=torch.float32),
               leaf(2, 2, 9, 8, dtype=torch.float32))
    compiled = torch.compile(sdpa, fullgraph=True)
    out = compiled(q, k, v, is_causal=True, enable_gqa=True)
    expected = sdpa(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), (q, k, v)),
                               torch.autograd.grad(expected.sum(), (q, k, v)))


@pytest.mark.parametrize("where", ["query", "key", "value"])
def test_nan_in_nan_out(where, path):
    """A NaN in an input gives NaN in every output row it reaches (torch's CPU flash kernel alone
    would return 0 on a query row holding a NaN, as if it were fully masked)."""
    q, k, v = (torch.randn(2, 4, 5, 8) for _ in range(3))
    {"query": q, "key": k, "value": v}[where][1, 2, 3, 4] = float("nan")
    out = sdpa(q, k, v)
    nan_rows = out.isnan().any(-1)
    if where == "query":
        assert nan_rows[1, 2, 3] and nan_rows.sum() == 1
    else:
        assert nan_rows[1, 2].all() and nan_rows.sum() == 5


def test_kernel_backend_outside_its_scope_runs_torch_not_the_reference(monkeypatch, triton_backend):
    """use_backend("triton") on float32 inputs (the kernels take 16-bit ones): torch's fused SDPA,
    not the materialising reference; inputs the kernel takes run it."""
    ran = []
    kernel = sdpa_fwd.kernels["triton"]
    monkeypatch.setitem(sdpa_fwd.kernels, "triton", dataclasses.replace(
        kernel, fn=lambda *args: ran.append("triton") or kernel.fn(*args)))
    reference = sdpa_fwd.reference
    monkeypatch.setattr(sdpa_fwd, "reference", lambda *args: ran.append("reference") or reference(*args))
    q, k, v = (torch.randn(1, 2, 9, 64, requires_grad=True) for _ in range(3))
    out = sdpa(q, k, v, is_causal=True)
    out.sum().backward()
    assert ran == [] and q.grad is not None
    assert_close(out, F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True), torch.float32)
    sdpa(q.half(), k.half(), v.half(), is_causal=True)
    assert ran == ["triton"]
