"""One device call for issue 18 item 2: the svd op's "qdwh" path (QR + QDWH + eigh, svd_large) on batches
of mid-size matrices, against torch.linalg.svd (and JAX at 64×256²) in the same run, with where its time goes.

    python bench/scripts/svd_batched_check.py --out $OUT                                  # the H100 run (~1-2 min)
    TRITON_INTERPRET=1 python bench/scripts/svd_batched_check.py --device cpu --tiny --reps 1 --torch-reps 1 --out /tmp/s

Cases: fp32 64×256², 16×512², 8×1024², 4×2048² and fp64 64×256² (``--tiny``: one 130² fp32 and one
160² fp64 on the CPU, ~1 min; the batched CPU checks are tests/linalg/test_svd_large.py's). For each:

* **ratios** of every output, worst over the batch, in fp64 on the device: ‖A − U S Vh‖_F/(‖A‖_F max(m,n) ε),
  ‖UᵀU − I‖_F/(k ε), ‖Vh Vhᵀ − I‖_F/(k ε), and max|σ − σ₆₄|/(σ₁ max(m,n) ε) against float64
  torch.linalg.svdvals — for the qdwh path and for torch (LAPACK's bar: 30);
* **wall time per call** (synchronised, ``perf_counter``; one warm-up call, median of ``--reps``; torch
  gets ``--torch-reps``): torch.linalg.svd(full_matrices=False); ``qdwh``: the public
  metalcore.linalg.svd with the path forced as the selection sweep forces it (``use_backend('triton')``
  + ``_selection.use_path('svd', 'qdwh')``, so the path's own qr and eigh calls are forced onto the
  triton backend too: blocked QR and cuSOLVER's batched syev at every batch and side); ``direct``:
  svd_large called as the path runs when a table names it (its qr and eigh under automatic
  selection: cuSOLVER per matrix below 8 matrices, syevd where the eigh op's routing or table says);
  and svdvals (forced) against torch.linalg.svdvals;
* **stages** (as ``direct`` runs them, automatic selection inside): the path's steps run one after
  another on the same input, each timed alone (median of ``--reps``, synchronised): the start ``X₀ = A/α``, every QDWH step (QR-based: the QR of the 2n × n
  stack, then ``Q₁Q₂ᵀ``; Cholesky-based: Gram + potrf, then the two triangular solves), ``H = U_pᵀA``,
  the eigh op (and which path it took), the sort and ``U = U_p V``, and the completion test (the
  path's one host sync). Beside them, for the prediction: torch.linalg.eigh of the same H (syevd, one
  matrix at a time) and the eigh op forced onto cuSOLVER's batched syev (``use_path('eigh', 'cusolver')``).
* **JAX** (``--peers jax``, the default on CUDA; its own process, ``JAX_PLATFORMS=cuda``,
  ``XLA_PYTHON_CLIENT_PREALLOCATE=false``, run before torch allocates anything): jnp.linalg.svd at
  64×256² fp32 and fp64. ``--peers numpy`` on the CPU exercises the same protocol.

fp32 GEMMs run with whatever ``torch.backends.cuda.matmul.allow_tf32`` says (False by default; recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import metalcore  # noqa: E402
import metalcore.linalg  # noqa: E402
from metalcore import _kernels, _selection  # noqa: E402
from metalcore.bench import peers  # noqa: E402
from metalcore.linalg.eigh import eigh_op  # noqa: E402
from metalcore.linalg.polar import (QDWH_CHOLESKY_MAX_C, qdwh_schedule, qdwh_start, qdwh_step,  # noqa: E402
                                    spectral_norm_bound)
from metalcore.linalg.qr import qr_op  # noqa: E402
from metalcore.linalg.svd_large import svd_large  # noqa: E402

FULL = [("float32", 64, 256), ("float32", 16, 512), ("float32", 8, 1024), ("float32", 4, 2048),
        ("float64", 64, 256)]
# One matrix each: under the interpreter a batch would send the blocked QR's panels to the interpreted
# tall-panel kernel (minutes on two cores); one matrix takes torch's geqrf panels.
TINY = [("float32", 1, 130), ("float64", 1, 160)]
# JAX's cases: the headline shape.
PEER_CASES = [("float32", 64, 256), ("float64", 64, 256)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_ms(fn, device, reps: int) -> float:
    """Median wall milliseconds of one synchronised call of ``fn``, after one untimed warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def fro(x):
    return torch.linalg.matrix_norm(x.double(), ord="fro")


def ratios(A, U, S, Vh, S64):
    """LAPACK's ratios (worst over the batch), in fp64 on the device; S64: float64 singular values."""
    eps = torch.finfo(A.dtype).eps
    m, n = A.shape[-2:]
    k = S.shape[-1]
    out = {"values": ((S.double() - S64).abs().amax(-1) / (S64[..., 0] * max(m, n) * eps)).max().item()}
    if U is not None:
        U64, Vh64 = U.double(), Vh.double()
        eye = torch.eye(k, dtype=torch.float64, device=A.device)
        out["residual"] = (fro(A.double() - (U64 * S.double().unsqueeze(-2)) @ Vh64) / (fro(A) * max(m, n) * eps)).max().item()
        out["orth_U"] = (fro(U64.mT @ U64 - eye) / (k * eps)).max().item()
        out["orth_V"] = (fro(Vh64 @ Vh64.mT - eye) / (k * eps)).max().item()
    return out


def forced(fn):
    """``fn`` as the public function runs it where the measured table names the qdwh path."""
    def call(*args, **kwargs):
        with metalcore.use_backend("triton"), _selection.use_path("svd", "qdwh"):
            return fn(*args, **kwargs)
    return call


def eigh_path(H) -> str:
    """Which implementation the eigh op takes for ``H`` here (automatic selection)."""
    backend = eigh_op.backend_for(H, "L", True)
    if backend == "reference":
        return "torch.linalg.eigh"
    path = _selection.route("eigh", backend, (H, "L", True))
    return f"{backend}:{path.name if path is not None else 'kernel'}"


def stages(A, device, reps):
    """The path's stages for a square batch (QDWH on A itself, as svd_large runs it for m ≤ 1.15 n),
    each timed alone on its own inputs. Returns [(name, ms)], the eigh op's path, and torch's eigh time."""
    t = lambda fn: wall_ms(fn, device, reps)  # noqa: E731
    rows = [("start X0 = A/alpha", t(lambda: qdwh_start(A)))]
    X = qdwh_start(A)
    n = A.shape[-1]
    eye = torch.eye(n, dtype=A.dtype, device=device)
    for i, (a, b, c) in enumerate(qdwh_schedule(torch.finfo(A.dtype).eps, A.dtype)):
        if c > QDWH_CHOLESKY_MAX_C:
            stack = torch.cat([c ** 0.5 * X, eye.expand(*X.shape[:-2], n, n)], dim=-2)
            rows.append((f"step {i} QR-based: qr_op of the 2n x n stack", t(lambda: qr_op(stack, "reduced"))))
            Q, _ = qr_op(stack, "reduced")
            rows.append((f"step {i} QR-based: Q1 Q2^T + axpy",
                         t(lambda: (b / c) * X + ((a - b / c) / c ** 0.5) * (Q[..., :n, :] @ Q[..., n:, :].mT))))
        else:
            def gram_potrf():
                return torch.linalg.cholesky_ex(torch.add(eye, X.mT @ X, alpha=c))[0]
            rows.append((f"step {i} Cholesky-based: Gram + potrf", t(gram_potrf)))
            L = gram_potrf()

            def solves():
                Y = torch.linalg.solve_triangular(L.mT, X, upper=True, left=False)
                return (b / c) * X + (a - b / c) * torch.linalg.solve_triangular(L, Y, upper=False, left=False)
            rows.append((f"step {i} Cholesky-based: 2 trsm + axpy", t(solves)))
        X = qdwh_step(X, a, b, c)
    Up = X

    def form_h():
        H = Up.mT @ A
        return 0.5 * (H + H.mT)
    rows.append(("H = Up^T A, symmetrised", t(form_h)))
    H = form_h()
    rows.append(("eigh op (vectors)", t(lambda: eigh_op(H, "L", True))))
    lam, V = eigh_op(H, "L", True)

    def products():
        S, order = lam.abs().sort(dim=-1, descending=True)
        Vs = V.gather(-1, order.unsqueeze(-2).expand_as(V))
        return Up @ (Vs * torch.where(lam.gather(-1, order) < 0, -1.0, 1.0).to(A.dtype).unsqueeze(-2))
    rows.append(("sort + U = Up V", t(products)))
    S = lam.abs().sort(dim=-1, descending=True).values
    eps = torch.finfo(A.dtype).eps
    rows.append(("completion test (the host sync)",
                 t(lambda: bool((S[..., -1:] <= 2 * eps * spectral_norm_bound(A)[..., 0]).any()))))
    alternatives = {"torch.linalg.eigh (syevd per matrix)": t(lambda: torch.linalg.eigh(H))}
    if device.type == "cuda":
        def batched_syev():
            # The backend too: a forced path applies only where the triton kernel is chosen.
            with metalcore.use_backend("triton"), _selection.use_path("eigh", "cusolver"):
                return metalcore.linalg.eigh(H)
        try:
            alternatives["eigh op forced to cuSOLVER batched syev"] = t(batched_syev)
        except Exception as exc:  # noqa: BLE001 — recorded, the run goes on
            alternatives["eigh op forced to cuSOLVER batched syev"] = f"{type(exc).__name__}: {exc}"[:200]
    return rows, eigh_path(H), alternatives


def run_case(dtype_name, batch, n, device, args, gen, add):
    dtype = getattr(torch, dtype_name)
    A = torch.randn(batch, n, n, device=device, dtype=dtype, generator=gen)
    row = {"case": f"svd {batch}x{n}^2 {dtype_name}", "dtype": dtype_name, "batch": batch, "n": n}
    S64 = torch.linalg.svdvals(A.double())
    U, S, Vh = forced(metalcore.linalg.svd)(A, full_matrices=False)
    row["qdwh_ratios"] = ratios(A, U, S, Vh, S64)
    row["qdwh_svdvals_ratios"] = ratios(A, None, forced(metalcore.linalg.svdvals)(A), None, S64)
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    row["torch_ratios"] = ratios(A, U, S, Vh, S64)
    del U, S, Vh, S64
    reps, treps = args.reps, args.torch_reps
    row["torch_ms"] = wall_ms(lambda: torch.linalg.svd(A, full_matrices=False), device, treps)
    row["qdwh_ms"] = wall_ms(lambda: forced(metalcore.linalg.svd)(A, full_matrices=False), device, reps)
    row["svd_large_direct_ms"] = wall_ms(lambda: svd_large(A, False, True), device, reps)
    row["torch_svdvals_ms"] = wall_ms(lambda: torch.linalg.svdvals(A), device, treps)
    row["qdwh_svdvals_ms"] = wall_ms(lambda: forced(metalcore.linalg.svdvals)(A), device, reps)
    row["speedup"] = row["torch_ms"] / row["qdwh_ms"]
    stage_rows, row["eigh_path"], row["eigh_alternatives_ms"] = stages(A, device, reps)
    row["stages_ms"] = dict(stage_rows)
    row["stages_sum_ms"] = sum(ms for _, ms in stage_rows)
    add(row)


def jax_peer(device_type: str, runner: str, cfg) -> dict:
    if runner == "none":
        return {"peer": "none", "available": False, "reason": "--peers none", "results": []}
    if runner == "jax":
        os.environ.setdefault("JAX_PLATFORMS", "cuda" if device_type == "cuda" else "cpu")
    cases = [peers.case("svd", b, n, dtype=d) for d, b, n in cfg]
    return peers.peer_timings(runner, cases, timeout_s=180.0, budget_s=0.5, max_reps=10)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="sides 130/160 on the CPU: a smoke test")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--torch-reps", type=int, default=3, help="torch's svd loops cuSOLVER: 434 ms at 64x256^2")
    ap.add_argument("--cases", default="", help="comma-separated BATCHxN:DTYPE to run (default: all), "
                                                 "e.g. 64x256:float32,64x256:float64")
    ap.add_argument("--peers", default=None, choices=["jax", "numpy", "none"],
                    help="default: jax on CUDA, numpy on the CPU (the protocol's smoke test)")
    args = ap.parse_args()
    device = torch.device(args.device)
    cfg = TINY if args.tiny else FULL
    if args.cases:
        wanted = {c.strip() for c in args.cases.split(",") if c.strip()}
        cfg = [(d, b, n) for d, b, n in cfg if f"{b}x{n}:{d}" in wanted]
        if not cfg:
            ap.error(f"--cases matched none of {', '.join(f'{b}x{n}:{d}' for d, b, n in (TINY if args.tiny else FULL))}")
    t_start = time.time()
    runner = args.peers or ("jax" if device.type == "cuda" else "numpy")
    # The peer first, before this process holds any GPU memory.
    peer = jax_peer(device.type, runner, TINY[:1] if args.tiny else PEER_CASES)
    _kernels.load_kernels()
    gen = torch.Generator(device=device).manual_seed(0)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"card": card, "torch": torch.__version__, "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
              "peer": peer, "rows": []}
    print(json.dumps({"peer": {k: v for k, v in peer.items() if k != "results"},
                      "results": [{k: r.get(k) for k in ("batch", "n", "dtype", "ms", "error")} for r in peer["results"]]}),
          flush=True)

    def add(row):
        result["rows"].append(row)
        print(json.dumps(row), flush=True)

    for dtype_name, batch, n in cfg:
        try:
            run_case(dtype_name, batch, n, device, args, gen, add)
        except Exception as exc:  # noqa: BLE001 — a failing case is a result to report, not a stop
            result.setdefault("errors", []).append({"case": f"{batch}x{n}^2 {dtype_name}",
                                                    "error": f"{type(exc).__name__}: {exc}"[:500],
                                                    "trace": traceback.format_exc()[-1500:]})
            print(f"[{batch}x{n}^2 {dtype_name}] ERROR {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    result["seconds"] = round(time.time() - t_start, 1)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "svd-batched-" + card.replace(" ", "-").replace("/", "-") + ".json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)

    peer_ms = {(r["dtype"], r["batch"], r["n"]): r.get("ms") for r in peer["results"]}
    print(f"\n{card}  torch {torch.__version__}  allow_tf32={result['allow_tf32']}  {result['seconds']} s  "
          f"peer {peer['peer']}: {peer.get('version', peer.get('reason', ''))}")
    print(f"{'case':24s} {'torch':>9s} {'qdwh':>9s} {'direct':>9s} {'peer':>9s} {'x torch':>8s} {'vals t/q':>15s}  "
          f"ratios qdwh (res, U, V, values) | torch")
    for r in result["rows"]:
        q, t = r["qdwh_ratios"], r["torch_ratios"]
        pm = peer_ms.get((r["dtype"], r["batch"], r["n"]))
        print(f"{r['case']:24s} {r['torch_ms']:9.2f} {r['qdwh_ms']:9.2f} {r['svd_large_direct_ms']:9.2f} "
              f"{pm if pm is not None else float('nan'):9.2f} {r['speedup']:8.2f} "
              f"{r['torch_svdvals_ms']:7.2f}/{r['qdwh_svdvals_ms']:<7.2f}  "
              f"{q['residual']:.2f} {q['orth_U']:.2f} {q['orth_V']:.2f} {q['values']:.2f} | "
              f"{t['residual']:.2f} {t['orth_U']:.2f} {t['orth_V']:.2f} {t['values']:.2f}")
        print(f"    stages (sum {r['stages_sum_ms']:.2f} ms; eigh op took {r['eigh_path']}):")
        for name, ms in r["stages_ms"].items():
            print(f"      {name:52s} {ms:9.3f}")
        for name, ms in r["eigh_alternatives_ms"].items():
            print(f"      [alt] {name:46s} {ms if isinstance(ms, str) else f'{ms:9.3f}'}")
    for e in result.get("errors", []):
        print("ERROR", e["case"], e["error"][:300])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
