import importlib

import pytest
import torch

from backends import expected_backend
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_apply_rotary_pos_emb

import metalcore
from metalcore import _metal
from metalcore.nn import apply_rotary_pos_emb
from metalcore.nn.rope import rotate_half as rotate_half_metal
from metalcore.nn.rope import rope_fwd
from metalcore.nn.rope import rope_bwd, rotate_half as rotate_half_triton
from oracle import assert_close


DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def rotate_half(x):
    """Copied from transformers.models.llama.modeling_llama."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def oracle(q, k, cos, sin, unsqueeze_dim=1):
    """Hugging Face's apply_rotary_pos_emb, copied (run in float64 as the oracle)."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def rotary(batch, seq, dim, dtype=torch.float32, base=10000.0):
    """cos, sin of shape (batch, seq, dim) built as Hugging Face's rotary embedding does."""
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    positions = torch.randint(0, 4096, (batch, seq)).double()
    freqs = positions[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def make(layout, B, Hq, Hk, S, D, dtype):
    shape = (lambda H: (B, H, S, D)) if layout == 1 else (lambda H: (B, S, H, D))
    q = torch.randn(shape(Hq), dtype=dtype, requires_grad=True)
    k = torch.randn(shape(Hk), dtype=dtype, requires_grad=True)
    return q, k


CASES = [  # (B, Hq, Hk, S, D, cos batch)
    (2, 4, 4, 1, 64, 2),
    (2, 8, 2, 31, 16, 1),
    (1, 4, 1, 33, 2, 1),
    (3, 2, 2, 33, 128, 3),
    (1, 1, 1, 2, 4098, 1),  # a long row
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", [1, 2], ids=["BHSD", "BSHD"])
@pytest.mark.parametrize("B,Hq,Hk,S,D,cb", CASES,
                         ids=[f"B{c[0]}-Hq{c[1]}-Hk{c[2]}-S{c[3]}-D{c[4]}-cosB{c[5]}" for c in CASES])
def test_rope_forward_backward(B, Hq, Hk, S, D, cb, layout, dtype):
    q, k = make(layout, B, Hq, Hk, S, D, dtype)
    cos, sin = rotary(cb, S, D, dtype)
    q_out, k_out = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=layout)
    assert q_out.shape == q.shape and k_out.shape == k.shape and q_out.dtype == k_out.dtype == dtype
    assert q_out.is_contiguous() and k_out.is_contiguous()  # same memory layout as contiguous inputs
    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    eq, ek = oracle(q64, k64, cos.double(), sin.double(), layout)
    assert_close(q_out, eq, dtype)
    assert_close(k_out, ek, dtype)
    dq_out, dk_out = torch.randn_like(q_out), torch.randn_like(k_out)
    dq, dk = torch.autograd.grad((q_out, k_out), (q, k), (dq_out, dk_out))
    edq, edk = torch.autograd.grad((eq, ek), (q64, k64), (dq_out.double(), dk_out.double()))
    assert dq.dtype == dk.dtype == dtype
    assert_close(dq, edq, dtype)
    assert_close(dk, edk, dtype)


def test_matches_transformers_with_its_rotary_embedding():
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    rotary_emb = LlamaRotaryEmbedding(config)
    x = torch.randn(2, 9, 64)
    position_ids = torch.arange(3, 12).expand(2, 9)
    cos, sin = rotary_emb(x, position_ids)
    q, k = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 9, 16)
    ours = apply_rotary_pos_emb(q, k, cos, sin, position_ids)  # position_ids: accepted, ignored
    theirs = hf_apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(ours, theirs)
    q64, k64 = q.double(), k.double()
    for ours64, theirs64 in zip(apply_rotary_pos_emb(q64, k64, cos.double(), sin.double()),
                                hf_apply_rotary_pos_emb(q64, k64, cos.double(), sin.double())):
        assert_close(ours64, theirs64)


def test_mixed_dtypes_promote_as_hugging_face():
    """bf16 q/k with float32 cos/sin: HF's q * cos gives float32, and so do we; grads return bf16."""
    q, k = make(1, 2, 4, 2, 5, 8, torch.bfloat16)
    cos, sin = rotary(1, 5, 8, torch.float32)
    q_out, k_out = apply_rotary_pos_emb(q, k, cos, sin)
    eq, ek = hf_apply_rotary_pos_emb(q.detach(), k.detach(), cos, sin)
    assert q_out.dtype == eq.dtype == torch.float32
    torch.testing.assert_close(q_out, eq)
    torch.testing.assert_close(k_out, ek)
    dq, dk = torch.autograd.grad((q_out, k_out), (q, k), (torch.ones_like(q_out), torch.ones_like(k_out)))
    assert dq.dtype == dk.dtype == torch.bfloat16


def test_seq_first_views_keep_their_layout():
    """(B, S, H, D) contiguous tensors viewed as (B, H, S, D), as Llama's attention builds them."""
    q = torch.randn(2, 7, 4, 8).transpose(1, 2)
    k = torch.randn(2, 7, 2, 8).transpose(1, 2)
    cos, sin = rotary(2, 7, 8)
    q_out, k_out = apply_rotary_pos_emb(q, k, cos, sin)
    assert q_out.stride() == q.stride() and k_out.stride() == k.stride()
    eq, ek = oracle(q, k, cos, sin)
    torch.testing.assert_close(q_out, eq)
    torch.testing.assert_close(k_out, ek)
    q2, k2 = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin, unsqueeze_dim=2)
    assert q2.is_contiguous()
    torch.testing.assert_close(q2, eq.transpose(1, 2))


def test_empty_batch():
    q, k = make(1, 0, 4, 2, 5, 8, torch.float32)
    cos, sin = rotary(1, 5, 8)
    q_out, k_out = apply_rotary_pos_emb(q, k, cos, sin)
    assert q_out.shape == (0, 4, 5, 8) and k_out.shape == (0, 2, 5, 8)
    (q_out.sum() + k_out.sum()).backward()
    assert q.grad.shape == q.shape


def test_gradcheck_including_cos_sin():
    q, k = make(1, 2, 2, 1, 3, 4, torch.float64)
    cos, sin = (t.requires_grad_() for t in rotary(2, 3, 4, torch.float64))
    torch.autograd.gradcheck(lambda q, k: apply_rotary_pos_emb(q, k, cos.detach(), sin.detach()), (q, k))
    # cos/sin requiring grad take the composite path; arbitrary (not half-duplicated) cos/sin too.
    torch.autograd.gradcheck(lambda q, k, c, s: apply_rotary_pos_emb(q, k, c, s), (q, k, cos, sin))
    c, s = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    torch.autograd.gradcheck(lambda q, k: apply_rotary_pos_emb(q, k, c, s, unsqueeze_dim=1), (q, k))


def test_op_refuses_to_drop_cos_grad():
    q, k = make(1, 1, 2, 2, 3, 4, torch.float64)
    cos, sin = (t.requires_grad_() for t in rotary(1, 3, 4, torch.float64))
    q_out, _ = rope_fwd(q, k, cos, sin)
    with pytest.raises(RuntimeError, match="does not differentiate cos and sin"):
        q_out.sum().backward()


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(D=5), ValueError, "head_dim must be even"),
    (dict(unsqueeze_dim=3), ValueError, "unsqueeze_dim must be 1"),
    (dict(cos_shape=(2, 6, 8)), ValueError, r"cos and sin must have shape \(2, 5, 8\) or \(1, 5, 8\)"),
    (dict(cos_shape=(5, 8)), ValueError, "cos and sin must both have shape"),
    (dict(q_dim=3), ValueError, r"q must be 4-D \(B, H, S, D\)"),
    (dict(k_seq=6), ValueError, "q and k must agree on batch, sequence and head_dim"),
    (dict(q_dtype=torch.float64), TypeError, "expected all tensors to have the same dtype; got q"),
], ids=["odd-D", "unsqueeze-dim", "cos-seq", "cos-rank", "q-rank", "k-seq", "q-k-dtype"])
def test_bad_inputs(kwargs, error, match):
    D = kwargs.get("D", 8)
    q = torch.randn(2, 4, 5, D, dtype=kwargs.get("q_dtype", torch.float32))
    if kwargs.get("q_dim") == 3:
        q = q[0]
    k = torch.randn(2, 2, kwargs.get("k_seq", 5), D)
    cos = torch.randn(kwargs.get("cos_shape", (2, 5, D)))
    with pytest.raises(error, match=r"metalcore\.apply_rotary_pos_emb: " + match):
        apply_rotary_pos_emb(q, k, cos, cos.clone(), unsqueeze_dim=kwargs.get("unsqueeze_dim", 1))


def test_rope_compiles_fullgraph():
    q, k = make(1, 2, 4, 2, 9, 16, torch.float32)
    cos, sin = rotary(1, 9, 16)
    compiled = torch.compile(apply_rotary_pos_emb, fullgraph=True)
    out = compiled(q, k, cos, sin)
    expected = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out[0].sum() + out[1].sum(), (q, k))
    expected_grads = torch.autograd.grad(expected[0].sum() + expected[1].sum(), (q, k))
    torch.testing.assert_close(grads, expected_grads)


# --- Triton kernels (interpreter in CI) -----------------------------------------------------------
# RoPE's Triton kernels (metalcore/nn/rope_triton.py) against the reference op and the float64
# oracle (Hugging Face's formula): outputs and both gradients, for each dtype, both layouts
# (``unsqueeze_dim`` 1 and 2), GQA, S = 1, 31, 33 and head dims 6, 64, 128; mixed dtypes, strided
# views, unequal cos/sin halves (the exact adjoint), and what stays on the reference.


DTYPES_triton = (torch.float32, torch.bfloat16, torch.float16)
LAYOUTS = {1: "BHSD", 2: "BSHD"}


def kernels():
    return importlib.import_module("metalcore.nn.rope_triton")


def oracle_triton(q, k, cos, sin, unsqueeze_dim):
    """Hugging Face's apply_rotary_pos_emb (run in float64)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half_triton(q) * sin, k * cos + rotate_half_triton(k) * sin


def rotary_triton(batch, seq, dim, dtype, device, base=10000.0):
    """cos, sin (batch, seq, dim) built as Hugging Face's rotary_triton embedding builds them."""
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
    oracle_triton and against the reference op (the same fp32 math, rounded once)."""
    qh, kh = heads_first(q, layout), heads_first(k, layout)
    assert rope_fwd.backend_for(qh, kh, cos, sin) == expected_backend("triton", qh, kh, cos, sin)
    assert rope_bwd.backend_for(qh, kh, cos, sin) == expected_backend("triton", qh, kh, cos, sin)
    out_dtype = torch.promote_types(q.dtype, cos.dtype)
    q_out, k_out = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=layout)
    assert q_out.shape == q.shape and k_out.shape == k.shape
    assert q_out.dtype == k_out.dtype == out_dtype

    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    eq, ek = oracle_triton(q64, k64, cos.double(), sin.double(), layout)
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


CASES_triton = [  # (B, Hq, Hk, S, D, cos batch)
    (2, 4, 4, 1, 64, 2),
    (1, 4, 2, 31, 128, 1),   # GQA
    (2, 3, 1, 33, 6, 2),     # multi-query, a head dim that is even but not a power of two
    (1, 2, 2, 33, 64, 1),
]


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", DTYPES_triton, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUTS.get)
@pytest.mark.parametrize("B,Hq,Hk,S,D,cb", CASES_triton, ids=[f"B{c[0]}-Hq{c[1]}-Hk{c[2]}-S{c[3]}-D{c[4]}-cosB{c[5]}"
                                                      for c in CASES_triton])
def test_rope(B, Hq, Hk, S, D, cb, layout, dtype, device):
    q, k = make_qk(layout, B, Hq, Hk, S, D, dtype, device)
    cos, sin = rotary_triton(cb, S, D, dtype, device)
    q_out, k_out = check_rope(q, k, cos, sin, layout)
    # Contiguous inputs give contiguous outputs in the same layout (empty_like), as Hugging Face's.
    assert q_out.is_contiguous() and k_out.is_contiguous()


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("x_dtype,cs_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
                                              (torch.float32, torch.float16)], ids=str)
def test_mixed_dtypes_promote_as_hugging_face_triton(x_dtype, cs_dtype, device):
    """A bf16 q with float32 cos gives a float32 q_out (``q * cos`` promotes) and a bf16 gradient."""
    q, k = make_qk(1, 1, 2, 1, 17, 64, x_dtype, device)
    cos, sin = rotary_triton(1, 17, 64, cs_dtype, device)
    check_rope(q, k, cos, sin, 1)


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.usefixtures("poison")
def test_strided_views(device):
    """q and k sliced out of a fused qkv projection (B, S, (Hq + 2·Hk)·D), cos/sin expanded over the
    batch (stride 0) and non-contiguous: every tensor addressed through its strides, no copies."""
    B, S, Hq, Hk, D = 2, 9, 4, 2, 64
    qkv = torch.randn(B, S, (Hq + 2 * Hk) * D, device=device)
    q = qkv[..., :Hq * D].view(B, S, Hq, D).requires_grad_()
    k = qkv[..., Hq * D:(Hq + Hk) * D].view(B, S, Hk, D).requires_grad_()
    cos, sin = rotary_triton(1, S, 2 * D, torch.float32, device)
    cos, sin = cos[..., ::2].expand(B, S, D), sin[..., ::2].expand(B, S, D)
    assert cos.stride(0) == 0 and not cos.is_contiguous()
    check_rope(q, k, cos, sin, 2)


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_unequal_halves_exact_adjoint(dtype, device):
    """Arbitrary cos/sin (not built from equal halves): the backward is still the exact adjoint."""
    q, k = make_qk(1, 2, 3, 2, 5, 6, dtype, device)
    cos, sin = torch.randn(2, 5, 6, dtype=dtype, device=device), torch.randn(2, 5, 6, dtype=dtype, device=device)
    check_rope(q, k, cos, sin, 1)


@pytest.mark.usefixtures("triton_backend")
def test_wide_heads_loop_over_head_blocks(device, monkeypatch):
    """Several passes of the head loop (and a ragged last block) at small sizes."""
    monkeypatch.setattr(kernels(), "TILE_HALF_ELEMENTS", 64)
    q, k = make_qk(2, 1, 5, 3, 7, 64, torch.float32, device)
    cos, sin = rotary_triton(1, 7, 64, torch.float32, device)
    check_rope(q, k, cos, sin, 2)


@pytest.mark.usefixtures("triton_backend")
def test_empty(device):
    q, k = torch.randn(2, 4, 0, 64, device=device), torch.randn(2, 2, 0, 64, device=device)
    cos = sin = torch.randn(1, 0, 64, device=device)
    assert rope_fwd.backend_for(q, k, cos, sin) == expected_backend("triton", q, k, cos, sin)
    q_out, k_out = rope_fwd(q, k, cos, sin)
    assert q_out.shape == q.shape and k_out.shape == k.shape


@pytest.mark.usefixtures("triton_backend")
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


@pytest.mark.usefixtures("triton_backend")
def test_cpu_tensors_really_run_the_interpreted_kernel():
    k = kernels()
    x, c = torch.randn(1, 2, 3, 8), torch.randn(1, 3, 8)
    k._rope_kernel.interpreted = None
    rope_fwd(x, x, c, c)
    assert k._rope_kernel.interpreted is not None
    assert k._rope_kernel.compiled is None


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("op", ["rope_fwd", "rope_bwd"])
def test_opcheck_on_the_triton_backend(op, device):
    q = torch.randn(2, 4, 5, 8, device=device, dtype=torch.bfloat16, requires_grad=op == "rope_fwd")
    k = torch.randn(2, 2, 5, 8, device=device, dtype=torch.bfloat16, requires_grad=op == "rope_fwd")
    cos, sin = rotary_triton(1, 5, 8, torch.bfloat16, device)
    assert metalcore._op.registered_ops()[op].backend_for(q, k, cos, sin) == expected_backend("triton", q, k, cos, sin)
    torch.library.opcheck(metalcore._op.registered_ops()[op].custom_op, (q, k, cos, sin))


# --------------------------------------------------------------------------------------------
# On the GPU: Llama-7B-sized attention heads, (4, 32, 2048, 128) bf16, MHA and GQA.
# --------------------------------------------------------------------------------------------

@pytest.mark.usefixtures("triton_backend")
@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUTS.get)
@pytest.mark.parametrize("Hk", (32, 8), ids=lambda h: f"Hk{h}")
def test_gpu_full_size(Hk, layout, device):
    q, k = make_qk(layout, 4, 32, Hk, 2048, 128, torch.bfloat16, device)
    cos, sin = rotary_triton(1, 2048, 128, torch.bfloat16, device)
    check_rope(q, k, cos, sin, layout)


# --- Metal shaders (executor in CI) ---------------------------------------------------------------
# shaders/rope.metal through the metal backend on CPU tensors (the shader executor): RoPE forward and
# backward against the float64 oracle (Hugging Face's formula) and the reference op, for float32,
# float16 and bfloat16, both layouts (``unsqueeze_dim`` 1 and 2), GQA and multi-query, S = 1, 31, 33,
# head dims 6 and 64, a shared or per-batch cos/sin, strided views (fused qkv slices, partial rotary
# dims), unequal cos/sin halves (the exact adjoint), and what stays on the reference. ``position_ids``
# is accepted and ignored by the op's contract (rope.py): cos/sin arrive gathered at the positions.


DTYPES_metal = (torch.float32, torch.bfloat16, torch.float16)
LAYOUTS_metal = {1: "BHSD", 2: "BSHD"}


def oracle_metal(q, k, cos, sin, unsqueeze_dim):
    """Hugging Face's apply_rotary_pos_emb (run in float64)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half_metal(q) * sin, k * cos + rotate_half_metal(k) * sin


def rotary_metal(batch, seq, dim, dtype, base=10000.0):
    """cos, sin (batch, seq, dim) built as Hugging Face's rotary_metal embedding builds them."""
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    freqs = torch.randint(0, 4096, (batch, seq)).double()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def make_qk_metal(layout, B, Hq, Hk, S, D, dtype):
    shape = (lambda H: (B, H, S, D)) if layout == 1 else (lambda H: (B, S, H, D))
    return (torch.randn(shape(Hq), dtype=dtype, requires_grad=True),
            torch.randn(shape(Hk), dtype=dtype, requires_grad=True))


def heads_first_metal(x, layout):
    return x if layout == 1 else x.transpose(1, 2)


def check_rope_metal(q, k, cos, sin, layout):
    """Forward and backward through apply_rotary_pos_emb on the shader, against the float64 oracle_metal and
    the reference op (the same float32 math, rounded once)."""
    qh, kh = heads_first_metal(q, layout), heads_first_metal(k, layout)
    assert rope_fwd.backend_for(qh, kh, cos, sin) == expected_backend("metal", qh, kh, cos, sin)
    assert rope_bwd.backend_for(qh, kh, cos, sin) == expected_backend("metal", qh, kh, cos, sin)
    _metal.launched.clear()
    q_out, k_out = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=layout)
    assert q_out.shape == q.shape and k_out.shape == k.shape and q_out.dtype == k_out.dtype == q.dtype

    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    eq, ek = oracle_metal(q64, k64, cos.double(), sin.double(), layout)
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
    rdq, rdk = rope_bwd.reference(heads_first_metal(dq_out, layout), heads_first_metal(dk_out, layout), cos, sin)
    assert_close(dq, heads_first_metal(rdq, layout), q.dtype)
    assert_close(dk, heads_first_metal(rdk, layout), k.dtype)
    return q_out, k_out


CASES_metal = [  # (B, Hq, Hk, S, D, cos batch)
    (2, 4, 4, 1, 64, 2),
    (1, 4, 2, 31, 64, 1),    # GQA
    (2, 3, 1, 33, 6, 2),     # multi-query, a head dim that is even but not a power of two
]


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
@pytest.mark.parametrize("dtype", DTYPES_metal, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS_metal, ids=LAYOUTS_metal.get)
@pytest.mark.parametrize("B,Hq,Hk,S,D,cb", CASES_metal, ids=[f"B{c[0]}-Hq{c[1]}-Hk{c[2]}-S{c[3]}-D{c[4]}-cosB{c[5]}"
                                                      for c in CASES_metal])
def test_rope_metal(B, Hq, Hk, S, D, cb, layout, dtype):
    q, k = make_qk_metal(layout, B, Hq, Hk, S, D, dtype)
    cos, sin = rotary_metal(cb, S, D, dtype)
    q_out, k_out = check_rope_metal(q, k, cos, sin, layout)
    # Contiguous inputs give contiguous outputs in the same layout (empty_like), as Hugging Face's.
    assert q_out.is_contiguous() and k_out.is_contiguous()


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_float32_inputs_with_16_bit_cos_sin():
    """``promote_types(float32, bf16)`` is float32: the kernel takes cos/sin widened, exactly."""
    q, k = make_qk_metal(1, 1, 2, 1, 17, 64, torch.float32)
    cos, sin = rotary_metal(1, 17, 64, torch.bfloat16)
    check_rope_metal(q, k, cos, sin, 1)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_strided_views_metal():
    """q and k sliced out of a fused qkv projection (B, S, (Hq + 2·Hk)·D), cos/sin expanded over the
    batch (stride 0) and non-contiguous: every tensor addressed through its strides, no copies."""
    B, S, Hq, Hk, D = 2, 9, 4, 2, 64
    qkv = torch.randn(B, S, (Hq + 2 * Hk) * D)
    q = qkv[..., :Hq * D].view(B, S, Hq, D).requires_grad_()
    k = qkv[..., Hq * D:(Hq + Hk) * D].view(B, S, Hk, D).requires_grad_()
    cos, sin = rotary_metal(1, S, 2 * D, torch.float32)
    cos, sin = cos[..., ::2].expand(B, S, D), sin[..., ::2].expand(B, S, D)
    assert cos.stride(0) == 0 and not cos.is_contiguous()
    check_rope_metal(q, k, cos, sin, 2)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
@pytest.mark.parametrize("layout", LAYOUTS_metal, ids=LAYOUTS_metal.get)
def test_partial_rotary_slices(layout):
    """Partial rotary_metal (GPT-NeoX, Phi): Hugging Face rotates ``q[..., :rot]`` and passes the rest
    through; the slice is a strided view (row stride D, not rot) that the kernel reads in place."""
    q, k = make_qk_metal(layout, 2, 4, 2, 7, 64, torch.bfloat16)
    rot = 24
    cos, sin = rotary_metal(2, 7, rot, torch.bfloat16)
    check_rope_metal(q[..., :rot], k[..., :rot], cos, sin, layout)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_unequal_halves_exact_adjoint_metal(dtype):
    """Arbitrary cos/sin (not built from equal halves): the backward is still the exact adjoint."""
    q, k = make_qk_metal(1, 2, 3, 2, 5, 6, dtype)
    cos, sin = torch.randn(2, 5, 6, dtype=dtype), torch.randn(2, 5, 6, dtype=dtype)
    check_rope_metal(q, k, cos, sin, 1)


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_empty_metal():
    q, k = torch.randn(2, 4, 0, 64), torch.randn(2, 2, 0, 64)
    cos = sin = torch.randn(1, 0, 64)
    assert rope_fwd.backend_for(q, k, cos, sin) == expected_backend("metal", q, k, cos, sin)
    q_out, k_out = rope_fwd(q, k, cos, sin)
    assert q_out.shape == q.shape and k_out.shape == k.shape


@pytest.mark.usefixtures("executor", "metal_outputs_poisoned", "_metal_backend")
def test_what_stays_on_the_reference_metal():
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8)
    cos = sin = torch.randn(1, 3, 8)
    d = torch.float64
    assert rope_fwd.backend_for(q.to(d), k.to(d), cos.to(d), sin.to(d)) == "reference"
    assert rope_fwd.backend_for(q, k, cos[:, :1], sin[:, :1]) == "reference"  # broadcast over S
    assert rope_fwd.backend_for(q[..., :7], k[..., :7], cos[..., :7], sin[..., :7]) == "reference"  # odd D
    # A 16-bit q with float32 cos gives a float32 output: the kernel writes q's dtype.
    b = torch.bfloat16
    assert rope_fwd.backend_for(q.to(b), k.to(b), cos, sin) == "reference"
    assert rope_fwd.backend_for(q.to(b), k.to(b), cos.to(b), sin.to(b)) == expected_backend("metal", q.to(b), k.to(b), cos.to(b), sin.to(b))
