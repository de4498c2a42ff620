import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_apply_rotary_pos_emb

from metalcore.nn import apply_rotary_pos_emb
from metalcore.nn.rope import rope_fwd
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
    torch.testing.assert_close(apply_rotary_pos_emb(q64, k64, cos.double(), sin.double()),
                               hf_apply_rotary_pos_emb(q64, k64, cos.double(), sin.double()), rtol=0, atol=1e-15)


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
