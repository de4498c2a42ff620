"""shaders/rope.metal through the metal backend on CPU tensors (the shader executor): RoPE forward and
backward against the float64 oracle (Hugging Face's formula) and the reference op, for float32,
float16 and bfloat16, both layouts (``unsqueeze_dim`` 1 and 2), GQA and multi-query, S = 1, 31, 33,
head dims 6 and 64, a shared or per-batch cos/sin, strided views (fused qkv slices, partial rotary
dims), unequal cos/sin halves (the exact adjoint), and what stays on the reference. ``position_ids``
is accepted and ignored by the op's contract (rope.py): cos/sin arrive gathered at the positions.
"""

import pytest
import torch

import metalcore
from metalcore import _metal
from metalcore.nn import apply_rotary_pos_emb
from metalcore.nn.rope import rope_bwd, rope_fwd, rotate_half
from oracle import assert_close

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LAYOUTS = {1: "BHSD", 2: "BSHD"}


@pytest.fixture(autouse=True)
def _metal_backend(executor):
    with metalcore.use_backend("metal"):
        yield


def oracle(q, k, cos, sin, unsqueeze_dim):
    """Hugging Face's apply_rotary_pos_emb (run in float64)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rotary(batch, seq, dim, dtype, base=10000.0):
    """cos, sin (batch, seq, dim) built as Hugging Face's rotary embedding builds them."""
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    freqs = torch.randint(0, 4096, (batch, seq)).double()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def make_qk(layout, B, Hq, Hk, S, D, dtype):
    shape = (lambda H: (B, H, S, D)) if layout == 1 else (lambda H: (B, S, H, D))
    return (torch.randn(shape(Hq), dtype=dtype, requires_grad=True),
            torch.randn(shape(Hk), dtype=dtype, requires_grad=True))


def heads_first(x, layout):
    return x if layout == 1 else x.transpose(1, 2)


def check_rope(q, k, cos, sin, layout):
    """Forward and backward through apply_rotary_pos_emb on the shader, against the float64 oracle and
    the reference op (the same float32 math, rounded once)."""
    qh, kh = heads_first(q, layout), heads_first(k, layout)
    assert rope_fwd.backend_for(qh, kh, cos, sin) == "metal"
    assert rope_bwd.backend_for(qh, kh, cos, sin) == "metal"
    _metal.launched.clear()
    q_out, k_out = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=layout)
    assert q_out.shape == q.shape and k_out.shape == k.shape and q_out.dtype == k_out.dtype == q.dtype

    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    eq, ek = oracle(q64, k64, cos.double(), sin.double(), layout)
    assert_close(q_out, eq, q.dtype)
    assert_close(k_out, ek, q.dtype)
    with metalcore.use_backend("reference"):
        rq, rk = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=layout)
    assert_close(q_out, rq, q.dtype)
    assert_close(k_out, rk, q.dtype)

    dq_out, dk_out = torch.randn_like(q_out), torch.randn_like(k_out)
    dq, dk = torch.autograd.grad((q_out, k_out), (q, k), (dq_out, dk_out))
    assert dq.dtype == q.dtype and dk.dtype == k.dtype
    assert f"rope_{_metal.dtype_suffix(q.dtype)}" in _metal.launched
    edq, edk = torch.autograd.grad((eq, ek), (q64, k64), (dq_out.double(), dk_out.double()))
    assert_close(dq, edq, q.dtype)
    assert_close(dk, edk, k.dtype)
    rdq, rdk = rope_bwd.reference(heads_first(dq_out, layout), heads_first(dk_out, layout), cos, sin)
    assert_close(dq, heads_first(rdq, layout), q.dtype)
    assert_close(dk, heads_first(rdk, layout), k.dtype)
    return q_out, k_out


CASES = [  # (B, Hq, Hk, S, D, cos batch)
    (2, 4, 4, 1, 64, 2),
    (1, 4, 2, 31, 64, 1),    # GQA
    (2, 3, 1, 33, 6, 2),     # multi-query, a head dim that is even but not a power of two
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUTS.get)
@pytest.mark.parametrize("B,Hq,Hk,S,D,cb", CASES, ids=[f"B{c[0]}-Hq{c[1]}-Hk{c[2]}-S{c[3]}-D{c[4]}-cosB{c[5]}"
                                                      for c in CASES])
def test_rope(B, Hq, Hk, S, D, cb, layout, dtype):
    q, k = make_qk(layout, B, Hq, Hk, S, D, dtype)
    cos, sin = rotary(cb, S, D, dtype)
    q_out, k_out = check_rope(q, k, cos, sin, layout)
    # Contiguous inputs give contiguous outputs in the same layout (empty_like), as Hugging Face's.
    assert q_out.is_contiguous() and k_out.is_contiguous()


def test_float32_inputs_with_16_bit_cos_sin():
    """``promote_types(float32, bf16)`` is float32: the kernel takes cos/sin widened, exactly."""
    q, k = make_qk(1, 1, 2, 1, 17, 64, torch.float32)
    cos, sin = rotary(1, 17, 64, torch.bfloat16)
    check_rope(q, k, cos, sin, 1)


def test_strided_views():
    """q and k sliced out of a fused qkv projection (B, S, (Hq + 2·Hk)·D), cos/sin expanded over the
    batch (stride 0) and non-contiguous: every tensor addressed through its strides, no copies."""
    B, S, Hq, Hk, D = 2, 9, 4, 2, 64
    qkv = torch.randn(B, S, (Hq + 2 * Hk) * D)
    q = qkv[..., :Hq * D].view(B, S, Hq, D).requires_grad_()
    k = qkv[..., Hq * D:(Hq + Hk) * D].view(B, S, Hk, D).requires_grad_()
    cos, sin = rotary(1, S, 2 * D, torch.float32)
    cos, sin = cos[..., ::2].expand(B, S, D), sin[..., ::2].expand(B, S, D)
    assert cos.stride(0) == 0 and not cos.is_contiguous()
    check_rope(q, k, cos, sin, 2)


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUTS.get)
def test_partial_rotary_slices(layout):
    """Partial rotary (GPT-NeoX, Phi): Hugging Face rotates ``q[..., :rot]`` and passes the rest
    through; the slice is a strided view (row stride D, not rot) that the kernel reads in place."""
    q, k = make_qk(layout, 2, 4, 2, 7, 64, torch.bfloat16)
    rot = 24
    cos, sin = rotary(2, 7, rot, torch.bfloat16)
    check_rope(q[..., :rot], k[..., :rot], cos, sin, layout)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_unequal_halves_exact_adjoint(dtype):
    """Arbitrary cos/sin (not built from equal halves): the backward is still the exact adjoint."""
    q, k = make_qk(1, 2, 3, 2, 5, 6, dtype)
    cos, sin = torch.randn(2, 5, 6, dtype=dtype), torch.randn(2, 5, 6, dtype=dtype)
    check_rope(q, k, cos, sin, 1)


def test_empty():
    q, k = torch.randn(2, 4, 0, 64), torch.randn(2, 2, 0, 64)
    cos = sin = torch.randn(1, 0, 64)
    assert rope_fwd.backend_for(q, k, cos, sin) == "reference"  # empty inputs never launch a kernel (the op core answers)
    q_out, k_out = rope_fwd(q, k, cos, sin)
    assert q_out.shape == q.shape and k_out.shape == k.shape


def test_what_stays_on_the_reference():
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8)
    cos = sin = torch.randn(1, 3, 8)
    d = torch.float64
    assert rope_fwd.backend_for(q.to(d), k.to(d), cos.to(d), sin.to(d)) == "reference"
    assert rope_fwd.backend_for(q, k, cos[:, :1], sin[:, :1]) == "reference"  # broadcast over S
    assert rope_fwd.backend_for(q[..., :7], k[..., :7], cos[..., :7], sin[..., :7]) == "reference"  # odd D
    # A 16-bit q with float32 cos gives a float32 output: the kernel writes q's dtype.
    b = torch.bfloat16
    assert rope_fwd.backend_for(q.to(b), k.to(b), cos, sin) == "reference"
    assert rope_fwd.backend_for(q.to(b), k.to(b), cos.to(b), sin.to(b)) == "metal"
