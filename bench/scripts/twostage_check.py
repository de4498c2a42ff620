"""Device check of the two-stage eigh above 128 (metalcore/linalg/eigh_twostage.py, issue 18): LAPACK
ratios on random, κ = 1e6 and rank-n/4 Gram input, wall ms per call (random and rank n/4) against cuSOLVER's batched syev, torch, the
automatic path and the peers JAX and CuPy (own processes), and the GPU ms of each stage.

    python bench/scripts/twostage_check.py --out DIR                     # H100: ~3-4 minutes
    TRITON_INTERPRET=1 python bench/scripts/twostage_check.py --device cpu --tiny --bands 4 --out /tmp/x

Rows: ``twostage b=B`` with vectors and ``values`` without, per band width ``B`` (``--bands``);
``path`` and ``path values`` (the op forced to its ``twostage`` path: the CUDA graph's replay from the
second call on, default band); ``cusolver`` (XsyevBatched through ctypes), ``torch`` (its syevd loop),
``auto`` (metalcore.linalg.eigh as the table routes it). ``--profile``: host ms of one un-synchronised
call, its kernel count and its top kernels (torch.profiler) a band. Stage rows (CUDA events over back-to-back calls, GPU ms; each stage on
inputs prepared by the stages before it, its own copy included): ``1 dense→band``, ``2
band→tridiagonal`` (the wave schedule, reflectors kept), ``2 sweeps`` (one step at a time) and ``2
wave-launches`` (a launch a time step),
``3 values``, ``3 vectors``, ``4a band reflectors`` (wave), ``4a sweeps`` and ``4a sweep-tiles``
(a sweep's reflectors together), ``4b panel
reflectors``, ``copy`` (one clone, to subtract). The predictions these are judged against are in bench/linalg.md, "two-stage
eigh above 128".
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from batched_eigh_svd_check import emitter, finish, run_peers  # noqa: E402  (same-folder scripts)
from jacobi_check import inputs, ratios_eigh  # noqa: E402
from tridiag_stages import gpu_ms  # noqa: E402

import metalcore  # noqa: E402
from metalcore import _selection  # noqa: E402
from metalcore.bench import peers  # noqa: E402
from metalcore.bench.timing import call_ms  # noqa: E402
from metalcore.linalg import cusolver_batched  # noqa: E402
from metalcore.linalg.eigh_band_triton import apply_band_reflectors, band_to_tridiag  # noqa: E402
from metalcore.linalg.eigh_twostage import eigh_twostage, symmetric_band  # noqa: E402
from metalcore.linalg.householder_gemm import larfb_gemm  # noqa: E402
from metalcore.linalg.tridiag_eig_triton import tridiag_eig  # noqa: E402

CASES = [(64, 256, torch.float32), (16, 512, torch.float32), (8, 1024, torch.float32), (64, 256, torch.float64)]
TINY = [(2, 20, torch.float32)]


def stages(S: torch.Tensor, b: int, device) -> dict:
    """GPU ms of each stage of eigh_twostage on the symmetric ``S`` (scaled like the path scales it):
    5 back-to-back calls (CUDA events); on the CPU the wall time of one call."""
    cuda = device.type == "cuda"

    def timed(fn):
        return gpu_ms(fn, launches=5) if cuda else call_ms(fn, device, reps=1)

    S = S / S.abs().amax((-2, -1), keepdim=True)
    band = S.clone()
    blocks = symmetric_band(band, b, True)
    tri = band.clone()
    d, e, W = band_to_tridiag(tri, b, True, "wave")
    _, Z = tridiag_eig(d, e, True)
    out = {"1 dense→band": timed(lambda: symmetric_band(S.clone(), b, True)),
           "2 band→tridiagonal": timed(lambda: band_to_tridiag(band.clone(), b, True, "wave")),
           "2 sweeps": timed(lambda: band_to_tridiag(band.clone(), b, True, "sweeps")),
           "2 wave-launches": timed(lambda: band_to_tridiag(band.clone(), b, True, "wave-launches")),
           "3 values": timed(lambda: tridiag_eig(d, e, False)),
           "3 vectors": timed(lambda: tridiag_eig(d, e, True)),
           "4a band reflectors": timed(lambda: apply_band_reflectors(W, Z.clone(), b, schedule="wave")),
           "4a sweeps": timed(lambda: apply_band_reflectors(W, Z.clone(), b, schedule="sweeps")),
           "4a sweep-tiles": timed(lambda: apply_band_reflectors(W, Z.clone(), b, schedule="sweep-tiles"))}

    def panels():
        X = Z.clone()
        for row, V, T in reversed(blocks):
            larfb_gemm(V, T, X[:, row:, :], True, False, inplace=True)

    out["4b panel reflectors"] = timed(panels)
    out["copy"] = timed(lambda: S.clone())
    return {k: round(v, 4) for k, v in out.items()}


def path_call(fn, A):
    with _selection.use_path("eigh", "twostage"):
        return fn(A)


def host_and_kernels(fn, top: int = 12) -> tuple[float, int, str]:
    """Host ms of one un-synchronised call of ``fn`` (median of 5: what the Python side costs, the
    wall time when it exceeds the GPU's), its number of CUDA kernels, and the ``top`` kernels by GPU
    time (torch.profiler)."""
    fn()
    torch.cuda.synchronize()
    host = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=60)
    return sorted(host)[2], len(kernels), table


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="one small shape (CPU interpreter smoke test)")
    ap.add_argument("--bands", default="16,32")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--skip", default="", help="variants not to run, comma-separated (e.g. torch)")
    ap.add_argument("--max-seconds", type=float, default=300.0)
    ap.add_argument("--cases", help="batch x n : dtype, comma-separated (e.g. 64x256:float32)")
    ap.add_argument("--no-stages", action="store_true", help="no per-stage GPU times")
    ap.add_argument("--profile", action="store_true", help="host ms, kernel count and top kernels a band (CUDA)")
    args = ap.parse_args()
    device = torch.device(args.device)
    bands = [int(b) for b in args.bands.split(",")]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "twostage-check.json")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    doc = {"card": card, "torch": torch.__version__, "rows": []}
    start = time.time()

    emit = emitter(doc, path)
    print(f"card {card}  torch {torch.__version__}", flush=True)
    cases = TINY if args.tiny else CASES
    if args.cases:
        cases = [(int(c.split("x")[0]), int(c.split("x")[1].split(":")[0]), getattr(torch, c.split(":")[1]))
                 for c in args.cases.split(",")]
    cuda = device.type == "cuda"
    for batch, n, dtype in cases:
        if time.time() - start > args.max_seconds:
            print(f"{batch}x{n} {dtype}: SKIPPED (past --max-seconds)", flush=True)
            continue
        data = {k: S.to(dtype) for k, (_, S) in inputs(batch, n, device).items()}
        # A Shampoo-like Gram matrix of rank n/4: an eigenvalue 0 of multiplicity 3n/4, which stage 3
        # serves from the blocks of the split T (one cluster of 3n/4 lanes for Gram-Schmidt before).
        G = torch.randn(batch, n, n // 4, dtype=torch.float64, device=device)
        data["lowrank"] = (G @ G.mT).to(dtype)
        variants = []
        for b in bands:
            variants += [(f"twostage b={b}", lambda A, b=b: eigh_twostage(A, False, True, band=b)),
                         (f"values b={b}", lambda A, b=b: eigh_twostage(A, False, False, band=b))]
        # The op's path as users get it: replayed as a CUDA graph from the second call on (_graphs).
        variants += [("path", lambda A: path_call(metalcore.linalg.eigh, A)),
                     ("path values", lambda A: (path_call(metalcore.linalg.eigvalsh, A), A.new_empty(0)))]
        if cuda and cusolver_batched.available():
            variants.append(("cusolver", lambda A: cusolver_batched.syev_batched(A, False, True)))
        variants += [("torch", lambda A: torch.linalg.eigh(A)), ("auto", lambda A: metalcore.linalg.eigh(A))]
        dt = str(dtype).replace("torch.", "")
        variants = [(name, fn) for name, fn in variants if name not in args.skip.split(",")]
        for name, fn in variants:
            row = {"section": "eigh", "variant": name, "batch": batch, "n": n, "dtype": dt}
            try:
                for kind, A in data.items():
                    L, Q = fn(A)
                    expected = torch.linalg.eigvalsh(A.double().cpu())
                    err = (L.double().cpu() - expected).abs().amax(-1) / (
                        expected.abs().amax(-1) * n * torch.finfo(dtype).eps)
                    r = ratios_eigh(A, L, Q) if Q.numel() else {}
                    row[kind] = {**{k: round(v, 2) for k, v in r.items()}, "values": round(err.max().item(), 2),
                                 "nan": int(L.isnan().any(-1).sum().item())}
                for kind in ("random", "lowrank"):
                    A = data[kind]
                    row["ms" if kind == "random" else "lowrank_ms"] = round(
                        call_ms(lambda: fn(A), device, reps=3, budget_s=2.0 if cuda else None), 4)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            worst = max((max(row[k][m] for m in row[k] if m != "nan") for k in data if k in row), default=float("nan"))
            text = (f"ERROR {row['error']}" if "error" in row else
                    f"{row['ms']:9.3f} ms (rank n/4: {row['lowrank_ms']:.3f})  worst ratio {worst:6.2f}")
            emit(row, f"eigh {batch:>4}x{n:<5} {dt:8} {name:14} {text}")
        for b in bands if args.profile and cuda else ():
            A = data["random"]
            for compute_v in (True, False):
                host, count, table = host_and_kernels(lambda: eigh_twostage(A, False, compute_v, band=b))
                emit({"section": "profile", "band": b, "batch": batch, "n": n, "dtype": dt, "vectors": compute_v,
                      "host_ms": round(host, 3), "kernels": count},
                     f"profile {batch:>4}x{n:<5} {dt:8} b={b:<3} vectors={compute_v}: host {host:.3f} ms, "
                     f"{count} kernels\n{table}")
        for b in () if args.no_stages else bands:
            row = {"section": "stages", "band": b, "batch": batch, "n": n, "dtype": dt}
            try:
                row.update(stages(data["random"], b, device))
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            emit(row, f"stages {batch:>4}x{n:<5} {dt:8} b={b:<3} " + "  ".join(
                f"{k} {v}" for k, v in row.items() if k not in ("section", "band", "batch", "n", "dtype")))
        del data
    if not args.no_peers:
        run_peers([peers.case("eigh", batch, n, dtype=str(dtype).replace("torch.", "")) for batch, n, dtype in cases],
                  device, emit)
    finish(doc, start, path)


if __name__ == "__main__":
    main()
