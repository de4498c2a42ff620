"""Where a point of the selection check fails on the torch route, time its pieces apart.

    python bench/scripts/rule_probe.py [--reps 400] [--out probe.json]
    python bench/scripts/rule_probe.py --points "svd:vectors,float64,16,256;solve_triangular,float32,2,65536"

For each probed point (op, shape, dtype): torch's own call, metalcore's public function (the torch
route after its first call), and the route's twin called directly (the same torch call behind
metalcore's thin wrapper, without the route's key and lookup), as wall time per synchronised call,
medians over ``--reps`` interleaved rounds, in both orders (torch first, then metalcore first), so
that an order effect shows as a difference between the two rows.

With ``--launches`` (with ``--points``), each point's Triton launches are captured from one call of
the plan's function and their layers timed alone, host time per call (no synchronisation between
calls): metalcore's launch (``LazyKernel._launch``), Triton's ``JITFunction.run``, Triton's argument
binder, the compiled launcher alone, ``torch.cuda.current_device()``; a bound launch
(:class:`metalcore._triton.BoundLaunch`, what the specialized launchers keep) against the same
launch unbound; then a cProfile of the kernel
forced (else the plan's function; the top functions by own time).

With ``--points`` (selection-check points: ``op[:variant],dtype,n,batch``, ``;``-separated), each
point's inputs as the check builds them, and beside torch and the public function: the plan's
function called directly (the public function's layers removed), and the public function with
each path of the op forced (``kernel`` and the alternatives that take the input). Each callable
runs once first; one that raises prints its error.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
from typing import Any

import torch
import torch.nn.functional as F

import metalcore
from metalcore import _selection, use_backend
from metalcore.bench import selection
from metalcore.bench.selection import wall_times
from metalcore.nn.activations import _silu_torch
from metalcore.nn.rms_norm import _rms_norm_torch


def _cases(device: torch.device):
    def rows(r, w, dtype=torch.float32):
        return torch.randn(r, w, device=device, dtype=dtype)

    for r, w in ((1, 4096), (1, 128), (32768, 1024), (4096, 8192)):
        x, wt = rows(r, w), torch.randn(w, device=device)
        yield f"rms_norm {r}x{w} fp32", {
            "torch": lambda x=x, wt=wt: F.rms_norm(x, (x.shape[-1],), wt, 1e-6),
            "public": lambda x=x, wt=wt: metalcore.rms_norm(x, (x.shape[-1],), wt, 1e-6),
            "twin": lambda x=x, wt=wt: _rms_norm_torch(x, (x.shape[-1],), wt, 1e-6)}
    for r, w in ((1, 4096), (4096, 8192)):
        x = rows(r, w)
        yield f"silu {r}x{w} fp32", {"torch": lambda x=x: F.silu(x), "public": lambda x=x: metalcore.metal_silu(x),
                                      "twin": lambda x=x: _silu_torch(x)}


def _decode_attention(device: torch.device):
    """Issue 16's decode shape (q 1×32×1×128, kv 1×8×512×128 GQA, bf16): torch's SDPA, the public
    function, and torch's fused kernels called directly (skipping SDPA's backend choice), where they
    take the call (a GQA call some of them refuse; those are left out)."""
    if device.type != "cuda":
        return
    q = torch.randn(1, 32, 1, 128, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 8, 512, 128, device=device, dtype=torch.bfloat16) for _ in range(2))
    fns = {"torch": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
           "public": lambda: metalcore.metal_scaled_dot_product_attention(q, k, v, enable_gqa=True),
           "cudnn": lambda: torch._scaled_dot_product_cudnn_attention(q, k, v, None, False)[0],
           "flash": lambda: torch._scaled_dot_product_flash_attention(q, k, v)[0],
           "efficient": lambda: torch._scaled_dot_product_efficient_attention(q, k, v, None, False)[0]}
    expected = fns["torch"]().float()
    for name in list(fns):
        try:
            err = (fns[name]().float() - expected).abs().max().item()
            print(f"decode attention {name}: max |diff| from torch's SDPA {err:.2e}", flush=True)
        except Exception as e:  # noqa: BLE001 — a fused kernel that refuses the call is left out
            print(f"decode attention {name}: refused ({type(e).__name__}: {str(e)[:100]})", flush=True)
            del fns[name]
    yield "decode attention bf16 GQA", fns


def _points(spec: str, device: torch.device):
    """The selection check's points named in ``spec``, each with its callables."""
    by_name = {s.name: s for s in selection.sweeps()}
    backend = {"cuda": "triton"}.get(device.type, "reference")
    for item in filter(None, (x.strip() for x in spec.split(";"))):
        name, dtype, n, batch = item.split(",")
        s = by_name[name]
        inputs = selection._build(s, device, getattr(torch, dtype), int(n), int(batch))
        args = s.op_args(*inputs)
        op = selection._registered(s)
        plan = op.plan(*args)
        with use_backend(backend):
            served = op.backend_for(*args)
        fn_name = getattr(getattr(plan.fn, "func", plan.fn), "__qualname__", repr(plan.fn))
        print(f"{item}: automatic plan {plan.backend} {fn_name}"
              + (" (chunked)" if hasattr(plan.fn, "func") else "") + f"; {backend} serves: {served}; "
              f"table path: {_selection.measured_path(s.key, backend, device, args)}", flush=True)
        fns = {"torch": lambda s=s, i=inputs: s.torch(*i), "public": lambda s=s, i=inputs: s.metalcore(*i),
               "plan": lambda p=plan, a=args: p.fn(*a)}
        if served == backend:
            for path in [_selection.KERNEL, *(k for k, p in _selection.paths(s.key, backend).items()
                                              if p.supports(*args))]:
                fns[path] = selection._Forced(s, backend, path, inputs, True)
        for key in list(fns):
            try:
                fns[key]()
                selection._sync(device)
            except Exception as e:  # noqa: BLE001 — printed: finding these is the point
                print(f"  {key} raises {type(e).__name__}: {str(e)[:400]}", flush=True)
                del fns[key]
        yield item, fns


def _host_us(fn: Any, device: torch.device, reps: int) -> float:
    """Host µs per call of ``fn`` called ``reps`` times back to back (best of 5 blocks)."""
    best = float("inf")
    for _ in range(5):
        selection._sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps)
    selection._sync(device)
    return best * 1e6


def _fill(bound: Any, tensors: tuple[Any, ...]) -> list[Any]:
    """A bound launch's arguments with ``tensors`` in its open slots."""
    args = list(bound.args)
    for i, t in zip(bound.slots, tensors):
        args[i] = t
    return args


def _launch_layers(item: str, fns: dict[str, Any], device: torch.device, reps: int) -> dict[str, Any]:
    """Capture the Triton launches of one call of the kernel forced (else the plan's function) and
    time each layer alone."""
    from metalcore import _triton

    captured = []
    original = _triton.LazyKernel._launch

    def record(self, grid, *args, **options):
        captured.append((self, grid, args, options))
        return original(self, grid, *args, **options)

    bound_calls = []
    bound_original = _triton.BoundLaunch.__call__

    def record_bound(self, *tensors):
        bound_calls.append((self, tensors))
        return bound_original(self, *tensors)

    target = "kernel" if "kernel" in fns else "plan"   # the plan may be torch's: capture the kernel
    _triton.LazyKernel._launch = record
    _triton.BoundLaunch.__call__ = record_bound
    try:
        fns[target]()
        selection._sync(device)
    finally:
        _triton.LazyKernel._launch = original
        _triton.BoundLaunch.__call__ = bound_original
    out: dict[str, Any] = {"launches": len(captured)}
    out.update({f"{k} host": _host_us(fns[k], device, reps) for k in ("torch", "public", "plan", "kernel") if k in fns})
    out["torch.empty host"] = _host_us(lambda: torch.empty(16, 8, 8, device=device), device, reps)
    if device.type == "cuda":
        out["current_device host"] = _host_us(torch.cuda.current_device, device, reps)
    for i, (kernel, grid, args, options) in enumerate(captured[:4]):
        jit = kernel.compiled
        dev = torch.cuda.current_device()
        binder = jit.device_caches[dev][4]
        bound, spec, _ = binder(*args, **options)
        entry = kernel._launchers.get((dev, tuple(spec), tuple(options.items())))
        layers = {"launch": lambda: original(kernel, grid, *args, **options),
                  "jit.run": lambda: jit.run(*args, grid=grid, warmup=False, **options),
                  "binder": lambda: binder(*args, **options)}
        if entry is not None:
            launcher, function, metadata = entry
            values = tuple(bound.values())
            g = (*grid, 1, 1)[:3]
            stream = torch._C._cuda_getCurrentRawStream(dev)
            layers["launcher"] = lambda: launcher(g[0], g[1], g[2], stream, function, metadata, None, None, None, *values)
        for name, f in layers.items():
            out[f"{kernel.__name__}#{i} {name}"] = _host_us(f, device, reps)
        out[f"{kernel.__name__}#{i} args"] = len(args)
    for i, (bound, tensors) in enumerate(bound_calls[:4]):
        out[f"{bound.kernel.__name__}#b{i} bound launch"] = _host_us(lambda: bound(*tensors), device, reps)
        out[f"{bound.kernel.__name__}#b{i} bound direct"] = bound.direct is not None
        filled = _fill(bound, tensors)
        out[f"{bound.kernel.__name__}#b{i} unbound launch"] = _host_us(
            lambda: original(bound.kernel, bound.grid, *filled, **bound.options), device, reps)
    print(f"{item} launch layers (host µs per call): " + "; ".join(
        f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items()), flush=True)
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(reps):
        fns[target]()
    profile.disable()
    selection._sync(device)
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(22)
    print(f"{item} cProfile of {reps} calls of {target}:\n" + "\n".join(text.getvalue().splitlines()[4:]), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=400)
    ap.add_argument("--out")
    ap.add_argument("--points", help="selection-check points, op[:variant],dtype,n,batch;...")
    ap.add_argument("--launches", action="store_true", help="with --points: time each launch layer alone")
    args = ap.parse_args()
    device = torch.device(args.device)
    results = {}
    probed = _points(args.points, device) if args.points else (*_decode_attention(device), *_cases(device))
    for name, fns in probed:
        for f in fns.values():  # first calls: route decisions, allocator
            f(), f()
        if args.launches:
            results[f"{name} launch layers"] = _launch_layers(name, fns, device, args.reps)
        for order in (list(fns), list(fns)[::-1]):
            # Interleaved round by round in this order, every callable args.reps times.
            timed = wall_times({k: fns[k] for k in order}, device, 0.0, args.reps, args.reps)
            med = {k: t * 1e6 for k, t in timed.items()}
            key = f"{name} [{order[0]} first]"
            results[key] = med
            print(f"{key:42s} " + "  ".join(f"{k} {med[k]:8.1f}µs" for k in fns if med[k] is not None)
                  + (f"  public/torch {med['torch'] / med['public']:.3f}x" if med.get("public") else ""),
                  flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                       "reps": args.reps, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
