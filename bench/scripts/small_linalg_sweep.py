"""Launch-shape sweep of the small-matrix cholesky, trsm, solve and cholesky_solve Triton kernels
against torch.linalg, in one process (issue 5: targets cholesky >= 2x, trsm >= 1.5x, solve >= 3x).

    python bench/scripts/small_linalg_sweep.py --out DIR                     # fp32 (< 3 minutes)
    python bench/scripts/small_linalg_sweep.py --dtype float64 --out DIR     # fp64 (< 3 minutes)
    TRITON_INTERPRET=1 python bench/scripts/small_linalg_sweep.py --device cpu --tiny --out DIR

Cases at 500x16, 1000x32, 100x64, 4096x8, 64x128, 10000x3: cholesky_ex, solve_triangular (left,
lower, n right-hand sides), solve_ex (1 right-hand side), cholesky_solve (1 right-hand side). The
variants are the default launch (each launcher's ``launch_shape``, fitted to the 2026-11-25 H100
run) and its neighbours: half and twice the warps, matrices per program and right-hand-side block,
and for solve both pivoting schemes. Each is checked first (LAPACK ratio in float64, <= 30) and
then timed three ways:

* ``gpu``: GPU time per call. A ``torch.cuda._sleep`` queued ahead of the start event covers the
  host's issuing of ``REPS`` back-to-back calls, so the events see only the GPU's work.
* ``call``: CUDA events around one call from an idle GPU (what bench/linalg_triton.md v1
  measured): host issue time plus GPU time, when the host cannot run ahead.
* ``host``: host time to issue one call (``time.perf_counter``, no synchronisation).

The default launch (what the ops run today) is timed through the registered op as well (``op``
rows), so the op core's dispatch cost shows beside the bare launcher's; the ``torch`` rows record
which backend automatic selection picks for the case (``auto``). Prints a table and the best variant
per case, writes ``small-linalg-sweep-<card>-<dtype>.json`` and a log to ``--out``. A variant
that fails (compile error, ratio > 30) is recorded and skipped; past ``--budget-s`` the remaining
variants are skipped (recorded too), so the run ends in time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time

import torch
import triton

import metalcore
from metalcore.bench.timing import sleep_cycles_per_s
from metalcore.linalg import cholesky_triton, solve_triton, triangular_triton
from metalcore.linalg.cholesky import cholesky_ex_op
from metalcore.linalg.cholesky_solve import cholesky_solve_op
from metalcore.linalg.cholesky_triton import cholesky_launch
from metalcore.linalg.solve import solve_ex_op
from metalcore.linalg.solve_triton import solve_launch
from metalcore.linalg.triangular import solve_triangular_op
from metalcore.linalg.triangular_triton import cholesky_solve_launch, solve_triangular_launch

SHAPES = [(500, 16), (1000, 32), (100, 64), (4096, 8), (64, 128), (10000, 3)]
TINY_SHAPES = [(5, 3), (3, 8), (2, 17)]
TARGETS = {"cholesky": 2.0, "trsm": 1.5, "solve": 3.0, "cholesky_solve": 2.0}
REPS = 20
RATIO_BAR = 30.0


class Clock:
    """Per-call times of a zero-argument callable on one device (seconds)."""

    def __init__(self, device: torch.device, reps: int):
        self.device = device
        self.reps = reps
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.cycles_per_s = sleep_cycles_per_s()

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def host(self, fn) -> float:
        times = []
        for _ in range(self.reps):
            self.sync()
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        self.sync()
        return statistics.median(times)

    def call(self, fn) -> float:
        if not self.cuda:
            return self.host(fn)
        times = []
        for _ in range(self.reps):
            torch.cuda.synchronize()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        return statistics.median(times)

    def gpu(self, fn, host_s: float) -> float | None:
        if not self.cuda:
            return None
        batch = 10
        times = []
        for _ in range(max(3, self.reps // 4)):
            torch.cuda.synchronize()
            torch.cuda._sleep(int(1.5 * batch * host_s * self.cycles_per_s) + 20_000)
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(batch):
                fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3 / batch)
        return statistics.median(times)

    def all(self, fn) -> dict:
        fn()   # compile / warm
        self.sync()
        host_s = self.host(fn)
        return {"host_us": host_s * 1e6, "call_us": self.call(fn) * 1e6,
                "gpu_us": None if (g := self.gpu(fn, host_s)) is None else g * 1e6}


def fro(x):
    return torch.linalg.matrix_norm(x.double(), ord="fro")


def ratio(residual, scale, n, dtype) -> float:
    """max over the batch of ‖residual‖ / (scale · n · ε): LAPACK's test ratios."""
    r = fro(residual) / (scale.clamp_min(torch.finfo(torch.float64).tiny) * max(n, 1) * torch.finfo(dtype).eps)
    return float(r.max())


def solve_check(A, X, B):
    return ratio(B.double() - A.double() @ X.double(), fro(A) * fro(X), A.shape[-1], X.dtype)


def inputs(b, n, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    X = torch.randn(b, n, n, device=device, generator=g, dtype=dtype)
    spd = X @ X.mT / n + torch.eye(n, device=device, dtype=dtype)
    L = torch.linalg.cholesky(spd)
    return {"X": X, "spd": spd, "L": L,
            "B": torch.randn(b, n, n, device=device, generator=g, dtype=dtype),
            "rhs": torch.randn(b, n, 1, device=device, generator=g, dtype=dtype)}


SHORT = {"num_warps": "w", "group_size": "G", "block_k": "BK", "implicit_pivoting": "implicit"}


def label(kw: dict) -> str:
    """``w=2 G=8 BK=4``; ``default`` for the default launch."""
    return " ".join(f"{SHORT[k]}={int(v)}" for k, v in kw.items()) or "default"


def default_shape(op: str, b: int, n: int, dtype: torch.dtype, device: torch.device) -> dict:
    """The launch keywords each launcher picks by itself for this case."""
    if op == "cholesky":
        return cholesky_triton.launch_shape(n, b, device)
    if op == "trsm":
        return triangular_triton.launch_shape(n, n, b, device)
    if op == "cholesky_solve":
        return triangular_triton.launch_shape(n, 1, b, device, cholesky_solve=True)
    return solve_triton.launch_shape(n, 1, b, dtype, device)


def variants(op: str, b: int, n: int, dtype: torch.dtype, device: torch.device, tiny: bool) -> list[dict]:
    """Launch-keyword sets to try for one case: the default launch first, then each keyword moved to
    half and twice its default (the others at theirs), and for solve the other pivoting scheme."""
    shape = default_shape(op, b, n, dtype, device)
    k = n if op == "trsm" else 1   # right-hand sides: a wider block than they need is never useful
    bounds = {"num_warps": (1, 16), "group_size": (1, 64), "block_k": (2, min(64, max(2, triton.next_power_of_2(k))))}
    out = [{}]
    for key, (lo, hi) in bounds.items():
        if key not in shape:
            continue
        for v in (shape[key] // 2, shape[key] * 2):
            if lo <= v <= hi:
                out.append({**shape, key: v})
    if "implicit_pivoting" in shape:
        out.append({**shape, "implicit_pivoting": not shape["implicit_pivoting"]})
    return out[:3] if tiny else out


def case(op: str, t: dict):
    """(launcher(**kw) -> result, metalcore op, its arguments, torch call, check(result) -> ratio)"""
    if op == "cholesky":
        A = t["spd"]
        return (lambda **kw: cholesky_launch(A, False, **kw), cholesky_ex_op, (A, False, False),
                lambda: torch.linalg.cholesky_ex(A),
                lambda r: ratio(A.double() - r[0].double() @ r[0].double().mT, fro(A), A.shape[-1], A.dtype)
                if not r[1].any() else float("inf"))
    if op == "trsm":
        L, B = t["L"], t["B"]
        return (lambda **kw: solve_triangular_launch(L, B, False, True, False, **kw), solve_triangular_op,
                (L, B, False, True, False), lambda: torch.linalg.solve_triangular(L, B, upper=False),
                lambda r: solve_check(L, r, B))
    if op == "solve":
        A, B = t["X"], t["rhs"]
        return (lambda **kw: solve_launch(A, B, True, **kw), solve_ex_op, (A, B, True, False),
                lambda: torch.linalg.solve_ex(A, B),
                lambda r: solve_check(A, r[0], B) if not r[1].any() else float("inf"))
    L, A, B = t["L"], t["spd"], t["rhs"]
    return (lambda **kw: cholesky_solve_launch(B, L, False, **kw), cholesky_solve_op, (B, L, False),
            lambda: torch.cholesky_solve(B, L), lambda r: solve_check(A, r, B))


def warm_gpu(device):
    """Bring the clocks up before the first timing (v1's first shape was slow for both sides)."""
    if device.type == "cuda":
        x = torch.randn(4096, 4096, device=device)
        t = time.time()
        while time.time() - t < 0.5:
            x @ x
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="small shapes and few variants (CPU smoke test)")
    ap.add_argument("--ops", default="cholesky,trsm,solve,cholesky_solve")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--reps", type=int, default=REPS)
    ap.add_argument("--budget-s", type=float, default=160.0,
                    help="skip the remaining variants after this many seconds")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    started = time.time()
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu-interpreter"
    os.makedirs(args.out, exist_ok=True)
    stem = "small-linalg-sweep-" + card.replace(" ", "-").replace("/", "-") + "-" + args.dtype
    log = open(os.path.join(args.out, stem + ".log"), "w")

    def say(line):
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    clock = Clock(device, 3 if args.tiny else args.reps)
    warm_gpu(device)
    result = {"card": card, "torch": torch.__version__, "dtype": args.dtype, "rows": []}
    ops = args.ops.split(",")
    shapes = TINY_SHAPES if args.tiny else SHAPES
    for i, (b, n) in enumerate(shapes):
        t = inputs(b, n, dtype, device)
        for j, op in enumerate(ops):
            # Each case gets its share of the budget (time a case leaves unused carries forward).
            deadline = started + args.budget_s * (i * len(ops) + j + 1) / (len(shapes) * len(ops))
            launcher, mc_op, op_args, torch_call, check = case(op, t)
            base = {"op": op, "batch": b, "n": n}
            try:
                ref = clock.all(torch_call)
            except Exception as exc:   # a failing peer is a result to report, not a stop
                ref = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            with metalcore.use_backend("auto"):
                ref["auto"] = mc_op.backend_for(*op_args)
            result["rows"].append({**base, "variant": "torch", **ref})
            say(json.dumps(result["rows"][-1]))
            with metalcore.use_backend("triton"):
                rows = [("op", lambda: mc_op(*op_args), {})] + [
                    (label(kw), lambda kw=kw: launcher(**kw), kw) for kw in variants(op, b, n, dtype, device, args.tiny)]
                for name, fn, kw in rows:
                    row = {**base, "variant": name}
                    if time.time() > deadline:
                        row["skipped"] = "budget"
                    else:
                        try:
                            row["ratio"] = check(fn())
                            if row["ratio"] <= RATIO_BAR:
                                row.update(clock.all(fn))
                                for metric in ("call_us", "gpu_us"):
                                    if row.get(metric) and ref.get(metric):
                                        row["speedup_" + metric[:-3]] = ref[metric] / row[metric]
                            else:
                                row["error"] = f"LAPACK ratio {row['ratio']:.3g} > {RATIO_BAR}"
                        except Exception as exc:
                            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                    result["rows"].append(row)
                    say(json.dumps(row))
            with open(os.path.join(args.out, stem + ".json"), "w") as f:
                json.dump(result, f, indent=1)

    say(f"\n{card}  torch {torch.__version__}  {args.dtype}  {time.time() - started:.0f} s")
    say(f"{'op':15s} {'shape':>10s} {'variant':26s} {'ratio':>6s} {'host us':>8s} {'call us':>8s} "
        f"{'gpu us':>8s} {'x call':>7s} {'x gpu':>7s}")
    for r in result["rows"]:
        shape = f"{r['batch']}x{r['n']}"
        if "error" in r or "skipped" in r:
            say(f"{r['op']:15s} {shape:>10s} {r['variant']:26s} {r.get('error', r.get('skipped'))[:60]}")
            continue
        variant = f"{r['variant']} (auto: {r['auto']})" if r["variant"] == "torch" else r["variant"]
        say(f"{r['op']:15s} {shape:>10s} {variant:26s} {r.get('ratio', 0):6.2f} {r['host_us']:8.1f} "
            f"{r['call_us']:8.1f} {r['gpu_us'] or 0:8.1f} {r.get('speedup_call', 0):7.2f} "
            f"{r.get('speedup_gpu', 0):7.2f}")
    say("\nbest variant per case (by GPU time; by host-inclusive call time on the CPU):")
    key = "gpu_us" if device.type == "cuda" else "call_us"
    for (op, b, n), group_rows in itertools.groupby(result["rows"], key=lambda r: (r["op"], r["batch"], r["n"])):
        group_rows = [r for r in group_rows if r["variant"] not in ("torch", "op") and r.get(key)]
        if group_rows:
            best = min(group_rows, key=lambda r: r[key])
            say(f"{op:15s} {b}x{n:<5d} {best['variant']:26s} {best[key]:8.1f} us  "
                f"x{best.get('speedup_' + key[:-3], 0):.2f} (target {TARGETS[op]}x)")
    result["seconds"] = round(time.time() - started, 1)
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump(result, f, indent=1)
    log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
