"""shaders/attention.metal (flash attention forward, dQ and dK/dV kernels) through the metal backend on
CPU tensors (the shader executor): ``out``, ``lse`` and every gradient against the float64 reference,
by the 2×-torch rule with the reference run in the inputs' dtype as torch's side (``lse`` elementwise
in float32). Every dtype, causal and not, GQA and multi-query, head dims from 3 to 128 with
``E ≠ Ev``, sequence lengths around the 16-row tiles, L ≠ S both ways, bool/float32/input-dtype
masks with broadcast dimensions and fully masked rows, strided views."""

import math

import pytest
import torch
import torch.nn.functional as F

import metalcore
from metalcore.nn.attention import sdpa_bwd, sdpa_fwd
from oracle import assert_close, assert_within_torch_error

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CASES = [  # (B, H, Hkv, L, S, E, Ev)
    (1, 1, 1, 1, 1, 8, 8),
    (1, 4, 2, 33, 65, 64, 64),      # GQA, L < S, tails of 1 row past two and four 16-row tiles
    (2, 2, 1, 31, 17, 128, 128),    # multi-query, L > S, the largest head dim
    (1, 2, 1, 17, 16, 40, 72),      # E != Ev, neither a multiple of 32
    (2, 3, 3, 5, 33, 3, 5),         # tiny head dims
]


def _case_id(c):
    return "B{}-H{}-Hkv{}-L{}-S{}-E{}-Ev{}".format(*c)


def _oracle(q, k, v, mask, is_causal, scale, dout):
    """out, lse and (dq, dk, dv) of the reference in float64."""
    q64, k64, v64 = (t.double() for t in (q, k, v))
    mask64 = mask if mask is None or mask.dtype == torch.bool else mask.double()
    out64, lse64 = sdpa_fwd.reference(q64, k64, v64, mask64, is_causal, scale)
    grads64 = sdpa_bwd.reference(dout.double(), q64, k64, v64, out64, lse64, mask64, is_causal, scale)
    return out64, lse64, grads64


def check_sdpa(q, k, v, mask, is_causal, scale=None):
    """Forward and backward kernels against the float64 reference; returns out, lse, the gradients and
    the float64 lse."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    with metalcore.use_backend("metal"):
        assert sdpa_fwd.backend_for(q, k, v, mask, is_causal, scale) == "metal"
        out, lse = sdpa_fwd(q, k, v, mask, is_causal, scale)
        dout = torch.randn_like(out)
        assert sdpa_bwd.backend_for(dout, q, k, v, out, lse, mask, is_causal, scale) == "metal"
        grads = sdpa_bwd(dout, q, k, v, out, lse, mask, is_causal, scale)
    assert out.dtype == q.dtype and out.shape == (*q.shape[:3], v.shape[-1]) and out.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]

    out64, lse64, grads64 = _oracle(q, k, v, mask, is_causal, scale, dout)
    out_ref, lse_ref = sdpa_fwd.reference(q, k, v, mask, is_causal, scale)
    grads_ref = sdpa_bwd.reference(dout, q, k, v, out_ref, lse_ref, mask, is_causal, scale)
    assert_close(lse, lse64, torch.float32)
    assert_within_torch_error(out, out_ref, out64)
    for g, g_ref, g64, x in zip(grads, grads_ref, grads64, (q, k, v)):
        assert g.dtype == x.dtype and g.shape == x.shape and g.is_contiguous()
        assert_within_torch_error(g, g_ref, g64)
    return out, lse, grads, lse64


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("B,H,Hkv,L,S,E,Ev", CASES, ids=[_case_id(c) for c in CASES])
def test_sdpa(executor, B, H, Hkv, L, S, E, Ev, is_causal, dtype):
    torch.manual_seed(B * 1000 + L * 10 + S)
    q = torch.randn(B, H, L, E).to(dtype)
    k = torch.randn(B, Hkv, S, E).to(dtype)
    v = torch.randn(B, Hkv, S, Ev).to(dtype)
    check_sdpa(q, k, v, None, is_causal)


MASK_CASES = [  # (B, H, Hkv, L, S, E, mask shape, mask dtype, is_causal)
    (2, 2, 1, 19, 37, 32, (2, 1, 19, 37), torch.bool, False),
    (1, 4, 2, 17, 40, 64, (1, 4, 1, 40), torch.float32, False),   # key padding, broadcast over queries
    (2, 2, 2, 20, 20, 16, (1, 1, 20, 20), "input", False),       # one mask for the batch, in q's dtype
    (1, 2, 1, 33, 18, 24, (1, 2, 33, 18), torch.bool, True),      # both (the op takes them together)
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,H,Hkv,L,S,E,mshape,mdtype,is_causal", MASK_CASES,
                         ids=[f"{c[6]}-{c[7]}-{'causal' if c[8] else 'full'}".replace(" ", "") for c in MASK_CASES])
def test_attn_mask(executor, B, H, Hkv, L, S, E, mshape, mdtype, is_causal, dtype):
    """Rows that attend nothing (all-False bool or all −inf float) give out = 0, lse = −inf and zero
    gradients (torch's safe softmax); keys masked with finfo.min (Hugging Face's padding) or −inf drop
    out of the other rows."""
    torch.manual_seed(L * 100 + S)
    mdtype = dtype if mdtype == "input" else mdtype
    q = torch.randn(B, H, L, E).to(dtype)
    k = torch.randn(B, Hkv, S, E).to(dtype)
    v = torch.randn(B, Hkv, S, E).to(dtype)
    if mdtype == torch.bool:
        mask = torch.rand(mshape) > 0.3
        mask[..., 3, :] = False
    else:
        mask = torch.randn(mshape).to(mdtype)
        mask[..., 5:9] = torch.finfo(mdtype).min
        mask[..., 11] = -math.inf
        if mshape[-2] > 1:
            mask[..., 2, :] = -math.inf
    out, lse, grads, lse64 = check_sdpa(q, k, v, mask, is_causal)
    dead = torch.isneginf(lse64)
    if mshape[-2] > 1:
        assert dead.any()
    assert (out[dead] == 0).all() and torch.isneginf(lse[dead]).all()
    assert (grads[0][dead] == 0).all()


@pytest.mark.parametrize("mdtype", [torch.float32, torch.bfloat16], ids=str)
def test_row_masked_with_finfo_min_averages_v(executor, mdtype):
    """A query row whose every key is masked with finfo.min (not −inf) stays finite, as in torch: all its
    scores round to the same value, so its output is the plain average of V, as torch's SDPA gives in
    float64. (The mask, scaled to base 2, would overflow to −inf without the kernels' clamp.) So does
    the reference op, which takes P from the row maximum: at −3.4·10³⁸ the lse has no digits left for
    ln S, and P = exp(z − lse) would be 1 for every key (the sum of V)."""
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 1, n, 16).to(mdtype) for n in (4, 6, 6))
    mask = torch.randn(1, 1, 4, 6).to(mdtype)
    mask[..., 1, :] = torch.finfo(mdtype).min
    with metalcore.use_backend("metal"):
        assert sdpa_fwd.backend_for(q, k, v, mask, False, 0.25) == "metal"
        out, lse = sdpa_fwd(q, k, v, mask, False, 0.25)
    assert torch.isfinite(lse).all()
    assert_close(out[0, 0, 1], v[0, 0].double().mean(0), mdtype)
    torch64 = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask.double(), scale=0.25)
    assert_close(out[0, 0, 1], torch64[0, 0, 1], mdtype)
    assert_close(sdpa_fwd.reference(q, k, v, mask, False, 0.25)[0][0, 0, 1], torch64[0, 0, 1], mdtype)


def test_strided_views(executor):
    """(B, S, H, E) tensors as transposed views, v a slice of a wider tensor, and an expanded mask
    (stride 0): the kernels read through the strides."""
    torch.manual_seed(0)
    q = torch.randn(1, 21, 4, 32, dtype=torch.float16).transpose(1, 2)
    k = torch.randn(1, 35, 2, 32, dtype=torch.float16).transpose(1, 2)
    v = torch.randn(1, 2, 35, 80, dtype=torch.float16)[..., 16:56]
    mask = (torch.rand(1, 1, 21, 35) > 0.2).expand(1, 4, 21, 35)
    check_sdpa(q, k, v, None, True)
    check_sdpa(q, k, v, mask, False, scale=0.3)


def test_through_the_public_function_and_autograd(executor):
    torch.manual_seed(1)
    q = torch.randn(2, 4, 9, 24, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 2, 13, 24, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, 2, 13, 24, dtype=torch.bfloat16, requires_grad=True)
    scale = 1.0 / math.sqrt(24)
    with metalcore.use_backend("metal"):
        assert sdpa_fwd.backend_for(q, k, v, None, True, scale) == "metal"
        out = metalcore.nn.metal_scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    out64, _, grads64 = _oracle(q.detach(), k.detach(), v.detach(), None, True, scale, dout)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out_ref, _ = sdpa_fwd.reference(*leaves, None, True, scale)
    grads_ref = torch.autograd.grad(out_ref, leaves, dout)
    assert_within_torch_error(out, out_ref, out64)
    for g, g_ref, g64 in zip(grads, grads_ref, grads64):
        assert_within_torch_error(g, g_ref, g64)


def test_empty(executor):
    q = torch.randn(1, 2, 5, 16, dtype=torch.float16)
    k = v = torch.randn(1, 1, 0, 16, dtype=torch.float16)
    with metalcore.use_backend("metal"):
        assert sdpa_fwd.backend_for(q, k, v, None, False, 0.25) == "reference"  # an empty argument: the op core answers, no launch
        out, lse = sdpa_fwd(q, k, v, None, False, 0.25)
        assert (out == 0).all() and torch.isneginf(lse).all()
        dq, dk, dv = sdpa_bwd(torch.randn_like(out), q, k, v, out, lse, None, False, 0.25)
        assert (dq == 0).all() and dk.shape == k.shape and dv.shape == v.shape
        q0 = q[:, :, :0]
        out0, lse0 = sdpa_fwd(q0, q, q, None, False, 0.25)
        assert out0.shape == (1, 2, 0, 16) and lse0.shape == (1, 2, 0)
        dq0, dk0, dv0 = sdpa_bwd(out0, q0, q, q, out0, lse0, None, False, 0.25)
        assert dq0.shape == q0.shape and (dk0 == 0).all() and (dv0 == 0).all()


def test_what_stays_on_the_reference(executor):
    q, k, v = (torch.randn(1, 2, 3, 16) for _ in range(3))
    with metalcore.use_backend("metal"):
        assert sdpa_fwd.backend_for(q, k, v, None, False, 0.1) == "metal"
        assert sdpa_fwd.backend_for(q.double(), k.double(), v.double(), None, False, 0.1) == "reference"
        wide = torch.randn(1, 2, 3, 129)
        assert sdpa_fwd.backend_for(wide, wide, v, None, False, 0.1) == "reference"
        assert sdpa_fwd.backend_for(q, k, wide, None, False, 0.1) == "reference"
        assert sdpa_fwd.backend_for(q, k, v, torch.zeros(1, 1, 3, 3, dtype=torch.float16), False, 0.1) == "reference"
        assert sdpa_fwd.backend_for(q, k, v, torch.zeros(1, 1, 3, 3, dtype=torch.float64), False, 0.1) == "reference"


def test_opcheck_on_the_metal_backend(executor):
    q = torch.randn(1, 2, 5, 16, dtype=torch.float16)
    k, v = (torch.randn(1, 1, 7, 16, dtype=torch.float16) for _ in range(2))
    with metalcore.use_backend("metal"):
        assert sdpa_fwd.backend_for(q, k, v, None, True, 0.25) == "metal"
        torch.library.opcheck(sdpa_fwd.custom_op, (q, k, v, None, True, 0.25))
        out, lse = sdpa_fwd(q, k, v, None, True, 0.25)
        dout = torch.randn_like(out)
        torch.library.opcheck(sdpa_bwd.custom_op, (dout, q, k, v, out, lse, None, True, 0.25))
