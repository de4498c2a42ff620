"""metalcore.metal_scaled_dot_product_attention against torch's SDPA, through the public function.

    python bench/scripts/attention_public_check.py --out attention_public.json          # CUDA, < 1 min
    python bench/scripts/attention_public_check.py --device cpu --tiny --out /tmp/a.json  # smoke test

Two parts, in one run:

1. **Semantics on this device** (checks, each PASS/FAIL): the public function against metalcore's
   reference run in float64 (``use_backend("reference")``), forward and every gradient, for a bool
   mask with a fully masked row (output and gradients exactly 0 there), a float ``finfo.min``
   padding mask (that row averages V), causal GQA, a float mask that requires a gradient, a
   float32 mask with bf16 inputs, a bool padding mask with a fully masked row at L = S = 320 (L % 128
   = 64 with a mask: where cuDNN's backward gave NaN dq on rows whose lse is below -88.7,
   pytorch#196678), dropout (finite, drops something), and NaN in the query or key reaching the
   output. Error bound: twice the error of torch's math backend in the same dtype (the
   suite's rule; its fused kernels are what is checked) plus a small floor.
2. **Timing**: wall time per eager call (back-to-back calls, one synchronize, median of repeats,
   the variants taking turns within each repeat)
   and GPU time beside it (CUDA events around the same calls behind a ``torch.cuda._sleep`` that
   hides the host), for metalcore's public function and torch's SDPA in the same run, at the shapes
   of issue "never slower": 4×32×2048×128 bf16 (forward; forward+backward; causal and not) and the
   decode shape q 1×32×1×128 against kv 1×8×512×128 (GQA), and prefill with a bool padding mask
   (reported beside the target: the public function adds a pass over the mask and one over the
   output there). The ratio is torch's time over metalcore's (≥ 0.95 is the target). The padding
   rows also time torch's own call with cuDNN attention switched off (what v5 of the public function
   ran), and every case records which kernel torch picks (``torch._fused_sdp_choice``). With
   ``--triton`` (off by default: compiling the kernels takes longer than the rest of the run), the
   Triton kernels forced with ``use_backend("triton")`` around the whole step, and around the
   forward only (the backward must stay on Triton: same time as the whole-step block, not the
   reference's).

Exit status 1 when a check fails or a ratio is below ``--min-ratio``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import metalcore
from metalcore.nn import metal_scaled_dot_product_attention as public_sdpa


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def wall_us(fns, device, calls, repeats):
    """Per variant, median over ``repeats`` of (time of ``calls`` back-to-back calls, one synchronize)
    / calls. Variants take turns within each repeat, so that clock or thermal drift during the run
    falls on all of them alike (measured one after the other, the same torch kernel read 0.92x)."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    sync(device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            sync(device)
            times[name].append((time.perf_counter() - t) / calls * 1e6)
    return {name: statistics.median(t) for name, t in times.items()}


def gpu_us(fn, device, calls, wall):
    """GPU time per call with the host hidden: the calls queue behind a sleep kernel longer than the
    host needs to issue them, between two CUDA events."""
    if device.type != "cuda":
        return None
    from metalcore.bench.timing import sleep_cycles_per_s

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    sync(device)
    torch.cuda._sleep(int(sleep_cycles_per_s() * wall * calls * 1.5e-6))
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    sync(device)
    return start.elapsed_time(end) / calls * 1e3


def shapes(tiny):
    if tiny:
        return {"prefill": dict(B=1, H=4, Hkv=4, L=64, S=64, E=64), "decode": dict(B=1, H=4, Hkv=2, L=1, S=32, E=64)}
    return {"prefill": dict(B=4, H=32, Hkv=32, L=2048, S=2048, E=128),
            "decode": dict(B=1, H=32, Hkv=8, L=1, S=512, E=128)}


def make(shape, dtype, device, grad):
    q = torch.randn(shape["B"], shape["H"], shape["L"], shape["E"], device=device, dtype=dtype)
    k = torch.randn(shape["B"], shape["Hkv"], shape["S"], shape["E"], device=device, dtype=dtype)
    v = torch.randn(shape["B"], shape["Hkv"], shape["S"], shape["E"], device=device, dtype=dtype)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def step(fn, q, k, v, dout, kwargs, backward, fwd_backend=None):
    """One call of ``fn`` (a forward, or forward + backward); ``fwd_backend`` opens a backend block
    around the forward only."""
    def run():
        if fwd_backend is None:
            out = fn(q, k, v, **kwargs)
        else:
            with metalcore.use_backend(fwd_backend):
                out = fn(q, k, v, **kwargs)
        if backward:
            out.backward(dout)
    if backward:
        return run

    def no_grad():
        with torch.no_grad():
            run()
    return no_grad


def without_cudnn(fn):
    """``fn`` with cuDNN attention switched off (torch's global flag), as v5 of the public function
    ran masked calls on CUDA."""
    def run():
        enabled = torch.backends.cuda.cudnn_sdp_enabled()
        torch.backends.cuda.enable_cudnn_sdp(False)
        try:
            fn()
        finally:
            torch.backends.cuda.enable_cudnn_sdp(enabled)
    return run


# torch._fused_sdp_choice's answer by value (torch.nn.attention.SDPBackend's members).
_KERNELS = {int(b): b.name for b in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                     SDPBackend.CUDNN_ATTENTION)}


def torch_choice(q, k, v, kwargs):
    """The kernel torch's SDPA picks for these arguments (a private torch function: None if absent)."""
    try:
        choice = torch._fused_sdp_choice(q, k, v, kwargs.get("attn_mask"), 0.0, kwargs.get("is_causal", False),
                                         scale=None, enable_gqa=kwargs.get("enable_gqa", False))
    except (AttributeError, RuntimeError, TypeError):
        return None
    return _KERNELS.get(int(choice), str(choice))


def timing_rows(device, tiny, triton, calls, repeats):
    rows = []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for name, shape in shapes(tiny).items():
        gqa = shape["Hkv"] != shape["H"]
        for causal in ([False, True, "padding"] if name == "prefill" else [False]):
            for backward in (False, True):
                q, k, v = make(shape, dtype, device, backward)
                dout = torch.randn(shape["B"], shape["H"], shape["L"], shape["E"], device=device, dtype=dtype)
                kwargs = dict(is_causal=causal is True, enable_gqa=gqa)
                if causal == "padding":  # a bool padding mask (last eighth of the keys of batch 0 off)
                    mask = torch.ones(shape["B"], 1, shape["L"], shape["S"], dtype=torch.bool, device=device)
                    mask[0, ..., -shape["S"] // 8:] = False
                    kwargs["attn_mask"] = mask
                variants = {"torch": step(F.scaled_dot_product_attention, q, k, v, dout, kwargs, backward),
                            "metalcore": step(public_sdpa, q, k, v, dout, kwargs, backward)}
                if causal == "padding" and device.type == "cuda":
                    variants["torch without cuDNN"] = without_cudnn(variants["torch"])
                if triton and causal != "padding":  # the Triton kernels are timed without masks
                    whole = step(public_sdpa, q, k, v, dout, kwargs, backward)

                    def forced(whole=whole):
                        with metalcore.use_backend("triton"):
                            whole()
                    variants["triton (block around all)"] = forced
                    if backward:
                        variants["triton (block around fwd)"] = step(public_sdpa, q, k, v, dout, kwargs, True, "triton")
                n = calls if name == "decode" else max(calls // 10, 5)
                walls = wall_us(variants, device, n, repeats)
                times = {variant: (w, gpu_us(variants[variant], device, n, w)) for variant, w in walls.items()}
                base = times["torch"][0]
                chosen = torch_choice(q, k, v, kwargs)
                for variant, (w, g) in times.items():
                    rows.append(dict(case=f"{name} {causal if causal == 'padding' else 'causal' if causal else 'full'}",
                                     shape="B{B} H{H} Hkv{Hkv} L{L} S{S} E{E}".format(**shape), dtype=str(dtype),
                                     direction="fwd+bwd" if backward else "fwd", variant=variant, wall_us=w,
                                     gpu_us=g, ratio_vs_torch=base / w, torch_kernel=chosen))
    return rows


def _grads(fn, leaves, dout, **kwargs):
    """Output and the gradients of ``leaves`` (q, k, v, and the mask when it is the fourth)."""
    out = fn(*leaves[:3], **kwargs)
    return (out, *torch.autograd.grad(out, leaves, dout))


def _err(a, e):
    return (a.double() - e.double()).abs().max().item() if a.numel() else 0.0


def semantic_checks(device):
    """PASS/FAIL per check: the public function in bf16 (fp32 on the CPU) against the float64 reference."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    B, H, Hkv, L, S, E = 2, 8, 2, 37, 45, 64
    results = []

    def check(name, kwargs, dead_row=None, average_row=None, mask_grad=False, zero_dout_row=None, size=(L, S)):
        q, k, v = make(dict(B=B, H=H, Hkv=Hkv, L=size[0], S=size[1], E=E), dtype, device, True)
        dout = torch.randn(B, H, size[0], E, device=device, dtype=dtype)
        if zero_dout_row is not None:
            dout[:, :, zero_dout_row] = 0
        kwargs = dict(kwargs, enable_gqa=True)
        leaves = [q, k, v]
        mask = kwargs.get("attn_mask")
        if mask_grad:
            mask = mask.detach().requires_grad_()
            kwargs["attn_mask"] = mask
            leaves = [q, k, v, mask]
        ours = _grads(public_sdpa, leaves, dout, **kwargs)
        # torch's error in this dtype; on CUDA from its math backend: the fused kernels there are what
        # the public function wraps (their results on these masks are what is being checked), and math
        # has the documented semantics (safe softmax). On the CPU, its flash kernel (as the suite).
        with sdpa_kernel(SDPBackend.MATH) if device.type == "cuda" else contextlib.nullcontext():
            theirs = _grads(F.scaled_dot_product_attention, leaves, dout, **kwargs)
        leaves64 = [t.detach().double().requires_grad_() for t in leaves]
        kwargs64 = dict(kwargs)
        if mask is not None:
            kwargs64["attn_mask"] = leaves64[3] if mask_grad else (mask if mask.dtype == torch.bool else mask.double())
        with metalcore.use_backend("reference"):
            expected = _grads(public_sdpa, leaves64, dout.double(), **kwargs64)
        problems = []
        for what, a, t, e in zip(("out", "dq", "dk", "dv", "dmask"), ours, theirs, expected):
            if not torch.isfinite(a).all():
                problems.append(f"{what} not finite")
                continue
            if not torch.isfinite(t).all():
                problems.append(f"{what}: torch's math backend not finite (no error bound)")
                continue
            floor = 4 * torch.finfo(dtype).eps * max(1.0, e.abs().max().item())
            if _err(a, e) > 2 * _err(t, e) + floor:
                problems.append(f"{what} error {_err(a, e):.2e} > 2x torch's {_err(t, e):.2e}")
        if dead_row is not None and not ((ours[0][:, :, dead_row] == 0).all() and (ours[1][:, :, dead_row] == 0).all()):
            problems.append("fully masked row: output or dq not 0")
        if average_row is not None:
            mean = v.detach().double().mean(-2).repeat_interleave(H // Hkv, 1)
            if _err(ours[0][:, :, average_row], mean) > 4 * torch.finfo(dtype).eps * mean.abs().max().item() + 1e-2:
                problems.append("finfo.min row: output is not the average of V")
        results.append(dict(check=name, ok=not problems, problems=problems,
                            torch_kernel=torch_choice(q, k, v, dict(kwargs, attn_mask=kwargs.get("attn_mask")))))

    bool_mask = torch.rand(B, 1, L, S, device=device) > 0.3
    bool_mask[..., 3, :] = False
    check("bool mask, row 3 fully masked", dict(attn_mask=bool_mask), dead_row=3)
    padding = torch.ones(B, 1, 320, 320, dtype=torch.bool, device=device)
    padding[0, ..., -40:] = False
    padding[:, :, 7] = False
    check("bool padding mask at L = S = 320, row 7 fully masked (pytorch#196678's case)",
          dict(attn_mask=padding), dead_row=7, size=(320, 320))
    pad = torch.zeros(B, 1, L, S, device=device, dtype=dtype)
    pad[..., S - 5:] = torch.finfo(dtype).min
    pad[..., 4, :] = torch.finfo(dtype).min
    check("finfo.min padding mask (row 4 all padding, no gradient into it)", dict(attn_mask=pad), average_row=4,
          zero_dout_row=4)
    check("causal GQA", dict(is_causal=True))
    check("float mask requiring grad", dict(attn_mask=torch.randn(1, H, L, S, device=device, dtype=dtype)),
          mask_grad=True)
    check("explicit scale, float32 mask", dict(attn_mask=torch.randn(L, S, device=device), scale=0.3))

    q, k, v = make(dict(B=B, H=H, Hkv=Hkv, L=L, S=S, E=E), dtype, device, True)
    out = public_sdpa(q, k, v, dropout_p=0.3, enable_gqa=True)
    out.float().sum().backward()
    plain = public_sdpa(q, k, v, enable_gqa=True)
    ok = bool(torch.isfinite(out).all() and torch.isfinite(q.grad).all() and (out - plain).abs().max() > 0.01)
    results.append(dict(check="dropout 0.3: finite, drops something, backward runs", ok=ok, problems=[] if ok else
                        ["dropout output not finite or identical to no dropout"]))

    for where in ("query", "key"):
        q, k, v = make(dict(B=B, H=H, Hkv=Hkv, L=L, S=S, E=E), dtype, device, False)
        {"query": q, "key": k}[where][1, 1, 3, 5] = float("nan")
        rows = public_sdpa(q, k, v, enable_gqa=True).isnan().any(-1)
        ok = bool(rows[1, 1, 3]) if where == "query" else bool(rows[1, 4:8].all())  # kv head 1: q heads 4-7
        results.append(dict(check=f"NaN in {where} gives NaN rows (torch's CPU kernel zeroes a NaN query row)",
                            ok=ok, problems=[] if ok else [f"NaN in {where} did not reach the output"]))
    return results


def commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="small shapes (smoke test on the CPU)")
    ap.add_argument("--triton", action="store_true",
                    help="also time the Triton kernels forced by use_backend (compiling them takes ~1 min)")
    ap.add_argument("--calls", type=int, help="back-to-back calls per measurement, decode (default 200; tiny 20); "
                    "prefill a tenth of it, at least 5")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--min-ratio", type=float, default=0.95)
    ap.add_argument("--out", required=True, help="JSON output path")
    args = ap.parse_args()
    device = torch.device(args.device)
    calls = args.calls or (20 if args.tiny else 200)
    torch.manual_seed(0)

    checks = semantic_checks(device)
    for c in checks:
        print(f"{'PASS' if c['ok'] else 'FAIL'}  {c['check']} [torch: {c.get('torch_kernel', '-')}]"
              + "".join(f"\n      {p}" for p in c["problems"]))
    rows = timing_rows(device, args.tiny, args.triton, calls, args.repeats)
    print(f"\n{'case':16s} {'dir':8s} {'variant':28s} {'wall us':>10s} {'gpu us':>10s} {'torch/ours':>10s}  "
          "torch picks")
    for r in rows:
        gpu = f"{r['gpu_us']:10.1f}" if r["gpu_us"] is not None else f"{'-':>10s}"
        print(f"{r['case']:16s} {r['direction']:8s} {r['variant']:28s} {r['wall_us']:10.1f} {gpu} "
              f"{r['ratio_vs_torch']:10.2f}  {r['torch_kernel']}")
    # The padding-mask rows are reported beside the target: there the public function adds a pass over
    # the mask and one over the output to give fully masked rows 0 (bench/training.md v6).
    public = [r for r in rows if r["variant"] == "metalcore" and "padding" not in r["case"]]
    padding = [r for r in rows if r["variant"] == "metalcore" and "padding" in r["case"]]
    worst = min(r["ratio_vs_torch"] for r in public)
    print(f"\npublic function: worst wall ratio torch/metalcore {worst:.2f} (target >= {args.min_ratio}); "
          f"with a padding mask {min(r['ratio_vs_torch'] for r in padding):.2f}; "
          f"{sum(not c['ok'] for c in checks)} of {len(checks)} checks failed")
    info = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
                commit=commit(), tiny=args.tiny, calls=calls, repeats=args.repeats)
    with open(args.out, "w") as f:
        json.dump(dict(info=info, checks=checks, timings=rows), f, indent=1)
    failed = any(not c["ok"] for c in checks) or (not args.tiny and worst < args.min_ratio)
    return 1 if failed or math.isnan(worst) else 0


if __name__ == "__main__":
    sys.exit(main())
