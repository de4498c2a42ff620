"""One device call for issue 6 §7 (polar) and issue 7 §4 (optimizers): Newton–Schulz with and without
the symmetric-product kernel, batched against looped, Muon and AdamW steps against torch's, and the
orthogonality error of each polar method. Everything in one process, baselines in the same run.

    python bench/scripts/muon_check.py --out $OUT/muon-check.json            # the H100 run
    python bench/scripts/muon_check.py --device cpu --tiny --out /tmp/m.json  # smoke test (interpreter)

Timing: CUDA events around each call after warm-up, median of ``--reps`` (≥ 20 by default); on the
CPU, ``perf_counter`` (a smoke test, not a result). "sym" is metalcore's polar with its symmetric
products (``metalcore::gram_poly``) on the Triton syrk kernel, forced with ``use_backend('triton')``
(the interpreter on the CPU); "ref" the same polar with ``use_backend('reference')`` (plain batched
matmuls, what runs by default until the kernel is measured faster).

Sections (full size; ``--tiny`` shrinks every shape):

a. Newton–Schulz, 5 steps, 4096×4096 bf16: the textbook loop (a copy of torch.optim.Muon's
   ``_zeropower_via_newtonschulz``) against polar sym/ref; the syrk products alone against
   ``torch.bmm``/``baddbmm``; ``--sweep`` times the kernel's tile configurations.
b. 32×1024×1024 bf16: one batched polar call against a loop of 32 single calls.
c. Muon step over a 12-layer, 768-wide GPT-2's hidden matrices (fp32, random gradients) and over
   8 × 2048×2048: metalcore.optim.Muon (sym and ref) against torch.optim.Muon, same hyperparameters.
d. MetalAdamW against torch.optim.AdamW(fused=True), 64 tensors of 512×512 (16.8M fp32 parameters).

Also printed and saved: ‖OᵀO − I‖_F / √n of each polar method on one 1024×1024 Gaussian matrix, and
the relative error of each symmetric-path output against its plain-matmul twin.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import metalcore  # noqa: E402
from metalcore.linalg.polar import METHODS, NS_COEFFICIENTS  # noqa: E402
from metalcore.optim import MetalAdamW, Muon  # noqa: E402

FULL = dict(ns=4096, batch=(32, 1024), gpt=(12, 768), square=(8, 2048), adamw=(64, 512), ortho=1024)
TINY = dict(ns=96, batch=(4, 48), gpt=(2, 32), square=(2, 64), adamw=(8, 32), ortho=48)
# (BLOCK, BLOCK_K, NUM_WARPS, NUM_STAGES) tried by --sweep on the 16-bit kernel; the first is the default.
SWEEP = [(128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 4, 3), (128, 128, 8, 3), (128, 32, 8, 4), (64, 64, 4, 4)]


def textbook_newton_schulz(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """torch.optim.Muon's ``_zeropower_via_newtonschulz`` (torch 2.9), copied: plain 2-D matmuls."""
    a, b, c = NS_COEFFICIENTS
    X = G.bfloat16()
    if G.size(0) > G.size(1):
        X = X.T
    X = X / X.norm().clamp(min=eps)
    for _ in range(steps):
        A = X @ X.T
        B = torch.addmm(A, A, A, beta=b, alpha=c)
        X = torch.addmm(X, B, X, beta=a)
    return X.T if G.size(0) > G.size(1) else X


class Timer:
    def __init__(self, device: torch.device, reps: int, warmup: int):
        self.device, self.reps, self.warmup = device, reps, warmup

    def __call__(self, fn) -> float:
        """Median milliseconds of ``fn()``."""
        for _ in range(self.warmup):
            fn()
        if self.device.type != "cuda":
            times = []
            for _ in range(self.reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times)
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(self.reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-300)).item()


def polar_with(name: str, method: str):
    def run(A):
        with metalcore.use_backend(name):
            return metalcore.polar(A, method=method)
    return run


def section_newton_schulz(n: int, dev, timer, rows, checks, sweep: bool):
    A = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    plain = timer(lambda: textbook_newton_schulz(A))
    rows.append(("a", f"NS 5 steps {n}x{n} bf16: textbook loop (torch.optim.Muon's)", plain, plain))
    for method in ("newton_schulz", "polar_express"):
        for name in ("reference", "triton"):
            t = timer(lambda: polar_with(name, method)(A))
            rows.append(("a", f"polar {method} {n}x{n} bf16, {'sym' if name == 'triton' else 'ref'}", t, plain))
        checks[f"a: polar {method} {n}² sym vs ref"] = rel_err(polar_with("triton", method)(A),
                                                              polar_with("reference", method)(A))
    checks[f"a: polar newton_schulz {n}² ref vs textbook"] = rel_err(polar_with("reference", "newton_schulz")(A),
                                                                     textbook_newton_schulz(A))
    # The two symmetric products alone (the kernel's launcher; compiled for CUDA tensors, the
    # interpreter on the CPU), on a G like the iteration's: X Xᵀ of a normalised X.
    from metalcore.linalg import syrk_triton as K

    X = (A.float() / A.float().norm()).bfloat16()[None]
    G = torch.bmm(X, X.mT)
    a, b, c = NS_COEFFICIENTS
    flop = 2 * n ** 3
    for label, sym, ref in [
        ("X Xᵀ", lambda: K.syrk_launch(X, None, 1.0, 0.0), lambda: torch.bmm(X, X.mT)),
        ("b G + c G²", lambda: K.syrk_launch(G, G, c, b), lambda: torch.baddbmm(G, G, G, beta=b, alpha=c)),
    ]:
        t_ref = timer(ref)
        rows.append(("a", f"{label} {n}² bf16: torch ({flop / t_ref / 1e9:.0f} TFLOP/s)", t_ref, t_ref))
        t_sym = timer(sym)
        rows.append(("a", f"{label} {n}² bf16: syrk kernel ({flop / t_sym / 1e9:.0f} TFLOP/s-equivalent)",
                     t_sym, t_ref))
        checks[f"a: syrk {label} {n}² vs torch"] = rel_err(sym(), ref())
    if sweep and dev.type == "cuda":
        saved = (K.BLOCK, K.BLOCK_K, K.NUM_WARPS, K.NUM_STAGES)
        t_ref = timer(lambda: torch.baddbmm(G, G, G, beta=b, alpha=c))
        for cfg in SWEEP:
            K.BLOCK, K.BLOCK_K, K.NUM_WARPS, K.NUM_STAGES = cfg
            try:
                t = timer(lambda: K.syrk_launch(G, G, c, b))
            except Exception as exc:  # a config that does not fit shared memory is a result
                print(f"sweep {cfg}: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            rows.append(("a-sweep", f"syrk b G + c G² {n}², BLOCK/BLOCK_K/warps/stages {cfg}", t, t_ref))
        K.BLOCK, K.BLOCK_K, K.NUM_WARPS, K.NUM_STAGES = saved


def section_batched(batch: int, n: int, dev, timer, rows, checks):
    A = torch.randn(batch, n, n, device=dev, dtype=torch.bfloat16)
    loop_plain = timer(lambda: [textbook_newton_schulz(a) for a in A])
    rows.append(("b", f"NS {batch}x{n}x{n} bf16: loop of {batch} textbook calls", loop_plain, loop_plain))
    for name in ("reference", "triton"):
        tag = "sym" if name == "triton" else "ref"
        t_loop = timer(lambda: [polar_with(name, "newton_schulz")(a) for a in A])
        rows.append(("b", f"NS {batch}x{n}x{n} bf16: loop of {batch} polar calls, {tag}", t_loop, loop_plain))
        t = timer(lambda: polar_with(name, "newton_schulz")(A))
        rows.append(("b", f"NS {batch}x{n}x{n} bf16: one batched polar call, {tag}", t, loop_plain))
    checks[f"b: batched NS {batch}x{n}² sym vs ref"] = rel_err(polar_with("triton", "newton_schulz")(A),
                                                              polar_with("reference", "newton_schulz")(A))


def muon_step_case(label: str, shapes: list[tuple[int, int]], dev, timer, rows, checks):
    params = [torch.randn(s, device=dev) * 0.02 for s in shapes]
    grads = [torch.randn(s, device=dev) for s in shapes]
    hyper = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True)

    def make(cls, **extra):
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        return ps, cls(ps, **hyper, **extra)

    count = sum(p.numel() for p in params) / 1e6
    base = None
    results = {}
    if hasattr(torch.optim, "Muon"):
        ps, opt = make(torch.optim.Muon)
        base = timer(opt.step)
        rows.append(("c", f"Muon step, {label} ({count:.1f}M): torch.optim.Muon", base, base))
        results["torch"] = make(torch.optim.Muon)
    for name, tag in (("reference", "ref"), ("triton", "sym")):
        for orth in ("newton_schulz", "polar_express"):
            ps, opt = make(Muon, orthogonalize=orth)
            with metalcore.use_backend(name):
                t = timer(opt.step)
            rows.append(("c", f"Muon step, {label}: metalcore Muon {orth}, {tag}", t, base))
        results[tag] = make(Muon)
    # One step from the same start: the parameters each optimizer produces, against torch's.
    for tag, (ps, opt) in results.items():
        with metalcore.use_backend({"sym": "triton", "ref": "reference"}.get(tag, "auto")):
            opt.step()
    if "torch" in results:
        theirs = results["torch"][0]
        for tag in ("ref", "sym"):
            delta = torch.cat([(p - q).flatten() for p, q in zip(results[tag][0], params)])
            delta_t = torch.cat([(p - q).flatten() for p, q in zip(theirs, params)])
            checks[f"c: Muon update {label} {tag} vs torch"] = rel_err(delta, delta_t)


def section_muon(layers: int, width: int, square: tuple[int, int], dev, timer, rows, checks):
    # nn.Linear weights are (out, in): qkv 768→2304, proj 768→768, fc 768→3072, fc2 3072→768.
    per_layer = [(3 * width, width), (width, width), (4 * width, width), (width, 4 * width)]
    muon_step_case(f"GPT-2 {layers}x{width} hidden", per_layer * layers, dev, timer, rows, checks)
    count, n = square
    muon_step_case(f"{count}x{n}x{n}", [(n, n)] * count, dev, timer, rows, checks)


def section_adamw(count: int, n: int, dev, timer, rows, checks):
    params = [torch.randn(n, n, device=dev) for _ in range(count)]
    grads = [torch.randn(n, n, device=dev) for _ in range(count)]
    hyper = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)

    def make(cls, **extra):
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        return ps, cls(ps, **hyper, **extra)

    label = f"AdamW step, {count} x {n}x{n} fp32 ({count * n * n / 1e6:.1f}M)"
    fused = dev.type == "cuda"
    ps_t, torch_opt = make(torch.optim.AdamW, fused=fused)
    base = timer(torch_opt.step)
    rows.append(("d", f"{label}: torch.optim.AdamW(fused={fused})", base, base))
    ps_m, ours = make(MetalAdamW)
    rows.append(("d", f"{label}: MetalAdamW", timer(ours.step), base))
    # Same number of steps from the same start (warm-up included): the parameters must agree.
    ps_t, torch_opt = make(torch.optim.AdamW, fused=fused)
    ps_m, ours = make(MetalAdamW)
    for _ in range(3):
        torch_opt.step()
        ours.step()
    checks["d: MetalAdamW vs torch AdamW, 3 steps"] = rel_err(torch.cat([p.flatten() for p in ps_m]),
                                                              torch.cat([p.flatten() for p in ps_t]))


def orthogonality(n: int, dev) -> dict[str, float]:
    """‖OᵀO − I‖_F / √n for each polar method (the RMS deviation of OᵀO from I per row)."""
    A = torch.randn(n, n, device=dev)
    eye = torch.eye(n, device=dev, dtype=torch.float64)
    errors = {}
    for method in METHODS:
        O = metalcore.polar(A, method=method).double()
        errors[method] = ((O.mT @ O - eye).norm() / n ** 0.5).item()
    with metalcore.use_backend("triton"):
        for method in ("newton_schulz", "polar_express"):
            O = metalcore.polar(A, method=method).double()
            errors[f"{method} (sym)"] = ((O.mT @ O - eye).norm() / n ** 0.5).item()
    return errors


def git_commit() -> str:
    with contextlib.suppress(Exception):
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip() or "unknown"
    return "unknown"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="small shapes, 3 reps: a smoke test")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 20; 3 with --tiny)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3; 1 with --tiny)")
    ap.add_argument("--sections", default="a,b,c,d,ortho")
    ap.add_argument("--sweep", action="store_true", help="also time the syrk kernel's tile configurations")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "muon-check.json"))
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cpu":
        # The symmetric path on CPU tensors is the Triton interpreter (checked at each launch).
        os.environ["TRITON_INTERPRET"] = "1"
    sizes = TINY if args.tiny else FULL
    timer = Timer(dev, args.reps or (3 if args.tiny else 20), args.warmup if args.warmup is not None else
                  (1 if args.tiny else 3))
    sections = set(args.sections.split(","))
    torch.manual_seed(0)
    rows: list[tuple[str, str, float, float | None]] = []
    checks: dict[str, float] = {}
    result = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
              "torch": torch.__version__, "commit": git_commit(), "tiny": args.tiny, "reps": timer.reps,
              "date": time.strftime("%Y-%m-%d")}
    with contextlib.suppress(ImportError):
        import triton

        result["triton"] = triton.__version__
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    errors: dict[str, str] = {}
    orthogonality_errors: dict[str, float] = {}
    runs = {
        "a": lambda: section_newton_schulz(sizes["ns"], dev, timer, rows, checks, args.sweep),
        "b": lambda: section_batched(*sizes["batch"], dev, timer, rows, checks),
        "c": lambda: section_muon(*sizes["gpt"], sizes["square"], dev, timer, rows, checks),
        "d": lambda: section_adamw(*sizes["adamw"], dev, timer, rows, checks),
        "ortho": lambda: orthogonality_errors.update(orthogonality(sizes["ortho"], dev)),
    }
    for name, run in runs.items():
        if name not in sections:
            continue
        done = len(rows)
        try:
            run()
        except Exception:  # one failing section (a kernel that does not compile, say) is a result too
            errors[name] = traceback.format_exc(limit=6)
            print(f"section {name} failed:\n{errors[name]}", flush=True)
        for s_, c_, t_, b_ in rows[done:]:
            print(f"{s_:8s} {c_:88s} {t_:10.3f}", flush=True)
        result.update(rows=[{"section": s_, "case": c_, "ms": t_, "speedup_vs_baseline": (b_ / t_) if b_ else None}
                            for s_, c_, t_, b_ in rows],
                      relative_errors=checks, orthogonality=orthogonality_errors, errors=errors)
        out.write_text(json.dumps(result, indent=1))  # after every section: a run cut short keeps its rows

    print(f"\n{result['device']}  torch {result['torch']}  triton {result.get('triton', '-')}  "
          f"commit {result['commit']}  (median of {timer.reps}, ms; 'x' = baseline time / this time)")
    for r in result["rows"]:
        ratio = f"{r['speedup_vs_baseline']:7.2f}x" if r["speedup_vs_baseline"] else "       -"
        print(f"{r['section']:8s} {r['case']:88s} {r['ms']:10.3f} {ratio}")
    for name, err in checks.items():
        print(f"rel. error  {name:70s} {err:.3e}")
    for name, err in orthogonality_errors.items():
        print(f"‖OᵀO − I‖_F/√n  {name:24s} {err:.3e}")
    if errors:
        print(f"FAILED sections: {', '.join(errors)} (tracebacks above and in the JSON)")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    sys.exit(1 if main()["errors"] else 0)
