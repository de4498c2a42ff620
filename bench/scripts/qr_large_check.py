"""One device call for the blocked Householder QR (metalcore/linalg/qr_blocked.py) and the GEMM
larft/larfb (metalcore/linalg/householder_gemm.py), fp32, against torch in the same process.

    python bench/scripts/qr_large_check.py [--out DIR]            # CUDA, ~2 minutes on an H100
    TRITON_INTERPRET=1 python bench/scripts/qr_large_check.py --device cpu --tiny   # smoke run
    python bench/scripts/qr_large_check.py --batched [--out DIR]  # batches, tall panels (below)
    TRITON_INTERPRET=1 python bench/scripts/qr_large_check.py --batched --device cpu --tiny

For each shape (4096², 11008×4096, 8×1024², 2048², reduced mode):
* LAPACK ratios ‖A − QR‖_F/(‖A‖_F·max(m,n)·ε) and ‖QᵀQ − I‖_F/(n·ε) of every variant on a random
  matrix, and of the default variant on an ill-conditioned (cond 1e6) and a rank-deficient one;
* median time (CUDA events) of ``torch.linalg.qr`` and of the blocked QR for each panel width ``nb``
  and panel variant, plus ``metalcore.linalg.qr`` under ``use_backend("triton")`` (the routed path);
* where the time goes: each variant's R alone (no Q) and its panel factorizations alone;
* the floor: the Householder flops, ``2mn² − 2n³/3`` for R and the same again for Q (per matrix),
  at the fp32 GEMM rate measured here, square (4096³) and as the blocked algorithm uses it (a rank-nb
  update of a 4096² block).
Then larft and larfb (GEMM compositions) against the reference composites for k = 32, 64, 128.

Writes qr-large-<card>.json and qr-large-<card>.log to --out (default $OUT or .) and prints a table.
TF32 follows torch.backends.cuda.matmul.allow_tf32 (printed; off unless set by the caller).

``--batched`` (instead of the above; ~2 minutes on an H100): batches of mid-size matrices, where the
blocked QR's panels go to the tall-panel kernel (metalcore/linalg/qr_panel_triton.py) — 64×256²,
16×512², 8×1024², 62×768², 12×2304², 24×3072² (SOAP's refresh at GPT-2 small) and a single 4096², fp32
(64×256² and 8×1024² in fp64 too). Per shape, interleaved in one Timer run (wall time per synchronised
call and GPU time with host issue hidden, medians): ``torch.linalg.qr``; the blocked QR with 'auto'
panels at nb = 32 and 64 (tall panels for a batch, geqrf for one matrix; for 4096² also tall panels
forced, and geqrf at nb = 128, today's single-matrix path); TSQR panels at nb = 32 eager and as the
``tsqr`` path (CUDA graph); ``metalcore.linalg.qr`` as routed
(automatic selection: on a card with a measured table, the table decides). LAPACK ratios of each on
the random matrix, and of the routed call on a cond-1e6 one. Where the time goes: the blocked QR's R
alone and its panels alone (call_ms). A tile sweep of the tall kernel (elements × warps) at 64×256²
and 24×3072². Writes qr-batched-<card>.json/.log.
"""

import argparse
import json
import os

import torch

import metalcore
from metalcore.bench.timing import Budget, Timer, call_ms
from metalcore.linalg import qr_blocked
from metalcore.linalg.qr import qr_op
from metalcore.linalg.householder import _unit_lower, larfb_composite, larft_composite
from metalcore.linalg.householder_gemm import larfb_gemm, larft_gemm

SHAPES = [((), 4096, 4096), ((), 11008, 4096), ((8,), 1024, 1024), ((), 2048, 2048)]
TINY_SHAPES = [((), 40, 24), ((2,), 33, 33)]
# --batched: (batch, n, dtype); n x n matrices.
BATCHED = [((64,), 256, torch.float32), ((16,), 512, torch.float32), ((8,), 1024, torch.float32),
           ((62,), 768, torch.float32), ((12,), 2304, torch.float32), ((24,), 3072, torch.float32),
           ((), 4096, torch.float32), ((64,), 256, torch.float64), ((8,), 1024, torch.float64)]
TINY_BATCHED = [((3,), 40, torch.float32), ((), 40, torch.float32), ((2,), 36, torch.float64)]
# Tall-kernel tiles swept at nb = 64: (TILE_ELEMENTS for fp32, MAX_WARPS).
TILE_SWEEP = [(4096, 4), (8192, 8), (16384, 8), (16384, 16)]
TILE_SWEEP_SHAPES = [((64,), 256), ((24,), 3072)]
BATCHED_BUDGET = Budget(warmup_s=0.05, measure_s=0.3, min_reps=3, max_reps=20)


def timed(fn, device, reps):
    return call_ms(fn, device, reps=reps)


def gemm_rates(device, n, nb):
    """fp32 GEMM rate in flop/s: square n³, and the blocked QR's shape (rank-nb update of n × n)."""
    g = torch.Generator(device=device).manual_seed(1)
    A, B = (torch.randn(n, n, device=device, generator=g) for _ in range(2))
    V, W = torch.randn(n, nb, device=device, generator=g), torch.randn(nb, n, device=device, generator=g)
    square = 2 * n ** 3 / (timed(lambda: A @ B, device, 5) / 1e3)
    update = 2 * n * n * nb / (timed(lambda: A.addmm_(V, W, alpha=-1), device, 5) / 1e3)
    return square, update


def qr_flops(batch, m, n):
    """Householder QR flops, R and the reduced Q (LAPACK's geqrf + orgqr counts), all matrices."""
    b = 1
    for d in batch:
        b *= d
    k, big = min(m, n), max(m, n)
    one = 2 * big * k * k - 2 * k ** 3 / 3
    return 2 * one * b


def panels_only(A3, nb, panel):
    """The panel factorizations of a blocked QR of ``A3`` on random panels of the same shapes."""
    B, m, n = A3.shape
    k = min(m, n)
    panels = [torch.randn(B, m - j, min(nb, k - j), device=A3.device) for j in range(0, k, nb)]
    return lambda: [qr_blocked.factor_panel(P.clone(), panel) for P in panels]


def ratios(A, Q, R):
    eps = torch.finfo(A.dtype).eps
    m, n = A.shape[-2:]
    A64 = A.double()
    res = torch.linalg.matrix_norm(A64 - Q.double() @ R.double()) / (
        torch.linalg.matrix_norm(A64).clamp_min(1e-300) * max(m, n) * eps)
    k = Q.shape[-1]
    orth = torch.linalg.matrix_norm(Q.double().mT @ Q.double() - torch.eye(k, dtype=torch.float64, device=A.device)) / (
        k * eps)
    return res.max().item(), orth.max().item()


def hard(kind, batch, m, n, device, g):
    """cond-1e6 ('ill') or rank-n/2 ('rank') matrix, built from orthonormal factors."""
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(*batch, m, k, device=device, generator=g))[0]
    V = torch.linalg.qr(torch.randn(*batch, n, k, device=device, generator=g))[0]
    i = torch.arange(k, device=device, dtype=torch.float32)
    s = 1e6 ** (-i / max(k - 1, 1)) if kind == "ill" else torch.where(i < k // 2, 1.0, 0.0)
    return (U * s) @ V.mT


def _label(batch, n, dtype):
    return "x".join(map(str, (*batch, n, n))) + ("" if dtype == torch.float32 else "-f64")


def _forced_small(tiny):
    """In --tiny runs, panels beyond 16 rows leave the register kernel, so that the smoke run reaches
    the tall kernel at interpreter sizes (routing through metalcore.linalg.qr too)."""
    if not tiny:
        return
    from metalcore.linalg import qr_triton

    qr_triton.SMALL_MAX = 16
    qr_triton.BATCHED_NB_SMALL = qr_triton.BATCHED_NB_LARGE = 8
    qr_blocked.PANEL_KERNEL_MAX = 16


def _on_triton(fn, *args):
    with metalcore.use_backend("triton"):
        return fn(*args)


def _tsqr_path(A):
    from metalcore import _selection

    with _selection.use_path("qr", "tsqr"):
        return _on_triton(metalcore.linalg.qr, A)


def batched_main(args, device, card, stem, say):
    """The --batched set (module docstring)."""
    from metalcore.linalg import qr_panel_triton

    _forced_small(args.tiny)
    shapes = TINY_BATCHED if args.tiny else BATCHED
    nbs = [int(x) for x in (args.nbs or ("8,16" if args.tiny else "32,64")).split(",")]
    timer = Timer(device, BATCHED_BUDGET)
    g = torch.Generator(device=device).manual_seed(0)
    result = {"card": card, "torch": torch.__version__, "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
              "tile_elements": {str(k): v for k, v in qr_panel_triton.TILE_ELEMENTS.items()},
              "max_warps": qr_panel_triton.MAX_WARPS, "tall_min_batch": qr_blocked.TALL_MIN_BATCH,
              "shapes": [], "tile_sweep": []}
    for batch, n, dtype in shapes:
        label = _label(batch, n, dtype)
        A = torch.randn(*batch, n, n, device=device, generator=g, dtype=dtype)
        A3 = A.reshape(-1, n, n)
        fns = {"torch": lambda: torch.linalg.qr(A), "routed": lambda: metalcore.linalg.qr(A),
               "triton op": lambda: _on_triton(metalcore.linalg.qr, A)}
        for nb in nbs:
            fns[f"auto nb={nb}"] = lambda nb=nb: qr_blocked.qr_blocked(A, "reduced", nb, "auto")
            if A3.shape[0] == 1:
                fns[f"tall nb={nb}"] = lambda nb=nb: qr_blocked.qr_blocked(A, "reduced", nb, "tall")
        if A3.shape[0] == 1:
            fns["geqrf nb=128"] = lambda: qr_blocked.qr_blocked(A, "reduced", 8 if args.tiny else 128, "geqrf")
        # TSQR panels (qr_tsqr_triton): eager, and the 'tsqr' path (its CUDA graph replayed).
        fns["tsqr nb=32"] = lambda: qr_blocked.qr_blocked(A, "reduced", 8 if args.tiny else 32, "tsqr")
        fns["tsqr path"] = lambda: _tsqr_path(A)
        row = {"shape": label, "flops": qr_flops(batch, n, n),
               "routed_backend": qr_op.backend_for(A, "reduced"), "variants": {}}
        for name, fn in fns.items():
            try:
                row["variants"][name] = {"ratios": ratios(A, *fn())}
            except Exception as exc:  # a failing variant is a result to report, not a stop
                row["variants"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        ok = {name: fn for name, fn in fns.items() if "error" not in row["variants"][name]}
        for name, t in timer.time_all(ok, called=True).items():
            row["variants"][name].update(wall_ms=t.wall_s * 1e3, gpu_ms=t.median_s * 1e3,
                                         host_ms=None if t.host_s is None else t.host_s * 1e3)
        H = hard("ill", batch, n, n, device, g).to(dtype)
        row["routed_ratios_ill"] = ratios(H, *metalcore.linalg.qr(H))
        # Where the time goes, for each nb: R alone (no Q), and the panels with their block reflectors.
        for nb in nbs:
            v = row["variants"].get(f"auto nb={nb}", {})
            if "error" in v:
                continue
            v["r_only_ms"] = call_ms(lambda nb=nb: qr_blocked.geqrf_blocked(A3, nb, "auto"), device, reps=args.reps)
            panels = [torch.randn(A3.shape[0], n - j, min(nb, n - j), device=device, dtype=dtype, generator=g)
                      for j in range(0, n, nb)]
            v["panels_ms"] = call_ms(lambda: [qr_blocked.factor_block(P.clone(), "auto") for P in panels], device,
                                     reps=args.reps)
        result["shapes"].append(row)
        say(json.dumps(row))
        del A, A3, H

    sweep = [((2,), 40)] if args.tiny else TILE_SWEEP_SHAPES
    default = (qr_panel_triton.TILE_ELEMENTS, qr_panel_triton.MAX_WARPS)
    for batch, n in sweep:
        A = torch.randn(*batch, n, n, device=device, generator=g)
        nb = 8 if args.tiny else 64
        fns = {}
        for tile, warps in TILE_SWEEP:
            def run(tile=tile, warps=warps):
                qr_panel_triton.TILE_ELEMENTS = {torch.float32: tile, torch.float64: tile // 2}
                qr_panel_triton.MAX_WARPS = warps
                try:
                    return qr_blocked.qr_blocked(A, "reduced", nb, "tall")
                finally:
                    qr_panel_triton.TILE_ELEMENTS, qr_panel_triton.MAX_WARPS = default
            fns[f"tile={tile} warps={warps}"] = run
        for name, t in timer.time_all(fns).items():
            result["tile_sweep"].append({"shape": _label(batch, n, torch.float32), "nb": nb, "config": name,
                                         "wall_ms": t.wall_s * 1e3, "gpu_ms": t.median_s * 1e3})
        del A

    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    say("\nqr reduced, batched: wall ms per synchronised call / GPU ms (host hidden); x = torch wall / wall; "
        "LAPACK ratios residual/orthogonality")
    for r in result["shapes"]:
        tw = r["variants"]["torch"].get("wall_ms")
        say(f"{r['shape']}  ({r['flops'] / 1e9:.0f} GFLOP; routed to {r['routed_backend']}; "
            f"routed on cond 1e6: {r['routed_ratios_ill'][0]:.2f}/{r['routed_ratios_ill'][1]:.2f})")
        for name, v in r["variants"].items():
            if "error" in v:
                say(f"    {name:>14s}  ERROR {v['error'][:100]}")
                continue
            where = (f"  R only {v['r_only_ms']:.2f}, panels {v['panels_ms']:.2f}" if "r_only_ms" in v else "")
            say(f"    {name:>14s} {v['wall_ms']:9.2f} / {v['gpu_ms']:9.2f}  x{tw / v['wall_ms']:6.2f}  "
                f"({v['ratios'][0]:.2f}/{v['ratios'][1]:.2f}){where}")
    say("\ntall-kernel tile sweep (blocked QR, tall panels): wall / GPU ms")
    for t in result["tile_sweep"]:
        say(f"    {t['shape']:>12s} nb={t['nb']:<3d} {t['config']:>22s} {t['wall_ms']:9.2f} / {t['gpu_ms']:9.2f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="small shapes and panel widths (CPU smoke run)")
    ap.add_argument("--nbs", default=None, help="panel widths to sweep (default 32,64,128; tiny: 8,16)")
    ap.add_argument("--panels", default="geqrf,recursive")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batched", action="store_true", help="the batched set with tall panels (module docstring)")
    args = ap.parse_args()
    device = torch.device(args.device)
    shapes = TINY_SHAPES if args.tiny else SHAPES
    nbs = [int(x) for x in (args.nbs or ("8,16" if args.tiny else "32,64,128")).split(",")]
    panels = args.panels.split(",")
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    tf32 = torch.backends.cuda.matmul.allow_tf32
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, ("qr-batched-" if args.batched else "qr-large-") + card.replace(" ", "-").replace("/", "-"))
    log = open(stem + ".log", "w")

    def say(line):
        print(line, flush=True)
        log.write(line + "\n")

    if args.batched:
        batched_main(args, device, card, stem, say)
        log.close()
        return
    gemm_n, gemm_nb = (64, 8) if args.tiny else (4096, 64)
    square_rate, update_rate = gemm_rates(device, gemm_n, gemm_nb)
    result = {"card": card, "torch": torch.__version__, "allow_tf32": tf32, "gemm_square_tflops": square_rate / 1e12,
              "gemm_rank_nb_update_tflops": update_rate / 1e12, "qr": [], "larft_larfb": []}
    say(f"{card}  torch {torch.__version__}  allow_tf32={tf32}  fp32 GEMM {square_rate / 1e12:.1f} TFLOP/s "
        f"square {gemm_n}³, {update_rate / 1e12:.1f} TFLOP/s rank-{gemm_nb} update")

    g = torch.Generator(device=device).manual_seed(0)
    for batch, m, n in shapes:
        A = torch.randn(*batch, m, n, device=device, generator=g)
        A3 = A.reshape(-1, m, n)
        flops = qr_flops(batch, m, n)
        shape = "x".join(map(str, (*batch, m, n)))
        row = {"shape": shape, "flops": flops, "floor_square_ms": 1e3 * flops / square_rate,
               "floor_update_ms": 1e3 * flops / update_rate}
        row["torch_ms"] = timed(lambda: torch.linalg.qr(A), device, args.reps)
        row["torch_ratios"] = ratios(A, *torch.linalg.qr(A))
        with metalcore.use_backend("triton"):
            row["routed_ms"] = timed(lambda: metalcore.linalg.qr(A), device, args.reps)
            row["routed_ratios"] = ratios(A, *metalcore.linalg.qr(A))
            for kind in ("ill", "rank"):
                H = hard(kind, batch, m, n, device, g)
                row[f"routed_ratios_{kind}"] = ratios(H, *metalcore.linalg.qr(H))
        row["variants"] = []
        for panel in panels:
            for nb in nbs:
                v = {"panel": panel, "nb": nb}
                try:
                    v["ms"] = timed(lambda: qr_blocked.qr_blocked(A, "reduced", nb, panel), device, args.reps)
                    v["ratios"] = ratios(A, *qr_blocked.qr_blocked(A, "reduced", nb, panel))
                    # Where the time goes: R alone (no Q), and the panel factorizations alone.
                    v["r_only_ms"] = timed(lambda: qr_blocked.geqrf_blocked(A3, nb, panel), device, args.reps)
                    v["panels_ms"] = timed(panels_only(A3, nb, panel), device, args.reps)
                except Exception as exc:  # a failing variant is a result to report, not a stop
                    v["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                row["variants"].append(v)
        result["qr"].append(row)
        say(json.dumps(row))
        del A, A3

    for m in ((40,) if args.tiny else (4096, 11008)):
        for k in ((8,) if args.tiny else (32, 64, 128)):
            V, tau = torch.geqrf(torch.randn(m, k, device=device, generator=g))
            C = torch.randn(m, (24 if args.tiny else 4096) - k, device=device, generator=g)
            V3, tau3, C3 = V[None], tau[None], C[None]
            T = larft_composite(V3, tau3)
            row = {"m": m, "k": k, "p": C.shape[1],
                   "larft_ms": timed(lambda: larft_gemm(_unit_lower(V3), tau3), device, 10),
                   "larft_ref_ms": timed(lambda: larft_composite(V3, tau3), device, 10),
                   "larft_maxdiff": (larft_gemm(_unit_lower(V3), tau3) - T).abs().max().item(),
                   "larfb_ms": timed(lambda: larfb_gemm(_unit_lower(V3), T, C3, True, True), device, 10),
                   "larfb_ref_ms": timed(lambda: larfb_composite(V3, T, C3, True, True), device, 10)}
            result["larft_larfb"].append(row)
            say(json.dumps(row))

    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    say("\nqr fp32 reduced: ms (LAPACK ratios residual/orthogonality); floor = Householder flops at the "
        "square / rank-nb-update GEMM rate")
    say(f"{'shape':>16s} {'torch':>16s} {'routed':>16s} {'floor sq/upd':>14s}  {'ill, rank (routed)':>22s}")
    for r in result["qr"]:
        fmt = lambda ms, rt: f"{ms:7.2f} ({rt[0]:.1f}/{rt[1]:.1f})"  # noqa: E731
        say(f"{r['shape']:>16s} {fmt(r['torch_ms'], r['torch_ratios']):>16s} {fmt(r['routed_ms'], r['routed_ratios']):>16s} "
            f"{r['floor_square_ms']:6.2f}/{r['floor_update_ms']:<6.2f}  "
            f"{r['routed_ratios_ill'][0]:.1f}/{r['routed_ratios_ill'][1]:.1f}, "
            f"{r['routed_ratios_rank'][0]:.1f}/{r['routed_ratios_rank'][1]:.1f}")
        for v in r["variants"]:
            if "error" in v:
                say(f"{'':>16s}   {v['panel']:>9s} nb={v['nb']:<4d} ERROR {v['error'][:80]}")
            else:
                say(f"{'':>16s}   {v['panel']:>9s} nb={v['nb']:<4d} {fmt(v['ms'], v['ratios'])}  "
                    f"x{r['torch_ms'] / v['ms']:.2f} torch; R only {v['r_only_ms']:.2f}, panels {v['panels_ms']:.2f}")
    say(f"\n{'larft/larfb m x k (C p cols)':>30s} {'larft':>8s} {'ref':>8s} {'larfb':>8s} {'ref':>8s}")
    for r in result["larft_larfb"]:
        say(f"{r['m']:>20d} x {r['k']:<3d} ({r['p']:5d}) {r['larft_ms']:8.3f} {r['larft_ref_ms']:8.3f} "
            f"{r['larfb_ms']:8.3f} {r['larfb_ref_ms']:8.3f}")
    log.close()


if __name__ == "__main__":
    main()
