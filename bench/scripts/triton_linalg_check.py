"""One device call for the small-matrix linalg kernels: the gpu-marked tests, then timings of every
kernel against torch.linalg in the same process (fp32, CUDA events, warm-up, medians).

    python bench/scripts/triton_linalg_check.py [--out DIR] [--skip-tests]

Prints a table last and writes triton-linalg-<card>.json to --out (default $OUT or .).
Floors per case: FLOP count of the algorithm / measured fp32 FMA peak is not measured here; the
byte floor (inputs read once, outputs written once) over ~3 TB/s is printed for reference.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import metalcore
from metalcore.linalg.cholesky import cholesky_ex_op
from metalcore.linalg.eigh import eigh_op
from metalcore.linalg.qr import qr_op
from metalcore.linalg.solve import solve_ex_op
from metalcore.linalg.svd import svd_op
from metalcore.linalg.triangular import solve_triangular_op

SHAPES = [(500, 16), (1000, 32), (100, 64), (4096, 8), (64, 128), (10000, 3)]


def timed(fn, reps=20, warm=3):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def cases(b, n):
    g = torch.Generator(device="cuda").manual_seed(0)
    X = torch.randn(b, n, n, device="cuda", generator=g)
    spd = X @ X.mT / n + torch.eye(n, device="cuda")
    sym = X + X.mT
    L = torch.linalg.cholesky(spd)
    B = torch.randn(b, n, n, device="cuda", generator=g)
    rhs = torch.randn(b, n, 1, device="cuda", generator=g)
    return {
        "qr": (lambda: qr_op(X, "reduced"), lambda: torch.linalg.qr(X), 8 * n * n * 4),
        "cholesky": (lambda: cholesky_ex_op(spd, False, False), lambda: torch.linalg.cholesky_ex(spd), 8 * n * n),
        "trsm": (lambda: solve_triangular_op(L, B, False, True, False),
                 lambda: torch.linalg.solve_triangular(L, B, upper=False), 12 * n * n),
        "solve": (lambda: solve_ex_op(X, rhs, True, False), lambda: torch.linalg.solve_ex(X, rhs), 4 * n * n + 8 * n),
        "eigh": (lambda: eigh_op(sym, "L", True), lambda: torch.linalg.eigh(sym), 12 * n * n),
        "svd": (lambda: svd_op(X, False, True), lambda: torch.linalg.svd(X, full_matrices=False), 16 * n * n),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--test-timeout", type=int, default=200)
    ap.add_argument("--ops", default="qr,cholesky,trsm,solve,eigh,svd")
    args = ap.parse_args()
    card = torch.cuda.get_device_name()
    result = {"card": card, "torch": torch.__version__, "tests": None, "timings": []}
    if not args.skip_tests:
        t0 = time.time()
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/linalg",
                                   "-p", "no:cacheprovider", "-W", "ignore"], capture_output=True, text=True,
                                  timeout=args.test_timeout)
            rc, tail = proc.returncode, proc.stdout[-6000:] + proc.stderr[-2000:]
        except subprocess.TimeoutExpired as exc:
            rc, tail = "timeout", ((exc.stdout or b"")[-6000:]).decode(errors="replace")
        print(tail, flush=True)
        result["tests"] = {"rc": rc, "seconds": round(time.time() - t0, 1), "tail": tail}
    ops = args.ops.split(",")
    for b, n in SHAPES:
        cs = cases(b, n)
        for op in ops:
            ours, theirs, bytes_per = cs[op]
            row = {"op": op, "batch": b, "n": n}
            try:
                with metalcore.use_backend("triton"):
                    row["metalcore_ms"] = timed(ours)
                row["torch_ms"] = timed(theirs, reps=5 if op in ("qr", "svd", "eigh") and n >= 64 else 10, warm=1)
                row["speedup"] = row["torch_ms"] / row["metalcore_ms"]
                row["byte_floor_ms"] = b * bytes_per / 3.0e9
                if op in ("eigh", "svd"):  # non-convergence is reported as NaN matrices
                    with metalcore.use_backend("triton"):
                        row["nan_fraction"] = ours()[0].isnan().float().mean().item()
            except Exception as exc:  # a failing kernel is a result to report, not a stop
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            result["timings"].append(row)
            print(json.dumps(row), flush=True)
    os.makedirs(args.out, exist_ok=True)
    name = "triton-linalg-" + card.replace(" ", "-").replace("/", "-") + ".json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{card}  torch {torch.__version__}")
    print(f"{'op':9s} {'shape':>10s} {'metalcore ms':>13s} {'torch ms':>10s} {'ratio':>8s}")
    for r in result["timings"]:
        if "error" in r:
            print(f"{r['op']:9s} {r['batch']:>5d}x{r['n']:<4d} ERROR {r['error'][:80]}")
        else:
            print(f"{r['op']:9s} {r['batch']:>5d}x{r['n']:<4d} {r['metalcore_ms']:13.4f} {r['torch_ms']:10.4f} {r['speedup']:8.1f}")


if __name__ == "__main__":
    main()
