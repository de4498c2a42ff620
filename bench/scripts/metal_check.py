"""One Mac call for the Metal shaders of RoPE, gram_poly (syrk), the Householder primitives,
cholesky_solve, the blocked QR with tall-panel shaders (its panel width ``NB`` swept), the svd
route to svd_large and the two-stage eigh path: each
op's accuracy at full size against float64 on the CPU, and its time against the reference backend
(plain torch on MPS; where torch lacks the op on MPS, torch on the CPU, marked ``peer@cpu``) in the
same process, medians with warm-up (metalcore.bench.timing: ``torch.mps.synchronize`` around each
call, a 256 MB flush before it). gram_poly's tile shape is swept (the shader's ``GRAM_*`` defines,
recompiled per variant) because gram_poly stays explicit-only on MPS until this says whether half
the FLOPs on scalar FMAs beats MPS's full matrix product.

    python bench/scripts/metal_check.py [--out DIR]                 # on a Mac with MPS (PyTorch >= 2.7)
    python bench/scripts/metal_check.py --device cpu --tiny         # smoke run through the shader executor

Prints a table last and writes metal-check-<device>.json and metal-check-<device>.log to --out
(default $OUT or .). Nothing here has run on Apple hardware yet.
"""

import argparse
import json
import os
import platform
import re
import sys
import traceback

import torch

import metalcore
from metalcore import _metal
from metalcore.bench.timing import GPU_BUDGET, QUICK_BUDGET, Timer, fmt_time
from metalcore.linalg import qr_blocked_metal, svd_large, svd_metal, syrk_metal
from metalcore.linalg.cholesky_solve import cholesky_solve_op
from metalcore.linalg.householder import geqr2_op, householder_product_op, larfb_op, larft_composite, larft_op
from metalcore.linalg.qr import qr_op
from metalcore.linalg.svd import svd_op
from metalcore.linalg.syrk import gram_poly_op
from metalcore.nn.rope import rope_bwd, rope_fwd

# (name, GRAM_BLOCK, GRAM_BLOCK_K, GRAM_SIDE): output tile rows, k step, threads per side (each thread
# holds (BLOCK / SIDE)^2 accumulators). The first is the shader's default.
EPS = torch.finfo(torch.float32).eps
NB_SWEEP = (16, 32, 64)  # blocked QR panel widths; the module default (64, the tile side) last
GRAM_VARIANTS = [("64x16/16", 64, 16, 16), ("32x16/16", 32, 16, 16), ("64x32/16", 64, 32, 16),
                 ("128x8/16", 128, 8, 16)]


def log(state, line):
    print(line, flush=True)
    state["log"].append(line)


def timed(timer, ours, peer, peer_device):
    """Times of ``ours`` (metal backend) and ``peer`` (reference backend on ``peer_device``)."""
    with metalcore.use_backend("metal"):
        ours()
    t = timer.time_all({"metal": lambda: _in_backend("metal", ours), "peer": lambda: _in_backend("reference", peer)})
    return {"metal_s": t["metal"].median_s, "peer_s": t["peer"].median_s, "peer_device": peer_device,
            "speedup": t["peer"].median_s / t["metal"].median_s}


def _in_backend(name, fn):
    with metalcore.use_backend(name):
        return fn()


def peer_on(dev, fn, *args):
    """``fn`` on ``dev`` when torch has it there, else on CPU copies (MPS lacks some linalg)."""
    try:
        with metalcore.use_backend("reference"):
            fn(*args)
        return (lambda: fn(*args)), dev.type
    except (NotImplementedError, RuntimeError):
        cpu = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
        return (lambda: fn(*cpu)), "cpu"


def peer_device(dev, fn):
    """Where the reference runs ``fn``: on ``dev`` when torch has the op there, else on the CPU."""
    try:
        _in_backend("reference", fn)
        return dev.type
    except (NotImplementedError, RuntimeError):
        return "cpu"


def fro(x):
    return x.double().cpu().norm(dim=(-2, -1))


def rel_err(x, x64):
    return ((x.double().cpu() - x64).norm() / x64.norm().clamp_min(1e-300)).item()


def rope_cases(dev, tiny):
    shapes = [(1, 2, 1, 5, 8)] if tiny else [(4, 32, 8, 2048, 128), (4, 32, 32, 2048, 128)]
    for B, Hq, Hk, S, D in shapes:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            # Hugging Face's (B, S, H, D) projection seen heads-first, and a shared (1, S, D) cos/sin.
            q = torch.randn(B, S, Hq, D, device=dev, dtype=dtype).transpose(1, 2)
            k = torch.randn(B, S, Hk, D, device=dev, dtype=dtype).transpose(1, 2)
            ang = torch.rand(1, S, D // 2, device=dev) * 100
            emb = torch.cat((ang, ang), -1)
            cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
            yield f"rope B{B} Hq{Hq} Hk{Hk} S{S} D{D} {str(dtype)[6:]}", (q, k, cos, sin)


def check_rope(state, timer, dev, tiny):
    for name, (q, k, cos, sin) in rope_cases(dev, tiny):
        with metalcore.use_backend("metal"):
            assert rope_fwd.backend_for(q, k, cos, sin) == "metal"
            qo, _ = rope_fwd(q, k, cos, sin)
            dq, _ = rope_bwd(q, k, cos, sin)
        q64, c64, s64 = (t.double().cpu() for t in (q, cos, sin))
        rot = torch.cat((-q64[..., q64.shape[-1] // 2:], q64[..., :q64.shape[-1] // 2]), -1)
        fwd64 = q64 * c64[:, None] + rot * s64[:, None]
        qs = q64 * s64[:, None]
        bwd64 = q64 * c64[:, None] - torch.cat((-qs[..., qs.shape[-1] // 2:], qs[..., :qs.shape[-1] // 2]), -1)
        row = {"case": name, "err_fwd": rel_err(qo, fwd64), "err_bwd": rel_err(dq, bwd64),
               "eps": torch.finfo(q.dtype).eps}
        row["ok"] = max(row["err_fwd"], row["err_bwd"]) <= 2 * row["eps"]
        row.update(timed(timer, lambda: rope_fwd(q, k, cos, sin), lambda: rope_fwd(q, k, cos, sin), dev.type))
        bwd = timed(timer, lambda: rope_bwd(q, k, cos, sin), lambda: rope_bwd(q, k, cos, sin), dev.type)
        row["bwd_metal_s"], row["bwd_peer_s"], row["bwd_speedup"] = bwd["metal_s"], bwd["peer_s"], bwd["speedup"]
        yield row


def use_gram_variant(dev, block, block_k, side):
    """Compile shaders/gram.metal with these tile defines and make the metal backend use it."""
    src = _metal.shader_source("gram")
    for key, value in (("GRAM_BLOCK", block), ("GRAM_BLOCK_K", block_k), ("GRAM_SIDE", side)):
        src = re.sub(rf"^#define {key} \d+$", f"#define {key} {value}", src, flags=re.M)
    lib = torch.mps.compile_shader(src) if dev.type == "mps" else _metal.executor().compile_shader(src)
    _metal._libraries[("gram", dev.type)] = lib
    syrk_metal._tile = lambda: (block, side)


def check_gram(state, timer, dev, tiny):
    shapes = [(2, 37, 50)] if tiny else [(1, 1024, 1024), (8, 1024, 2048), (1, 4096, 4096)]
    dtypes = (torch.bfloat16, torch.float32) if not tiny else (torch.bfloat16,)
    variants = GRAM_VARIANTS[:2] if tiny else GRAM_VARIANTS
    b, c = -4.775, 2.0315
    for batch, m, n in shapes:
        for dtype in dtypes:
            X = (torch.randn(batch, m, n, device=dev) / n ** 0.5).to(dtype)
            with metalcore.use_backend("reference"):
                ref = gram_poly_op(X, b, c)
            G = (X @ X.mT).double().cpu()
            exact = b * G + c * G @ G
            for vname, block, block_k, side in variants:
                use_gram_variant(dev, block, block_k, side)
                with metalcore.use_backend("metal"):
                    out = gram_poly_op(X, b, c)
                row = {"case": f"gram_poly {batch}x{m}x{n} {str(dtype)[6:]} tile {vname}",
                       "err": rel_err(out, exact), "err_torch": rel_err(ref, exact),
                       "symmetric": bool(torch.equal(out, out.mT))}
                row["ok"] = row["symmetric"] and row["err"] <= 2 * row["err_torch"] + torch.finfo(dtype).eps
                row.update(timed(timer, lambda: gram_poly_op(X, b, c), lambda: gram_poly_op(X, b, c), dev.type))
                yield row


def check_householder(state, timer, dev, tiny):
    shapes = [(3, 9, 5)] if tiny else [(1000, 32, 32), (500, 64, 64), (10000, 8, 8), (200, 64, 16)]
    for batch, m, n in shapes:
        A = torch.randn(batch, m, n, device=dev)
        A64 = A.double().cpu()
        with metalcore.use_backend("metal"):
            QR, tau = geqr2_op(A)
            Q = householder_product_op(QR, tau)
            T = larft_op(QR, tau)
            C = torch.randn(batch, m, 16, device=dev)
            X = larfb_op(QR, T, C, True, False)
        eps = torch.finfo(torch.float32).eps
        Q64, R64 = Q.double().cpu(), QR.double().cpu().triu()[..., :n, :]
        eye = torch.eye(n, dtype=torch.float64)
        resid = ((A64 - Q64 @ R64).norm(dim=(-2, -1)) / (A64.norm(dim=(-2, -1)) * m * eps)).max().item()
        orth = ((Q64.mT @ Q64 - eye).norm(dim=(-2, -1)) / (n * eps)).max().item()
        T64 = larft_composite(QR.double().cpu(), tau.double().cpu())
        t_err = ((T.double().cpu() - T64).norm(dim=(-2, -1)) / (T64.norm(dim=(-2, -1)) * m * eps)).max().item()
        X64 = torch.ormqr(QR.double().cpu(), tau.double().cpu(), C.double().cpu())
        x_err = ((X.double().cpu() - X64).norm(dim=(-2, -1)) / (C.double().cpu().norm(dim=(-2, -1)) * m * eps)).max()
        ratios = {"geqr2+householder_product residual": resid, "orthogonality": orth, "larft": t_err,
                  "larfb": x_err.item()}
        for op, args in ((geqr2_op, (A,)), (householder_product_op, (QR, tau)), (larft_op, (QR, tau)),
                         (larfb_op, (QR, T, C, True, False))):
            peer, where = peer_on(dev, op, *args)
            row = {"case": f"{op.name} {batch}x{m}x{n}", "lapack_ratios": ratios,
                   "ok": max(ratios.values()) <= 30}
            row.update(timed(timer, lambda op=op, args=args: op(*args), peer, where))
            yield row


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
        row = {"case": f"cholesky_solve {b}x{n}x{n} k={k}", "lapack_ratios": {"solve": ratio}, "ok": ratio <= 30}
        row.update(timed(timer, lambda: cholesky_solve_op(B, L, False), lambda: cholesky_solve_op(Bp, Lp, False),
                         where))
        yield row


def qr_ratios(A, Q, R):
    A64, Q64, R64 = A.double().cpu(), Q.double().cpu(), R.double().cpu()
    m, n = A.shape[-2:]
    eye = torch.eye(Q.shape[-1], dtype=torch.float64)
    return {"residual": (fro(A64 - Q64 @ R64) / (fro(A64) * max(m, n) * EPS)).max().item(),
            "orthogonality": (fro(Q64.mT @ Q64 - eye) / (max(m, n) * EPS)).max().item()}


def check_qr_large(state, timer, dev, tiny):
    shapes = [(1, 80, 40)] if tiny else [(1, 1024, 1024), (1, 2048, 2048), (1, 4096, 1024), (8, 512, 512)]
    sweep = (8, 16) if tiny else NB_SWEEP
    for b, m, n in shapes:
        A = torch.randn(b, m, n, device=dev)
        if _in_backend("metal", lambda: qr_op.backend_for(A, "reduced")) != "metal":
            log(state, f"qr {b}x{m}x{n}: the metal backend does not take it here")
            continue
        where = peer_device(dev, lambda: qr_op(A, "reduced"))
        Ap = A if where == dev.type else A.cpu()
        for nb in sweep:
            qr_blocked_metal.NB = nb
            Q, R = _in_backend("metal", lambda: qr_op(A, "reduced"))
            ratios = qr_ratios(A, Q, R)
            row = {"case": f"qr {b}x{m}x{n} NB={nb}", "lapack_ratios": ratios, "ok": max(ratios.values()) <= 30}
            row.update(timed(timer, lambda: qr_op(A, "reduced"), lambda: qr_op(Ap, "reduced"), where))
            yield row
    qr_blocked_metal.NB = NB_SWEEP[-1]


def check_svd_large(state, timer, dev, tiny):
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
        row = {"case": f"svd {b}x{m}x{n}", "lapack_ratios": ratios, "ok": max(ratios.values()) <= 30}
        row.update(timed(timer, lambda: svd_op(A, False, True), lambda: svd_op(Ap, False, True), where))
        yield row


def check_eigh_twostage(state, timer, dev, tiny):
    """The two-stage eigh path (forced: it is not automatic on Metal) against the reference, random
    symmetric float32 input; the time decides whether a measured table should pick it."""
    from metalcore import _selection
    from metalcore.linalg.eigh import eigh_op
    shapes = [(2, 70)] if tiny else [(64, 128), (64, 256), (16, 512), (8, 1024)]
    for b, n in shapes:
        X = torch.randn(b, n, n, device=dev)
        A = X + X.mT
        where = peer_device(dev, lambda: eigh_op(A, "L", True))
        Ap = A if where == dev.type else A.cpu()

        def ours():
            with _selection.use_path("eigh", "twostage"):
                return eigh_op(A, "L", True)

        L, Q = _in_backend("metal", ours)
        A64, L64, Q64 = A.double().cpu(), L.double().cpu(), Q.double().cpu()
        scale = fro(A64)
        eye = torch.eye(n, dtype=torch.float64)
        ratios = {"residual": (fro(A64 @ Q64 - Q64 * L64.unsqueeze(-2)) / (scale * n * EPS)).max().item(),
                  "orthogonality": (fro(Q64.mT @ Q64 - eye) / (n * EPS)).max().item(),
                  "values": ((L64 - torch.linalg.eigvalsh(A64)).abs().amax(-1) / (scale * n * EPS)).max().item()}
        row = {"case": f"eigh twostage {b}x{n}x{n}", "lapack_ratios": ratios, "ok": max(ratios.values()) <= 30}
        row.update(timed(timer, ours, lambda: eigh_op(Ap, "L", True), where))
        yield row


SECTIONS = {"rope": check_rope, "gram_poly": check_gram, "householder": check_householder,
            "cholesky_solve": check_cholesky_solve, "qr_large": check_qr_large, "svd_large": check_svd_large,
            "eigh_twostage": check_eigh_twostage}


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
    base = os.path.join(args.out, f"metal-check-{args.device}")
    for section in args.sections.split(","):
        try:
            for row in SECTIONS[section](state, timer, dev, args.tiny):
                row["section"] = section
                state["rows"].append(row)
                worst = f"ratio {max(row['lapack_ratios'].values()):6.2f} " if "lapack_ratios" in row else ""
                log(state, f"{row['case']:<46} metal {fmt_time(row['metal_s']):>9}  peer@{row['peer_device']} "
                           f"{fmt_time(row['peer_s']):>9}  x{row['speedup']:.2f}  {worst}{'ok' if row['ok'] else 'FAIL'}")
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
