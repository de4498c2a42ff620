"""Device check of the Jacobi eigh and svd kernels (metalcore/linalg/{eigh,svd}_triton.py): for every
issue-#5 shape and each variant (num_warps; for svd also QR preconditioning on/off), LAPACK ratios
on random and ill-conditioned (κ = 1e6) fp32 input, NaN count, the largest sweep count, and the
time against torch.linalg in the same process (CUDA events, median).

    python bench/scripts/jacobi_check.py [--out DIR]              # H100: ~2-3 minutes
    TRITON_INTERPRET=1 python bench/scripts/jacobi_check.py --device cpu --tiny   # smoke test

Prints a table last and writes jacobi-check.json and jacobi-check.log to --out (default $OUT or .).
Ratios: eigh ‖A − QΛQᵀ‖/(‖A‖ n ε), ‖QᵀQ − I‖/(n ε); svd ‖A − U S Vᵀ‖/(‖A‖ n ε), ‖UᵀU − I‖/(n ε),
‖VᵀV − I‖/(n ε); the bar is 30.
"""

import argparse
import json
import os
import time

import torch

from metalcore.linalg._jacobi_triton import block_of
from metalcore.linalg._small_triton import warps
from metalcore.linalg.eigh_triton import eigh_launch
from metalcore.bench.timing import call_ms
from metalcore.linalg import svd_triton
from metalcore.linalg.svd_triton import svd_launch

SHAPES = [(500, 16), (1000, 32), (100, 64), (4096, 8), (64, 128), (10000, 3)]
TINY_SHAPES = [(2, 3), (1, 5)]
# Per-call time budget for the timing loop: torch's 64×128 svd is ~170 ms a call.
TIME_BUDGET_S = 0.25


def timed(fn, device):
    """Median milliseconds per call: 1 warm-up call, then as many as fit TIME_BUDGET_S (3-20)."""
    return call_ms(fn, device, reps=3, budget_s=TIME_BUDGET_S)


def orthogonal(b, n, device, g):
    Q, R = torch.linalg.qr(torch.randn(b, n, n, dtype=torch.float64, device=device, generator=g))
    return Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1)).unsqueeze(-2)


def inputs(b, n, device, seed=0):
    """fp32 random and κ = 1e6 (geometric spectrum) general and symmetric matrices."""
    g = torch.Generator(device=device).manual_seed(seed)
    X = torch.randn(b, n, n, dtype=torch.float64, device=device, generator=g)
    s = 1e6 ** (-torch.arange(n, dtype=torch.float64, device=device) / max(n - 1, 1))
    sign = torch.where(torch.rand(b, n, device=device, generator=g, dtype=torch.float64) < 0.5, -1.0, 1.0)
    Q1, Q2 = orthogonal(b, n, device, g), orthogonal(b, n, device, g)
    return {
        "random": (X.float(), (X + X.mT).float()),
        "ill": (((Q1 * s) @ Q2.mT).float(), ((Q1 * (s * sign).unsqueeze(-2)) @ Q1.mT).float()),
    }


def ratios_eigh(A, L, Q):
    n = A.shape[-1]
    eps = torch.finfo(A.dtype).eps
    A, L, Q = A.double(), L.double(), Q.double()
    I = torch.eye(n, dtype=torch.float64, device=A.device)
    res = torch.linalg.matrix_norm(A - (Q * L.unsqueeze(-2)) @ Q.mT) / (torch.linalg.matrix_norm(A) * n * eps)
    orth = torch.linalg.matrix_norm(Q.mT @ Q - I) / (n * eps)
    return {"res": res.nan_to_num(0).max().item(), "orth_q": orth.nan_to_num(0).max().item()}


def ratios_svd(A, U, S, Vh):
    n = A.shape[-1]
    eps = torch.finfo(A.dtype).eps
    A, U, S, Vh = A.double(), U.double(), S.double(), Vh.double()
    I = torch.eye(n, dtype=torch.float64, device=A.device)
    res = torch.linalg.matrix_norm(A - (U * S.unsqueeze(-2)) @ Vh) / (torch.linalg.matrix_norm(A) * n * eps)
    ou = torch.linalg.matrix_norm(U.mT @ U - I) / (n * eps)
    ov = torch.linalg.matrix_norm(Vh @ Vh.mT - I) / (n * eps)
    return {"res": res.nan_to_num(0).max().item(), "orth_u": ou.nan_to_num(0).max().item(),
            "orth_v": ov.nan_to_num(0).max().item()}


def variants(n, op):
    """(num_warps, precondition) pairs to sweep: the launcher's default width and its neighbours
    (the pair tiles are [BN/2, BN]; BM = BN for these square shapes), and for svd also the default
    width without QR preconditioning (Jacobi on A itself)."""
    BN = block_of(n)
    base = warps(BN // 2 * BN)
    widths = sorted({max(1, base // 2), base, min(16, base * 2)})
    if op == "eigh":
        return [(w, None) for w in widths]
    return [(w, True) for w in widths] + [(base, False)]


def check(op, b, n, device):
    data = inputs(b, n, device)
    base = warps(block_of(n) // 2 * block_of(n))
    rows = []
    for w, pre in variants(n, op):
        row = {"op": op, "batch": b, "n": n, "num_warps": w, "precondition": pre,
               "default": w == base and pre is not False}
        for kind, (G, Sym) in data.items():
            sweeps = torch.zeros(b, dtype=torch.int32, device=device)
            if op == "eigh":
                L, Q = eigh_launch(Sym, False, True, num_warps=w, sweeps=sweeps)
                r = ratios_eigh(Sym, L, Q)
                nan = int(L.isnan().any(-1).sum().item())
            else:
                U, S, Vh = svd_launch(G, False, True, num_warps=w, sweeps=sweeps, precondition=pre)
                r = ratios_svd(G, U, S, Vh)
                nan = int(S.isnan().any(-1).sum().item())
            row[kind] = {**r, "nan_matrices": nan, "max_sweeps": int(sweeps.max().item())}
        G, Sym = data["random"]
        if op == "eigh":
            row["ms"] = timed(lambda: eigh_launch(Sym, False, True, num_warps=w), device)
        else:
            row["ms"] = timed(lambda: svd_launch(G, False, True, num_warps=w, precondition=pre), device)
        rows.append(row)
    G, Sym = data["random"]
    torch_ms = timed((lambda: torch.linalg.eigh(Sym)) if op == "eigh" else
                     (lambda: torch.linalg.svd(G, full_matrices=False)), device)
    for row in rows:
        row["torch_ms"] = torch_ms
        row["speedup"] = torch_ms / row["ms"]
    return rows


QR_MARK = {None: "-", True: "y", False: "n"}


def table(rows):
    head = (f"{'op':5} {'shape':>9} {'warps':>5} {'qr':>3} {'ms':>9} {'torch':>9} {'x':>7}  "
            f"{'rand res/orth':>15} {'ill res/orth':>15} {'nan':>4} {'sweeps':>7}")
    lines = [head]
    for r in rows:
        def acc(k):
            d = r[k]
            o = max(v for key, v in d.items() if key.startswith("orth"))
            return f"{d['res']:.1f}/{o:.1f}"
        mark = "*" if r["default"] else " "
        lines.append(f"{r['op']:5} {r['batch']:>5}x{r['n']:<3} {r['num_warps']:>4}{mark} "
                     f"{QR_MARK[r['precondition']]:>3} {r['ms']:9.3f} "
                     f"{r['torch_ms']:9.3f} {r['speedup']:7.1f}  {acc('random'):>15} {acc('ill'):>15} "
                     f"{r['random']['nan_matrices'] + r['ill']['nan_matrices']:>4} "
                     f"{max(r['random']['max_sweeps'], r['ill']['max_sweeps']):>7}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="small shapes only (CPU smoke test)")
    args = ap.parse_args()
    device = torch.device(args.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    os.makedirs(args.out, exist_ok=True)
    log = open(os.path.join(args.out, "jacobi-check.log"), "w")
    start = time.time()
    rows = []
    for b, n in TINY_SHAPES if args.tiny else SHAPES:
        for op in ("eigh", "svd"):
            if op == "svd" and device.type == "cuda" and n < svd_triton.CUDA_MIN_N:
                print(f"svd {b}x{n}: skipped (CUDA_MIN_N, see svd_triton.py)", file=log, flush=True)
                continue
            t = time.time()
            new = check(op, b, n, device)
            rows += new
            print(f"{op} {b}x{n}: {time.time() - t:.1f} s", file=log, flush=True)
            print(table(new).split("\n", 1)[1], file=log, flush=True)
    legend = "* = default variant; qr = svd's QR preconditioning; ratios are maxima over the batch, bar 30"
    text = f"card: {card}  ({legend})\n{table(rows)}"
    print(text)
    print(text, f"\ntotal {time.time() - start:.0f} s", file=log)
    with open(os.path.join(args.out, "jacobi-check.json"), "w") as f:
        json.dump({"card": card, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
