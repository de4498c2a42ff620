"""metalcore.metal_scaled_dot_product_attention and its ops ``metalcore::sdpa_fwd`` / ``sdpa_bwd``: the
whole contract, in two parts.

1. The public function on its two CPU paths (the ``path`` fixture):

   * ``fused`` — the automatic choice on the CPU (and on CUDA): torch's fused SDPA, judged against
     metalcore's reference run in float64 (``use_backend("reference")``);
   * ``reference`` — metalcore's ops forced by ``use_backend("reference")`` (the materialising oracle),
     judged against torch's SDPA run in float64.

   So each path is checked against the other one's float64 implementation.

2. The ops on every backend (conftest's ``backend`` fixture: the reference, the Triton kernels of
   metalcore/nn/attention_triton.py interpreted on CPU tensors, the Metal shaders of
   shaders/attention.metal through the executor). One rule for every backend: ``out`` and each
   gradient within twice the error of torch's SDPA run in the inputs' dtype, both against metalcore's
   reference in float64 (tests/tolerances.py); ``lse`` (float32) elementwise against float64. An input
   outside a kernel's scope (``kernel_takes``) must be served by the reference.
"""

import contextlib
import dataclasses
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import metalcore
from metalcore._op import observing
from metalcore.nn import metal_scaled_dot_product_attention as sdpa
from metalcore.nn.attention import _mask_for_fused_kernels, sdpa_bwd, sdpa_fwd
from backends import expected_backend
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


# --- 2. The ops on every backend ------------------------------------------------------------------

def kernel_takes(backend, q, k, v, attn_mask):
    """The documented scope of each backend's kernels; every other input runs the reference.

    Triton (attention_triton.py): float16/bfloat16, head dims ``E`` and ``Ev`` of 64 or 128, any mask.
    Metal (attention_metal.py): float32/float16/bfloat16, head dims 1 to 128, a bool, float32 or
    input-dtype mask."""
    dims = (q.shape[-1], v.shape[-1])
    if backend == "triton":
        return q.dtype in (torch.float16, torch.bfloat16) and all(d in (64, 128) for d in dims)
    if backend == "metal":
        return (q.dtype in (torch.float32, torch.float16, torch.bfloat16) and all(1 <= d <= 128 for d in dims)
                and (attn_mask is None or attn_mask.dtype in (torch.bool, torch.float32, q.dtype)))
    return True


def torch_sdpa(q, k, v, attn_mask, is_causal, scale):
    """torch's SDPA on the ops' arguments (torch takes a mask or causality, not both: they are merged)."""
    if attn_mask is not None and is_causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        attn_mask = attn_mask & keep if attn_mask.dtype == torch.bool else attn_mask.masked_fill(~keep, -float("inf"))
        is_causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=k.shape[-3] != q.shape[-3])


def check_ops(backend, q, k, v, attn_mask=None, is_causal=False, scale=None):
    """``sdpa_fwd`` then ``sdpa_bwd`` on ``backend``, judged by the one rule (module docstring); returns
    ``out``, ``lse``, the gradients and the float64 ``lse``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    served = expected_backend(backend if kernel_takes(backend, q, k, v, attn_mask) else "reference", q, k, v)
    assert sdpa_fwd.backend_for(q, k, v, attn_mask, is_causal, scale) == served
    out, lse = sdpa_fwd(q, k, v, attn_mask, is_causal, scale)
    dout = torch.randn_like(out)
    assert sdpa_bwd.backend_for(dout, q, k, v, out, lse, attn_mask, is_causal, scale) == served
    grads = sdpa_bwd(dout, q, k, v, out, lse, attn_mask, is_causal, scale)
    assert out.dtype == q.dtype and out.shape == (*q.shape[:3], v.shape[-1]) and out.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    for g, x in zip(grads, (q, k, v)):
        assert g.dtype == x.dtype and g.shape == x.shape and g.is_contiguous()

    q64, k64, v64 = (t.double() for t in (q, k, v))
    mask64 = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.double()
    out64, lse64 = sdpa_fwd.reference(q64, k64, v64, mask64, is_causal, scale)
    grads64 = sdpa_bwd.reference(dout.double(), q64, k64, v64, out64, lse64, mask64, is_causal, scale)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    theirs = torch_sdpa(*leaves, attn_mask, is_causal, scale)
    # Rows that attend nothing: torch gives 0 (the oracle's answer) since 2.5; NaN in older versions.
    theirs_all = [t.detach().nan_to_num() for t in (theirs, *torch.autograd.grad(theirs, leaves, dout))]
    assert_close(lse, lse64, torch.float32)
    for name, a, t, e in zip(("out", "dq", "dk", "dv"), (out, *grads), theirs_all, (out64, *grads64)):
        assert torch.isfinite(a).all(), name
        assert_within_torch_error(a, t, e)
    return out, lse, grads, lse64


# The dtypes each backend's kernels take. Every case runs on every backend, causal and not; the dtype
# rotates over the backend's dtypes from one case to the next (a full cross product tripled the
# interpreter's and the executor's time for no case they do not already see in some dtype).
BACKEND_DTYPES = {"reference": (torch.float32, torch.float16, torch.bfloat16),
                  "triton": (torch.float16, torch.bfloat16),
                  "metal": (torch.float32, torch.float16, torch.bfloat16)}
OP_CASES = [  # (B, H, Hkv, L, S, E, Ev)
    (1, 2, 2, 1, 1, 64, 64),        # one query, one key
    (1, 4, 2, 33, 65, 64, 64),      # GQA, L < S: tails one row past 2 and 4 Metal tiles of 16, Triton's 64
    (2, 2, 1, 65, 33, 128, 128),    # multi-query, L > S, the largest head dim
    (2, 2, 1, 31, 17, 128, 128),    # L > S inside the first Triton block
    (1, 2, 1, 130, 70, 128, 64),    # two Triton query blocks of 128 (the second of 2 rows), Ev != E
    (1, 1, 1, 1, 1, 8, 8),          # head dims outside Triton's scope (the reference serves there)
    (1, 2, 1, 17, 16, 40, 72),      # E != Ev, neither a multiple of 32
    (2, 3, 3, 5, 33, 3, 5),         # tiny head dims
]
OP_RUNS = [(backend, dtypes[(2 * i + causal) % len(dtypes)], causal, case)
           for backend, dtypes in BACKEND_DTYPES.items() for i, case in enumerate(OP_CASES) for causal in (False, True)]


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("backend,dtype,is_causal,case", OP_RUNS, indirect=["backend"],
                         ids=["{}-B{}-H{}-Hkv{}-L{}-S{}-E{}-Ev{}-".format(b, *c) + ("causal" if causal else "full")
                              + f"-{str(d).removeprefix('torch.')}" for b, d, causal, c in OP_RUNS])
def test_ops(case, is_causal, dtype, backend, device):
    B, H, Hkv, L, S, E, Ev = case
    q = torch.randn(B, H, L, E, device=device).to(dtype)
    k = torch.randn(B, Hkv, S, E, device=device).to(dtype)
    v = torch.randn(B, Hkv, S, Ev, device=device).to(dtype)
    check_ops(backend, q, k, v, None, is_causal)


MASK_CASES = [  # (B, H, Hkv, L, S, E, mask shape, mask dtype ("input": the inputs'), is_causal)
    (2, 2, 1, 37, 50, 64, (2, 1, 37, 50), torch.bool, False),      # broadcast over heads
    (2, 2, 1, 19, 37, 32, (2, 1, 19, 37), torch.bool, False),      # a head dim only Metal's kernels take
    (1, 4, 2, 33, 70, 128, (1, 4, 1, 70), torch.float32, False),   # key padding, broadcast over queries
    (2, 2, 2, 40, 40, 64, (1, 1, 40, 40), "input", False),         # one mask for the batch, in q's dtype
    (1, 2, 1, 33, 18, 64, (1, 2, 33, 18), torch.bool, True),       # mask and causality together
]
# Every mask case in every dtype a kernel takes (the reference: one, rotating).
MASK_RUNS = [(backend, dtype, case) for backend, dtypes in BACKEND_DTYPES.items() for i, case in enumerate(MASK_CASES)
             for dtype in (dtypes if backend != "reference" else dtypes[i % len(dtypes):][:1])]


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("backend,dtype,case", MASK_RUNS, indirect=["backend"],
                         ids=[f"{b}-{c[6]}-{c[7]}-{'causal' if c[8] else 'full'}-{d}".replace(" ", "").replace("torch.", "")
                              for b, d, c in MASK_RUNS])
def test_ops_with_masks(case, dtype, backend, device):
    """Rows that attend nothing (all-False bool or all −inf float) give out = 0, lse = −inf and zero
    gradients (torch's safe softmax); keys masked with finfo.min (Hugging Face's padding) or −inf drop
    out of the other rows."""
    B, H, Hkv, L, S, E, mshape, mdtype, is_causal = case
    mdtype = dtype if mdtype == "input" else mdtype
    q = torch.randn(B, H, L, E, device=device).to(dtype)
    k = torch.randn(B, Hkv, S, E, device=device).to(dtype)
    v = torch.randn(B, Hkv, S, E, device=device).to(dtype)
    if mdtype == torch.bool:
        mask = torch.rand(mshape, device=device) > 0.3
        mask[..., 3, :] = False
    else:
        mask = torch.randn(mshape, device=device).to(mdtype)
        mask[..., 5:9] = torch.finfo(mdtype).min
        mask[..., 11] = -float("inf")
        if mshape[-2] > 1:
            mask[..., 2, :] = -float("inf")
    out, lse, grads, lse64 = check_ops(backend, q, k, v, mask, is_causal)
    dead = torch.isneginf(lse64)
    assert dead.any() == (mshape[-2] > 1)
    assert (out[dead] == 0).all() and torch.isneginf(lse[dead]).all() and (grads[0][dead] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_row_masked_with_finfo_min_averages_v(dtype, backend, device):
    """A query row whose every key is masked with finfo.min (not −inf) stays finite, as in torch: all its
    scores round to the same value, so its output is the plain average of V, as torch's SDPA gives in
    float64. (The mask, scaled to base 2, would overflow to −inf without the kernels' clamp.) So does
    the reference op, which takes P from the row maximum: at −3.4·10³⁸ the lse has no digits left for
    ln S, and P = exp(z − lse) would be 1 for every key (the sum of V)."""
    q, k, v = (torch.randn(1, 1, n, 64, device=device).to(dtype) for n in (4, 6, 6))
    mask = torch.randn(1, 1, 4, 6, device=device).to(dtype)
    mask[..., 1, :] = torch.finfo(dtype).min
    assert sdpa_fwd.backend_for(q, k, v, mask, False, 0.25) == (backend if kernel_takes(backend, q, k, v, mask)
                                                                 else "reference")
    out, lse = sdpa_fwd(q, k, v, mask, False, 0.25)
    assert torch.isfinite(lse).all()
    assert_close(out[0, 0, 1], v[0, 0].double().mean(0), dtype)
    torch64 = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask.double(), scale=0.25)
    assert_close(out[0, 0, 1], torch64[0, 0, 1], dtype)


@pytest.mark.usefixtures("poison")
def test_ops_on_strided_views(backend, device):
    """(B, S, H, E) tensors passed as transposed views, v a slice of a wider tensor, and an expanded
    mask (stride 0): the kernels read through the strides."""
    q = torch.randn(1, 40, 4, 64, dtype=torch.bfloat16, device=device).transpose(1, 2)
    k = torch.randn(1, 70, 2, 64, dtype=torch.bfloat16, device=device).transpose(1, 2)
    v = torch.randn(1, 2, 70, 160, dtype=torch.bfloat16, device=device)[..., 16:80]
    mask = (torch.rand(1, 1, 40, 70, device=device) > 0.2).expand(1, 4, 40, 70)
    check_ops(backend, q, k, v, None, True)
    check_ops(backend, q, k, v, mask, False, scale=0.3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_public_function_and_autograd_on_the_backend(dtype, backend, device):
    q = torch.randn(2, 4, 9, 64, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn(2, 2, 13, 64, dtype=dtype, device=device, requires_grad=True)
    v = torch.randn(2, 2, 13, 64, dtype=dtype, device=device, requires_grad=True)
    ran = []
    with observing(lambda op, served: ran.append((op, served))):
        out = sdpa(q, k, v, is_causal=True, enable_gqa=True)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    assert ran == [("sdpa_fwd", backend), ("sdpa_bwd", backend)]
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    with metalcore.use_backend("reference"):
        out64 = sdpa(*leaves64, is_causal=True, enable_gqa=True)
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert_within_torch_error(out, theirs, out64)
    for g, t, e in zip(grads, torch.autograd.grad(theirs, (q, k, v), dout),
                       torch.autograd.grad(out64, leaves64, dout.double())):
        assert_within_torch_error(g, t, e)


def test_ops_without_keys_or_queries(backend, device):
    """An empty argument is answered by the op core (no launch): no keys give out = 0, lse = −inf and
    zero gradients; no queries give empty outputs and zero dk, dv."""
    q = torch.randn(1, 2, 5, 64, dtype=torch.float16, device=device)
    kv = torch.randn(1, 1, 0, 64, dtype=torch.float16, device=device)
    assert sdpa_fwd.backend_for(q, kv, kv, None, False, 0.25) == "reference"
    out, lse = sdpa_fwd(q, kv, kv, None, False, 0.25)
    assert (out == 0).all() and torch.isneginf(lse).all()
    dq, dk, dv = sdpa_bwd(torch.randn_like(out), q, kv, kv, out, lse, None, False, 0.25)
    assert (dq == 0).all() and dk.shape == kv.shape and dv.shape == kv.shape
    q0 = q[:, :, :0]
    out0, lse0 = sdpa_fwd(q0, q, q, None, False, 0.25)
    assert out0.shape == (1, 2, 0, 64) and lse0.shape == (1, 2, 0)
    dq0, dk0, dv0 = sdpa_bwd(out0, q0, q, q, out0, lse0, None, False, 0.25)
    assert dq0.shape == q0.shape and (dk0 == 0).all() and (dv0 == 0).all()


SCOPE = [  # (id, q/k/v dtype, E, Ev, mask dtype, the backends whose kernels take it)
    ("bf16-E64", torch.bfloat16, 64, 64, None, {"triton", "metal"}),
    ("fp16-E128-Ev64-bool", torch.float16, 128, 64, torch.bool, {"triton", "metal"}),
    ("fp32", torch.float32, 64, 64, None, {"metal"}),
    ("fp64", torch.float64, 64, 64, None, set()),
    ("bf16-E32", torch.bfloat16, 32, 32, None, {"metal"}),
    ("bf16-Ev48", torch.bfloat16, 64, 48, None, {"metal"}),
    ("fp16-E129", torch.float16, 129, 129, None, set()),
    ("fp32-Ev129", torch.float32, 16, 129, None, set()),
    ("fp32-fp16-mask", torch.float32, 16, 16, torch.float16, set()),
    ("fp32-fp64-mask", torch.float32, 16, 16, torch.float64, set()),
]


@pytest.mark.parametrize("dtype,E,Ev,mdtype,takers", [c[1:] for c in SCOPE], ids=[c[0] for c in SCOPE])
def test_what_each_kernel_takes(dtype, E, Ev, mdtype, takers, backend, device):
    q, k = (torch.randn(1, 2, 3, E, device=device, dtype=dtype) for _ in range(2))
    v = torch.randn(1, 2, 3, Ev, device=device, dtype=dtype)
    mask = None if mdtype is None else torch.zeros(1, 1, 3, 3, device=device, dtype=mdtype)
    want = backend if backend in takers | {"reference"} else "reference"
    assert kernel_takes(backend, q, k, v, mask) == (want == backend)
    assert sdpa_fwd.backend_for(q, k, v, mask, False, 0.1) == want


def test_opcheck_on_the_backend(backend, device):
    q = torch.randn(1, 2, 5, 64, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 1, 7, 64, device=device, dtype=torch.bfloat16) for _ in range(2))
    assert sdpa_fwd.backend_for(q, k, v, None, True, 0.125) == backend
    torch.library.opcheck(sdpa_fwd.custom_op, (q, k, v, None, True, 0.125))
    out, lse = sdpa_fwd(q, k, v, None, True, 0.125)
    dout = torch.randn_like(out)
    assert sdpa_bwd.backend_for(dout, q, k, v, out, lse, None, True, 0.125) == backend
    torch.library.opcheck(sdpa_bwd.custom_op, (dout, q, k, v, out, lse, None, True, 0.125))


# --- Triton's own paths ----------------------------------------------------------------------------

def triton_kernels():
    return importlib.import_module("metalcore.nn.attention_triton")


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_triton_forward_through_tensor_descriptors(is_causal, device, monkeypatch, triton_backend):
    """The TMA forward (descriptors instead of pointers): ragged blocks at both ends, GQA, a
    transposed sequence-first q, and a mask; a misaligned view falls back to the pointer path."""
    monkeypatch.setattr(triton_kernels(), "FWD_TMA", True)
    q = torch.randn(1, 130, 4, 64, dtype=torch.bfloat16, device=device).transpose(1, 2)
    k, v = (torch.randn(1, 2, 70, 64, dtype=torch.bfloat16, device=device) for _ in range(2))
    assert all(triton_kernels()._tma_ready(t) for t in (q, k, v))
    check_ops("triton", q, k, v, None, is_causal)
    check_ops("triton", q, k, v, torch.randn(1, 1, 130, 70, device=device), is_causal)
    assert not triton_kernels()._tma_ready(torch.randn(1, 2, 70, 65, dtype=torch.bfloat16, device=device)[..., 1:])


def test_triton_cpu_tensors_really_run_the_interpreted_kernel(triton_backend):
    kernel = triton_kernels()._sdpa_fwd_kernel
    x = torch.randn(1, 1, 3, 64, dtype=torch.float16)
    kernel.interpreted = None
    sdpa_fwd(x, x, x, None, True, 0.125)
    assert kernel.interpreted is not None and kernel.compiled is None


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4, 32, 32, 2048, 128), (8, 16, 16, 1024, 64), (4, 32, 8, 2048, 128)],
                         ids=lambda s: f"B{s[0]}-H{s[1]}-Hkv{s[2]}-S{s[3]}-E{s[4]}")
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_gpu_full_size(shape, is_causal, device, triton_backend):
    """Full sizes, compiled, against torch in float32 (the float64 reference would hold B·H·S² scores
    of 8 bytes: 4 GiB at the first shape)."""
    B, H, Hkv, S, E = shape
    leaves = [torch.randn(B, n, S, E, dtype=torch.bfloat16, device=device).requires_grad_() for n in (H, Hkv, Hkv)]
    out, _ = sdpa_fwd(*leaves, None, is_causal, E ** -0.5)
    theirs = torch_sdpa(*leaves, None, is_causal, E ** -0.5)
    leaves32 = [t.detach().float().requires_grad_() for t in leaves]
    expected = torch_sdpa(*leaves32, None, is_causal, E ** -0.5)
    assert_within_torch_error(out, theirs, expected)
    dout = torch.randn_like(out)
    for ours, t, e in zip(torch.autograd.grad(out, leaves, dout), torch.autograd.grad(theirs, leaves, dout),
                          torch.autograd.grad(expected, leaves32, dout.float())):
        assert_within_torch_error(ours, t, e)
