"""Flash attention in Triton (metalcore/nn/attention_triton.py), forward and backward kernels,
against the float64 oracle and torch's own SDPA in the same dtype (the 2×-torch rule): ``out``,
``lse`` and ``dq``/``dk``/``dv``, causal and not, GQA, head dims 64 and 128, sequence lengths that are
not multiples of the blocks (forward 128×64, backward 128×32 and 32×128), L ≠ S both ways, bool and
float ``attn_mask`` with broadcast dimensions and fully masked rows; fp32 stays on the reference."""

import importlib
import math

import pytest
import torch

from backends import expected_backend
import torch.nn.functional as F

import metalcore
from metalcore.nn.attention import sdpa_bwd, sdpa_fwd
from oracle import assert_close, assert_within_torch_error

DTYPES = (torch.bfloat16, torch.float16)
CASES = [  # (B, H, Hkv, L, S, E, Ev)
    (1, 2, 2, 1, 1, 64, 64),
    (1, 4, 2, 33, 65, 64, 64),      # GQA, L < S
    (2, 2, 1, 65, 33, 128, 128),    # multi-query, L > S
    (1, 2, 1, 130, 70, 128, 64),    # two query blocks of 128 (the second of 2 rows), Ev != E
]


def kernels():
    return importlib.import_module("metalcore.nn.attention_triton")


def torch_sdpa(q, k, v, is_causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=k.shape[1] != q.shape[1])


def lse_oracle(q, k, is_causal):
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    z = (q.double() @ k.double().mT) / math.sqrt(q.shape[-1])
    if is_causal:
        L, S = z.shape[-2:]
        z = z.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(), -math.inf)
    return torch.logsumexp(z, dim=-1)


def check_sdpa(q, k, v, is_causal):
    """``out`` and ``lse`` from the Triton kernel; dq, dk, dv from the reference backward fed with
    them; each judged against float64 by the 2×-torch rule (``lse`` elementwise, in float32)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    assert sdpa_fwd.backend_for(q, k, v, None, is_causal, scale) == expected_backend("triton", q, k, v, None, is_causal, scale)
    out, lse = sdpa_fwd(q, k, v, None, is_causal, scale)
    assert out.dtype == q.dtype and out.shape == (*q.shape[:3], v.shape[-1]) and out.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    assert_close(lse, lse_oracle(q, k, is_causal), torch.float32)

    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out64 = torch_sdpa(*leaves64, is_causal)
    theirs = torch_sdpa(q.detach(), k.detach(), v.detach(), is_causal)
    assert_within_torch_error(out, theirs, out64)

    dout = torch.randn_like(out)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out_t, _ = sdpa_fwd(*leaves, None, is_causal, scale)
    assert sdpa_bwd.backend_for(dout, q, k, v, out, lse, None, is_causal, scale) == expected_backend("triton", dout, q, k, v, out, lse, None, is_causal, scale)
    grads = torch.autograd.grad(out_t, leaves, dout)
    theirs = torch.autograd.grad(torch_sdpa(*leaves, is_causal), leaves, dout)
    for g, t, e in zip(grads, theirs, torch.autograd.grad(out64, leaves64, dout.double())):
        assert_within_torch_error(g, t, e)


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("B,H,Hkv,L,S,E,Ev", CASES, ids=[f"B{c[0]}-H{c[1]}-Hkv{c[2]}-L{c[3]}-S{c[4]}-E{c[5]}-Ev{c[6]}"
                                                        for c in CASES])
def test_sdpa_fwd(B, H, Hkv, L, S, E, Ev, is_causal, dtype, device):
    q = torch.randn(B, H, L, E, dtype=dtype, device=device)
    k = torch.randn(B, Hkv, S, E, dtype=dtype, device=device)
    v = torch.randn(B, Hkv, S, Ev, dtype=dtype, device=device)
    check_sdpa(q, k, v, is_causal)


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_forward_through_tensor_descriptors(is_causal, device, monkeypatch):
    """The TMA forward (descriptors instead of pointers): ragged blocks at both ends, GQA, a
    transposed sequence-first q, and a mask; a misaligned view falls back to the pointer path."""
    monkeypatch.setattr(kernels(), "FWD_TMA", True)
    q = torch.randn(1, 130, 4, 64, dtype=torch.bfloat16, device=device).transpose(1, 2)
    k, v = (torch.randn(1, 2, 70, 64, dtype=torch.bfloat16, device=device) for _ in range(2))
    assert all(kernels()._tma_ready(t) for t in (q, k, v))
    check_sdpa(q, k, v, is_causal)
    mask = torch.randn(1, 1, 130, 70, device=device)
    out, lse = sdpa_fwd(q, k, v, mask, is_causal, 0.125)
    out_p, lse_p = sdpa_fwd.reference(q, k, v, mask, is_causal, 0.125)
    assert_close(out, out_p.double(), torch.bfloat16)
    assert not kernels()._tma_ready(torch.randn(1, 2, 70, 65, dtype=torch.bfloat16, device=device)[..., 1:])


@pytest.mark.usefixtures("poison")
def test_strided_sequence_first_views(device):
    """(B, S, H, E) tensors passed as transposed views, and v a slice of a wider tensor."""
    q = torch.randn(1, 40, 4, 64, dtype=torch.bfloat16, device=device).transpose(1, 2)
    k = torch.randn(1, 70, 2, 64, dtype=torch.bfloat16, device=device).transpose(1, 2)
    v = torch.randn(1, 2, 70, 160, dtype=torch.bfloat16, device=device)[..., 16:80]
    check_sdpa(q, k, v, True)


def test_through_the_public_function(device):
    q = torch.randn(1, 4, 9, 64, device=device, dtype=torch.float16)
    k, v = (torch.randn(1, 2, 9, 64, device=device, dtype=torch.float16) for _ in range(2))
    assert sdpa_fwd.backend_for(q, k, v, None, True, 0.125) == expected_backend("triton", q, k, v, None, True, 0.125)
    ours = metalcore.nn.metal_scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    theirs = torch_sdpa(q, k, v, True)
    assert_within_torch_error(ours, theirs, torch_sdpa(q.double(), k.double(), v.double(), True))


def test_no_keys(device):
    q = torch.randn(1, 2, 5, 64, device=device, dtype=torch.bfloat16)
    k = v = torch.randn(1, 2, 0, 64, device=device, dtype=torch.bfloat16)
    assert sdpa_fwd.backend_for(q, k, v, None, False, 0.125) == expected_backend("triton", q, k, v, None, False, 0.125)
    out, lse = sdpa_fwd(q, k, v, None, False, 0.125)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_what_stays_on_the_reference(device):
    q, k, v = (torch.randn(1, 2, 3, 64, device=device, dtype=torch.bfloat16) for _ in range(3))
    assert sdpa_fwd.backend_for(q, k, v, None, False, 0.1) == expected_backend("triton", q, k, v, None, False, 0.1)
    assert sdpa_fwd.backend_for(q, k, v, torch.ones(3, 3, dtype=torch.bool, device=device)[None, None],
                                False, 0.1) == "triton"
    for dtype in (torch.float32, torch.float64):
        assert sdpa_fwd.backend_for(q.to(dtype), k.to(dtype), v.to(dtype), None, False, 0.1) == "reference"
    assert sdpa_fwd.backend_for(q[..., :32], k[..., :32], v[..., :32], None, False, 0.1) == "reference"
    assert sdpa_fwd.backend_for(q, k, v[..., :48], None, False, 0.1) == "reference"


MASK_CASES = [  # (B, H, Hkv, L, S, E, mask shape, mask dtype)
    (2, 2, 1, 37, 50, 64, (2, 1, 37, 50), torch.bool),
    (1, 4, 2, 33, 70, 128, (1, 4, 1, 70), torch.float32),      # key padding, broadcast over queries
    (2, 2, 2, 40, 40, 64, (1, 1, 40, 40), "same"),             # one mask for the batch, in q's dtype
]


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("B,H,Hkv,L,S,E,mshape,mdtype", MASK_CASES,
                         ids=[f"{c[6]}-{c[7]}".replace(" ", "") for c in MASK_CASES])
def test_attn_mask_forward_and_backward(B, H, Hkv, L, S, E, mshape, mdtype, device):
    """Masks through the kernels: rows that attend nothing (bool) give 0 and zero gradients; keys
    masked with -inf or finfo.min (Hugging Face's padding) drop out as in torch."""
    dtype = torch.float16 if mdtype == torch.float32 else torch.bfloat16
    mdtype = dtype if mdtype == "same" else mdtype
    q = torch.randn(B, H, L, E, dtype=dtype, device=device)
    k = torch.randn(B, Hkv, S, E, dtype=dtype, device=device)
    v = torch.randn(B, Hkv, S, E, dtype=dtype, device=device)
    if mdtype == torch.bool:
        mask = torch.rand(mshape, device=device) > 0.3
        mask[..., 3, :] = False                      # a query row that attends nothing
    else:
        mask = torch.randn(mshape, device=device).to(mdtype)
        mask[..., 5:9] = torch.finfo(mdtype).min     # padded keys, every query still attends some
        mask[..., 11] = -math.inf
    scale = 1.0 / math.sqrt(E)
    assert sdpa_fwd.backend_for(q, k, v, mask, False, scale) == expected_backend("triton", q, k, v, mask, False, scale)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = sdpa_fwd(*leaves, mask, False, scale)
    dout = torch.randn_like(out)
    assert sdpa_bwd.backend_for(dout, q, k, v, out, lse, mask, False, scale) == expected_backend("triton", dout, q, k, v, out, lse, mask, False, scale)
    grads = torch.autograd.grad(out, leaves, dout)

    def torch_masked(q, k, v, m):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=Hkv != H)

    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    mask64 = mask if mask.dtype == torch.bool else mask.double()
    out64 = torch_masked(*leaves64, mask64)
    theirs = torch_masked(*leaves, mask)
    if mdtype == torch.bool:  # torch's math path gives NaN on dead rows in some versions: compare the rest
        dead = ~mask.expand(B, H, L, S).any(-1)
        assert (out[dead] == 0).all() and torch.isneginf(lse[dead]).all()
        out64 = out64.masked_fill(dead[..., None], 0.0)
        theirs = theirs.masked_fill(dead[..., None], 0.0)
    assert_within_torch_error(out, theirs, out64)
    g64 = torch.autograd.grad(out64, leaves64, dout.double())
    g_torch = torch.autograd.grad(theirs, leaves, dout)
    for g, t, e in zip(grads, g_torch, g64):
        assert_within_torch_error(g, t.nan_to_num(), e.nan_to_num())


def test_cpu_tensors_really_run_the_interpreted_kernel():
    k = kernels()
    x = torch.randn(1, 1, 3, 64, dtype=torch.float16)
    k._sdpa_fwd_kernel.interpreted = None
    sdpa_fwd(x, x, x, None, True, 0.125)
    assert k._sdpa_fwd_kernel.interpreted is not None
    assert k._sdpa_fwd_kernel.compiled is None


def test_opcheck_on_the_triton_backend(device):
    q = torch.randn(1, 2, 5, 64, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 1, 7, 64, device=device, dtype=torch.bfloat16) for _ in range(2))
    assert sdpa_fwd.backend_for(q, k, v, None, True, 0.125) == expected_backend("triton", q, k, v, None, True, 0.125)
    torch.library.opcheck(sdpa_fwd.custom_op, (q, k, v, None, True, 0.125))
    out, lse = sdpa_fwd(q, k, v, None, True, 0.125)
    dout = torch.randn_like(out)
    assert sdpa_bwd.backend_for(dout, q, k, v, out, lse, None, True, 0.125) == expected_backend("triton", dout, q, k, v, out, lse, None, True, 0.125)
    torch.library.opcheck(sdpa_bwd.custom_op, (dout, q, k, v, out, lse, None, True, 0.125))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4, 32, 32, 2048, 128), (8, 16, 16, 1024, 64), (4, 32, 8, 2048, 128)],
                         ids=lambda s: f"B{s[0]}-H{s[1]}-Hkv{s[2]}-S{s[3]}-E{s[4]}")
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_gpu_full_size(shape, is_causal, device):
    B, H, Hkv, S, E = shape
    q = torch.randn(B, H, S, E, dtype=torch.bfloat16, device=device)
    k, v = (torch.randn(B, Hkv, S, E, dtype=torch.bfloat16, device=device) for _ in range(2))
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out, lse = sdpa_fwd(*leaves, None, is_causal, 1.0 / math.sqrt(E))
    theirs = torch_sdpa(*leaves, is_causal)
    leaves32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
    expected = torch_sdpa(*leaves32, is_causal)
    assert_within_torch_error(out, theirs, expected)
    dout = torch.randn_like(out)
    for ours, t, e in zip(torch.autograd.grad(out, leaves, dout), torch.autograd.grad(theirs, leaves, dout),
                          torch.autograd.grad(expected, leaves32, dout.float())):
        assert_within_torch_error(ours, t, e)
