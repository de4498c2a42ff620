"""Time metalcore's Triton training kernels against same-run peers on one CUDA GPU.

    python bench/scripts/triton_training_check.py --out results.json [--sweep]

For each case: the fewest bytes the op must move (each input read once, each output written
once), the median GPU time, achieved GB/s, the fraction of the measured device-to-device copy
bandwidth, and the ratio of each peer's time to metalcore's (above 1: metalcore is faster).

Timing, L2 evicted before every timed call by reading 256 MB:
* GPU time (``times_us``, the ratios): the call captured in a CUDA graph and replayed between
  CUDA events, so host overhead is excluded for every contender alike;
* eager time (``eager_us``): the plain call between events, after a ~0.5 ms ``torch.cuda._sleep``
  that hides up to that much host time; a call whose host overhead is larger shows it here;
* wall time (``wall_us_per_call``): back-to-back eager calls, host included.
``--sweep`` also times a few launch configurations (module constants), defaults restored.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import metalcore  # noqa: E402
from metalcore.nn import activations_triton as ACT  # noqa: E402
from metalcore.nn import rms_norm_triton as RMS  # noqa: E402
from metalcore.nn import swiglu_triton as SWI  # noqa: E402
from metalcore.nn.activations import metal_gelu, metal_silu  # noqa: E402
from metalcore.nn.swiglu import swiglu  # noqa: E402
from metalcore.optim import adamw_triton as ADAM  # noqa: E402
from metalcore.optim.adamw import MetalAdamW  # noqa: E402

EPS = 1e-6
_flush = None


def _cold_l2():
    """Evict L2 by reading 256 MB (a read leaves clean lines: no write-backs land in the timed
    region, as they would after writing a flush buffer)."""
    global _flush
    if _flush is None:
        _flush = torch.ones(64 * 2**20, dtype=torch.float32, device="cuda")
    _flush.sum()


def _time(launch, reps: int, sleep_cycles: int) -> float:
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        _cold_l2()
        torch.cuda._sleep(sleep_cycles)  # the host enqueues launch() while the GPU waits here
        start.record()
        launch()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def eager_ms(fn, reps: int = 30, warmup: int = 5, sleep_cycles: int = 1_000_000) -> float:
    """Median milliseconds between events around an eager call, cold L2, after a ~0.5 ms sleep
    that hides up to that much host time: a call whose host overhead is larger shows it here."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    return _time(fn, reps, sleep_cycles)


def graph_ms(fn, reps: int = 30) -> float:
    """Median GPU milliseconds of ``fn`` captured in a CUDA graph (no host overhead at all)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    return _time(graph.replay, reps, 200_000)


def gpu_ms(fn, reps: int = 30) -> float:
    """GPU time: from a CUDA graph when ``fn`` can be captured, else the eager measurement."""
    try:
        return graph_ms(fn, reps)
    except Exception as e:  # noqa: BLE001
        print(f"    (graph capture failed, eager timing: {str(e)[:120]})")
        torch.cuda.synchronize()
        return eager_ms(fn, reps)


def wall_us(fn, calls: int = 200) -> float:
    """Host-inclusive microseconds per eager call, back to back (dispatch overhead shows here)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / calls * 1e6


def liger(module: str, name: str):
    try:
        mod = __import__(f"liger_kernel.ops.{module}", fromlist=[name])
        return getattr(mod, name)
    except Exception as e:  # noqa: BLE001  (an absent or broken peer is reported, not fatal)
        print(f"liger {module}.{name} unavailable: {e!r}")
        return None


def fwd_bwd(f, inputs, dy):
    """A call that runs forward and backward, returning gradients without accumulating them."""
    return lambda: torch.autograd.grad(f(), inputs, dy)


class Report:
    def __init__(self, copy_gbs: float, device: str):
        self.copy_gbs = copy_gbs
        self.device = device
        self.rows = []

    def case(self, name: str, nbytes: int, fns: dict, wall: dict | None = None, note: str = "",
             long_sleep: bool = False) -> dict:
        """Time ``fns`` (metalcore first) and record the row."""
        times, eager = {}, {}
        for label, fn in fns.items():
            try:
                eager[label] = eager_ms(fn) * 1e3
                # long_sleep: calls whose host side is too long or not capturable (the AdamW step
                # copies its pointer table from pinned host memory): eager timing behind a ~3 ms
                # sleep, which hides the host time, instead of a graph.
                times[label] = eager_ms(fn, sleep_cycles=6_000_000) if long_sleep else gpu_ms(fn)
            except Exception as e:  # noqa: BLE001
                print(f"  {name} / {label} failed: {e!r}")
                traceback.print_exc()
        ours = times.get("metalcore")
        row = dict(case=name, bytes=nbytes, floor_us=nbytes / (self.copy_gbs * 1e9) * 1e6,
                   times_us={k: v * 1e3 for k, v in times.items()}, eager_us=eager, note=note)
        if ours:
            row["gbs"] = nbytes / (ours * 1e-3) / 1e9
            row["fraction_of_copy"] = row["gbs"] / self.copy_gbs
            row["peer_over_metalcore"] = {k: v / ours for k, v in times.items() if k != "metalcore"}
            if eager.get("metalcore"):
                row["eager_peer_over_metalcore"] = {k: v / eager["metalcore"] for k, v in eager.items() if k != "metalcore"}
        if wall:
            row["wall_us_per_call"] = {k: wall_us(v) for k, v in wall.items()}
        self.rows.append(row)
        peers = " ".join(f"{k}={v:.2f}x" for k, v in row.get("peer_over_metalcore", {}).items())
        epeers = " ".join(f"{k}={v:.2f}x" for k, v in row.get("eager_peer_over_metalcore", {}).items())
        print(f"{name:34s} {row['times_us'].get('metalcore', float('nan')):9.1f} us "
              f"{row.get('gbs', 0):7.0f} GB/s {row.get('fraction_of_copy', 0):5.1%} of copy | {peers}"
              f" || eager {eager.get('metalcore', float('nan')):.1f} us: {epeers}", flush=True)
        return row


def copy_bandwidth(nbytes: int = 2**30) -> float:
    """Device-to-device copy GB/s (bytes read + written) of an ``nbytes`` buffer."""
    src = torch.randn(nbytes // 4, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = gpu_ms(lambda: dst.copy_(src), reps=20)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def hf_rms_norm(x, w):
    """transformers' LlamaRMSNorm.forward: fp32 statistics, weight applied in x's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)
    return w * xf.to(x.dtype)


def bench_rms_norm(rep: Report, compile_peers: bool):
    rows, n = 4096, 4096
    dt = torch.bfloat16
    x = torch.randn(rows, n, device="cuda", dtype=dt, requires_grad=True)
    w = (1 + 0.1 * torch.randn(n, device="cuda")).to(dt).requires_grad_()
    dy = torch.randn_like(x)
    N = x.numel() * 2
    fwd_bytes = 2 * N + n * 2 + rows * 4
    bwd_bytes = 3 * N + 2 * n * 2 + rows * 4
    compiled = torch.compile(hf_rms_norm) if compile_peers else None
    LigerRMS = liger("rms_norm", "LigerRMSNormFunction")

    fwd = {
        "metalcore": lambda: metalcore.rms_norm(x, (n,), w, EPS),
        "kernel": lambda: RMS.rms_norm_fwd_launch(x.detach(), w.detach(), EPS, 0.0),
        "F.rms_norm": lambda: F.rms_norm(x, (n,), w, EPS),
        "hf module": lambda: hf_rms_norm(x, w),
    }
    if compiled:
        fwd["torch.compile"] = lambda: compiled(x, w)
    if LigerRMS:
        fwd["liger"] = lambda: LigerRMS.apply(x, w, EPS, 0.0, "llama", False)
    with torch.no_grad():
        nograd = {k: v for k, v in fwd.items()}
        rep.case("rms_norm fwd bf16 4096x4096", fwd_bytes, nograd,
                 wall={"metalcore": fwd["metalcore"], "F.rms_norm": fwd["F.rms_norm"]})
    both = {
        "metalcore": fwd_bwd(lambda: metalcore.rms_norm(x, (n,), w, EPS), (x, w), dy),
        "F.rms_norm": fwd_bwd(lambda: F.rms_norm(x, (n,), w, EPS), (x, w), dy),
        "hf module": fwd_bwd(lambda: hf_rms_norm(x, w), (x, w), dy),
    }
    if compiled:
        both["torch.compile"] = fwd_bwd(lambda: compiled(x, w), (x, w), dy)
    if LigerRMS:
        # in_place=True is Liger's default (LigerRMSNorm): dX overwrites dY, so give it a fresh dY.
        both["liger"] = lambda: torch.autograd.grad(LigerRMS.apply(x, w, EPS, 0.0, "llama", True), (x, w), dy.clone())
    rep.case("rms_norm fwd+bwd bf16 4096x4096", fwd_bytes + bwd_bytes, both,
             wall={"metalcore": both["metalcore"], "F.rms_norm": both["F.rms_norm"]})
    _, rstd = RMS.rms_norm_fwd_launch(x.detach(), w.detach(), EPS, 0.0)[::2]
    rep.case("rms_norm bwd kernel bf16 4096x4096", bwd_bytes,
             {"metalcore": lambda: RMS.rms_norm_bwd_launch(dy, x.detach(), w.detach(), rstd, 0.0)})

    # fp32 weight with bf16 activations (mixed precision), and the fused residual add.
    w32 = w.detach().float().requires_grad_()
    rep.case("rms_norm fwd bf16 x, fp32 w", fwd_bytes + n * 2, {
        "metalcore": lambda: RMS.rms_norm_fwd_launch(x.detach(), w32.detach(), EPS, 0.0)})
    r = torch.randn_like(x)
    LigerAdd = liger("fused_add_rms_norm", "LigerFusedAddRMSNormFunction")
    add = {
        "metalcore": lambda: metalcore.fused_add_rms_norm(x.detach(), r, w.detach(), EPS),
        "eager add + F.rms_norm": lambda: F.rms_norm(x.detach() + r, (n,), w.detach(), EPS),
    }
    if LigerAdd:
        add["liger"] = lambda: LigerAdd.apply(x.detach(), r, w.detach(), EPS, 0.0, "llama", False)
    rep.case("fused_add_rms_norm fwd bf16 4096x4096", 4 * N + n * 2 + rows * 4, add)

    # Long rows: the looped path.
    xl = torch.randn(512, 65536, device="cuda", dtype=dt)
    wl = torch.randn(65536, device="cuda", dtype=dt)
    dyl = torch.randn_like(xl)
    NL = xl.numel() * 2
    rep.case("rms_norm fwd bf16 512x65536 (looped)", 2 * NL, {
        "metalcore": lambda: RMS.rms_norm_fwd_launch(xl, wl, EPS, 0.0),
        "F.rms_norm": lambda: F.rms_norm(xl, (65536,), wl, EPS)})
    rstdl = RMS.rms_norm_fwd_launch(xl, wl, EPS, 0.0)[2]
    rep.case("rms_norm bwd bf16 512x65536 (looped)", 3 * NL, {
        "metalcore": lambda: RMS.rms_norm_bwd_launch(dyl, xl, wl, rstdl, 0.0)})


def bench_elementwise(rep: Report, compile_peers: bool):
    shape = (4096, 11008)
    dt = torch.bfloat16
    x = torch.randn(shape, device="cuda", dtype=dt, requires_grad=True)
    dy = torch.randn_like(x)
    N = x.numel() * 2
    cases = {
        "gelu": (lambda: metal_gelu(x), lambda: F.gelu(x)),
        "gelu_tanh": (lambda: metal_gelu(x, approximate="tanh"), lambda: F.gelu(x, approximate="tanh")),
        "silu": (lambda: metal_silu(x), lambda: F.silu(x)),
    }
    formulas = {"gelu": lambda t: F.gelu(t), "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
                "silu": lambda t: F.silu(t)}
    for name, (ours, eager) in cases.items():
        fns = {"metalcore": ours, "torch": eager}
        if compile_peers:
            c = torch.compile(formulas[name])
            fns["torch.compile"] = lambda _c=c: _c(x)
        with torch.no_grad():
            rep.case(f"{name} fwd bf16 4096x11008", 2 * N, fns)
        rep.case(f"{name} fwd+bwd bf16 4096x11008", 5 * N, {k: fwd_bwd(f, (x,), dy) for k, f in fns.items()})

    g = torch.randn(shape, device="cuda", dtype=dt, requires_grad=True)
    u = torch.randn(shape, device="cuda", dtype=dt, requires_grad=True)
    LigerSwi = liger("swiglu", "LigerSiLUMulFunction")
    fns = {"metalcore": lambda: swiglu(g, u), "torch": lambda: F.silu(g) * u}
    if compile_peers:
        c = torch.compile(lambda a, b: F.silu(a) * b)
        fns["torch.compile"] = lambda: c(g, u)
    if LigerSwi:
        fns["liger"] = lambda: LigerSwi.apply(g, u)
    with torch.no_grad():
        rep.case("swiglu fwd bf16 4096x11008", 3 * N, fns)
    rep.case("swiglu fwd+bwd bf16 4096x11008", 8 * N, {k: fwd_bwd(f, (g, u), dy) for k, f in fns.items()})


def _triton(fn):
    """``fn`` under the explicit triton backend (RoPE and attention are not chosen automatically);
    wrap the whole forward-and-backward call, or the backward runs outside the context."""
    def run():
        with metalcore.use_backend("triton"):
            return fn()
    return run


def _grads(f, inputs, dy, triton: bool):
    call = lambda: torch.autograd.grad(f(), inputs, dy)  # noqa: E731
    return _triton(call) if triton else call


def bench_rope(rep: Report):
    """HF layout, Llama-3-8B-like heads: q (4, 32, 2048, 128), k (4, 8, 2048, 128), cos/sin (4, 2048, 128)."""
    from metalcore.nn.rope import apply_rotary_pos_emb, rotate_half

    dt = torch.bfloat16
    q = torch.randn(4, 32, 2048, 128, device="cuda", dtype=dt, requires_grad=True)
    k = torch.randn(4, 8, 2048, 128, device="cuda", dtype=dt, requires_grad=True)
    pos = torch.arange(2048, device="cuda", dtype=torch.float32)
    inv = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, device="cuda", dtype=torch.float32) / 128))
    ang = torch.cat([pos[:, None] * inv, pos[:, None] * inv], dim=-1)
    cos, sin = (f(ang)[None].expand(4, -1, -1).to(dt) for f in (torch.cos, torch.sin))

    def hf(q, k):
        c, s_ = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * c + rotate_half(q) * s_, k * c + rotate_half(k) * s_

    fns = {"metalcore": lambda: apply_rotary_pos_emb(q, k, cos, sin), "hf eager": lambda: hf(q, k)}
    LigerRope = liger("rope", "LigerRopeFunction")
    if LigerRope:
        fns["liger"] = lambda: LigerRope.apply(q, k, cos, sin)
    from metalcore.nn.rope import rope_fwd
    with metalcore.use_backend("triton"):
        print(f"rope backend: {rope_fwd.backend_for(q, k, cos, sin)}")
    nbytes = 2 * (q.numel() + k.numel()) * 2 + 2 * cos.numel() * 2
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    with torch.no_grad():
        rep.case("rope fwd bf16 q 4x32x2048x128 k 4x8", nbytes,
                 {name: _triton(f) if name == "metalcore" else f for name, f in fns.items()})
    rep.case("rope fwd+bwd bf16 q 4x32x2048x128 k 4x8", 2 * nbytes,
             {name: _grads(f, (q, k), (dq, dk), name == "metalcore") for name, f in fns.items()})


def bench_attention(rep: Report):
    """Flash attention against torch's SDPA (its flash backend) in bf16; reports TFLOP/s, counting
    4·B·H·L·S·E FLOPs forward (halved when causal) and 2.5× that backward."""
    from metalcore.nn.attention import metal_scaled_dot_product_attention as ours

    for B, H, S, E in ((4, 32, 2048, 128), (8, 16, 1024, 64)):
        q, k, v = (torch.randn(B, H, S, E, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        for causal in (False, True):
            flops = 4 * B * H * S * S * E * (0.5 if causal else 1.0)
            fns = {"metalcore": lambda: ours(q, k, v, is_causal=causal),
                   "torch sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)}
            tag = f"{B}x{H}x{S}x{E}{' causal' if causal else ''}"
            with torch.no_grad():
                row = rep.case(f"attention fwd bf16 {tag}", 4 * q.numel() * 2,
                               {name: _triton(f) if name == "metalcore" else f for name, f in fns.items()})
            row["tflops"] = {name: flops / (t * 1e-6) / 1e12 for name, t in row["times_us"].items()}
            print("    TFLOP/s: " + " ".join(f"{n}={t:.0f}" for n, t in row["tflops"].items()), flush=True)
            row = rep.case(f"attention fwd+bwd bf16 {tag}", 8 * q.numel() * 2,
                           {name: _grads(f, (q, k, v), do, name == "metalcore") for name, f in fns.items()})
            row["tflops"] = {name: 3.5 * flops / (t * 1e-6) / 1e12 for name, t in row["times_us"].items()}
            print("    TFLOP/s: " + " ".join(f"{n}={t:.0f}" for n, t in row["tflops"].items()), flush=True)


def _kernel_resources(lazy) -> str:
    """Registers and spills of each compiled specialisation of a metalcore Triton kernel."""
    try:
        caches = lazy.compiled.device_caches
        found = [f"{k.n_regs}r/{k.n_spills}s" for cache in caches.values() for k in cache[0].values()]
        return ",".join(found)
    except Exception as e:  # noqa: BLE001  (Triton internals; a miss is reported, not fatal)
        return f"? ({type(e).__name__})"


def sweep_attention():
    """Launch shapes for the flash-attention kernels at (4, 32, 2048, 128) bf16, causal and not:
    forward and forward+backward times, registers/spills per kernel."""
    from metalcore.nn import attention_triton as AT
    from metalcore.nn.attention import metal_scaled_dot_product_attention as ours

    defaults = {n: getattr(AT, n) for n in ("BLOCK_N", "NUM_WARPS", "NUM_STAGES", "FWD_TMA", "BWD_KV", "BWD_Q",
                                            "BWD_DQ_Q", "BWD_DQ_KV", "BWD_WARPS", "BWD_STAGES")}
    configs = [{}, dict(FWD_TMA=True), dict(FWD_TMA=True, BLOCK_N=128), dict(FWD_TMA=True, NUM_STAGES=2),
               dict(FWD_TMA=True, NUM_STAGES=4), dict(FWD_TMA=True, NUM_WARPS=4), dict(BLOCK_N=128),
               dict(BWD_KV=128, BWD_Q=64), dict(BWD_DQ_Q=128, BWD_DQ_KV=64)]
    tuned = AT.FWD_BY_HEAD_DIM, AT.BWD_DQ_KV_BY_HEAD_DIM
    AT.FWD_BY_HEAD_DIM, AT.BWD_DQ_KV_BY_HEAD_DIM = {}, {}  # the sweep sets the plain constants
    out = []
    for E, B, H, S in ((128, 4, 32, 2048), (64, 8, 16, 1024)):
        q, k, v = (torch.randn(B, H, S, E, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        for causal in (False, True):
            flops = 4 * B * H * S * S * E * (0.5 if causal else 1.0)
            for cfg in configs:
                for name, value in {**defaults, **cfg}.items():
                    setattr(AT, name, value)
                for lazy in (AT._sdpa_fwd_kernel, AT._sdpa_bwd_dkdv_kernel, AT._sdpa_bwd_dq_kernel):
                    lazy.compiled = None  # fresh caches, so the resources printed are this config's
                try:
                    with torch.no_grad():
                        f_ms = gpu_ms(_triton(lambda: ours(q, k, v, is_causal=causal)), reps=10)
                    fb_ms = gpu_ms(_grads(lambda: ours(q, k, v, is_causal=causal), (q, k, v), do, True), reps=10)
                    res = " ".join(_kernel_resources(x) for x in (AT._sdpa_fwd_kernel, AT._sdpa_bwd_dkdv_kernel,
                                                                   AT._sdpa_bwd_dq_kernel))
                    row = dict(E=E, causal=causal, cfg=cfg, fwd_tflops=flops / f_ms / 1e9,
                               fwd_bwd_tflops=3.5 * flops / fb_ms / 1e9, resources=res)
                except Exception as e:  # noqa: BLE001
                    row = dict(E=E, causal=causal, cfg=cfg, error=repr(e)[:200])
                out.append(row)
                print("attn sweep", json.dumps(row), flush=True)
    for name, value in defaults.items():
        setattr(AT, name, value)
    AT.FWD_BY_HEAD_DIM, AT.BWD_DQ_KV_BY_HEAD_DIM = tuned
    return out


def bench_adamw(rep: Report):
    def params(dtype):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(512, 512, device="cuda", dtype=dtype)) for _ in range(64)]
        for p in ps:
            p.grad = torch.randn_like(p)
        return ps

    n = 64 * 512 * 512
    for dtype, per in ((torch.float32, 28), (torch.bfloat16, 2 + 2 + 2 + 8 + 8)):
        ours = MetalAdamW(params(dtype), lr=1e-3, weight_decay=0.1)
        fns = {"metalcore": ours.step}
        if dtype == torch.float32:
            # capturable=True keeps torch's step counters on the GPU, so its fused step can be
            # captured in a CUDA graph like ours; it is the same fused kernel.
            fused = torch.optim.AdamW(params(dtype), lr=1e-3, weight_decay=0.1, fused=True, capturable=True)
            foreach = torch.optim.AdamW(params(dtype), lr=1e-3, weight_decay=0.1, foreach=True)
            fns.update({"torch fused": fused.step, "torch foreach": foreach.step})
        rep.case(f"adamw step {str(dtype)[6:]} 16.8M params/64 tensors", n * per, fns, long_sleep=True,
                 wall={"metalcore": ours.step, **({"torch fused": fns["torch fused"]} if "torch fused" in fns else {})})


def sweep(rep: Report):
    """A few launch configurations per kernel (kernel-level GPU times, defaults restored)."""
    out = {}
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    rstd = RMS.rms_norm_fwd_launch(x, w, EPS, 0.0)[2]
    N = x.numel() * 2
    for tile in (4096, 8192, 16384):
        RMS.TILE_ELEMENTS = tile
        out[f"rms fwd tile={tile}"] = (2 * N, gpu_ms(lambda: RMS.rms_norm_fwd_launch(x, w, EPS, 0.0)))
        for per_sm in (2, 4):
            RMS.BWD_TILE_ELEMENTS, RMS.BWD_PROGRAMS_PER_SM = tile, per_sm
            out[f"rms bwd tile={tile} programs/SM={per_sm}"] = (
                3 * N, gpu_ms(lambda: RMS.rms_norm_bwd_launch(dy, x, w, rstd, 0.0)))
    RMS.TILE_ELEMENTS, RMS.BWD_TILE_ELEMENTS, RMS.BWD_PROGRAMS_PER_SM = 4096, 4096, 2

    ps = [torch.randn(512, 512, device="cuda") for _ in range(64)]
    gs = [torch.randn_like(p) for p in ps]
    ms_ = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    steps = [torch.tensor(0.0) for _ in ps]
    for block, warps, per_sm in ((512, 4, 4), (512, 4, 8), (1024, 8, 4), (2048, 8, 2)):
        ADAM.BLOCK, ADAM.NUM_WARPS, ADAM.PROGRAMS_PER_SM = block, warps, per_sm
        ADAM._PLANS.clear()  # the launch plans depend on BLOCK and PROGRAMS_PER_SM
        fn = lambda: ADAM._adamw_step_triton(ps, gs, ms_, vs, [], steps, 1e-3, 0.9, 0.999, 1e-8, 0.1, False, False)
        out[f"adamw BLOCK={block} warps={warps} programs/SM={per_sm}"] = (64 * 512 * 512 * 28, eager_ms(fn))
    ADAM.BLOCK, ADAM.NUM_WARPS, ADAM.PROGRAMS_PER_SM = 512, 4, 8
    ADAM._PLANS.clear()

    result = {}
    for k, (nbytes, ms) in out.items():
        gbs = nbytes / (ms * 1e-3) / 1e9
        result[k] = dict(us=ms * 1e3, gbs=gbs, fraction_of_copy=gbs / rep.copy_gbs)
        print(f"sweep {k:45s} {ms * 1e3:8.1f} us {gbs:7.0f} GB/s {gbs / rep.copy_gbs:5.1%}")
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="triton-training.json")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--attn-sweep", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated sections: rms_norm,elementwise,adamw,rope,attention")
    args = ap.parse_args()
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    info = dict(device=torch.cuda.get_device_name(0), sms=props.multi_processor_count,
                torch=torch.__version__, triton=__import__("triton").__version__)
    try:
        info["liger"] = __import__("liger_kernel").__version__ if hasattr(__import__("liger_kernel"), "__version__") else "present"
    except Exception:  # noqa: BLE001
        info["liger"] = None
    copy = copy_bandwidth()
    info["copy_gbs"] = copy
    # The same copy at the size of one 4096x4096 bf16 activation (32 MiB in, 32 MiB out): the
    # ceiling a kernel of that size can reach, launch and tail included.
    info["copy_gbs_32MiB"] = copy_bandwidth(2**25)
    print(json.dumps(info))
    rep = Report(copy, info["device"])
    results = dict(info=info)
    sections = (("rms_norm", lambda: bench_rms_norm(rep, not args.no_compile)),
                ("elementwise", lambda: bench_elementwise(rep, not args.no_compile)),
                ("adamw", lambda: bench_adamw(rep)),
                ("rope", lambda: bench_rope(rep)),
                ("attention", lambda: bench_attention(rep)))
    for name, fn in sections:
        if args.only and name not in args.only.split(","):
            continue
        try:
            fn()
        except Exception:  # noqa: BLE001
            print(f"{name} failed:")
            traceback.print_exc()
    results["cases"] = rep.rows
    if args.attn_sweep:
        results["attn_sweep"] = sweep_attention()
    if args.sweep:
        try:
            results["sweep"] = sweep(rep)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
