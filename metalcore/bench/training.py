"""Training-op cases: norms, activations, RoPE, attention, the AdamW step.

Shapes: activations are 4096×4096 on GPUs (a 4096-token micro-batch of a 4096-wide model) and
1024×4096 on the CPU; RoPE and attention use the Hugging Face layout ``(batch, heads, seq, head_dim)``.
Storage dtype: bf16 on GPUs, fp32 on the CPU (:attr:`Context.train_dtype`).

Peers: the torch function eager ("torch"), ``torch.compile`` of the eager formula models use
("torch.compile", CUDA only by default), the formula as Hugging Face models write it
("hf eager") where that is what an unpatched model runs, and Liger Kernel ("liger") on CUDA
when importable.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from metalcore.bench.harness import Bench, Context, Skip, case, compiled, liger, metalcore_fn

ACTIVATIONS_FULL = [dict(rows=4096, hidden=4096)]
# 1024 rows keep a CPU call near 3 ms (fp32 rms_norm, 2 cores) at the models' row length.
ACTIVATIONS_SMALL = [dict(rows=1024, hidden=4096)]
FWD_BWD = ("fwd", "fwd+bwd")
_EPS = 1e-6


def _size(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


# --- RMSNorm -------------------------------------------------------------------------------------

def _rms_norm_hf(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``LlamaRMSNorm.forward`` of transformers: statistics in fp32, weight applied in x's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + _EPS)
    return w * xf.to(x.dtype)


@case("rms_norm", family="training", full=ACTIVATIONS_FULL, small=ACTIVATIONS_SMALL, modes=FWD_BWD)
def rms_norm(ctx: Context, rows: int, hidden: int) -> Bench:
    import metalcore

    dt = ctx.train_dtype
    x = ctx.randn(rows, hidden, dtype=dt, grad=True)
    w = (1 + 0.1 * torch.randn(hidden, device=ctx.device)).to(dt).requires_grad_(ctx.backward)
    peers = {
        "torch": lambda: F.rms_norm(x, (hidden,), w, _EPS),
        "hf eager": lambda: _rms_norm_hf(x, w),
    }
    if ctx.compile:
        fn = compiled(_rms_norm_hf)
        peers["torch.compile"] = lambda: fn(x, w)
    fn_liger = liger(ctx, "rms_norm", "LigerRMSNormFunction")
    if fn_liger is not None:
        peers["liger"] = lambda: fn_liger.apply(x, w, _EPS, 0.0, "llama", False)
    # fwd: read x, w; write y. bwd: read dy, x, w; write dx, dw.
    n = _size(x) + _size(w)
    return Bench(
        metalcore=lambda: metalcore.rms_norm(x, (hidden,), w, _EPS), peers=peers,
        shape=f"{rows}x{hidden}", dtype=dt,
        bytes=(2 * n - _size(w)) + (3 * _size(x) + 2 * _size(w) if ctx.backward else 0),
        grad_inputs=(x, w),
    )


@case("fused_add_rms_norm", family="training", full=ACTIVATIONS_FULL, small=ACTIVATIONS_SMALL, modes=FWD_BWD)
def fused_add_rms_norm(ctx: Context, rows: int, hidden: int) -> Bench:
    import metalcore

    dt = ctx.train_dtype
    x = ctx.randn(rows, hidden, dtype=dt, grad=True)
    r = ctx.randn(rows, hidden, dtype=dt, grad=True)
    w = (1 + 0.1 * torch.randn(hidden, device=ctx.device)).to(dt).requires_grad_(ctx.backward)

    def eager(x, r, w):
        h = x + r
        return F.rms_norm(h, (hidden,), w, _EPS), h

    def hf(x, r, w):
        h = x + r
        return _rms_norm_hf(h, w), h

    peers = {"torch": lambda: eager(x, r, w), "hf eager": lambda: hf(x, r, w)}
    if ctx.compile:
        fn = compiled(hf)
        peers["torch.compile"] = lambda: fn(x, r, w)
    fn_liger = liger(ctx, "fused_add_rms_norm", "LigerFusedAddRMSNormFunction")
    if fn_liger is not None:
        peers["liger"] = lambda: fn_liger.apply(x, r, w, _EPS, 0.0, "llama", False)
    # fwd: read x, r, w; write y, h. bwd: read dy, dh, h, w; write dx (= dresidual), dw.
    t = _size(x)
    return Bench(
        metalcore=lambda: metalcore.fused_add_rms_norm(x, r, w, _EPS), peers=peers,
        shape=f"{rows}x{hidden}", dtype=dt,
        bytes=4 * t + _size(w) + (4 * t + 2 * _size(w) if ctx.backward else 0),
        grad_inputs=(x, r, w),
    )


# --- activations -----------------------------------------------------------------------------------

def _pointwise(ctx: Context, rows: int, hidden: int, ours, theirs, variant: str = "") -> Bench:
    """A one-input elementwise op: read x, write y (bwd: read x, dy; write dx)."""
    dt = ctx.train_dtype
    x = ctx.randn(rows, hidden, dtype=dt, grad=True)
    return Bench(
        metalcore=lambda: ours(x), peers={"torch": lambda: theirs(x)},
        shape=f"{rows}x{hidden}", dtype=dt, variant=variant,
        bytes=(2 + (3 if ctx.backward else 0)) * _size(x), grad_inputs=(x,),
    )


@case("gelu", family="training", modes=FWD_BWD,
      full=[dict(p, approximate=a) for p in ACTIVATIONS_FULL for a in ("none", "tanh")],
      small=[dict(p, approximate=a) for p in ACTIVATIONS_SMALL for a in ("none", "tanh")])
def gelu(ctx: Context, rows: int, hidden: int, approximate: str) -> Bench:
    fn = metalcore_fn("nn.metal_gelu")
    return _pointwise(ctx, rows, hidden, lambda x: fn(x, approximate=approximate),
                      lambda x: F.gelu(x, approximate=approximate),
                      variant="exact" if approximate == "none" else "tanh")


@case("silu", family="training", full=ACTIVATIONS_FULL, small=ACTIVATIONS_SMALL, modes=FWD_BWD)
def silu(ctx: Context, rows: int, hidden: int) -> Bench:
    fn = metalcore_fn("nn.metal_silu")
    return _pointwise(ctx, rows, hidden, fn, F.silu)


@case("swiglu", family="training", full=ACTIVATIONS_FULL, small=ACTIVATIONS_SMALL, modes=FWD_BWD)
def swiglu(ctx: Context, rows: int, hidden: int) -> Bench:
    """``silu(gate) * up``, the MLP gate of Llama-style models (gate and up: rows × hidden each)."""
    fn = metalcore_fn("nn.swiglu")
    dt = ctx.train_dtype
    a = ctx.randn(rows, hidden, dtype=dt, grad=True)
    b = ctx.randn(rows, hidden, dtype=dt, grad=True)

    def eager(a, b):
        return F.silu(a) * b

    peers = {"torch": lambda: eager(a, b)}
    if ctx.compile:
        cfn = compiled(eager)
        peers["torch.compile"] = lambda: cfn(a, b)
    fn_liger = liger(ctx, "swiglu", "LigerSiLUMulFunction")
    if fn_liger is not None:
        peers["liger"] = lambda: fn_liger.apply(a, b)
    # fwd: read a, b; write y. bwd: read dy, a, b; write da, db.
    return Bench(metalcore=lambda: fn(a, b), peers=peers, shape=f"{rows}x{hidden}", dtype=dt,
                 bytes=(3 + (5 if ctx.backward else 0)) * _size(a), grad_inputs=(a, b))


# --- RoPE ----------------------------------------------------------------------------------------

def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope_hf(q, k, cos, sin):
    """``apply_rotary_pos_emb`` of transformers' Llama (cos, sin: (B, S, D), unsqueezed at dim 1)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


@case("rope", family="training", modes=FWD_BWD,
      full=[dict(batch=4, heads=32, seq=2048, head_dim=128)],
      small=[dict(batch=1, heads=8, seq=512, head_dim=128)])
def rope(ctx: Context, batch: int, heads: int, seq: int, head_dim: int) -> Bench:
    fn = metalcore_fn("nn.apply_rotary_pos_emb")
    dt = ctx.train_dtype
    q = ctx.randn(batch, heads, seq, head_dim, dtype=dt, grad=True)
    k = ctx.randn(batch, heads, seq, head_dim, dtype=dt, grad=True)
    pos = torch.arange(seq, device=ctx.device, dtype=torch.float32)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, device=ctx.device, dtype=torch.float32) / head_dim))
    angles = torch.outer(pos, inv_freq).repeat(1, 2)
    cos = angles.cos().to(dt).expand(batch, seq, head_dim).contiguous()
    sin = angles.sin().to(dt).expand(batch, seq, head_dim).contiguous()
    peers = {"hf eager": lambda: _rope_hf(q, k, cos, sin)}
    if ctx.compile:
        cfn = compiled(_rope_hf)
        peers["torch.compile"] = lambda: cfn(q, k, cos, sin)
    fn_liger = liger(ctx, "rope", "LigerRopeFunction")
    if fn_liger is not None:
        peers["liger"] = lambda: fn_liger.apply(q, k, cos, sin)
    # fwd: read q, k, cos, sin; write q', k'. bwd: read dq', dk', cos, sin; write dq, dk.
    qk, cs = _size(q) + _size(k), _size(cos) + _size(sin)
    return Bench(metalcore=lambda: fn(q, k, cos, sin), peers=peers, shape=f"{batch}x{heads}x{seq}x{head_dim}",
                 dtype=dt, bytes=(2 * qk + cs) * (2 if ctx.backward else 1), grad_inputs=(q, k))


# --- attention -----------------------------------------------------------------------------------

_SDPA_FULL = [dict(batch=4, heads=32, seq=2048, head_dim=128), dict(batch=8, heads=16, seq=1024, head_dim=64)]
_SDPA_SMALL = [dict(batch=1, heads=8, seq=512, head_dim=128), dict(batch=2, heads=4, seq=256, head_dim=64)]


@case("sdpa", family="training", modes=FWD_BWD,
      full=[dict(p, causal=c) for p in _SDPA_FULL for c in (True, False)],
      small=[dict(p, causal=c) for p in _SDPA_SMALL for c in (True, False)])
def sdpa(ctx: Context, batch: int, heads: int, seq: int, head_dim: int, causal: bool) -> Bench:
    fn = metalcore_fn("nn.metal_scaled_dot_product_attention")
    dt = ctx.train_dtype
    q, k, v = (ctx.randn(batch, heads, seq, head_dim, dtype=dt, grad=True) for _ in range(3))

    def torch_sdpa(backend=None):
        def call():
            with (torch.nn.attention.sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return call

    if ctx.device.type == "cuda":
        # torch picks one backend by heuristics; the best of the three is the peer to beat.
        B = torch.nn.attention.SDPBackend
        peers = {"torch flash": torch_sdpa(B.FLASH_ATTENTION), "torch cudnn": torch_sdpa(B.CUDNN_ATTENTION),
                 "torch mem-efficient": torch_sdpa(B.EFFICIENT_ATTENTION)}
    else:
        peers = {"torch": torch_sdpa()}
    # 2 matmuls of 2·S²·D per head forward; backward 2.5× forward (FlashAttention-2's count);
    # causal does half. fwd: read q, k, v; write o. bwd: read q, k, v, o, do; write dq, dk, dv.
    flops = 4 * batch * heads * seq * seq * head_dim * (0.5 if causal else 1.0) * (3.5 if ctx.backward else 1.0)
    return Bench(metalcore=lambda: fn(q, k, v, is_causal=causal), peers=peers,
                 shape=f"{batch}x{heads}x{seq}x{head_dim}", dtype=dt, variant="causal" if causal else "full",
                 flops=flops, bytes=_size(q) * (12 if ctx.backward else 4), grad_inputs=(q, k, v))


# --- optimizer -----------------------------------------------------------------------------------

@case("adamw", family="training", modes=("step",),
      full=[dict(tensors=64, rows=512, cols=512)], small=[dict(tensors=64, rows=512, cols=512)])
def adamw(ctx: Context, tensors: int, rows: int, cols: int) -> Bench:
    """One AdamW step over ``tensors`` fp32 parameters of ``rows × cols`` (64 × 512² = 16.8M).

    The CPU runs the full size too: torch's fused CPU step takes ~11 ms on 2 cores."""
    cls = metalcore_fn("optim.MetalAdamW")
    hyper = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    init = [torch.randn(rows, cols, device=ctx.device) for _ in range(tensors)]
    grads = [torch.randn(rows, cols, device=ctx.device) for _ in range(tensors)]

    def stepper(make):
        params = [torch.nn.Parameter(p.clone()) for p in init]
        for p, g in zip(params, grads):
            p.grad = g
        try:
            opt = make(params)
        except (RuntimeError, ValueError) as e:  # e.g. fused=True on a device without the kernel
            return None, e
        def step():
            opt.step()
            return params  # compared after the first step of each optimizer
        return step, None

    ours, err = stepper(lambda ps: cls(ps, **hyper))
    if ours is None:
        raise err
    peers = {}
    for name, kw in (("torch fused", dict(fused=True)), ("torch foreach", dict(foreach=True))):
        step, _ = stepper(lambda ps: torch.optim.AdamW(ps, **hyper, **kw))
        if step is not None:
            peers[name] = step
    if not peers:
        raise Skip("torch.optim.AdamW has neither a fused nor a foreach step here")
    n = tensors * rows * cols
    # read p, g, m, v; write p, m, v (fp32); ~16 FLOPs a parameter, far below any GEMM ceiling.
    return Bench(metalcore=ours, peers=peers, shape=f"{tensors}x{rows}x{cols}", dtype=torch.float32,
                 bytes=7 * 4 * n)
