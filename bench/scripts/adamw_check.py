"""MetalAdamW against torch.optim.AdamW(fused=True) over a grid of (number of tensors × tensor size):
equality, wall time per step as a training loop sees it, GPU time beside, and the byte floor.

    python bench/scripts/adamw_check.py --out $OUT/adamw-check.json             # the H100 run (< 3 min)
    python bench/scripts/adamw_check.py --device cpu --tiny --out /tmp/a.json    # smoke test

Grid: n_tensors ∈ {1, 2, 8, 64, 200, 1000} × size ∈ {64, 4096, 65536, 1M, 16.8M/n} fp32, skipping points
above ``MAX_PARAMS`` parameters in all (1000 × 1M: 16 GB of optimizer tensors per optimizer, the
large-tensor regime is covered by 200 × 1M and the 16.8M column). Each point, in one process:

* backend: what served MetalAdamW's step (``metalcore._op.observe_backends``), or ``torch_fused``
  where no metalcore op ran (a group sent straight to ``torch._fused_adamw_``; the rule is in
  ``metalcore/optim/adamw.py``); ``triton`` below is the same optimizer with the Triton kernel forced
  (``metalcore.use_backend("triton")``), the data for that rule;
* equality: each optimizer and torch's from the same parameters and zero state, ``CHECK_STEPS`` steps
  on the same gradients. The parameters may differ by ``PARAM_ULPS`` fp32 ulps of |θ| per step (each
  step rounds θ, in another operation order) plus ``UPDATE_REL`` of the total change of θ; moments by
  ``UPDATE_REL`` of their largest value. ``UPDATE_REL`` = 1e-4 covers coefficients rounded to fp32
  in another order: 1 − fp32(0.999) is 1.3e-5 off 0.001, so v, and the update through √v, differ
  by that much between a kernel that takes β₂ in fp32 and one that takes 1 − β₂ from the host (the
  first H100 run measured 1.3e-5 at every point against torch's fused CUDA kernel) and stays 100× below a missing weight decay
  (lr·λ·θ: 1% of the change at these settings). Printed: the worst |difference| over its allowance
  (≤ 1 passes);
* wall: rounds of ``ROUND`` back-to-back ``step()`` calls between synchronisations, the optimizers
  alternating round by round, median of the per-step times (host and GPU, what a user's loop sees;
  the GPU runs ahead of the host only within a round); torch's ``foreach=True`` step beside;
* GPU time: metalcore.bench's Timer (a GPU sleep hides the host, L2 flushed before each call), for
  both ``step()``s and for torch's ``torch._fused_adamw_`` called directly on device step counters
  (torch's kernel without its Python: what routing a case to it could reach); the Timer's host time
  per step (the call's own time while the GPU sleeps: Python, dispatch and launches) is printed beside;
* floor: bytes moved (read θ, g, m, v; write θ, m, v: 28 B per parameter) at ``FLOOR_TBPS`` (3.0 TB/s,
  an H100's copy bandwidth); the fraction of it each wall and GPU time reaches.

Printed: one row per point with ``ratio = torch wall / MetalAdamW wall`` (≥ 1: MetalAdamW is not the
slower choice) and the GPU-time ratio; then the count of points below 1.0. Exit status 1 if any
equality check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import metalcore  # noqa: E402
from metalcore._op import observe_backends  # noqa: E402
from metalcore.bench.timing import GPU_BUDGET, QUICK_BUDGET, Timer  # noqa: E402
from metalcore.optim import MetalAdamW  # noqa: E402

COUNTS = (1, 2, 8, 64, 200, 1000)
SIZES = (64, 4096, 65536, 1 << 20, None)  # None: 16.8M parameters split over the tensors
TOTAL = 1 << 24  # 16.8M, the large case
MAX_PARAMS = 256 << 20
TINY_COUNTS, TINY_SIZES, TINY_TOTAL = (1, 2, 8, 64), (64, 4096, None), 1 << 16
BYTES_PER_PARAM = 28
FLOOR_TBPS = 3.0
CHECK_STEPS = 3
ROUND = 5
PARAM_ULPS = 2.0
UPDATE_REL = 1e-4
FP32_EPS = 2.0 ** -23
HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)


def grid(tiny: bool) -> list[tuple[int, int]]:
    counts, sizes, total = (TINY_COUNTS, TINY_SIZES, TINY_TOTAL) if tiny else (COUNTS, SIZES, TOTAL)
    points = []
    for n in counts:
        for size in sizes:
            size = size or total // n
            if n * size <= MAX_PARAMS and (n, size) not in points:
                points.append((n, size))
    return points


# The optimizers each point builds, by name: MetalAdamW (automatic; with the Triton kernel forced)
# and torch's two multi-tensor steps.
OPTIMIZERS = dict(
    metalcore=lambda ps: MetalAdamW(ps, **HYPER),
    triton=lambda ps: MetalAdamW(ps, **HYPER),
    torch_foreach=lambda ps: torch.optim.AdamW(ps, **HYPER, foreach=True),
    torch_fused=lambda ps: torch.optim.AdamW(ps, **HYPER, fused=True),
)


def make_optimizers(n: int, size: int, device: torch.device, names: list[str]):
    """The named optimizers (:data:`OPTIMIZERS`) over equal parameters with equal gradients; the
    gradients are fixed tensors (a step reads them only), so repeated steps need no host work but the
    optimizers' own. Returns ({name: params}, {name: optimizer}, start)."""
    start = [torch.randn(size, device=device) for _ in range(n)]
    grads = [torch.randn_like(p) for p in start]
    params, opts = {}, {}
    for name in names:
        ps = [p.clone().requires_grad_() for p in start]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        params[name], opts[name] = ps, OPTIMIZERS[name](ps)
    return params, opts, start


def diff_over_allowance(ours, opt, theirs, ref, start) -> float:
    """Worst |difference| from torch's fused AdamW over its allowance (module docstring), after the
    CHECK_STEPS steps both have taken."""
    worst = 0.0
    for p, q, p0 in zip(ours, theirs, start):
        a, b = p.detach(), q.detach()
        change = (b - p0).abs().max().item()
        allowed = PARAM_ULPS * CHECK_STEPS * FP32_EPS * b.abs() + UPDATE_REL * change
        worst = max(worst, ((a - b).abs() / allowed).max().item())
        for key in ("exp_avg", "exp_avg_sq"):
            x, y = opt.state[p][key], ref.state[q][key]
            worst = max(worst, (x - y).abs().max().item() / (UPDATE_REL * (y.abs().max().item() or 1.0)))
    return worst


def stepped(opt, backend: str):
    """``opt.step`` under ``metalcore.use_backend(backend)`` (``auto``: nothing forced)."""
    if backend == "auto":
        return opt.step

    def step():
        with metalcore.use_backend(backend):
            opt.step()
    return step


def served_by(step) -> str:
    with observe_backends() as served:
        step()
    return served.get("adamw_step_", "torch_fused")


def wall_per_step(fns: dict, device: torch.device, rounds: int) -> dict[str, float]:
    """Median seconds per step of rounds of ROUND back-to-back calls, the callables alternating."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for name, fn in fns.items():  # warm-up: compiles, builds launch plans, settles clocks
        for _ in range(ROUND):
            fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(ROUND):
                fn()
            sync()
            times[name].append((time.perf_counter() - t0) / ROUND)
    return {name: statistics.median(t) for name, t in times.items()}


def direct_fused(opt, params: list[torch.Tensor]):
    """``torch._fused_adamw_`` on copies of MetalAdamW's state with device step counters (the
    layout torch's fused optimizer keeps)."""
    dev = params[0].device
    grads = [p.grad for p in params]
    m = [opt.state[p]["exp_avg"].clone() for p in params]
    v = [opt.state[p]["exp_avg_sq"].clone() for p in params]
    work = [p.detach().clone() for p in params]
    steps = [torch.tensor(100.0, device=dev) for _ in params]
    beta1, beta2 = HYPER["betas"]

    def run():
        torch._foreach_add_(steps, 1.0)
        torch._fused_adamw_(work, grads, m, v, [], steps, lr=HYPER["lr"], beta1=beta1, beta2=beta2,
                            weight_decay=HYPER["weight_decay"], eps=HYPER["eps"], amsgrad=False, maximize=False)
    return run


def measure(n: int, size: int, device: torch.device, timer: Timer, rounds: int) -> dict:
    # The forced Triton kernel where it can run (under TRITON_INTERPRET=1 on the CPU: a smoke test).
    triton_runs = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    variants = ["metalcore", "triton"] if triton_runs else ["metalcore"]
    params, opts, start = make_optimizers(n, size, device, variants + ["torch_foreach", "torch_fused"])
    steps = {name: stepped(opt, "triton" if name == "triton" else "auto") for name, opt in opts.items()}
    for _ in range(CHECK_STEPS):
        for step in steps.values():
            step()
    diff = {name: diff_over_allowance(params[name], opts[name], params["torch_fused"], opts["torch_fused"], start)
            for name in variants}
    served = served_by(steps["metalcore"])
    wall = wall_per_step(steps, device, rounds)
    timed = {name: steps[name] for name in (*variants, "torch_fused")}
    gpu = timer.time_all({**timed, "fused_kernel": direct_fused(opts["metalcore"], params["metalcore"])})
    floor = n * size * BYTES_PER_PARAM / (FLOOR_TBPS * 1e12)
    row = dict(n_tensors=n, size=size, params=n * size, backend=served, diff_over_allowance=diff,
               equal=all(d <= 1.0 for d in diff.values()), floor_us=floor * 1e6,
               wall_us={k: t * 1e6 for k, t in wall.items()},
               gpu_us={k: t.median_s * 1e6 for k, t in gpu.items()},
               host_us={k: t.host_s * 1e6 if t.host_s is not None else float("nan") for k, t in gpu.items()})
    row["ratio_wall"] = wall["torch_fused"] / wall["metalcore"]
    row["ratio_gpu"] = gpu["torch_fused"].median_s / gpu["metalcore"].median_s
    row["floor_fraction_wall"] = floor / wall["metalcore"]
    row["floor_fraction_gpu"] = floor / gpu["metalcore"].median_s
    del params, opts, steps, timed
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="small grid and budgets (a smoke test)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "adamw-check.json"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    timer = Timer(device, QUICK_BUDGET if args.tiny or device.type == "cpu" else GPU_BUDGET)
    rounds = 5 if args.tiny else 15
    rows = []
    print(f"{'n':>5} {'size':>9} {'backend':>11} {'diff/tol':>8} | {'wall ours':>10} {'triton':>9} {'torch':>9} "
          f"{'foreach':>9} {'ratio':>6} | {'host ours':>9} {'torch':>9} | "
          f"{'gpu ours':>9} {'torch':>9} {'kernel':>9} {'ratio':>6} | {'floor':>8} {'frac w':>6} {'frac g':>6}")
    started = time.perf_counter()
    for n, size in grid(args.tiny):
        row = measure(n, size, device, timer, rounds)
        rows.append(row)
        w, g, h = row["wall_us"], row["gpu_us"], row["host_us"]
        print(f"{n:>5} {size:>9} {row['backend']:>11} {max(row['diff_over_allowance'].values()):8.2f} | "
              f"{w['metalcore']:8.1f}us {w.get('triton', float('nan')):7.1f}us "
              f"{w['torch_fused']:7.1f}us {w['torch_foreach']:7.1f}us {row['ratio_wall']:6.2f} | "
              f"{h['metalcore']:7.1f}us {h['torch_fused']:7.1f}us | {g['metalcore']:7.1f}us {g['torch_fused']:7.1f}us "
              f"{g['fused_kernel']:7.1f}us {row['ratio_gpu']:6.2f} | {row['floor_us']:6.1f}us "
              f"{row['floor_fraction_wall']:6.2f} {row['floor_fraction_gpu']:6.2f}", flush=True)
    slower = [r for r in rows if r["ratio_wall"] < 1.0]
    unequal = [r for r in rows if not r["equal"]]
    print(f"\n{len(slower)} of {len(rows)} grid points where MetalAdamW's wall time per step is above torch fused's"
          + "".join(f"\n  n={r['n_tensors']} size={r['size']}: {r['ratio_wall']:.2f}x" for r in slower))
    print(f"{len(unequal)} of {len(rows)} points unequal to torch (a difference above its allowance); "
          f"{time.perf_counter() - started:.0f} s")
    meta = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                torch=torch.__version__, commit=git_commit(), date=time.strftime("%Y-%m-%d %H:%M:%S"),
                floor_tbps=FLOOR_TBPS, bytes_per_param=BYTES_PER_PARAM, round=ROUND, rounds=rounds,
                param_ulps=PARAM_ULPS, update_rel=UPDATE_REL)
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        pass
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"wrote {args.out}")
    return 1 if unequal else 0


if __name__ == "__main__":
    sys.exit(main())
