"""Launch-shape sweep of the small-matrix cholesky, trsm, solve and cholesky_solve Triton kernels
against torch.linalg, in one process (issue 5: targets cholesky >= 2x, trsm >= 1.5x, solve >= 3x).

    python bench/scripts/small_linalg_sweep.py --out DIR            # the H100 run (< 3 minutes)
    TRITON_INTERPRET=1 python bench/scripts/small_linalg_sweep.py --device cpu --tiny --out DIR

Cases, fp32, at 500x16, 1000x32, 100x64, 4096x8, 64x128, 10000x3: cholesky_ex, solve_triangular
(left, lower, n right-hand sides), solve_ex (1 right-hand side), cholesky_solve (1 right-hand
side). Every variant (num_warps, matrices per program, RHS block, the kernels' constexpr
alternatives) is checked first (LAPACK ratio in float64, <= 30) and then timed three ways:

* ``gpu``: GPU time per call. A ``torch.cuda._sleep`` queued ahead of the start event covers the
  host's issuing of ``REPS`` back-to-back calls, so the events see only the GPU's work.
* ``call``: CUDA events around one call from an idle GPU (what bench/linalg_triton.md v1
  measured): host issue time plus GPU time, when the host cannot run ahead.
* ``host``: host time to issue one call (``time.perf_counter``, no synchronisation).

The default launch (what the ops run today) is timed through the registered op as well (``op``
rows), so the op core's dispatch cost shows beside the bare launcher's. Prints a table and the
best variant per case, writes ``small-linalg-sweep-<card>.json`` and a log to ``--out``. A variant
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

import metalcore
from metalcore.linalg._small_triton import block, group, warps
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
            torch.cuda._sleep(1000)
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            torch.cuda._sleep(10_000_000)
            e.record()
            e.synchronize()
            self.cycles_per_s = 10_000_000 / (s.elapsed_time(e) / 1e3)

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


def inputs(b, n, device):
    g = torch.Generator(device=device).manual_seed(0)
    X = torch.randn(b, n, n, device=device, generator=g)
    spd = X @ X.mT / n + torch.eye(n, device=device)
    L = torch.linalg.cholesky(spd)
    return {"X": X, "spd": spd, "L": L,
            "B": torch.randn(b, n, n, device=device, generator=g),
            "rhs": torch.randn(b, n, 1, device=device, generator=g)}


SHORT = {"num_warps": "w", "group_size": "G", "block_k": "BK", "a_in_registers": "regs", "row_by_reduction": "row",
         "implicit_pivoting": "implicit"}


def label(kw: dict) -> str:
    """``w=2 G=8 BK=4 regs=0``; ``default`` for today's launch."""
    return " ".join(f"{SHORT[k]}={int(v)}" for k, v in kw.items()) or "default"


def pow2_around(v: int, lo: int = 1, hi: int = 16) -> list[int]:
    return sorted({min(max(x, lo), hi) for x in (v // 2, v, v * 2)})


def variants(op: str, b: int, n: int, device: torch.device, tiny: bool) -> list[dict]:
    """Launch-keyword sets to try for one case; the first is today's default launch."""
    BN = block(n)
    if op == "cholesky":
        G = group(b, BN * BN, device)
        out = [{}]
        for w, row in itertools.product(pow2_around(warps(G * BN * BN)), (False, True)):
            out.append({"num_warps": w, "group_size": G, "row_by_reduction": row})
        if G > 1:
            out.append({"group_size": max(1, G // 4)})
        return out[:2] + out[-2:] if tiny else out
    if op in ("trsm", "cholesky_solve"):
        k = n if op == "trsm" else 1
        BK = min(block(k), 64)
        out = [{}]
        for regs in (True, False):
            elements = BN * (max(BN, BK) if regs else BK)
            G = group(b, elements, device)
            out += [{"num_warps": w, "group_size": G, "block_k": BK, "a_in_registers": regs}
                    for w in pow2_around(warps(G * elements))]
            if G > 1:
                out.append({"group_size": max(1, G // 4), "a_in_registers": regs})
        if op == "trsm" and n >= 64:   # more programs per matrix: narrower RHS blocks
            out += [{"block_k": bk, "a_in_registers": regs} for bk, regs in itertools.product((16, 32), (True, False))]
        return out[:2] + out[-2:] if tiny else out
    G = group(b, BN * BN, device)
    out = [{}] + [{"num_warps": w, "group_size": G, "implicit_pivoting": imp}
                  for w, imp in itertools.product(pow2_around(warps(G * BN * BN)), (False, True))]
    if G > 1:
        out.append({"group_size": max(1, G // 4)})
    return out[:2] + out[-2:] if tiny else out


def case(op: str, t: dict):
    """(launcher(**kw) -> result, op call, torch call, check(result) -> ratio)"""
    if op == "cholesky":
        A = t["spd"]
        return (lambda **kw: cholesky_launch(A, False, **kw), lambda: cholesky_ex_op(A, False, False),
                lambda: torch.linalg.cholesky_ex(A),
                lambda r: ratio(A.double() - r[0].double() @ r[0].double().mT, fro(A), A.shape[-1], A.dtype)
                if not r[1].any() else float("inf"))
    if op == "trsm":
        L, B = t["L"], t["B"]
        return (lambda **kw: solve_triangular_launch(L, B, False, True, False, **kw),
                lambda: solve_triangular_op(L, B, False, True, False),
                lambda: torch.linalg.solve_triangular(L, B, upper=False), lambda r: solve_check(L, r, B))
    if op == "solve":
        A, B = t["X"], t["rhs"]
        return (lambda **kw: solve_launch(A, B, True, **kw), lambda: solve_ex_op(A, B, True, False),
                lambda: torch.linalg.solve_ex(A, B),
                lambda r: solve_check(A, r[0], B) if not r[1].any() else float("inf"))
    L, A, B = t["L"], t["spd"], t["rhs"]
    return (lambda **kw: cholesky_solve_launch(B, L, False, **kw), lambda: cholesky_solve_op(B, L, False),
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
    ap.add_argument("--reps", type=int, default=REPS)
    ap.add_argument("--budget-s", type=float, default=160.0,
                    help="skip the remaining variants after this many seconds")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    started = time.time()
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu-interpreter"
    os.makedirs(args.out, exist_ok=True)
    stem = "small-linalg-sweep-" + card.replace(" ", "-").replace("/", "-")
    log = open(os.path.join(args.out, stem + ".log"), "w")

    def say(line):
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    clock = Clock(device, 3 if args.tiny else args.reps)
    warm_gpu(device)
    result = {"card": card, "torch": torch.__version__, "rows": []}
    ops = args.ops.split(",")
    shapes = TINY_SHAPES if args.tiny else SHAPES
    for i, (b, n) in enumerate(shapes):
        t = inputs(b, n, device)
        for j, op in enumerate(ops):
            # Each case gets its share of the budget (time a case leaves unused carries forward).
            deadline = started + args.budget_s * (i * len(ops) + j + 1) / (len(shapes) * len(ops))
            launcher, op_call, torch_call, check = case(op, t)
            base = {"op": op, "batch": b, "n": n}
            try:
                ref = clock.all(torch_call)
            except Exception as exc:   # a failing peer is a result to report, not a stop
                ref = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            result["rows"].append({**base, "variant": "torch", **ref})
            with metalcore.use_backend("triton"):
                rows = [("op", op_call, {})] + [(label(kw), lambda kw=kw: launcher(**kw), kw)
                                                for kw in variants(op, b, n, device, args.tiny)]
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

    say(f"\n{card}  torch {torch.__version__}  {time.time() - started:.0f} s")
    say(f"{'op':15s} {'shape':>10s} {'variant':26s} {'ratio':>6s} {'host us':>8s} {'call us':>8s} "
        f"{'gpu us':>8s} {'x call':>7s} {'x gpu':>7s}")
    for r in result["rows"]:
        shape = f"{r['batch']}x{r['n']}"
        if "error" in r or "skipped" in r:
            say(f"{r['op']:15s} {shape:>10s} {r['variant']:26s} {r.get('error', r.get('skipped'))[:60]}")
            continue
        say(f"{r['op']:15s} {shape:>10s} {r['variant']:26s} {r.get('ratio', 0):6.2f} {r['host_us']:8.1f} "
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
