"""Host time per eager call of metalcore's training ops against torch's, and where it goes.

    python bench/scripts/host_overhead.py [--device cuda] [--profile]

Wall time of back-to-back calls (one synchronize at the end) on small inputs, so the GPU finishes
each call before the host issues the next and the figure is host time; with ``--profile``, the
top of a cProfile of metalcore's call by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch
import torch.nn.functional as F

import metalcore
from metalcore.optim import MetalAdamW


def wall_us(fn, device, calls=300):
    for _ in range(20):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / calls * 1e6


def cases(device):
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(8, 512, device=device, dtype=dt, requires_grad=True)
    w = torch.ones(512, device=device, dtype=dt, requires_grad=True)
    g = torch.randn(8, 1024, device=device, dtype=dt, requires_grad=True)
    u = torch.randn(8, 1024, device=device, dtype=dt, requires_grad=True)
    dy = torch.randn(8, 512, device=device, dtype=dt)
    dh = torch.randn(8, 1024, device=device, dtype=dt)

    def fwd(f):
        def run():
            with torch.no_grad():
                f()
        return run

    params = [torch.randn(256, 256, device=device, requires_grad=True) for _ in range(64)]
    for p in params:
        p.grad = torch.randn_like(p)
    ours = MetalAdamW(params, lr=1e-3)
    theirs = torch.optim.AdamW(params, lr=1e-3, fused=device.type == "cuda", foreach=None if device.type == "cuda" else True)
    return {
        "rms_norm fwd": (fwd(lambda: metalcore.rms_norm(x, (512,), w, eps=1e-6)),
                         fwd(lambda: F.rms_norm(x, (512,), w, eps=1e-6))),
        "rms_norm fwd+bwd": (lambda: metalcore.rms_norm(x, (512,), w, eps=1e-6).backward(dy),
                             lambda: F.rms_norm(x, (512,), w, eps=1e-6).backward(dy)),
        "swiglu fwd+bwd": (lambda: metalcore.swiglu(g, u).backward(dh),
                           lambda: (F.silu(g) * u).backward(dh)),
        "adamw step 64 tensors": (ours.step, theirs.step),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    for name, (mine, peer) in cases(device).items():
        a, b = wall_us(mine, device), wall_us(peer, device)
        print(f"{name:24s} metalcore {a:8.1f} us   torch {b:8.1f} us   ratio {a / b:5.2f}")
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(100):
                mine()
            prof.disable()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(12)
            print("\n".join(line for line in s.getvalue().splitlines()[6:] if line.strip()))


if __name__ == "__main__":
    main()
