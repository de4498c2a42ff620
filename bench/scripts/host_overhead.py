"""Host time per eager call of metalcore's ops against torch's own call, and where it goes.

    python bench/scripts/host_overhead.py [--device cuda] [--out host.json] [--profile] [--quick]
                                          [--cases SUBSTRING ...] [--threads N] [--timer wall|thread]
                                          [--budget]

For each op at a tiny size (issue 16's list: rms_norm 1×4096, fused_add_rms_norm, swiglu, gelu,
silu, rotary embedding at one token, cholesky/cholesky_solve/solve/solve_triangular/qr/eigh/
eigvalsh/svd/svdvals at 1×3×3 and 1×16×16, AdamW over 200 small tensors, and the training ops'
forward + backward), wall time per call of back-to-back calls (one synchronize per block, so on a
GPU the figure is host time whenever the kernel is shorter than the launch), medians over
interleaved rounds, torch's call in the same round. ``over`` is metalcore's time minus torch's.

``path`` says what served metalcore's call: a backend's name when one of metalcore's ops ran, or
``torch`` when the public function handed the call to torch's own op (automatic selection chose the
reference; after its first call a signature takes the torch route of metalcore/_route.py, so
``over`` is that route's whole cost). On a shared CPU, ``--timer thread --threads 1`` counts this
thread's CPU time only, with torch on one thread: time the process spends descheduled by other jobs
is not counted (wall time, the default, is what a user's loop sees; CUDA always uses it).

The layers of one call that runs metalcore's op are timed apart (µs per call):

* ``public``   — the public function (argument checks, reshapes, then the op);
* ``op``       — the registered op called with the arguments the public function passes it
  (the dispatcher: plan lookup, autograd wrapping where inputs require grad, the result check);
* ``backend``  — the implementation the plan chose, called directly (a Triton launcher or the
  reference, i.e. torch's own op behind metalcore's reference function);

* ``via run()`` — on CUDA, the backend again with Triton's own ``JITFunction.run`` launch instead of
  metalcore's direct launch (:mod:`metalcore._triton`), for the launch path's share;

so ``public − op`` is the wrapper's cost, ``op − backend`` the dispatcher's. ``--budget`` times the
torch route's pieces alone (guards, key, lookup; docs/op_core.md). With ``--check`` (on
by default for CUDA) the run also verifies that an eigh batch of 65536 16×16 matrices (which torch's
own call rejects on the H100) is split and solved, and that direct launches give the same results as
``JITFunction.run``, and prints the result of each check.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import platform
import pstats
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import metalcore
from metalcore._op import observe_backends
from metalcore.linalg.cholesky import cholesky_ex_op
from metalcore.linalg.cholesky_solve import cholesky_solve_op
from metalcore.linalg.eigh import eigh_op
from metalcore.linalg.qr import qr_op
from metalcore.linalg.solve import solve_ex_op
from metalcore.linalg.svd import svd_op
from metalcore.linalg.triangular import solve_triangular_op
from metalcore.nn.activations import gelu_fwd, silu_fwd
from metalcore.nn.rms_norm import fused_add_rms_norm_fwd, rms_norm_fwd
from metalcore.nn.rope import rope_fwd
from metalcore.nn.swiglu import swiglu_fwd
from metalcore.optim import MetalAdamW


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _block_us(fn: Callable[[], object], device: torch.device, calls: int,
              clock: Callable[[], float] = time.perf_counter) -> float:
    _sync(device)
    t = clock()
    for _ in range(calls):
        fn()
    _sync(device)
    return (clock() - t) / calls * 1e6


def measure(variants: dict[str, Callable[[], object]], device: torch.device, calls: int,
            rounds: int, stat: str = "median", clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """µs per call of each variant (median or min over rounds); the variants alternate within each
    round, so that a noisy neighbour or a clock change hits all of them alike."""
    for fn in variants.values():
        for _ in range(max(3, calls // 10)):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            samples[name].append(_block_us(fn, device, calls, clock))
    reduce = statistics.median if stat == "median" else min
    return {name: reduce(s) for name, s in samples.items()}


def _no_grad(fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return fn()
    return run


def _through_run(fn: Callable[..., object]) -> Callable[..., object]:
    """``fn`` with compiled Triton kernels launched by ``JITFunction.run`` (no direct launch)."""
    from metalcore import _triton

    def call(*args):
        _triton.FAST_LAUNCH = False
        try:
            return fn(*args)
        finally:
            _triton.FAST_LAUNCH = True
    return call


def _layers(op, args) -> dict[str, Callable[[], object]]:
    """The ``op`` and ``backend`` layers of one call of ``op`` with ``args`` (and, when a Triton
    kernel serves it on CUDA, the backend launched through ``JITFunction.run``)."""
    if not hasattr(op, "_plan"):   # a metalcore from before plans: the whole call only
        return {}
    plan = op._plan(args)
    fn = plan.fn
    layers = {"op": lambda: op(*args), "backend": lambda: fn(*args)}
    if plan.backend == "triton" and args[0].is_cuda and _fast_launch():
        slow = _through_run(fn)
        layers["via run()"] = lambda: slow(*args)
    return layers


def _fast_launch() -> bool:
    try:
        from metalcore import _triton
    except ImportError:
        return False
    return _triton.FAST_LAUNCH


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def cases(device: torch.device, quick: bool) -> dict[str, dict[str, Callable[[], object]]]:
    """name -> {"metalcore": public call, "torch": peer, "op"/"backend": layers where they apply}."""
    out: dict[str, dict[str, Callable[[], object]]] = {}
    low = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(1, 4096, device=device, dtype=low)
    w = torch.ones(4096, device=device, dtype=low)
    res = torch.randn_like(x)
    out["rms_norm 1x4096"] = {
        "metalcore": lambda: metalcore.rms_norm(x, (4096,), w, 1e-6),
        "torch": lambda: F.rms_norm(x, (4096,), w, 1e-6),
        **_layers(rms_norm_fwd, (x, w, 1e-6, 0.0))}
    out["fused_add_rms_norm 1x4096"] = {
        "metalcore": lambda: metalcore.fused_add_rms_norm(x, res, w, 1e-6),
        "torch": lambda: F.rms_norm(x + res, (4096,), w, 1e-6),
        **_layers(fused_add_rms_norm_fwd, (x, res, w, 1e-6, 0.0))}
    g, u = torch.randn(1, 11008, device=device, dtype=low), torch.randn(1, 11008, device=device, dtype=low)
    out["swiglu 1x11008"] = {
        "metalcore": lambda: metalcore.swiglu(g, u), "torch": lambda: F.silu(g) * u,
        **_layers(swiglu_fwd, (g, u))}
    out["gelu 1x4096"] = {
        "metalcore": lambda: metalcore.metal_gelu(x), "torch": lambda: F.gelu(x),
        **_layers(gelu_fwd, (x, "none"))}
    out["silu 1x4096"] = {
        "metalcore": lambda: metalcore.metal_silu(x), "torch": lambda: F.silu(x),
        **_layers(silu_fwd, (x,))}
    q = torch.randn(1, 32, 1, 128, device=device, dtype=low)
    k = torch.randn(1, 8, 1, 128, device=device, dtype=low)
    cos, sin = torch.randn(1, 1, 128, device=device, dtype=low), torch.randn(1, 1, 128, device=device, dtype=low)
    out["rope 1 token 32/8 heads"] = {
        "metalcore": lambda: metalcore.apply_rotary_pos_emb(q, k, cos, sin),
        "torch": lambda: (q * cos.unsqueeze(1) + _rotate_half(q) * sin.unsqueeze(1),
                          k * cos.unsqueeze(1) + _rotate_half(k) * sin.unsqueeze(1)),
        **_layers(rope_fwd, (q, k, cos, sin))}
    for n in (3, 16):
        M = torch.randn(1, n, n, device=device)
        A = M @ M.mT + n * torch.eye(n, device=device)
        L = torch.linalg.cholesky(A)
        B = torch.randn(1, n, 2, device=device)
        out[f"cholesky 1x{n}x{n}"] = {
            "metalcore": lambda A=A: metalcore.linalg.cholesky(A), "torch": lambda A=A: torch.linalg.cholesky(A),
            **_layers(cholesky_ex_op, (A, False, True))}
        out[f"solve 1x{n}x{n}"] = {
            "metalcore": lambda A=A, B=B: metalcore.linalg.solve(A, B),
            "torch": lambda A=A, B=B: torch.linalg.solve(A, B),
            **_layers(solve_ex_op, (A, B, True, True))}
        out[f"solve_triangular 1x{n}x{n}"] = {
            "metalcore": lambda L=L, B=B: metalcore.linalg.solve_triangular(L, B, upper=False),
            "torch": lambda L=L, B=B: torch.linalg.solve_triangular(L, B, upper=False),
            **_layers(solve_triangular_op, (L, B, False, True, False))}
        out[f"cholesky_solve 1x{n}x{n}"] = {
            "metalcore": lambda L=L, B=B: metalcore.linalg.cholesky_solve(B, L),
            "torch": lambda L=L, B=B: torch.cholesky_solve(B, L),
            **_layers(cholesky_solve_op, (B, L, False))}
        out[f"qr 1x{n}x{n}"] = {
            "metalcore": lambda M=M: metalcore.linalg.qr(M), "torch": lambda M=M: torch.linalg.qr(M),
            **_layers(qr_op, (M, "reduced"))}
        out[f"eigh 1x{n}x{n}"] = {
            "metalcore": lambda A=A: metalcore.linalg.eigh(A), "torch": lambda A=A: torch.linalg.eigh(A),
            **_layers(eigh_op, (A, "L", True))}
        out[f"eigvalsh 1x{n}x{n}"] = {
            "metalcore": lambda A=A: metalcore.linalg.eigvalsh(A), "torch": lambda A=A: torch.linalg.eigvalsh(A),
            **_layers(eigh_op, (A, "L", False))}
        out[f"svd 1x{n}x{n}"] = {
            "metalcore": lambda M=M: metalcore.linalg.svd(M, full_matrices=False),
            "torch": lambda M=M: torch.linalg.svd(M, full_matrices=False),
            **_layers(svd_op, (M, False, True))}
        out[f"svdvals 1x{n}x{n}"] = {
            "metalcore": lambda M=M: metalcore.linalg.svdvals(M), "torch": lambda M=M: torch.linalg.svdvals(M),
            **_layers(svd_op, (M, False, False))}
    for name in out:
        out[name] = {key: _no_grad(fn) for key, fn in out[name].items()}

    # Training: forward + backward with inputs that require grad (the autograd Function's cost).
    xg = torch.randn(8, 4096, device=device, dtype=low, requires_grad=True)
    wg = torch.ones(4096, device=device, dtype=low, requires_grad=True)
    dy = torch.randn(8, 4096, device=device, dtype=low)
    out["rms_norm fwd+bwd 8x4096"] = {
        "metalcore": lambda: metalcore.rms_norm(xg, (4096,), wg, 1e-6).backward(dy),
        "torch": lambda: F.rms_norm(xg, (4096,), wg, 1e-6).backward(dy)}
    gg = torch.randn(8, 4096, device=device, dtype=low, requires_grad=True)
    ug = torch.randn(8, 4096, device=device, dtype=low, requires_grad=True)
    out["swiglu fwd+bwd 8x4096"] = {
        "metalcore": lambda: metalcore.swiglu(gg, ug).backward(dy),
        "torch": lambda: (F.silu(gg) * ug).backward(dy)}
    if not quick:
        params = [torch.randn(64, 64, device=device, requires_grad=True) for _ in range(200)]
        for p in params:
            p.grad = torch.randn_like(p)
        ours = MetalAdamW(params, lr=1e-3)
        fused = device.type == "cuda"
        theirs = torch.optim.AdamW(params, lr=1e-3, fused=fused or None, foreach=None if fused else True)
        out["adamw step 200x64x64"] = {"metalcore": ours.step, "torch": theirs.step}
    return out


def check_direct_launch(device: torch.device) -> dict[str, str]:
    """Kernels launched directly give bit-identical results to kernels launched by JITFunction.run."""
    if not _fast_launch():
        return {"direct launch": "not used (Triton is not 3.6)"}
    A = torch.randn(64, 8, 8, device=device)
    A = A @ A.mT + 8 * torch.eye(8, device=device)
    L = torch.linalg.cholesky(A)
    B = torch.randn(64, 8, 3, device=device)
    x, w = torch.randn(4, 4096, device=device, dtype=torch.bfloat16), torch.randn(4096, device=device, dtype=torch.bfloat16)
    calls = {"cholesky": lambda: metalcore.linalg.cholesky(A),
             "solve_triangular": lambda: metalcore.linalg.solve_triangular(L, B, upper=False),
             "solve": lambda: metalcore.linalg.solve(A, B), "rms_norm": lambda: metalcore.rms_norm(x, (4096,), w, 1e-6),
             "swiglu": lambda: metalcore.swiglu(x, x), "gelu": lambda: metalcore.metal_gelu(x)}
    results = {}
    with metalcore.use_backend("triton"):
        for name, call in calls.items():
            try:
                want = _through_run(call)()
                got = [call() for _ in range(3)][-1]
                same = torch.equal(got, want)
                results[f"direct launch {name}"] = "ok, identical" if same else "FAILED: results differ"
            except Exception as e:
                results[f"direct launch {name}"] = f"FAILED: {type(e).__name__}: {e}"
    return results


def check_large_batches(device: torch.device) -> dict[str, str]:
    """Batches torch's own call cannot take in one piece are split by the op core (eigh), and
    whether svd, which declares no limit, takes the same batch (singular values of an SPD matrix
    are its eigenvalues). torch's own eigh runs last: a failing cuSOLVER call is left for the end."""
    results = {}
    A = torch.randn(65536, 16, 16, device=device)
    A = A @ A.mT + 16 * torch.eye(16, device=device)
    try:
        L, Q = metalcore.linalg.eigh(A)
        err = (Q @ torch.diag_embed(L) @ Q.mT - A).abs().max() / A.abs().max()
        results["eigh 65536x16x16"] = f"ok, max relative residual {err.item():.2e}"
    except Exception as e:  # report, do not stop: the other figures are still wanted
        results["eigh 65536x16x16"] = f"FAILED: {type(e).__name__}: {e}"
    try:
        S = metalcore.linalg.svdvals(A)
        results["svdvals 65536x16x16"] = f"ok, max |S - L| / |L| {((S - L.flip(-1)).abs().max() / L.abs().max()).item():.2e}"
    except Exception as e:
        results["svdvals 65536x16x16"] = f"FAILED: {type(e).__name__}: {e}"
    try:
        torch.linalg.eigh(A)
        results["torch eigh 65536x16x16"] = "ok (torch's own call took the whole batch)"
    except Exception as e:
        results["torch eigh 65536x16x16"] = f"raises {type(e).__name__} (as issue 16 reports)"
    return results


def served_by(call: Callable[[], object]) -> str:
    """What served one call: the backend of the metalcore op that ran, or ``torch`` where none ran
    (the public function handed the call to torch's own op)."""
    with observe_backends() as served:
        call()
    return next(iter(served.values()), "torch")


def route_budget(device: torch.device, clock: Callable[[], float]) -> dict[str, float]:
    """µs of each piece of a torch-route hit (metalcore/_route.py), timed alone: the guards, the key
    of a 1×3×3 and a 1×3×2 tensor (solve's arguments), its lookup, and a call through ``*args``."""
    from metalcore import _backend, _route

    A, B = torch.randn(1, 3, 3, device=device), torch.randn(1, 3, 2, device=device)
    key = _route._key((A, B), {})
    decisions = {_route._key((A, B), {}): True}

    def forward(*args, **kwargs):
        return None

    pieces = {
        "is_compiling()": torch.compiler.is_compiling,
        "dispatch-mode probe": torch._C._len_torch_dispatch_stack,
        "automatic_selection()": _backend.automatic_selection,
        "key, 2 tensors": lambda: _route._key((A, B), {}),
        "key, 2 tensors + 1 keyword": lambda: _route._key((A, B), {"left": True}),
        "lookup (hash + compare)": lambda: decisions.get(key),
        "frame with *args, **kwargs": lambda: forward(A, B),
        "empty call (subtracted)": lambda: None,
    }
    t = measure(pieces, device, 2000, 9, "min", clock)
    empty = t.pop("empty call (subtracted)")
    return {name: max(0.0, us - empty) for name, us in t.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--calls", type=int, default=200, help="calls per timed block")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds; the median is reported")
    ap.add_argument("--stat", choices=("median", "min"), default="median",
                    help="statistic over rounds (min: on a loaded machine, the least disturbed round)")
    ap.add_argument("--timer", choices=("wall", "thread"), default="wall",
                    help="thread: this thread's CPU time (CPU only; a shared machine's descheduling not counted)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (1: tiny CPU ops without the thread pool)")
    ap.add_argument("--cases", nargs="+", help="only the cases whose name contains one of these")
    ap.add_argument("--budget", action="store_true", help="time the torch route's pieces alone")
    ap.add_argument("--quick", action="store_true", help="fewer calls, no AdamW (a smoke test)")
    ap.add_argument("--check", action=argparse.BooleanOptionalAction, default=None,
                    help="large-batch checks (default: on for CUDA)")
    ap.add_argument("--profile", action="store_true", help="cProfile of metalcore's call, by own time")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.timer == "thread" and device.type != "cpu":
        ap.error("--timer thread measures CPU time: use it with --device cpu (CUDA work runs on the device)")
    clock = time.thread_time if args.timer == "thread" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    calls, rounds = (20, 3) if args.quick else (args.calls, args.rounds)

    rows = []
    print(f"{'case':28s} {'metalcore':>10s} {'torch':>9s} {'ratio':>6s} {'over':>6s} {'path':>9s} {'wrapper':>8s} "
          f"{'dispatch':>9s} {'backend':>8s} {'via run()':>10s}   "
          f"(µs per call, {args.timer} time, {args.stat} of {rounds} rounds of {calls})")
    for name, variants in cases(device, args.quick).items():
        if args.cases and not any(c in name for c in args.cases):
            continue
        path = served_by(variants["metalcore"])
        if path == "torch":   # the op's layers are not what runs
            variants = {k: v for k, v in variants.items() if k in ("metalcore", "torch")}
        t = measure(variants, device, calls, rounds, args.stat, clock)
        row = {"case": name, **{k: round(v, 2) for k, v in t.items()}, "ratio": round(t["metalcore"] / t["torch"], 3),
               "over": round(t["metalcore"] - t["torch"], 2), "path": path}
        layers = ""
        if "op" in t:
            row["wrapper"] = round(t["metalcore"] - t["op"], 2)
            row["dispatch"] = round(t["op"] - t["backend"], 2)
            layers = f"{row['wrapper']:8.1f} {row['dispatch']:9.1f} {t['backend']:8.1f}"
        if "via run()" in t:
            layers += f" {t['via run()']:10.1f}"
        print(f"{name:28s} {t['metalcore']:10.1f} {t['torch']:9.1f} {row['ratio']:6.2f} {row['over']:6.1f} {path:>9s} "
              f"{layers}")
        rows.append(row)
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(100):
                variants["metalcore"]()
            prof.disable()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(10)
            print("\n".join(line for line in s.getvalue().splitlines()[6:] if line.strip()))

    budget = {}
    if args.budget:
        budget = route_budget(device, clock)
        print("torch route, each piece alone (µs, min of 9 rounds of 2000):")
        for piece, us in budget.items():
            print(f"  {piece:30s} {us:6.2f}")
    checks = {}
    if args.check or (args.check is None and device.type == "cuda"):
        checks = {**(check_direct_launch(device) if device.type == "cuda" else {}), **check_large_batches(device)}
        for name, result in checks.items():
            print(f"check {name}: {result}")
    if rows:
        worst = max(rows, key=lambda r: r["ratio"])
        within = sum(r["ratio"] <= 1.25 for r in rows)
        routed = [r["over"] for r in rows if r["path"] == "torch"]
        print(f"summary: {within} of {len(rows)} cases within 1.25x of torch per call; worst {worst['case']} "
              f"{worst['ratio']:.2f}x" + (f"; torch route over torch's own call: median {statistics.median(routed):.2f} "
                                          f"µs, max {max(routed):.2f} µs ({len(routed)} cases)" if routed else ""))
    if args.out:
        meta = {"stat": args.stat, "timer": args.timer, "threads": torch.get_num_threads(),
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                "torch": torch.__version__, "python": platform.python_version(), "calls": calls, "rounds": rounds,
                "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows, "budget": budget, "checks": checks}, f, indent=1)


if __name__ == "__main__":
    main()
