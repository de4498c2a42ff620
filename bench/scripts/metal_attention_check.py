"""One Mac call for the Metal flash-attention shaders (shaders/attention.metal): accuracy at full size
against float64 on the CPU, and time against the reference backend (torch matmuls + softmax on MPS,
which store the L × S scores) and torch's own ``F.scaled_dot_product_attention`` on MPS, in the same
process (metalcore.bench.timing: ``torch.mps.synchronize`` around each call, medians with warm-up).
Forward and forward+backward, causal and not, bf16/fp16/fp32, with TFLOP/s; masked and fully
masked rows once, for accuracy (they rely on IEEE infinities, as the executor computes them). The launch shape is
swept — SIMD-groups per threadgroup (host: ``attention_metal.ROWS_PER_GROUP``) and the streamed tile
(shader: ``ATTN_TILE``, recompiled per variant; 32 does not fit dK/dV's threadgroup memory at head
dim 128) — because whether the kernels stay chosen automatically on MPS depends on what this shows.

    python bench/scripts/metal_attention_check.py [--out DIR]            # on a Mac with MPS (PyTorch >= 2.7)
    python bench/scripts/metal_attention_check.py --device cpu --tiny    # smoke run through the shader executor

Prints a table last and writes metal-attention-<device>.json and .log to --out (default $OUT or .).
Nothing here has run on Apple hardware yet.
"""

import argparse
import json
import math
import os
import platform
import re
import sys
import traceback

import torch
import torch.nn.functional as F

import metalcore
from metalcore import _metal
from metalcore.bench.timing import GPU_BUDGET, QUICK_BUDGET, Timer, fmt_time
from metalcore.nn import attention_metal
from metalcore.nn.attention import sdpa_bwd, sdpa_fwd

# (rows per threadgroup, ATTN_TILE); the first is the default.
VARIANTS = [(16, 16), (8, 16), (32, 16), (16, 8), (32, 8)]
CASES = [(1, 32, 8, 2048, 128), (2, 16, 16, 1024, 64)]  # (B, H, Hkv, S, E)
TINY_CASES = [(1, 2, 1, 33, 16)]


def log(state, line):
    print(line, flush=True)
    state["log"].append(line)


_variant_libs = {}


def use_variant(dev, rows, tile):
    """Make the metal backend use ROWS_PER_GROUP = rows and shaders/attention.metal compiled with this
    ATTN_TILE (each tile's library compiled once)."""
    lib = _variant_libs.get((dev.type, tile))
    if lib is None:
        src = re.sub(r"^#define ATTN_TILE \d+$", f"#define ATTN_TILE {tile}", _metal.shader_source("attention"),
                     flags=re.M)
        lib = torch.mps.compile_shader(src) if dev.type == "mps" else _metal.executor().compile_shader(src)
        _variant_libs[(dev.type, tile)] = lib
    _metal._libraries[("attention", dev.type)] = lib
    attention_metal.ROWS_PER_GROUP = rows


def fwd_bwd(q, k, v, causal, scale, dout):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, _ = sdpa_fwd(*leaves, None, causal, scale)
    return torch.autograd.grad(out, leaves, dout)


def torch_fwd_bwd(q, k, v, causal, dout):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*leaves, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])
    return torch.autograd.grad(out, leaves, dout)


def in_backend(name, fn):
    with metalcore.use_backend(name):
        return fn()


def rel_err(x, x64):
    return ((x.double().cpu() - x64).norm() / x64.norm().clamp_min(1e-300)).item()


def accuracy(q, k, v, causal, scale, dout):
    """Errors of out, dq, dk, dv (metal) and of the reference in the same dtype, against float64 on the CPU,
    on batch 0 and the query heads of key/value head 0 (all that dk/dv of that head depend on)."""
    g = q.shape[1] // k.shape[1]
    qs, ks, vs, ds = q[:1, :g], k[:1, :1], v[:1, :1], dout[:1, :g]
    with metalcore.use_backend("metal"):
        out, lse = sdpa_fwd(qs, ks, vs, None, causal, scale)
        grads = sdpa_bwd(ds, qs, ks, vs, out, lse, None, causal, scale)
    with metalcore.use_backend("reference"):
        out_r, lse_r = sdpa_fwd(qs, ks, vs, None, causal, scale)
        grads_r = sdpa_bwd(ds, qs, ks, vs, out_r, lse_r, None, causal, scale)
    q64, k64, v64, d64 = (t.double().cpu() for t in (qs, ks, vs, ds))
    out64, lse64 = sdpa_fwd.reference(q64, k64, v64, None, causal, scale)
    grads64 = sdpa_bwd.reference(d64, q64, k64, v64, out64, lse64, None, causal, scale)
    names = ("out", "dq", "dk", "dv")
    ours = {n: rel_err(x, x64) for n, x, x64 in zip(names, (out, *grads), (out64, *grads64))}
    ref = {n: rel_err(x, x64) for n, x, x64 in zip(names, (out_r, *grads_r), (out64, *grads64))}
    eps = torch.finfo(q.dtype).eps
    ok = all(ours[n] <= 2 * ref[n] + eps for n in names)
    return {"err": ours, "err_reference": ref, "ok": ok}


def check_masks(dev):
    """Masked rows on the device: a bool mask with a row that attends nothing (out 0, lse −inf, zero
    gradients) and a float mask with −inf and finfo.min keys. The kernels rely on IEEE infinities
    here, which a fast-math compile would not honour; returns {case: ok}."""
    result = {}
    for mdtype in (torch.bool, torch.float32, torch.bfloat16):
        q, k, v = (torch.randn(2, 4, 37, 64, device=dev, dtype=torch.bfloat16) for _ in range(3))
        if mdtype == torch.bool:
            mask = torch.rand(2, 1, 37, 37, device=dev) > 0.3
            mask[..., 3, :] = False
        else:
            mask = torch.randn(1, 4, 37, 37, device=dev).to(mdtype)
            mask[..., 5:9] = torch.finfo(mdtype).min
            mask[..., 11] = -math.inf
            mask[..., 2, :] = -math.inf
        dout = torch.randn_like(q)
        with metalcore.use_backend("metal"):
            out, lse = sdpa_fwd(q, k, v, mask, False, 0.125)
            grads = sdpa_bwd(dout, q, k, v, out, lse, mask, False, 0.125)
        m64 = mask.cpu() if mdtype == torch.bool else mask.double().cpu()
        q64, k64, v64, d64 = (t.double().cpu() for t in (q, k, v, dout))
        out64, lse64 = sdpa_fwd.reference(q64, k64, v64, m64, False, 0.125)
        grads64 = sdpa_bwd.reference(d64, q64, k64, v64, out64, lse64, m64, False, 0.125)
        dead = torch.isneginf(lse64)
        ok = bool(dead.any()) and bool((out.cpu()[dead] == 0).all()) and bool(torch.isneginf(lse.cpu()[dead]).all())
        ok = ok and all(rel_err(x, x64) <= 4 * torch.finfo(torch.bfloat16).eps
                        for x, x64 in zip((out, *grads), (out64, *grads64)))
        result[f"mask {str(mdtype)[6:]}"] = ok
    return result


def check_case(state, timer, dev, case, dtype, causal, variants):
    B, H, Hkv, S, E = case
    q = torch.randn(B, H, S, E, device=dev, dtype=dtype)
    k, v = (torch.randn(B, Hkv, S, E, device=dev, dtype=dtype) for _ in range(2))
    dout = torch.randn(B, H, S, E, device=dev, dtype=dtype)
    scale = 1.0 / math.sqrt(E)
    flops = 4.0 * B * H * S * S * E * (0.5 if causal else 1.0)  # two matmuls; bwd is 2.5x this
    name = f"B{B} H{H} Hkv{Hkv} S{S} E{E} {'causal' if causal else 'full'} {str(dtype)[6:]}"
    fns = {
        "reference fwd": lambda: in_backend("reference", lambda: sdpa_fwd(q, k, v, None, causal, scale)),
        "reference fwd+bwd": lambda: in_backend("reference", lambda: fwd_bwd(q, k, v, causal, scale, dout)),
        "torch fwd": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=H != Hkv),
        "torch fwd+bwd": lambda: torch_fwd_bwd(q, k, v, causal, dout),
    }
    for rows, tile in variants:
        fns[f"metal {rows}x{tile} fwd"] = (
            lambda rows=rows, tile=tile: (use_variant(dev, rows, tile),
                                          in_backend("metal", lambda: sdpa_fwd(q, k, v, None, causal, scale))))
        fns[f"metal {rows}x{tile} fwd+bwd"] = (
            lambda rows=rows, tile=tile: (use_variant(dev, rows, tile),
                                          in_backend("metal", lambda: fwd_bwd(q, k, v, causal, scale, dout))))
    for key, fn in fns.items():
        try:
            fn()
        except Exception:  # e.g. the reference running out of memory for the L x S scores
            state["errors"][f"{name} {key}"] = traceback.format_exc()
    fns = {key: fn for key, fn in fns.items() if f"{name} {key}" not in state["errors"]}
    times = timer.time_all(fns, called=True)
    use_variant(dev, *variants[0])
    row = {"case": name, "flops_fwd": flops, **accuracy(q, k, v, causal, scale, dout),
           "times_s": {key: t.median_s for key, t in times.items()}}
    row["tflops"] = {key: (flops * (3.5 if "bwd" in key else 1.0)) / s / 1e12 for key, s in row["times_s"].items()}
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="mps", choices=("mps", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="small sizes (with --device cpu: a smoke run)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    dev = torch.device(args.device)
    if dev.type == "mps" and not torch.backends.mps.is_available():
        sys.exit("MPS is not available: run on a Mac, or use --device cpu --tiny for the executor smoke run")
    torch.manual_seed(0)
    timer = Timer(dev, QUICK_BUDGET if args.tiny else GPU_BUDGET)
    state = {"device": args.device, "tiny": args.tiny, "torch": torch.__version__, "machine": platform.platform(),
             "rows": [], "errors": {}, "log": []}
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"metal-attention-{args.device}")
    try:
        state["masks_ok"] = check_masks(dev)
        log(state, f"masked rows: {state['masks_ok']}")
    except Exception:
        state["errors"]["masks"] = traceback.format_exc()
        log(state, f"masked rows failed:\n{state['errors']['masks']}")
    cases = TINY_CASES if args.tiny else CASES
    dtypes = (torch.bfloat16,) if args.tiny else (torch.bfloat16, torch.float16, torch.float32)
    variants = [VARIANTS[0], VARIANTS[3]] if args.tiny else VARIANTS
    for case in cases:
        for dtype in dtypes:
            for causal in (False, True):
                try:
                    row = check_case(state, timer, dev, case, dtype, causal, variants)
                except Exception:  # one failing case is reported; the others still run
                    state["errors"][str((case, dtype, causal))] = traceback.format_exc()
                    log(state, f"{case} {dtype} causal={causal} failed:\n{traceback.format_exc()}")
                    continue
                state["rows"].append(row)
                err = " ".join(f"{n} {e:.1e}" for n, e in row["err"].items())
                log(state, f"{row['case']}: {'ok' if row['ok'] else 'INACCURATE'} ({err})")
                for key, s in row["times_s"].items():
                    log(state, f"    {key:<22} {fmt_time(s):>9}  {row['tflops'][key]:7.2f} TFLOP/s")
                with open(base + ".json", "w") as f:
                    json.dump(state, f, indent=1, default=float)
    with open(base + ".json", "w") as f:
        json.dump(state, f, indent=1, default=float)
    with open(base + ".log", "w") as f:
        f.write("\n".join(state["log"]) + "\n")
    bad = [r["case"] for r in state["rows"] if not r["ok"]]
    bad += [case for case, ok in state.get("masks_ok", {}).items() if not ok]
    print(f"\n{len(state['rows'])} cases, {len(bad)} inaccurate, {len(state['errors'])} errors; {base}.json")
    sys.exit(1 if bad or state["errors"] else 0)


if __name__ == "__main__":
    main()
