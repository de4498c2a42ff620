"""One device call for issue 6 part B: the large-matrix SVD (QR + QDWH + eigh), polar methods, randomized
SVD, and the pieces that predict them, each against torch in the same process.

    python bench/scripts/svd_large_check.py --out $OUT                              # the H100 run (< 4 min)
    TRITON_INTERPRET=1 python bench/scripts/svd_large_check.py --device cpu --tiny --out /tmp/s  # smoke test

Timing: CUDA events around each call after one warm-up, median of ``--reps`` (3 by default: torch's
SVD takes ~1.1 s a call); on the CPU ``perf_counter`` (a smoke test, not a result). fp32 GEMMs run
with whatever ``torch.backends.cuda.matmul.allow_tf32`` says (False by default; recorded in the JSON).

Sections (full size; ``--tiny`` shrinks every shape by 32):

a. fp32 GEMM rate (4096³ matmul), the rate the FLOP floors use.
b. svd 4096², 11008×4096 and 8×1024² fp32, reduced: svd_large against torch.linalg.svd; svdvals of
   4096² against torch.linalg.svdvals. LAPACK ratios ‖A − U S Vh‖_F/(‖A‖_F max(m,n) ε),
   ‖UᵀU − I‖_F/(k ε), ‖Vh Vhᵀ − I‖_F/(k ε) for both, computed in fp64 on the device; max |S − S_torch|/S₀.
c. Pieces of svd_large at n = 4096: one QR-based QDWH step (QR of the 2n × n stack + Q₁Q₂ᵀ), one
   Cholesky-based step, eigh and eigvalsh of n × n (cuSOLVER syevd: also the eigh baseline), the
   completing QR of n × n, QR of 11008×4096 (the first two also with the blocked QR that the triton
   backend's qr takes) — and the ``l0`` sweep: svd_large on a 4096² matrix of
   known condition number 1e3 with the default l0 = ε (2 QR-based steps) and with the exact
   σ_min/α (what a perfect condition estimate would buy: 1 QR-based step).
   Also svd_large at n² under ``metalcore.use_backend('triton')`` (qr then takes the blocked QR) and
   on a rank-n/2 matrix (the completing QR runs).
d. polar 4096²: qdwh fp32, newton_schulz bf16, polar_express bf16, and torch's SVD route U Vh: time,
   ‖OᵀO − I‖_F/(n ε_fp32) and max |O − O_exact|.
e. svd_lowrank against torch.svd_lowrank (q = 64, niter = 2) on 4096² and 11008×4096 with singular
   values 0.9^j: time and ‖A − U S Vᵀ‖_F / the optimal (σ_{q+1}², ...)^{1/2} tail.

FLOP floors: svd_large's count (module docstring of metalcore/linalg/svd_large.py, syevd counted as
9n³) over the measured GEMM rate; printed next to each time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import metalcore  # noqa: E402
from metalcore.bench.timing import call_ms  # noqa: E402
from metalcore.linalg.lowrank import svd_lowrank  # noqa: E402
from metalcore.linalg.polar import polar, qdwh, spectral_norm_bound  # noqa: E402
from metalcore.linalg.qr import qr_op  # noqa: E402
from metalcore.linalg.svd_large import svd_large  # noqa: E402

FULL = dict(n=4096, tall=(11008, 4096), batch=(8, 1024), q=64)
TINY = dict(n=128, tall=(344, 128), batch=(2, 32), q=8)


class Timer:
    def __init__(self, device: str, reps: int):
        self.device, self.reps = torch.device(device), reps

    def __call__(self, fn, reps: int | None = None) -> float:
        """Median milliseconds of ``fn()`` per call after one warm-up call."""
        return call_ms(fn, self.device, reps=reps or self.reps)


def fro(x):
    return torch.linalg.matrix_norm(x.double(), ord="fro")


def ratios(A, U, S, Vh):
    """LAPACK's residual and orthogonality ratios, worst over the batch, in fp64 on the device."""
    eps = torch.finfo(A.dtype).eps
    m, n = A.shape[-2:]
    k = S.shape[-1]
    U64, Vh64 = U.double(), Vh.double()
    eye = torch.eye(k, dtype=torch.float64, device=A.device)
    res = fro(A.double() - (U64 * S.double().unsqueeze(-2)) @ Vh64) / (fro(A) * max(m, n) * eps)
    ou = fro(U64.mT @ U64 - eye) / (k * eps)
    ov = fro(Vh64 @ Vh64.mT - eye) / (k * eps)
    return {"residual": res.max().item(), "orth_U": ou.max().item(), "orth_V": ov.max().item()}


def svd_flops(m: int, n: int) -> float:
    """svd_large's FLOPs with the default l0 (svd_large.py docstring): 30 n³ + syevd's 9 n³, plus the
    tall matrix's QR (4mn² − 4n³/3 with Q) and Q U (2mn²) when it is taken first."""
    f = 39.0 * n ** 3
    if m > 1.15 * n:
        f += 4 * m * n * n - 4 * n ** 3 / 3 + 2 * m * n * n
    return f


def known_condition(n: int, cond: float, device: str, gen) -> tuple[torch.Tensor, float]:
    """A fp32 n × n matrix with singular values spread geometrically over [1/cond, 1], and its exact
    σ_min / α (α = spectral_norm_bound) — the l0 a perfect condition estimate would give."""
    U = torch.linalg.qr(torch.randn(n, n, device=device, generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, n, device=device, generator=gen, dtype=torch.float64))[0]
    S = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), n, device=device, dtype=torch.float64)
    A = ((U * S) @ V.mT).float()
    l0 = (S[-1] / spectral_norm_bound(A).double().squeeze()).item()
    return A, 0.99 * l0


def run(section: str, fn, result: dict):
    """A failing case is a result to report, not a stop."""
    try:
        fn()
    except Exception as exc:
        result.setdefault("errors", []).append({"section": section, "error": f"{type(exc).__name__}: {exc}"[:500],
                                                "trace": traceback.format_exc()[-1500:]})
        print(f"[{section}] ERROR {type(exc).__name__}: {str(exc)[:200]}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="shapes / 32, for a CPU smoke test")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    dev = args.device
    cfg = TINY if args.tiny else FULL
    timer = Timer(dev, args.reps)
    gen = torch.Generator(device=dev).manual_seed(0)
    card = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    result = {"card": card, "torch": torch.__version__, "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
              "config": cfg, "rows": []}
    rows = result["rows"]
    n = cfg["n"]
    t_start = time.time()

    def add(row):
        rows.append(row)
        print(json.dumps(row), flush=True)

    # a. GEMM rate.
    X = torch.randn(n, n, device=dev, generator=gen)
    Y = torch.randn(n, n, device=dev, generator=gen)
    gemm_ms = timer(lambda: X @ Y, reps=10)
    rate = 2 * n ** 3 / (gemm_ms * 1e-3)
    result["gemm_fp32_tflops"] = rate / 1e12
    add({"case": f"gemm fp32 {n}^3", "ms": gemm_ms, "tflops": rate / 1e12})

    # b. SVD.
    def svd_case(shape, name):
        A = torch.randn(*shape, device=dev, generator=gen)
        m, k = shape[-2], shape[-1]
        batch = shape[0] if len(shape) == 3 else 1
        U, S, Vh = svd_large(A, False, True)
        Ut, St, Vht = torch.linalg.svd(A, full_matrices=False)
        row = {"case": f"svd {name} fp32", "ours": ratios(A, U, S, Vh), "torch": ratios(A, Ut, St, Vht),
               "max_dS_rel": ((S.double() - St.double()).abs().amax(-1) / St[..., 0].double()).max().item()}
        del U, S, Vh, Ut, St, Vht
        row["ms"] = timer(lambda: svd_large(A, False, True))
        row["torch_ms"] = timer(lambda: torch.linalg.svd(A, full_matrices=False))
        row["speedup"] = row["torch_ms"] / row["ms"]
        row["flop_floor_ms"] = batch * svd_flops(m, k) / rate * 1e3
        add(row)

    run("svd square", lambda: svd_case((n, n), f"{n}x{n}"), result)
    run("svd tall", lambda: svd_case(cfg["tall"], "x".join(map(str, cfg["tall"]))), result)
    b, nb = cfg["batch"]
    run("svd batched", lambda: svd_case((b, nb, nb), f"{b}x{nb}x{nb}"), result)

    def svdvals_case():
        A = torch.randn(n, n, device=dev, generator=gen)
        S = svd_large(A, False, False)[1]
        St = torch.linalg.svdvals(A)
        row = {"case": f"svdvals {n}x{n} fp32", "max_dS_rel": ((S - St).abs().max() / St[0]).item(),
               "ms": timer(lambda: svd_large(A, False, False)), "torch_ms": timer(lambda: torch.linalg.svdvals(A))}
        row["speedup"] = row["torch_ms"] / row["ms"]
        add(row)

    run("svdvals", svdvals_case, result)

    def variants():
        """svd_large at n² with every metalcore op on the triton backend (how the svd op's triton
        registration will run it: qr then takes the blocked QR), and on a rank-n/2 matrix (the
        completing QR runs)."""
        A = torch.randn(n, n, device=dev, generator=gen)
        with metalcore.use_backend("triton"):
            U, S, Vh = svd_large(A, False, True)
            add({"case": f"svd {n}x{n} fp32, use_backend('triton')", "ours": ratios(A, U, S, Vh),
                 "ms": timer(lambda: svd_large(A, False, True))})
        half = n // 2
        A = torch.randn(n, half, device=dev, generator=gen) @ torch.randn(half, n, device=dev, generator=gen)
        U, S, Vh = svd_large(A, False, True)
        add({"case": f"svd {n}x{n} rank {half} fp32 (completing QR)", "ours": ratios(A, U, S, Vh),
             "ms": timer(lambda: svd_large(A, False, True))})

    run("variants", variants, result)

    # c. The pieces, for the prediction in the report.
    def pieces():
        A = torch.randn(n, n, device=dev, generator=gen)
        eye = torch.eye(n, device=dev)
        stack = torch.cat([1e3 * A, eye], dim=-2)

        def qr_step():
            Q, _ = qr_op(stack, "reduced")
            return Q[:n] @ Q[n:].mT

        def chol_step():
            L, _ = torch.linalg.cholesky_ex(torch.add(eye, A.mT @ A, alpha=1e-3))
            Y = torch.linalg.solve_triangular(L.mT, A, upper=True, left=False)
            return torch.linalg.solve_triangular(L, Y, upper=False, left=False)

        H = A @ A.mT
        T = torch.randn(*cfg["tall"], device=dev, generator=gen)
        for name, fn in [("qdwh QR-based step (QR of 2n x n + GEMM)", qr_step),
                         ("qdwh Cholesky-based step", chol_step),
                         (f"torch.linalg.eigh {n}^2 (syevd; the eigh baseline)", lambda: torch.linalg.eigh(H)),
                         (f"torch.linalg.eigvalsh {n}^2", lambda: torch.linalg.eigvalsh(H)),
                         (f"qr {n}^2 (completing QR)", lambda: qr_op(A, "reduced")),
                         (f"qr {'x'.join(map(str, cfg['tall']))}", lambda: qr_op(T, "reduced"))]:
            add({"case": "piece: " + name, "ms": timer(fn)})
        # The blocked QR (metalcore/linalg/qr_blocked.py) is what qr takes under the triton backend: its
        # speed on these shapes decides whether QDWH-based eigh could beat syevd (report's analysis).
        with metalcore.use_backend("triton"):
            for name, fn in [("qdwh QR-based step, blocked QR", qr_step),
                             (f"qr {'x'.join(map(str, cfg['tall']))}, blocked QR", lambda: qr_op(T, "reduced"))]:
                add({"case": "piece: " + name, "ms": timer(fn)})
        Ac, l0 = known_condition(n, 1e3, dev, gen)
        for label, l0_value in (("default l0=eps", None), (f"exact l0={l0:.2e}", l0)):
            def call(v=l0_value):
                Up = qdwh(Ac) if v is None else qdwh(Ac, l0=v)
                return Up
            Up = call()
            eye64 = torch.eye(n, dtype=torch.float64, device=dev)
            ortho = (fro(Up.double().mT @ Up.double() - eye64) / (n * torch.finfo(torch.float32).eps)).item()
            add({"case": f"qdwh {n}^2 cond 1e3, {label}", "ms": timer(call), "orth_ratio": ortho})

    run("pieces", pieces, result)

    # d. Polar methods.
    def polar_case():
        A = torch.randn(n, n, device=dev, generator=gen)
        U, _, Vh = torch.linalg.svd(A.double() if dev == "cpu" else A)
        exact = (U @ Vh).double()
        eye64 = torch.eye(n, dtype=torch.float64, device=dev)
        eps32 = torch.finfo(torch.float32).eps
        for method, fn in [("torch svd U Vh fp32", lambda: (lambda r: r[0] @ r[2])(torch.linalg.svd(A))),
                           ("qdwh fp32", lambda: polar(A, method="qdwh")),
                           ("newton_schulz bf16", lambda: polar(A, method="newton_schulz")),
                           ("polar_express bf16", lambda: polar(A, method="polar_express"))]:
            O = fn().double()
            add({"case": f"polar {n}^2 {method}", "ms": timer(fn),
                 "orth_ratio_fp32_eps": (fro(O.mT @ O - eye64) / (n * eps32)).item(),
                 "max_err_vs_exact": (O - exact).abs().max().item()})

    run("polar", polar_case, result)

    # e. Randomized SVD.
    def lowrank_case(shape):
        m, k = shape
        q = cfg["q"]
        U = torch.linalg.qr(torch.randn(m, k, device=dev, generator=gen))[0]
        V = torch.linalg.qr(torch.randn(k, k, device=dev, generator=gen))[0]
        S = 0.9 ** torch.arange(k, device=dev, dtype=torch.float32)
        A = (U * S) @ V.mT
        optimal = S[q:].double().square().sum().sqrt().item()
        row = {"case": f"svd_lowrank {m}x{k} q={q} niter=2"}
        for who, fn in (("ours", lambda: svd_lowrank(A, q=q)), ("torch", lambda: torch.svd_lowrank(A, q=q))):
            Uq, Sq, Vq = fn()
            row[who + "_err_over_optimal"] = (fro(A - (Uq * Sq) @ Vq.mT) / optimal).item()
            row[who + "_ms"] = timer(fn, reps=10)
        row["speedup"] = row["torch_ms"] / row["ours_ms"]
        add(row)

    run("lowrank square", lambda: lowrank_case((n, n)), result)
    run("lowrank tall", lambda: lowrank_case(cfg["tall"]), result)

    result["seconds"] = round(time.time() - t_start, 1)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "svd-large-" + card.replace(" ", "-").replace("/", "-") + ".json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{card}  torch {torch.__version__}  fp32 GEMM {rate / 1e12:.1f} TFLOP/s  allow_tf32="
          f"{result['allow_tf32']}  {result['seconds']} s")
    print(f"{'case':58s} {'ms':>9s} {'torch ms':>9s} {'speedup':>8s} {'floor ms':>9s}  ratios / errors")
    for r in rows:
        ms = r.get("ms", r.get("ours_ms"))
        extra = {k: v for k, v in r.items() if k in ("ours", "torch", "orth_ratio", "orth_ratio_fp32_eps",
                                                     "max_err_vs_exact", "max_dS_rel", "ours_err_over_optimal",
                                                     "torch_err_over_optimal")}
        fmt = lambda v: f"{v:9.2f}" if isinstance(v, float) else f"{'':9s}"  # noqa: E731
        print(f"{r['case'][:58]:58s} {fmt(ms)} {fmt(r.get('torch_ms'))} {fmt(r.get('speedup'))} "
              f"{fmt(r.get('flop_floor_ms'))}  {json.dumps(extra, separators=(',', ':'))[:200]}")
    for e in result.get("errors", []):
        print("ERROR", e["section"], e["error"][:200])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
