"""One Mac call for the Metal pieces of issue #9's last part: ``cholesky_solve_<dtype>`` (both
substitutions in one dispatch), the blocked QR with ``geqr2_panel_<dtype>`` panels
(metalcore/linalg/qr_blocked_metal.py; its panel width ``NB`` swept) and the svd route to svd_large.
Each case's LAPACK ratios against float64 on the CPU, and its time against the reference backend in
the same process (torch on MPS, or torch on the CPU where MPS lacks the op, marked ``peer@cpu``),
medians with warm-up (metalcore.bench.timing: ``torch.mps.synchronize`` around each call).

    python bench/scripts/metal_large_linalg_check.py [--out DIR]              # a Mac with MPS
    python bench/scripts/metal_large_linalg_check.py --device cpu --tiny      # executor smoke run

Prints a table last and writes metal-large-linalg-<device>.json and .log to --out (default $OUT or
.). Nothing here has run on Apple hardware. The blocked QR needs triton importable (qr_blocked.py
imports it); where it is not, the qr and svd sections report the reference route and time nothing.
"""

import argparse
import json
import os
import platform
import sys
import traceback

import torch

import metalcore
from metalcore.bench.timing import GPU_BUDGET, QUICK_BUDGET, Timer, fmt_time
from metalcore.linalg import qr_blocked_metal, svd_large, svd_metal
from metalcore.linalg.cholesky_solve import cholesky_solve_op
from metalcore.linalg.qr import qr_op
from metalcore.linalg.svd import svd_op

EPS = torch.finfo(torch.float32).eps
NB_SWEEP = (16, 32, 64)  # the module default (64, the tile side) last


def log(state, line):
    print(line, flush=True)
    state["log"].append(line)


def _in_backend(name, fn):
    with metalcore.use_backend(name):
        return fn()


def timed(timer, ours, peer):
    t = timer.time_all({"metal": lambda: _in_backend("metal", ours), "peer": lambda: _in_backend("reference", peer)})
    return {"metal_s": t["metal"].median_s, "peer_s": t["peer"].median_s,
            "speedup": t["peer"].median_s / t["metal"].median_s}


def peer_device(dev, fn):
    """Where the reference runs ``fn``: on ``dev`` when torch has the op there, else on the CPU."""
    try:
        _in_backend("reference", fn)
        return dev.type
    except (NotImplementedError, RuntimeError):
        return "cpu"


def fro(x):
    return x.double().cpu().norm(dim=(-2, -1))


def check_cholesky_solve(state, timer, dev, tiny):
    shapes = [(3, 9, 2)] if tiny else [(1000, 32, 1), (1000, 64, 8), (100, 64, 256)]
    for b, n, k in shapes:
        X = torch.randn(b, n, n, device=dev)
        A = X @ X.mT / n + torch.eye(n, device=dev)
        L = torch.linalg.cholesky(A.cpu()).to(dev)
        B = torch.randn(b, n, k, device=dev)
        assert _in_backend("metal", lambda: cholesky_solve_op.backend_for(B, L, False)) == "metal"
        Xs = _in_backend("metal", lambda: cholesky_solve_op(B, L, False))
        ratio = ((fro(B.cpu() - A.cpu().double() @ Xs.cpu().double())) / (fro(A) * fro(Xs) * n * EPS)).max().item()
        where = peer_device(dev, lambda: cholesky_solve_op(B, L, False))
        Bp, Lp = (B, L) if where == dev.type else (B.cpu(), L.cpu())
        row = {"case": f"cholesky_solve {b}x{n}x{n} k={k}", "lapack_ratios": {"solve": ratio}, "ok": ratio <= 30,
               "peer_device": where}
        row.update(timed(timer, lambda: cholesky_solve_op(B, L, False), lambda: cholesky_solve_op(Bp, Lp, False)))
        yield row


def qr_ratios(A, Q, R):
    A64, Q64, R64 = A.double().cpu(), Q.double().cpu(), R.double().cpu()
    m, n = A.shape[-2:]
    eye = torch.eye(Q.shape[-1], dtype=torch.float64)
    return {"residual": (fro(A64 - Q64 @ R64) / (fro(A64) * max(m, n) * EPS)).max().item(),
            "orthogonality": (fro(Q64.mT @ Q64 - eye) / (max(m, n) * EPS)).max().item()}


def check_qr(state, timer, dev, tiny):
    shapes = [(1, 80, 40)] if tiny else [(1, 1024, 1024), (1, 2048, 2048), (1, 4096, 1024), (8, 512, 512)]
    sweep = (8, 16) if tiny else NB_SWEEP
    for b, m, n in shapes:
        A = torch.randn(b, m, n, device=dev)
        if _in_backend("metal", lambda: qr_op.backend_for(A, "reduced")) != "metal":
            log(state, f"qr {b}x{m}x{n}: the metal backend does not take it here (triton not importable)")
            continue
        where = peer_device(dev, lambda: qr_op(A, "reduced"))
        Ap = A if where == dev.type else A.cpu()
        for nb in sweep:
            qr_blocked_metal.NB = nb
            Q, R = _in_backend("metal", lambda: qr_op(A, "reduced"))
            ratios = qr_ratios(A, Q, R)
            row = {"case": f"qr {b}x{m}x{n} NB={nb}", "lapack_ratios": ratios, "ok": max(ratios.values()) <= 30,
                   "peer_device": where}
            row.update(timed(timer, lambda: qr_op(A, "reduced"), lambda: qr_op(Ap, "reduced")))
            yield row
    qr_blocked_metal.NB = NB_SWEEP[-1]


def check_svd(state, timer, dev, tiny):
    shapes = [(1, 80, 24)] if tiny else [(1, 1024, 1024), (1, 2048, 2048), (1, 4096, 1024)]
    for b, m, n in shapes:
        A = torch.randn(b, m, n, device=dev)
        if _in_backend("metal", lambda: svd_op.backend_for(A, False, True)) != "metal":
            log(state, f"svd {b}x{m}x{n}: the metal backend does not take it here")
            continue
        where = peer_device(dev, lambda: svd_op(A, False, True))
        Ap = A if where == dev.type else A.cpu()
        U, S, Vh = _in_backend("metal", lambda: svd_op(A, False, True))
        A64 = A.double().cpu()
        U64, S64, Vh64 = U.double().cpu(), S.double().cpu(), Vh.double().cpu()
        k = min(m, n)
        eye = torch.eye(k, dtype=torch.float64)
        ratios = {"residual": (fro(A64 - (U64 * S64.unsqueeze(-2)) @ Vh64) / (fro(A64) * max(m, n) * EPS)).max().item(),
                  "orthogonality U": (fro(U64.mT @ U64 - eye) / (max(m, n) * EPS)).max().item(),
                  "orthogonality V": (fro(Vh64 @ Vh64.mT - eye) / (max(m, n) * EPS)).max().item()}
        row = {"case": f"svd {b}x{m}x{n}", "lapack_ratios": ratios, "ok": max(ratios.values()) <= 30,
               "peer_device": where}
        row.update(timed(timer, lambda: svd_op(A, False, True), lambda: svd_op(Ap, False, True)))
        yield row


SECTIONS = {"cholesky_solve": check_cholesky_solve, "qr": check_qr, "svd": check_svd}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="mps", choices=("mps", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="small sizes (with --device cpu: a smoke run)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--sections", default=",".join(SECTIONS))
    args = parser.parse_args()
    dev = torch.device(args.device)
    if dev.type == "mps" and not torch.backends.mps.is_available():
        sys.exit("MPS is not available: run on a Mac, or use --device cpu --tiny for the executor smoke run")
    if args.tiny:  # the blocked QR and the svd_large route at smoke-run sizes
        qr_blocked_metal.SMALL_MAX, svd_metal.JACOBI_MAX, svd_large.LARGE_MIN_N = 16, 16, 20
    torch.manual_seed(0)
    timer = Timer(dev, QUICK_BUDGET if args.tiny else GPU_BUDGET)
    state = {"device": args.device, "tiny": args.tiny, "torch": torch.__version__, "machine": platform.platform(),
             "rows": [], "errors": {}, "log": []}
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"metal-large-linalg-{args.device}")
    for section in args.sections.split(","):
        try:
            for row in SECTIONS[section](state, timer, dev, args.tiny):
                row["section"] = section
                state["rows"].append(row)
                worst = max(row["lapack_ratios"].values())
                log(state, f"{row['case']:<34} metal {fmt_time(row['metal_s']):>9}  peer@{row['peer_device']} "
                           f"{fmt_time(row['peer_s']):>9}  x{row['speedup']:.2f}  ratio {worst:6.2f} "
                           f"{'ok' if row['ok'] else 'FAIL'}")
        except Exception:  # one failing section is reported; the others still run
            state["errors"][section] = traceback.format_exc()
            log(state, f"[{section}] failed:\n{state['errors'][section]}")
        with open(base + ".json", "w") as f:
            json.dump(state, f, indent=1, default=float)
    with open(base + ".log", "w") as f:
        f.write("\n".join(state["log"]) + "\n")
    bad = [r["case"] for r in state["rows"] if not r["ok"]]
    print(f"\n{len(state['rows'])} cases, {len(bad)} inaccurate, {len(state['errors'])} sections failed; {base}.json")
    sys.exit(1 if bad or state["errors"] else 0)


if __name__ == "__main__":
    main()
