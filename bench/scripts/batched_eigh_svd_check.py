"""Device check of the batched eigh/svd paths against torch, JAX and CuPy (issue shapes, fp32 and some
fp64): LAPACK ratios on random and κ = 1e6 input, NaN count, sweeps, and the median wall time per call
of every variant, the peers in their own processes (metalcore/bench/peers.py).

    python bench/scripts/batched_eigh_svd_check.py --out DIR                     # H100: ~3-4 minutes
    python bench/scripts/batched_eigh_svd_check.py --syevj --out DIR             # H100: ~1-1.5 minutes
    TRITON_INTERPRET=1 python bench/scripts/batched_eigh_svd_check.py --device cpu --tiny --out /tmp/x
    TRITON_INTERPRET=1 python bench/scripts/batched_eigh_svd_check.py --syevj --device cpu --tiny --out /tmp/x

``--syevj`` times only eigh at the points where cuSOLVER's batched Jacobi is the routine to beat
(500×16², 1000×32², 4096×8², 10000×3², 65536×32² fp32 and 1000×32² fp64): the ``syevj`` path
(cusolver_syevj, with vectors and values only), the ``shifted`` path (eigh_shifted_triton: one-sided
Jacobi on ``A + cI``; with vectors, values only, and at 4 warps), the automatic path through the op,
the Jacobi kernels, torch (eigh and eigvalsh) and the peers JAX and CuPy (eigh and eigvalsh); on
CUDA each row also gives the GPU time with the host hidden and the host time of issuing one call
(``gpu``, ``host``). Values-only rows are judged against LAPACK in float64 on the CPU. Its probe
also calls syevjBatched unsplit on 65535 and 65536 matrices of side 2, in the probe's subprocess,
to see where the library's batch limit lies (the split is at 32768).

``--shifted-wide`` times the ``shifted`` kernel beyond its n ≤ 32 bound (n = 33-128, one matrix per
program, 2-16 warps; with vectors and values only) against cuSOLVER's batched ``XsyevBatched`` (the
``cusolver`` path the table takes there), at batches 100-4096 (bench/linalg_triton.md v11).

``--tridiag`` times the tridiagonal path (eigh_tridiag_triton, n <= 128; with vectors and values only)
against the batched cuSOLVER calls, syevj at n <= 32, the automatic path, torch and the peers at issue
17's 64² and 128² rows and the batches around them (bench/linalg_triton.md v15).

``--bidiag`` times the bidiagonal svd path (svd_bidiag_triton, both sides <= 128; with vectors and
values only, bisection and 8-point multisection) against the register Jacobi, the QR + QDWH + eigh
path, the automatic path, torch and the peers at issue 17's svd rows from 16 to 128
(bench/linalg_triton.md v17).

``--svd-small`` times svd at the n ≤ 32 target points (the same shapes, fp32, and fp64 1000×32²):
the fused launch (svd_fused_triton; vectors and values), the chain it replaced, the register Jacobi
without the QR step, the automatic path, torch and the peers.

Variants: eigh ``scratch`` (eigh_triton, one program per matrix), ``registers`` (eigh_batched_triton,
n ≤ 32, default and alternative matrices per program), ``cusolver_batched`` (XsyevBatched through
ctypes), ``torch``; svd ``scratch`` (not for n ≤ 8 on CUDA: it hangs there), ``registers`` with and
without QR preconditioning, ``torch``. The svd hang regression runs first, in subprocesses with a
timeout: the register kernel on the batches that hung the scratch kernel, the scratch kernel on the
single matrix that hung it (matrix 106 of ``torch.randn(200, 8, 8)`` after ``manual_seed(0)`` on the
card), which is also written to the JSON so that a CPU test can replay it.

Every variant runs in try/except and prints its row as soon as it is done; the JSON
(batched-eigh-svd-check.json in --out) is rewritten after every row.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from jacobi_check import inputs, ratios_eigh, ratios_svd  # noqa: E402  (same-folder script)

from metalcore.bench import peers  # noqa: E402
from metalcore.bench.timing import QUICK_BUDGET, Timer, call_ms  # noqa: E402
import metalcore  # noqa: E402
from metalcore.linalg import cusolver_batched, cusolver_syevj  # noqa: E402
from metalcore.linalg._small_triton import block, group  # noqa: E402
from metalcore.linalg.eigh_batched_triton import REGISTER_MAX_N, eigh_registers  # noqa: E402
from metalcore.linalg.eigh_shifted_triton import MAX_N as SHIFTED_MAX_N, eigh_shifted  # noqa: E402
from metalcore.linalg.eigh_tridiag_triton import eigh_tridiag  # noqa: E402
from metalcore.linalg.eigh_triton import eigh_launch  # noqa: E402
from metalcore.linalg.svd_bidiag_triton import svd_bidiag  # noqa: E402
from metalcore.linalg.svd_large import PATH_MIN_N, svd_large  # noqa: E402
from metalcore.linalg.svd_triton import svd_launch  # noqa: E402

SHAPES = [(4096, 8), (10000, 3), (500, 16), (1000, 32), (100, 64), (64, 128)]
FP64_SHAPES = [(1000, 32), (100, 64)]
CUSOLVER_ONLY = [(64, 256), (16, 512)]
TINY = [(5, 3), (3, 8)]
TINY_CUSOLVER = [(2, 40)]
BUDGET_S = 0.1
SYEVJ_POINTS = [(500, 16, torch.float32), (1000, 32, torch.float32), (4096, 8, torch.float32),
                (10000, 3, torch.float32), (65536, 32, torch.float32), (1000, 32, torch.float64)]
TINY_SYEVJ = [(5, 3, torch.float32), (3, 8, torch.float64)]
SVD_SMALL_POINTS = [(500, 16, torch.float32), (1000, 32, torch.float32), (4096, 8, torch.float32),
                    (10000, 3, torch.float32), (65536, 32, torch.float32), (1000, 32, torch.float64)]
TINY_SVD_SMALL = [(5, 3, torch.float32), (3, 8, torch.float64)]
SHIFTED_WIDE_POINTS = [(100, 48, torch.float32), (100, 64, torch.float32), (1024, 64, torch.float32),
                       (4096, 64, torch.float32), (256, 33, torch.float32), (4096, 33, torch.float32),
                       (64, 128, torch.float32), (1024, 128, torch.float32),
                       (100, 64, torch.float64), (1024, 64, torch.float64)]
TINY_SHIFTED_WIDE = [(2, 40, torch.float32), (2, 33, torch.float64)]
# The tridiagonal path's points (bench/linalg_triton.md v15): issue 17's 64² and 128² rows, the batches
# around them, 1000×32² (where the Jacobi kernels and syevj hold the table), fp64 at the targets.
TRIDIAG_POINTS = [(100, 64, torch.float32), (64, 128, torch.float32), (1000, 32, torch.float32),
                  (16, 64, torch.float32), (16, 128, torch.float32), (1024, 64, torch.float32),
                  (4096, 64, torch.float32), (1024, 128, torch.float32),
                  (100, 64, torch.float64), (64, 128, torch.float64)]
TINY_TRIDIAG = [(2, 40, torch.float32), (2, 33, torch.float64)]
# The bidiagonal svd path's points (bench/linalg_triton.md v17): issue 17's svd rows at 16-128, the
# batches around them, fp64 at the targets.
BIDIAG_POINTS = [(100, 64, torch.float32), (64, 128, torch.float32), (1000, 32, torch.float32),
                 (500, 16, torch.float32), (16, 128, torch.float32), (1024, 64, torch.float32),
                 (100, 64, torch.float64), (64, 128, torch.float64)]
TINY_BIDIAG = [(2, 40, torch.float32), (2, 33, torch.float64)]
CUSOLVER = False            # set in main() by cusolver_usable()
SYEVJ = False               # likewise, for cusolver_syevj

HANG = r"""
import json, sys, torch
from metalcore.linalg import _jacobi_triton, svd_triton
for spec in json.loads(sys.argv[1]):
    dev = spec["device"]
    _jacobi_triton.FP_FUSION = bool(spec.get("fused"))    # True: the launch as it was before the fix
    torch.manual_seed(0)
    A = torch.randn(spec["batch"], spec["n"], spec["n"], device=dev)
    if spec.get("index") is not None:
        A = A[spec["index"]:spec["index"] + 1].contiguous()
        print(json.dumps({"name": spec["name"], "matrix": A[0].double().cpu().tolist()}), flush=True)
    sw = torch.zeros(A.shape[0], dtype=torch.int32, device=dev)
    U, S, Vh = svd_triton.svd_launch(A, False, True, sweeps=sw, precondition=spec["pre"], registers=spec["registers"])
    res = ((U @ torch.diag_embed(S) @ Vh - A).norm(dim=(-2, -1)) / A.norm(dim=(-2, -1))).max()
    print(json.dumps({"name": spec["name"], "ok": True, "sweeps": int(sw.max()), "nan": int(S.isnan().any(-1).sum()),
                      "resid": float(res)}), flush=True)
"""


def hang_groups(tiny):
    """Subprocesses of cases: the register kernel's in one; the scratch kernel, FMA contraction off
    (the fix), on the matrix that hung the H100 and on the batches that did; last the same matrix
    with contraction on, as before the fix (expected to time out: that confirms the cause)."""
    if tiny:
        return [[dict(name="registers 6x8", batch=6, n=8, registers=True, pre=True)],
                [dict(name="scratch matrix 1 of 3x8", batch=3, n=8, index=1, registers=False, pre=False)],
                [dict(name="scratch matrix 1 of 3x8 fused", batch=3, n=8, index=1, registers=False, pre=False,
                      fused=True)]]
    registers = [dict(name=f"registers {b}x{n} pre={int(pre)}", batch=b, n=n, registers=True, pre=pre)
                 for b, n in [(4096, 8), (10000, 3), (200, 8)] for pre in (False, True)]
    registers.append(dict(name="registers matrix 106 of 200x8", batch=200, n=8, index=106, registers=True, pre=False))
    scratch = [dict(name="scratch matrix 106 of 200x8 (hung before)", batch=200, n=8, index=106,
                    registers=False, pre=False)]
    scratch += [dict(name=f"scratch {b}x{n} pre={int(pre)}", batch=b, n=n, registers=False, pre=pre)
                for b, n in [(200, 8), (4096, 8), (10000, 3)] for pre in (False, True)]
    fused = [dict(name="scratch matrix 106 of 200x8, FMA contraction on (as before)", batch=200, n=8, index=106,
                  registers=False, pre=False, fused=True)]
    return [registers, scratch, fused]


def run_hang(device, tiny, timeout_s, emit):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    for k, cases in enumerate(hang_groups(tiny)):
        # The last group is expected to hang: 20 s are enough to see it.
        limit = min(timeout_s, 20.0) if k == 2 else timeout_s
        for spec in cases:
            spec["device"] = device.type
        t = time.time()
        timed_out, err, out = False, "", ""
        try:
            p = subprocess.run([sys.executable, "-c", HANG, json.dumps(cases)], capture_output=True, text=True,
                               timeout=limit, env=env)
            out = p.stdout
            err = p.stderr.strip()[-400:] if p.returncode != 0 else ""
        except subprocess.TimeoutExpired as e:
            timed_out = True
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        rows = {spec["name"]: {"section": "hang", **spec} for spec in cases}
        for line in out.splitlines():
            if line.startswith("{"):
                rec = json.loads(line)
                rows[rec["name"]].update(rec)
        for name, row in rows.items():
            if not row.get("ok"):
                row["timeout" if timed_out else "error"] = True if timed_out else (err or "no result")
            status = ("ok sweeps {} nan {} resid {:.1e}".format(row["sweeps"], row["nan"], row["resid"]) if row.get("ok")
                      else "TIMEOUT (group)" if timed_out else "ERROR " + str(row["error"])[-200:])
            emit(row, f"hang  {name:44s} {status}")
        print(f"hang group: {time.time() - t:.1f} s", flush=True)


PROBE = r"""
import json, sys, torch
from metalcore.linalg import cusolver_batched as cb, cusolver_syevj as cj
out = {"available": cb.available(), "syevj_available": cj.available()}
for name, fn, n in (("", cb.syev_batched, 40), ("syevj ", cj.syevj_batched, 8)):
    if not out[name.replace(" ", "_") + "available"]:
        continue
    X = torch.randn(3, n, n, device="cuda", dtype=torch.float64)
    A = X + X.mT
    for dt in (torch.float32, torch.float64):
        L, Q = fn(A.to(dt), False, True)
        res = (A - (Q.double() * L.double().unsqueeze(-2)) @ Q.double().mT).norm() / A.norm()
        out[name + str(dt)] = float(res)
print(json.dumps(out), flush=True)
if out["syevj_available"] and "--limit" in sys.argv:
    # Last, as a failed launch may leave the context unusable: one unsplit call at each size.
    for count in (65535, 65536):
        cb.MAX_BATCH = count
        X = torch.randn(count, 2, 2, device="cuda")
        try:
            L, _ = cj.syevj_batched(X + X.mT, False, True)
            torch.cuda.synchronize()
            out[f"unsplit {count}x2"] = "ok, nan rows %d" % int(L.isnan().any(-1).sum())
        except Exception as e:
            out[f"unsplit {count}x2"] = f"{type(e).__name__}: {e}"[:200]
        print(json.dumps(out), flush=True)
"""


def cusolver_usable(device, limit=False):
    """Whether the ctypes paths run at all, ``(XsyevBatched, syevjBatched)``, tried in a subprocess
    first: a wrong call through ctypes can take the process down, and this script must finish."""
    if device.type != "cuda":
        return False, False
    try:
        p = subprocess.run([sys.executable, "-c", PROBE] + (["--limit"] if limit else []),
                           capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])))
        lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
        probe = json.loads(lines[-1]) if lines else {"error": p.stderr.strip()[-300:]}
    except subprocess.TimeoutExpired:
        probe = {"error": "timeout"}
    print(f"cusolver probe: {probe}", flush=True)
    good = [bool(probe.get(key)) and all(v < 1e-4 for k, v in probe.items() if k.startswith(prefix))
            for key, prefix in (("available", "torch."), ("syevj_available", "syevj torch."))]
    return good[0], good[1]


def eigh_variants(n, device, dtype):
    out = [("scratch", lambda A, sw: eigh_launch(A, False, True, sweeps=sw))]
    if n <= REGISTER_MAX_N:
        out.append(("registers", lambda A, sw: eigh_registers(A, False, True, sweeps=sw)))
        # The default matrices per program (_small_triton.group) and a quarter / four times it.
        base = group(10 ** 6, block(n) ** 2 * 2, device)
        for G in sorted({max(1, base // 4), base * 4} - {base}):
            out.append((f"registers G={G}", lambda A, sw, G=G: eigh_registers(A, False, True, sweeps=sw,
                                                                            matrices_per_program=G)))
    if n == 64:
        # Beyond REGISTER_MAX_N, to see whether one matrix per program in registers still pays.
        for w in (8, 16):
            out.append((f"registers w={w}", lambda A, sw, w=w: eigh_registers(A, False, True, sweeps=sw,
                                                                            matrices_per_program=1, num_warps=w)))
    if SYEVJ and n <= cusolver_syevj.MAX_N:
        out.append(("syevj", lambda A, sw: cusolver_syevj.syevj_batched(A, False, True)))
    if CUSOLVER:
        out.append(("cusolver_batched", lambda A, sw: cusolver_batched.syev_batched(A, False, True)))
    out.append(("torch", lambda A, sw: torch.linalg.eigh(A)))
    return out


def values_only(fn):
    """``(L, empty)`` from a function returning eigenvalues only."""
    return lambda A, sw: (fn(A), A.new_empty(0))


def syevj_variants(n, dtype, device):
    """Every way to get eigh at one ``--syevj`` point; the cuSOLVER ones only where the probe passed."""
    out = []
    if SYEVJ:
        out += [("syevj", lambda A, sw: cusolver_syevj.syevj_batched(A, False, True)),
                ("syevj values", lambda A, sw: cusolver_syevj.syevj_batched(A, False, False))]
    if n <= SHIFTED_MAX_N:
        out += [("shifted", lambda A, sw: eigh_shifted(A, False, True, sweeps=sw)),
                ("shifted values", lambda A, sw: eigh_shifted(A, False, False, sweeps=sw)),
                ("shifted 4 warps", lambda A, sw: eigh_shifted(A, False, True, sweeps=sw, num_warps=4))]
    out.append(("op automatic", lambda A, sw: metalcore.linalg.eigh(A)))
    out.append(("scratch", lambda A, sw: eigh_launch(A, False, True, sweeps=sw)))
    if n <= REGISTER_MAX_N:
        out.append(("registers", lambda A, sw: eigh_registers(A, False, True, sweeps=sw)))
    out += [("torch", lambda A, sw: torch.linalg.eigh(A)),
            ("torch eigvalsh", values_only(torch.linalg.eigvalsh))]
    return out


def shifted_wide_variants(n, dtype, device):
    """The shifted kernel past its bound at several warp counts, against the batched cuSOLVER call."""
    warps = (2, 4, 8) if n <= 64 else (4, 8, 16)
    out = [(f"shifted w={w}", lambda A, sw, w=w: eigh_shifted(A, False, True, sweeps=sw, matrices_per_program=1,
                                                             num_warps=w)) for w in warps]
    out.append((f"shifted values w={warps[1]}", lambda A, sw: eigh_shifted(A, False, False, sweeps=sw,
                                                                           matrices_per_program=1,
                                                                           num_warps=warps[1])))
    if CUSOLVER:
        out += [("cusolver_batched", lambda A, sw: cusolver_batched.syev_batched(A, False, True)),
                ("cusolver values", lambda A, sw: (cusolver_batched.syev_batched(A, False, False)[0],
                                                   A.new_empty(0)))]
    out.append(("op automatic", lambda A, sw: metalcore.linalg.eigh(A)))
    return out


def tridiag_variants(n, dtype, device):
    """The tridiagonal path (eigh_tridiag_triton; vectors and values only) against the batched cuSOLVER
    calls the table takes at 33-128, syevj at n <= 32, the automatic path and torch."""
    out = []
    # Both Sturm schedules (the launcher picks one by batch): bisection and 8-point multisection.
    for k in (1, 8):
        out += [(f"tridiag s={k}", lambda A, sw, k=k: eigh_tridiag(A, False, True, sections=k)),
                (f"values s={k}", lambda A, sw, k=k: eigh_tridiag(A, False, False, sections=k))]
    # Other warp counts than _small_triton.warps' 16 at 128²: fp64 128² spills at 16.
    for w in ((8, 32) if n > 64 else ()):
        out.append((f"tridiag w={w}", lambda A, sw, w=w: eigh_tridiag(A, False, True, num_warps=w)))
    if CUSOLVER:
        out += [("cusolver_batched", lambda A, sw: cusolver_batched.syev_batched(A, False, True)),
                ("cusolver values", lambda A, sw: (cusolver_batched.syev_batched(A, False, False)[0],
                                                   A.new_empty(0)))]
    if SYEVJ and n <= cusolver_syevj.MAX_N:
        out.append(("syevj", lambda A, sw: cusolver_syevj.syevj_batched(A, False, True)))
    out += [("op automatic", lambda A, sw: metalcore.linalg.eigh(A)),
            ("torch", lambda A, sw: torch.linalg.eigh(A))]
    return out


def bidiag_variants(n, dtype, device):
    """The bidiagonal svd path (svd_bidiag_triton; vectors and values only, both Sturm schedules)
    against the register Jacobi, the QR + QDWH + eigh path from side 33, the automatic path and torch."""
    def values(fn):
        return lambda A, sw: (A.new_empty(0), fn(A), A.new_empty(0))
    out = []
    for k in (1, 8):
        out += [(f"bidiag s={k}", lambda A, sw, k=k: svd_bidiag(A, True, sections=k)),
                (f"values s={k}", lambda A, sw, k=k: svd_bidiag(A, False, sections=k))]
    if n <= REGISTER_MAX_N or n == 64:
        out.append(("registers", lambda A, sw: svd_launch(A, False, True, sweeps=sw, registers=True)))
    if n >= PATH_MIN_N:
        out.append(("qdwh", lambda A, sw: svd_large(A, False, True)))
    out += [("op automatic", lambda A, sw: metalcore.linalg.svd(A, full_matrices=False)),
            ("torch", lambda A, sw: torch.linalg.svd(A, full_matrices=False)),
            ("torch values", values(torch.linalg.svdvals))]
    return out


def values_ratio(L, expected64, dtype):
    """``max|λ − λ64| / (n·ε·max|λ64|)``, worst over the batch (NaN rows are counted apart)."""
    n = max(expected64.shape[-1], 1)
    norm = expected64.abs().amax(-1).clamp_min(torch.finfo(torch.float64).tiny)
    r = (L.double().cpu() - expected64).abs().amax(-1) / (norm * n * torch.finfo(dtype).eps)
    return r.nan_to_num(0).max().item()


def cpu_values(Sym):
    """LAPACK's float64 eigenvalues on the CPU, the oracle of the values-only rows."""
    return torch.linalg.eigvalsh(Sym.cpu().double())


def run_points(args, device, start, emit, op, points, variants, oracle, peer_ops):
    """Every variant of ``op`` at each ``(batch, n, dtype)`` point (random and κ = 1e6 input; values-only
    rows judged against ``oracle(G, Sym)``, LAPACK in float64), with the GPU time with the host hidden
    and the host time per call beside the wall time on CUDA; then the peers' ``peer_ops``."""
    timer = Timer(device, QUICK_BUDGET) if device.type == "cuda" else None
    for b, n, dtype in points:
        if time.time() - start > args.max_seconds:
            print(f"{op} {b}x{n} {dtype}: SKIPPED (past --max-seconds {args.max_seconds:.0f})", flush=True)
            continue
        try:
            data = {k: (G.to(dtype), S.to(dtype)) for k, (G, S) in inputs(b, n, device).items()}
        except RuntimeError as e:                     # the κ = 1e6 family needs a batched QR of b matrices
            print(f"{op} {b}x{n}: ill-conditioned input not built ({str(e)[:120]}); random only", flush=True)
            X = torch.randn(b, n, n, device=device, dtype=torch.float64)
            data = {"random": (X.to(dtype), (X + X.mT).to(dtype))}
        expected = {k: oracle(G, Sym) for k, (G, Sym) in data.items()}
        for name, fn in variants(n, dtype, device):
            measure(op, name, fn, data, b, n, dtype, device, emit, expected, timer)
        del data
    if not args.no_peers:
        cases = [peers.case(o, b, n, dtype=str(dtype).replace("torch.", ""))
                 for b, n, dtype in points for o in peer_ops]
        run_peers(cases, device, emit)


def run_syevj(args, device, start, emit):
    run_points(args, device, start, emit, "eigh", TINY_SYEVJ if args.tiny else SYEVJ_POINTS, syevj_variants,
               lambda G, Sym: cpu_values(Sym), ("eigh", "eigvalsh"))


def run_shifted_wide(args, device, start, emit):
    run_points(args, device, start, emit, "eigh", TINY_SHIFTED_WIDE if args.tiny else SHIFTED_WIDE_POINTS,
               shifted_wide_variants, lambda G, Sym: cpu_values(Sym), ("eigh",))


def run_tridiag(args, device, start, emit):
    run_points(args, device, start, emit, "eigh", TINY_TRIDIAG if args.tiny else TRIDIAG_POINTS,
               tridiag_variants, lambda G, Sym: cpu_values(Sym), ("eigh", "eigvalsh"))


def run_bidiag(args, device, start, emit):
    run_points(args, device, start, emit, "svd", TINY_BIDIAG if args.tiny else BIDIAG_POINTS, bidiag_variants,
               lambda G, Sym: torch.linalg.svdvals(G.double().cpu()), ("svd", "svdvals"))


def run_svd_small(args, device, start, emit):
    run_points(args, device, start, emit, "svd", TINY_SVD_SMALL if args.tiny else SVD_SMALL_POINTS,
               lambda n, dtype, device: svd_small_variants(),
               lambda G, Sym: torch.linalg.svdvals(G.double().cpu()), ("svd", "svdvals"))


def svd_small_variants():
    """The svd paths for n ≤ 32 (bench/linalg_triton.md v9): the fused launch, the chain it replaced,
    the register Jacobi without the QR step, the automatic path (through the op) and torch."""
    def values(fn):
        return lambda A, sw: (A.new_empty(0), fn(A, sw), A.new_empty(0))
    return [
        ("fused", lambda A, sw: svd_launch(A, False, True, sweeps=sw, registers=True)),
        ("fused values", lambda A, sw: svd_launch(A, False, False, sweeps=sw, registers=True)),
        ("chain (v6)", lambda A, sw: svd_launch(A, False, True, sweeps=sw, registers=True, fused=False)),
        ("registers no-QR", lambda A, sw: svd_launch(A, False, True, sweeps=sw, registers=True,
                                                     precondition=False)),
        ("automatic", lambda A, sw: metalcore.linalg.svd(A, full_matrices=False)),
        ("torch", lambda A, sw: torch.linalg.svd(A, full_matrices=False)),
        ("torch values", values(lambda A, sw: torch.linalg.svdvals(A))),
    ]


def svd_variants(n, device):
    out = []
    if not (device.type == "cuda" and n <= 8):
        out.append(("scratch", lambda A, sw: svd_launch(A, False, True, sweeps=sw)))
    if n <= REGISTER_MAX_N or n == 64:
        out.append(("registers", lambda A, sw: svd_launch(A, False, True, sweeps=sw, registers=True)))
        out.append(("registers no-QR", lambda A, sw: svd_launch(A, False, True, sweeps=sw, registers=True,
                                                                precondition=False)))
    out.append(("torch", lambda A, sw: torch.linalg.svd(A, full_matrices=False)))
    return out


def measure(op, name, fn, data, b, n, dtype, device, emit, expected=None, timer=None):
    """One row: ratios per input family, NaN count, sweeps, median ms. ``expected``: float64
    eigenvalues per family, for variants that return no eigenvectors (values ratio, LAPACK units).
    ``timer`` (CUDA): also the GPU time with the host hidden and the host time of issuing a call."""
    row = {"section": op, "variant": name, "batch": b, "n": n, "dtype": str(dtype).replace("torch.", "")}
    try:
        for kind, (G, Sym) in data.items():
            sw = torch.zeros(b, dtype=torch.int32, device=device)
            if op == "eigh":
                L, Q = fn(Sym, sw)
                r = ratios_eigh(Sym, L, Q) if Q.numel() else {"values": values_ratio(L, expected[kind], dtype)}
                nan = int(L.isnan().any(-1).sum().item())
            else:
                U, S, Vh = fn(G, sw)
                r = ratios_svd(G, U, S, Vh) if U.numel() else {"values": values_ratio(S, expected[kind], dtype)}
                nan = int(S.isnan().any(-1).sum().item())
            row[kind] = {**{k: round(v, 2) for k, v in r.items()}, "nan": nan, "sweeps": int(sw.max().item())}
        G, Sym = data["random"]
        arg = Sym if op == "eigh" else G
        sw = torch.zeros(b, dtype=torch.int32, device=device)
        # Under the interpreter one call takes seconds: one timed call is enough for a smoke test.
        cuda = device.type == "cuda"
        row["ms"] = round(call_ms(lambda: fn(arg, sw), device, reps=3 if cuda else 1,
                                  budget_s=BUDGET_S if cuda else None), 4)
        if timer is not None:
            t = timer.time(lambda: fn(arg, sw))
            row["gpu_ms"], row["host_ms"] = round(t.median_s * 1e3, 4), round(t.host_s * 1e3, 4)
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}"[:300]
    worst = max((max(v for k, v in row[kind].items() if k not in ("nan", "sweeps")) for kind in data if kind in row),
                default=float("nan"))
    nan = sum(row[kind]["nan"] for kind in data if kind in row)
    text = (f"ERROR {row['error']}" if "error" in row else
            f"{row['ms']:9.3f} ms  worst ratio {worst:6.1f}  nan {nan}  sweeps "
            f"{max((row[k]['sweeps'] for k in data if k in row), default=0)}"
            + (f"  gpu {row['gpu_ms']:.3f} host {row['host_ms']:.3f}" if "gpu_ms" in row else ""))
    emit(row, f"{op:5} {b:>6}x{n:<4} {row['dtype']:8} {name:18} {text}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="small shapes (CPU interpreter smoke test)")
    ap.add_argument("--hang-timeout", type=float, default=60.0)
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--no-hang", action="store_true", help="skip the svd hang regression subprocesses")
    ap.add_argument("--syevj", action="store_true",
                    help="only eigh at the batched-Jacobi points, every path and the peers (module docstring)")
    ap.add_argument("--shifted-wide", action="store_true",
                    help="only eigh at n = 33-128: the shifted kernel past its bound against batched cuSOLVER")
    ap.add_argument("--tridiag", action="store_true",
                    help="only eigh at n = 32-128: the tridiagonal path against batched cuSOLVER, torch and the peers")
    ap.add_argument("--bidiag", action="store_true",
                    help="only svd at n = 16-128: the bidiagonal path against Jacobi, QDWH, torch and the peers")
    ap.add_argument("--svd-small", action="store_true",
                    help="only svd at the n <= 32 target points: the fused launch against the chain, torch and the peers")
    ap.add_argument("--max-seconds", type=float, default=210.0,
                    help="skip the remaining device shapes past this (the peers still run, ~1 min)")
    args = ap.parse_args()
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "batched-eigh-svd-check.json")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    doc = {"card": card, "torch": torch.__version__, "cusolver_batched": cusolver_batched.available(), "rows": []}
    start = time.time()

    emit = emitter(doc, path)
    print(f"card {card}  torch {torch.__version__}  cusolver_batched {doc['cusolver_batched']}", flush=True)
    global CUSOLVER, SYEVJ
    CUSOLVER, SYEVJ = doc["cusolver_usable"], doc["syevj_usable"] = cusolver_usable(device, limit=args.syevj)
    focused = {"syevj": run_syevj, "shifted_wide": run_shifted_wide, "tridiag": run_tridiag, "bidiag": run_bidiag,
               "svd_small": run_svd_small}
    chosen = [run for flag, run in focused.items() if getattr(args, flag)]
    if chosen:
        chosen[0](args, device, start, emit)
        finish(doc, start, path)
        return
    if not args.no_hang:
        run_hang(device, args.tiny, args.hang_timeout, emit)

    shapes = TINY if args.tiny else SHAPES
    plan = [(b, n, torch.float32) for b, n in shapes]
    plan += [(b, n, torch.float64) for b, n in (TINY[:1] if args.tiny else FP64_SHAPES)]
    for b, n, dtype in plan:
        if time.time() - start > args.max_seconds:
            print(f"eigh/svd {b}x{n} {dtype}: SKIPPED (past --max-seconds {args.max_seconds:.0f})", flush=True)
            continue
        data = {k: (G.to(dtype), S.to(dtype)) for k, (G, S) in inputs(b, n, device).items()}
        for name, fn in eigh_variants(n, device, dtype):
            measure("eigh", name, fn, data, b, n, dtype, device, emit)
        for name, fn in svd_variants(n, device):
            measure("svd", name, fn, data, b, n, dtype, device, emit)
        del data
    for b, n in TINY_CUSOLVER if args.tiny else CUSOLVER_ONLY:
        if time.time() - start > args.max_seconds:
            print(f"eigh {b}x{n}: SKIPPED (past --max-seconds {args.max_seconds:.0f})", flush=True)
            continue
        data = {k: (G, S) for k, (G, S) in inputs(b, n, device).items()}
        variants = [("torch", lambda A, sw: torch.linalg.eigh(A))]
        if CUSOLVER:
            variants.insert(0, ("cusolver_batched", lambda A, sw: cusolver_batched.syev_batched(A, False, True)))
        for name, fn in variants:
            measure("eigh", name, fn, data, b, n, torch.float32, device, emit)
        del data

    if not args.no_peers:
        cases = [peers.case(op, b, n) for b, n in shapes for op in ("eigh", "svd")]
        cases += [peers.case("eigh", b, n, dtype="float64") for b, n in (TINY[:1] if args.tiny else FP64_SHAPES)]
        cases += [peers.case("eigh", b, n) for b, n in (TINY_CUSOLVER if args.tiny else CUSOLVER_ONLY)]
        run_peers(cases, device, emit)
    finish(doc, start, path)


def run_peers(cases, device, emit):
    for runner in ("jax", "cupy") if device.type == "cuda" else ("numpy", "jax"):
        t = time.time()
        res = peers.peer_timings(runner, cases, timeout_s=90.0)
        for r in res["results"]:
            r = dict(r, section="peer", peer=runner)
            val = f"{r['ms']:9.3f} ms" if "ms" in r else f"ERROR {r.get('error', '')[:120]}"
            emit(r, f"{r['op']:8} {r['batch']:>6}x{r['n']:<4} {r['dtype']:8} {runner:18} {val}")
        if not res["available"]:
            emit({"section": "peer", "peer": runner, "available": False, "reason": res["reason"]},
                 f"peer {runner}: not available ({res['reason'][:200]})")
        print(f"peer {runner}: {time.time() - t:.1f} s", flush=True)


def emitter(doc, path):
    """``emit(row, line)``: ``row`` appended to ``doc["rows"]``, ``line`` printed, the JSON rewritten
    (a run cut short keeps what it measured)."""
    def emit(row, line):
        doc["rows"].append(row)
        print(line, flush=True)
        with open(path, "w") as f:
            json.dump(doc, f, indent=1)

    return emit


def finish(doc, start, path):
    doc["total_s"] = round(time.time() - start, 1)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"total {doc['total_s']} s; JSON in {path}", flush=True)


if __name__ == "__main__":
    main()
