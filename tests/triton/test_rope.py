"""RoPE's Triton kernels (metalcore/nn/rope_triton.py) against the reference op and the float64
oracle (Hugging Face's formula): outputs and both gradients, for each dtype, both layouts
(``unsqueeze_dim`` 1 and 2), GQA, S = 1, 31, 33 and head dims 6, 64, 128; mixed dtypes, strided
views, unequal cos/sin halves (the exact adjoint), and what stays on the reference."""

import importlib

import pytest
import torch

import metalcore
from metalcore.nn import apply_rotary_pos_emb
from metalcore.nn.rope import rope_bwd, rope_fwd, rotate_half
from oracle import assert_close

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LAYOUTS = {1: "BHSD", 2: "BSHD"}


def kernels():
    return importlib.import_module("metalcore.nn.rope_triton")


def oracle(q, k, cos, sin, unsqueeze_dim):
    """Hugging Face's apply_rotary_pos_emb (run in float64)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rotary(batch, seq, dim, dtype, device, base=10000.0):
    """cos, sin (batch, seq, dim) built as Hugging Face's rotary embedding builds them."""
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    freqs = torch.randint(0, 4096, (batch, seq)).double()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype)


def make_qk(layout, B, Hq, Hk, S, D, dtype, device):
    shape = (lambda H: (B, H, S, D)) if layout == 1 else (lambda H: (B, S, H, D))
    return (torch.randn(shape(Hq), dtype=dtype, device=device, requires_grad=True),
            torch.randn(shape(Hk), dtype=dtype, device=device, requires_grad=True))


def heads_first(x, layout):
    return x if layout == 1 else x.transpose(1, 2)


def check_rope(q, k, cos, sin, layout):
    """Forward and backward through apply_rotary_pos_emb on the Triton kernels, against the float64
    oracle and against the reference op (the same fp32 math, rounded once)."""
    qh, kh = heads_first(q, layout), heads_first(k, layout)
    assert rope_fwd.backend_for(qh, kh, cos, sin) == "triton"
    assert rope_bwd.backend_for(qh, kh, cos, sin) == "triton"
    out_dtype = torch.promote_types(q.dtype, cos.dtype)
    q_out, k_out = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=layout)
    assert q_out.shape == q.shape and k_out.shape == k.shape
    assert q_out.dtype == k_out.dtype == out_dtype

    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    eq, ek = oracle(q64, k64, cos.double(), sin.double(), layout)
    assert_close(q_out, eq, out_dtype)
    assert_close(k_out, ek, out_dtype)
    with metalcore.use_backend("reference"):
        rq, rk = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=layout)
    assert_close(q_out, rq, out_dtype)
    assert_close(k_out, rk, out_dtype)

    dq_out, dk_out = torch.randn_like(q_out), torch.randn_like(k_out)
    dq, dk = torch.autograd.grad((q_out, k_out), (q, k), (dq_out, dk_out))
    assert dq.dtype == q.dtype and dk.dtype == k.dtype
    edq, edk = torch.autograd.grad((eq, ek), (q64, k64), (dq_out.double(), dk_out.double()))
    assert_close(dq, edq, q.dtype)
    assert_close(dk, edk, k.dtype)
    rdq, rdk = rope_bwd.reference(heads_first(dq_out, layout), heads_first(dk_out, layout), cos, sin)
    assert_close(dq, heads_first(rdq, layout).to(q.dtype), q.dtype)
    assert_close(dk, heads_first(rdk, layout).to(k.dtype), k.dtype)
    return q_out, k_out


CASES = [  # (B, Hq, Hk, S, D, cos batch)
    (2, 4, 4, 1, 64, 2),
    (1, 4, 2, 31, 128, 1),   # GQA
    (2, 3, 1, 33, 6, 2),     # multi-query, a head dim that is even but not a power of two
    (1, 2, 2, 33, 64, 1),
]


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUTS.get)
@pytest.mark.parametrize("B,Hq,Hk,S,D,cb", CASES, ids=[f"B{c[0]}-Hq{c[1]}-Hk{c[2]}-S{c[3]}-D{c[4]}-cosB{c[5]}"
                                                      for c in CASES])
def test_rope(B, Hq, Hk, S, D, cb, layout, dtype, device):
    q, k = make_qk(layout, B, Hq, Hk, S, D, dtype, device)
    cos, sin = rotary(cb, S, D, dtype, device)
    q_out, k_out = check_rope(q, k, cos, sin, layout)
    # Contiguous inputs give contiguous outputs in the same layout (empty_like), as Hugging Face's.
    assert q_out.is_contiguous() and k_out.is_contiguous()


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("x_dtype,cs_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
                                              (torch.float32, torch.float16)], ids=str)
def test_mixed_dtypes_promote_as_hugging_face(x_dtype, cs_dtype, device):
    """A bf16 q with float32 cos gives a float32 q_out (``q * cos`` promotes) and a bf16 gradient."""
    q, k = make_qk(1, 1, 2, 1, 17, 64, x_dtype, device)
    cos, sin = rotary(1, 17, 64, cs_dtype, device)
    check_rope(q, k, cos, sin, 1)


@pytest.mark.usefixtures("poison")
def test_strided_views(device):
    """q and k sliced out of a fused qkv projection (B, S, (Hq + 2·Hk)·D), cos/sin expanded over the
    batch (stride 0) and non-contiguous: every tensor addressed through its strides, no copies."""
    B, S, Hq, Hk, D = 2, 9, 4, 2, 64
    qkv = torch.randn(B, S, (Hq + 2 * Hk) * D, device=device)
    q = qkv[..., :Hq * D].view(B, S, Hq, D).requires_grad_()
    k = qkv[..., Hq * D:(Hq + Hk) * D].view(B, S, Hk, D).requires_grad_()
    cos, sin = rotary(1, S, 2 * D, torch.float32, device)
    cos, sin = cos[..., ::2].expand(B, S, D), sin[..., ::2].expand(B, S, D)
    assert cos.stride(0) == 0 and not cos.is_contiguous()
    check_rope(q, k, cos, sin, 2)


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_unequal_halves_exact_adjoint(dtype, device):
    """Arbitrary cos/sin (not built from equal halves): the backward is still the exact adjoint."""
    q, k = make_qk(1, 2, 3, 2, 5, 6, dtype, device)
    cos, sin = torch.randn(2, 5, 6, dtype=dtype, device=device), torch.randn(2, 5, 6, dtype=dtype, device=device)
    check_rope(q, k, cos, sin, 1)


def test_wide_heads_loop_over_head_blocks(device, monkeypatch):
    """Several passes of the head loop (and a ragged last block) at small sizes."""
    monkeypatch.setattr(kernels(), "TILE_HALF_ELEMENTS", 64)
    q, k = make_qk(2, 1, 5, 3, 7, 64, torch.float32, device)
    cos, sin = rotary(1, 7, 64, torch.float32, device)
    check_rope(q, k, cos, sin, 2)


def test_empty(device):
    q, k = torch.randn(2, 4, 0, 64, device=device), torch.randn(2, 2, 0, 64, device=device)
    cos = sin = torch.randn(1, 0, 64, device=device)
    assert rope_fwd.backend_for(q, k, cos, sin) == "reference"  # empty inputs never launch a kernel (the op core answers)
    q_out, k_out = rope_fwd(q, k, cos, sin)
    assert q_out.shape == q.shape and k_out.shape == k.shape


def test_what_stays_on_the_reference(device):
    q, k = torch.randn(1, 2, 3, 8, device=device), torch.randn(1, 1, 3, 8, device=device)
    cos = sin = torch.randn(1, 3, 8, device=device)
    d = torch.float64
    assert rope_fwd.backend_for(q.to(d), k.to(d), cos.to(d), sin.to(d)) == "reference"
    assert rope_fwd.backend_for(q, k, cos[:, :1], sin[:, :1]) == "reference"  # broadcast over S
    assert rope_fwd.backend_for(q[..., :7], k[..., :7], cos[..., :7], sin[..., :7]) == "reference"  # odd D
    wide = kernels().MAX_HEAD_DIM + 2
    assert rope_fwd.backend_for(torch.randn(1, 1, 1, wide), torch.randn(1, 1, 1, wide),
                                torch.randn(1, 1, wide), torch.randn(1, 1, wide)) == "reference"


def test_cpu_tensors_really_run_the_interpreted_kernel():
    k = kernels()
    x, c = torch.randn(1, 2, 3, 8), torch.randn(1, 3, 8)
    k._rope_kernel.interpreted = None
    rope_fwd(x, x, c, c)
    assert k._rope_kernel.interpreted is not None
    assert k._rope_kernel.compiled is None


@pytest.mark.parametrize("op", ["rope_fwd", "rope_bwd"])
def test_opcheck_on_the_triton_backend(op, device):
    q = torch.randn(2, 4, 5, 8, device=device, dtype=torch.bfloat16, requires_grad=op == "rope_fwd")
    k = torch.randn(2, 2, 5, 8, device=device, dtype=torch.bfloat16, requires_grad=op == "rope_fwd")
    cos, sin = rotary(1, 5, 8, torch.bfloat16, device)
    assert metalcore._op.registered_ops()[op].backend_for(q, k, cos, sin) == "triton"
    torch.library.opcheck(metalcore._op.registered_ops()[op].custom_op, (q, k, cos, sin))


# --------------------------------------------------------------------------------------------
# On the GPU: Llama-7B-sized attention heads, (4, 32, 2048, 128) bf16, MHA and GQA.
# --------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUTS.get)
@pytest.mark.parametrize("Hk", (32, 8), ids=lambda h: f"Hk{h}")
def test_gpu_full_size(Hk, layout, device):
    q, k = make_qk(layout, 4, 32, Hk, 2048, 128, torch.bfloat16, device)
    cos, sin = rotary(1, 2048, 128, torch.bfloat16, device)
    check_rope(q, k, cos, sin, layout)
