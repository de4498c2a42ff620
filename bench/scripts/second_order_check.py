"""One device call for issue 20: metalcore's SOAP and Shampoo against a per-block loop over
torch.linalg, heavyball's SOAP and MetalAdamW, on GPT-2-sized parameter sets; correctness against the
float64 references first. Everything in one process, baselines in the same run.

    python bench/scripts/second_order_check.py --out $OUT/second-order.json            # the H100 run (< 4 min)
    python bench/scripts/second_order_check.py --device cpu --tiny --out /tmp/so.json  # smoke test

Parameter sets (random fp32 weights and gradients; matrices as ``nn.Linear`` stores them):

* ``gpt2``: GPT-2 small, 12 layers × 768: per layer c_attn 2304×768, attn proj 768×768, fc 3072×768,
  mlp proj 768×3072; wte 50257×768, wpe 1024×768 (124M parameters with the embeddings).
* ``350m``: GPT-2 medium, 24 layers × 1024, same layout (354M).
* ``--tiny``: 2 layers × 32, vocabulary 300 (CPU smoke test).

Variants, each timed as one ``opt.step()`` from an idle device (host issue included; CUDA events and a
synchronisation around each call, median, after warm-up steps that also build the first bases):

* ``metalcore``: ``metalcore.optim.SOAP`` / ``Shampoo`` (batched refreshes);
* ``loop``: the same optimizer object with every batched ``eigh``/``qr`` replaced by a Python loop of
  ``torch.linalg.eigh``/``qr`` over the matrices (the per-block implementation users write), at the
  ``gpt2`` set only (its Shampoo refresh takes seconds);
* ``heavyball``: ``heavyball.SOAP`` when importable (3.2.1 has no plain Shampoo), eager unless
  ``--heavyball-compile shipped`` (its own torch.compile setting) or another mode;
* ``MetalAdamW`` over the same parameters, for the amortized comparison.

"refresh" is a step that refreshes every basis/root (``precondition_frequency=1``), "plain" one that
refreshes none, "amortized@10" = (refresh + 9·plain)/10. Peak memory: the most allocated during the
timed steps above what parameters and gradients hold. A plain metalcore step also runs under
``torch.cuda.set_sync_debug_mode('error')`` to show it has no host synchronisation.

Hyperparameters: SOAP ``max_precond_dim=10000`` (the embeddings' vocabulary side stays diagonal),
Shampoo ``max_preconditioner_dim=1024`` with Adam grafting, both the libraries' defaults otherwise.
A time guard skips what would start past ``--budget-s`` (default 180 s) and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import metalcore  # noqa: E402
import metalcore.optim.shampoo as shampoo_module  # noqa: E402
import metalcore.optim.soap as soap_module  # noqa: E402
from metalcore.optim import SOAP, MetalAdamW, Shampoo  # noqa: E402

SETS = {"gpt2": (12, 768, 50257, 1024), "350m": (24, 1024, 50257, 1024)}
TINY_SET = (2, 32, 300, 64)
SOAP_OPTIONS = dict(lr=3e-3, betas=(0.95, 0.95), weight_decay=0.01, max_precond_dim=10000)
SHAMPOO_OPTIONS = dict(lr=1e-3, betas=(0.9, 0.999), epsilon=1e-12, max_preconditioner_dim=1024, grafting="adam")
NEVER = 10**9


def gpt_shapes(layers: int, width: int, vocab: int, positions: int) -> list[tuple[int, int]]:
    per_layer = [(3 * width, width), (width, width), (4 * width, width), (width, 4 * width)]
    return per_layer * layers + [(vocab, width), (positions, width)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_ms(fn, device: torch.device, *, warmup: int, budget_s: float, max_reps: int = 15) -> tuple[float, int]:
    """Median ms of ``fn()`` calls after ``warmup`` calls; stops at ``budget_s`` seconds of samples
    (at least one). Returns (median, samples)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    while not times or (len(times) < max_reps and sum(times) < budget_s * 1e3):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), len(times)


def looped(fn):
    """``fn`` over a stack, one matrix at a time (the per-block baseline)."""
    def call(A, *args, **kwargs):
        outs = [fn(a, *args, **kwargs) for a in A.unbind(0)]
        return type(outs[0])(torch.stack(parts) for parts in zip(*outs))
    return call


@contextlib.contextmanager
def torch_loop_linalg():
    saved = soap_module.eigh, soap_module.qr, shampoo_module.eigh
    soap_module.eigh, soap_module.qr = looped(torch.linalg.eigh), looped(torch.linalg.qr)
    shampoo_module.eigh = looped(torch.linalg.eigh)
    try:
        yield
    finally:
        soap_module.eigh, soap_module.qr, shampoo_module.eigh = saved


def set_frequency(opt, frequency: int) -> None:
    for group in opt.param_groups:
        group["precondition_frequency"] = frequency
        if "start_preconditioning_step" in group:
            group["start_preconditioning_step"] = 1


class Run:
    """Parameters with fixed random gradients on one device, and the timing of optimizers over them."""

    def __init__(self, shapes, device, budget_s, deadline):
        g = torch.Generator(device="cpu").manual_seed(0)
        self.params = [torch.nn.Parameter((torch.randn(s, generator=g) * 0.02).to(device)) for s in shapes]
        self.grads = [(torch.randn(s, generator=g) * 1e-3).to(device) for s in shapes]
        self.device, self.budget_s, self.deadline = device, budget_s, deadline
        self.numel = sum(p.numel() for p in self.params)

    def set_grads(self):
        for p, gr in zip(self.params, self.grads):
            p.grad = gr

    def step_fn(self, opt):
        def fn():
            self.set_grads()
            opt.step()
        return fn

    def time_left(self) -> float:
        return self.deadline - time.perf_counter()

    def measure(self, opt, warmup: int, budget_s: float) -> dict:
        cuda = self.device.type == "cuda"
        if cuda:
            sync(self.device)
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        ms, n = step_ms(self.step_fn(opt), self.device, warmup=warmup, budget_s=budget_s)
        out = {"ms": ms, "samples": n}
        if cuda:
            out["peak_extra_MiB"] = (torch.cuda.max_memory_allocated(self.device) - base) / 2**20
        return out


def state_MiB(opt) -> float:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            for t in (v if isinstance(v, list) else [v]):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
    return total / 2**20


def no_sync_in_plain_step(run: Run, opt) -> str:
    if run.device.type != "cuda":
        return "n/a (cpu)"
    try:
        torch.cuda.set_sync_debug_mode("error")
        run.step_fn(opt)()
        return "none"
    except RuntimeError as e:
        return f"SYNC: {str(e).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")


def bench_metalcore(run: Run, name: str, cls, options: dict, loop: bool) -> dict:
    """metalcore's optimizer, refresh and plain steps; the same object with looped linalg when ``loop``."""
    res: dict = {}
    opt = cls(run.params, **options)
    set_frequency(opt, 1)
    t0 = time.perf_counter()
    run.step_fn(opt)()  # first bases / roots
    sync(run.device)
    res["first_step_ms"] = (time.perf_counter() - t0) * 1e3
    # Shampoo's first step is already a refresh (t = start = 1); SOAP's was an eigh, so one QR warm-up
    res["metalcore_refresh"] = run.measure(opt, warmup=1 if cls is SOAP else 0, budget_s=run.budget_s)
    set_frequency(opt, NEVER)
    res["metalcore_plain"] = run.measure(opt, warmup=2, budget_s=run.budget_s)
    res["syncs_in_plain_step"] = no_sync_in_plain_step(run, opt)
    res["state_MiB"] = state_MiB(opt)
    if loop:
        if run.time_left() < 60:
            res["loop_refresh"] = "skipped (time budget)"
        else:
            set_frequency(opt, 1)
            with torch_loop_linalg():
                res["loop_refresh"] = run.measure(opt, warmup=0, budget_s=run.budget_s)
    for key in ("metalcore", "loop"):
        r = res.get(f"{key}_refresh")
        if isinstance(r, dict):
            plain = res["metalcore_plain"]["ms"]  # the plain step makes no linalg call: shared
            r["amortized10_ms"] = (r["ms"] + 9 * plain) / 10
    del opt
    return res


def profile_refresh(shapes, device: torch.device, rep_s: float, rows: int = 14) -> dict:
    """One refresh step of each optimizer under torch.profiler: the ops and kernels by device time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    tables = {}
    for name, cls, options in (("SOAP", SOAP, SOAP_OPTIONS), ("Shampoo", Shampoo, SHAMPOO_OPTIONS)):
        run = Run(shapes, device, rep_s, time.perf_counter() + 600)
        opt = cls(run.params, **options)
        set_frequency(opt, 1)
        for _ in range(2):  # first bases/roots, then one refresh as warm-up
            run.step_fn(opt)()
        sync(device)
        with profile(activities=activities) as prof:
            run.step_fn(opt)()
            sync(device)
        tables[name] = prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=60)
        print(f"\n== {name} refresh step, by {sort}\n{tables[name]}")
        del opt, run
        free(device)
    return tables


def bench_heavyball(run: Run, compile_mode) -> dict:
    try:
        import heavyball
        import heavyball.utils
    except Exception as e:  # ImportError, or a dependency of the wrong version failing at import
        return {"skipped": f"heavyball not importable ({type(e).__name__}: {e})"}
    if compile_mode != "shipped":
        heavyball.utils.compile_mode = None if compile_mode == "none" else compile_mode
    compile_mode = heavyball.utils.compile_mode
    if run.time_left() < 40:
        return {"skipped": "time budget"}
    res: dict = {"version": getattr(heavyball, "__version__", "?"), "compile_mode": compile_mode}
    opt = heavyball.SOAP(run.params, lr=SOAP_OPTIONS["lr"], betas=SOAP_OPTIONS["betas"], shampoo_beta=0.95,
                         weight_decay=SOAP_OPTIONS["weight_decay"], precondition_frequency=1,
                         max_precond_dim=SOAP_OPTIONS["max_precond_dim"], merge_dims=False, precondition_1d=False)
    t0 = time.perf_counter()
    run.step_fn(opt)()
    sync(run.device)
    res["first_step_ms"] = (time.perf_counter() - t0) * 1e3
    res["refresh"] = run.measure(opt, warmup=1, budget_s=run.budget_s)
    opt.precond_schedule = 1 / NEVER  # heavyball keeps 1/frequency as a refresh probability
    res["plain"] = run.measure(opt, warmup=2, budget_s=run.budget_s)
    res["refresh"]["amortized10_ms"] = (res["refresh"]["ms"] + 9 * res["plain"]["ms"]) / 10
    del opt
    return res


def correctness(device: torch.device) -> dict:
    """Small SOAP and Shampoo runs on ``device`` in float32 against the float64 CPU references."""
    from kronecker_reference import ReferenceShampoo, ReferenceSOAP

    out = {}
    shapes = [(6, 6), (6, 6), (5, 12), (9, 4), (4, 3, 2, 2), (7,)]
    cases = {
        "SOAP": (SOAP, ReferenceSOAP, dict(lr=3e-3, betas=(0.95, 0.95), shampoo_beta=None, eps=1e-8,
                                          weight_decay=0.01, precondition_frequency=4, max_precond_dim=8,
                                          merge_dims=True, precondition_1d=False, normalize_grads=False,
                                          correct_bias=True)),
        "Shampoo": (Shampoo, ReferenceShampoo, dict(lr=1e-2, betas=(0.9, 0.999), epsilon=1e-6, weight_decay=0.0,
                                                   max_preconditioner_dim=4, precondition_frequency=3,
                                                   start_preconditioning_step=None, use_bias_correction=True,
                                                   grafting="adam", grafting_beta2=0.999, grafting_epsilon=1e-8,
                                                   merge_dims=True)),
    }
    g = torch.Generator().manual_seed(1)
    for name, (cls, ref_cls, cfg) in cases.items():
        params = [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in shapes]
        refs = [ref_cls(p, cfg) for p in params]
        opt = cls(params, **cfg)
        for _ in range(20):
            grads = [torch.randn(p.shape, generator=g) for p in params]
            for p, gr in zip(params, grads):
                p.grad = gr.to(device)
            opt.step()
            for p, r, gr in zip(params, refs, grads):
                if name == "SOAP" and r.Q is None:
                    r.first(gr, opt.state[p]["Q"])
                else:
                    r.step(gr)
        err = max((p.detach().cpu().double() - r.p).abs().max().item() for p, r in zip(params, refs))
        # 20 steps move θ by ~0.1; fp32 rounding through Adam's 1/√v and Shampoo's inverse 4th roots
        # leaves ~1e-4 (CPU); a wrong update is off by the update's size
        out[name] = {"max_abs_param_error_vs_float64": err, "ok": err < 1e-3}
    return out


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fmt(r) -> str:
    if not isinstance(r, dict):
        return str(r)
    s = f"{r['ms']:9.2f} ms"
    if "peak_extra_MiB" in r:
        s += f"  peak+{r['peak_extra_MiB']:8.0f} MiB"
    return s


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--sets", default="gpt2,350m")
    ap.add_argument("--loop-sets", default="gpt2", help="sets where the per-block torch loop is timed")
    ap.add_argument("--heavyball-compile", default="none",
                    help="heavyball.utils.compile_mode: 'none' (default: eager, no compile time), 'shipped' "
                         "(heavyball's own default, max-autotune: minutes of compiling) or a torch.compile mode")
    ap.add_argument("--budget-s", type=float, default=180.0, help="skip what would start after this many seconds")
    ap.add_argument("--rep-s", type=float, default=2.0, help="seconds of samples per timing (at least one)")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (all variants alike)")
    ap.add_argument("--profile", action="store_true",
                    help="only profile one refresh step of SOAP and of Shampoo at the first set (where the time goes)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    start = time.perf_counter()
    result: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "metalcore": getattr(metalcore, "__version__", "?"), "tf32": args.tf32,
                    "correctness": correctness(device), "sets": {}}
    print(f"device {result['device']}, torch {result['torch']}, tf32 {args.tf32}")
    for name, c in result["correctness"].items():
        print(f"correctness {name:8s} fp32 on {device.type} vs float64 reference, 20 steps: max |Δθ| "
              f"{c['max_abs_param_error_vs_float64']:.2e}  {'ok' if c['ok'] else 'FAILED'}")
    sets = {"tiny": TINY_SET} if args.tiny else {k: SETS[k] for k in args.sets.split(",")}
    if args.profile:
        result["profile"] = profile_refresh(gpt_shapes(*next(iter(sets.values()))), device, args.rep_s)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        return result
    loop_sets = {"tiny"} if args.tiny else set(args.loop_sets.split(","))
    deadline = start + args.budget_s
    for set_name, spec in sets.items():
        shapes = gpt_shapes(*spec)
        run = Run(shapes, device, args.rep_s, deadline)
        entry: dict = {"parameters": run.numel}
        result["sets"][set_name] = entry
        print(f"\n== {set_name}: {len(shapes)} matrices, {run.numel / 1e6:.1f}M parameters")
        adamw = MetalAdamW(run.params, lr=1e-3)
        entry["MetalAdamW"] = run.measure(adamw, warmup=3, budget_s=args.rep_s)
        del adamw
        print(f"  MetalAdamW step            {fmt(entry['MetalAdamW'])}")
        # --tiny: blocks of 32 (of 1024, the 32×32 matrices would merge into 1024-vectors)
        shampoo_options = {**SHAMPOO_OPTIONS, "max_preconditioner_dim": 32} if args.tiny else SHAMPOO_OPTIONS
        for opt_name, cls, options in (("SOAP", SOAP, SOAP_OPTIONS), ("Shampoo", Shampoo, shampoo_options)):
            if run.time_left() < 20:
                entry[opt_name] = "skipped (time budget)"
                print(f"  {opt_name}: skipped (time budget)")
                continue
            try:
                r = entry[opt_name] = bench_metalcore(run, opt_name, cls, options, set_name in loop_sets)
            except Exception:  # keep what was measured; the traceback goes into the JSON
                entry[opt_name] = {"error": traceback.format_exc()}
                print(entry[opt_name]["error"])
                continue
            finally:
                free(device)
            adam_ms = entry["MetalAdamW"]["ms"]
            print(f"  {opt_name} metalcore first step {r['first_step_ms']:9.1f} ms (first bases/roots)")
            print(f"  {opt_name} metalcore refresh    {fmt(r['metalcore_refresh'])}")
            print(f"  {opt_name} metalcore plain      {fmt(r['metalcore_plain'])}  syncs: {r['syncs_in_plain_step']}")
            print(f"  {opt_name} amortized@10         {r['metalcore_refresh']['amortized10_ms']:9.2f} ms = "
                  f"{r['metalcore_refresh']['amortized10_ms'] / adam_ms:.2f}x MetalAdamW (target <= 1.5x); "
                  f"state {r['state_MiB']:.0f} MiB")
            if isinstance(r.get("loop_refresh"), dict):
                ratio = r["loop_refresh"]["ms"] / r["metalcore_refresh"]["ms"]
                r["speedup_vs_loop_refresh"] = ratio
                print(f"  {opt_name} torch loop refresh   {fmt(r['loop_refresh'])}  -> metalcore {ratio:.2f}x "
                      f"(target >= 20x at gpt2)")
            elif "loop_refresh" in r:
                print(f"  {opt_name} torch loop refresh   {r['loop_refresh']}")
        try:
            hb = entry["heavyball_SOAP"] = bench_heavyball(run, args.heavyball_compile)
        except Exception:
            hb = entry["heavyball_SOAP"] = {"skipped": "error", "error": traceback.format_exc()}
            print(hb["error"])
        finally:
            free(device)
        soap_refresh = entry["SOAP"].get("metalcore_refresh") if isinstance(entry["SOAP"], dict) else None
        if "refresh" in hb and soap_refresh:
            ratio = hb["refresh"]["ms"] / soap_refresh["ms"]
            hb["speedup_of_metalcore_refresh"] = ratio
            print(f"  heavyball SOAP refresh     {fmt(hb['refresh'])}  -> metalcore {ratio:.2f}x (target >= 10x)")
            print(f"  heavyball SOAP plain       {fmt(hb['plain'])}  (first step {hb['first_step_ms']:.0f} ms)")
        else:
            print(f"  heavyball SOAP: {hb.get('skipped')}")
        del run
        free(device)
    result["seconds"] = time.perf_counter() - start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\n{result['seconds']:.0f} s; JSON: {args.out}")
    return result


if __name__ == "__main__":
    main()
