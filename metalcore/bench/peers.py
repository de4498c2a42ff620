"""Linear-algebra timings of the peers JAX and CuPy, each in its own process.

The best peer for batched eigh/svd on NVIDIA is often not torch (JAX calls cuSOLVER's batched
``syevBatched``; CuPy its ``syevj``), so the benchmarks compare against them where they are
installed. Each peer runs in a subprocess (``python metalcore/bench/peers.py RUNNER CASES``, which
imports nothing from metalcore or torch) so
that its allocator cannot take GPU memory from the torch process (JAX also gets
``XLA_PYTHON_CLIENT_PREALLOCATE=false``) and an import failure or crash costs only that peer.

Protocol: the child prints JSON lines as it goes: ``{"peer", "available": true, "version",
"device"}`` once the peer is imported, then ``{"result": {"op", "batch", "m", "n", "dtype", "ms"?,
"reps"?, "error"?, "skipped"?, "predicted_ms"?}}`` per case, then ``{"done": true}`` (or one line
``{"peer", "available": false, "reason"}`` when the import fails). ``ms`` is the median wall time
per call (the call plus a wait for its result), after one warm-up call that includes compilation.
A case predicted (from the previous batch of the same op, shape and dtype) to take longer than
``max_call_s`` a call is not run: ``skipped`` says why and ``predicted_ms`` gives the linear
extrapolation. :func:`peer_timings` returns ``{"peer", "available", "version"?, "device"?,
"reason"?, "results"}``: ``available: False`` with the reason when the peer is not importable or
fails before its first case; a run cut short (timeout, crash) keeps the cases it finished and gives
the others an ``error``.

Runners: ``jax``, ``cupy``, and ``numpy`` (CPU, the same protocol: used to test it anywhere).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

OPS = ("eigh", "eigvalsh", "svd", "svdvals", "qr", "cholesky", "solve")
RUNNERS = ("jax", "cupy", "numpy")


def case(op: str, batch: int, n: int, m: int | None = None, dtype: str = "float32") -> dict[str, Any]:
    """One timing case: ``batch`` matrices of ``m × n`` (``m = n`` unless given)."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}; got {op!r}")
    return {"op": op, "batch": batch, "m": n if m is None else m, "n": n, "dtype": dtype}


def peer_timings(runner: str, cases: list[dict[str, Any]], *, timeout_s: float = 120.0,
                 budget_s: float = 0.2, max_reps: int = 50, max_call_s: float | None = None) -> dict[str, Any]:
    """Run ``cases`` in a subprocess with the peer ``runner``; never raises for a peer problem."""
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {RUNNERS}; got {runner!r}")
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    spec = json.dumps({"cases": cases, "budget_s": budget_s, "max_reps": max_reps, "max_call_s": max_call_s})
    try:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), runner, spec],
                           capture_output=True, text=True, timeout=timeout_s, env=env)
        stdout, stopped = p.stdout, (f"exit {p.returncode}: " + " | ".join(p.stderr.strip().splitlines()[-3:])[-500:]
                                     if p.returncode != 0 else None)
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stopped = f"timed out after {timeout_s:.0f} s"
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    head = lines[0] if lines and "peer" in lines[0] else None
    if head is None or not head["available"]:
        reason = head["reason"] if head is not None else stopped or "no output"
        return {"peer": runner, "available": False, "reason": reason, "results": []}
    results = [line["result"] for line in lines if "result" in line]
    out = {**head, "results": results}
    if not any(line.get("done") for line in lines):
        out["reason"] = f"stopped after {len(results)} of {len(cases)} cases: {stopped or 'no end marker'}"
        results += [dict(c, error=f"not run: {out['reason']}") for c in cases[len(results):]]
    return out


def _median_ms(fn: Callable[[], Any], wait: Callable[[Any], Any], budget_s: float, max_reps: int) -> tuple[float, int]:
    wait(fn())                                   # warm-up, compilation included
    times: list[float] = []
    while len(times) < 3 or (len(times) < max_reps and sum(times) < budget_s * 1e3):
        t0 = time.perf_counter()
        wait(fn())
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), len(times)


def _inputs(xp, rng_normal, c: dict[str, Any]):
    """Well-posed inputs per op: symmetric for eigh, SPD for cholesky, diagonally dominant for solve."""
    b, m, n = c["batch"], c["m"], c["n"]
    X = rng_normal((b, m, n)).astype(c["dtype"])
    if c["op"] in ("eigh", "eigvalsh"):
        return (X + xp.swapaxes(X, -1, -2),)
    if c["op"] == "cholesky":
        return (X @ xp.swapaxes(X, -1, -2) + n * xp.eye(n, dtype=c["dtype"]),)
    if c["op"] == "solve":
        return (X + n * xp.eye(n, dtype=c["dtype"]), rng_normal((b, n, 1)).astype(c["dtype"]))
    return (X,)


def _run(runner: str, spec: dict[str, Any]) -> None:
    if runner == "jax":
        import jax
        import jax.numpy as jnp
        jax.config.update("jax_enable_x64", True)
        prng = [jax.random.PRNGKey(0)]  # (not `key`: the case loop below uses that name)

        def normal(shape):
            prng[0], sub = jax.random.split(prng[0])
            return jax.random.normal(sub, shape, dtype=jnp.float64)

        ops = {"eigh": jax.jit(jnp.linalg.eigh), "eigvalsh": jax.jit(jnp.linalg.eigvalsh),
               "svd": jax.jit(lambda a: jnp.linalg.svd(a, full_matrices=False)),
               "svdvals": jax.jit(lambda a: jnp.linalg.svd(a, compute_uv=False)),
               "qr": jax.jit(jnp.linalg.qr), "cholesky": jax.jit(jnp.linalg.cholesky), "solve": jax.jit(jnp.linalg.solve)}
        xp, wait, version = jnp, jax.block_until_ready, jax.__version__
        device = str(jax.devices()[0])
    elif runner == "cupy":
        import cupy
        rng = cupy.random.default_rng(0)
        normal = rng.standard_normal
        ops = {"eigh": cupy.linalg.eigh, "eigvalsh": cupy.linalg.eigvalsh,
               "svd": lambda a: cupy.linalg.svd(a, full_matrices=False),
               "svdvals": lambda a: cupy.linalg.svd(a, compute_uv=False),
               "qr": cupy.linalg.qr, "cholesky": cupy.linalg.cholesky, "solve": cupy.linalg.solve}

        def wait(_):
            cupy.cuda.Device().synchronize()

        xp, version = cupy, cupy.__version__
        device = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    else:
        import numpy
        normal = numpy.random.default_rng(0).standard_normal
        ops = {"eigh": numpy.linalg.eigh, "eigvalsh": numpy.linalg.eigvalsh,
               "svd": lambda a: numpy.linalg.svd(a, full_matrices=False),
               "svdvals": lambda a: numpy.linalg.svd(a, compute_uv=False),
               "qr": numpy.linalg.qr, "cholesky": numpy.linalg.cholesky, "solve": numpy.linalg.solve}
        xp, version, device = numpy, numpy.__version__, "cpu"

        def wait(_):
            return None

    _emit({"peer": runner, "available": True, "version": version, "device": device})
    last: dict[tuple[Any, ...], tuple[int, float]] = {}   # (op, m, n, dtype) → (batch, ms) last timed
    for c in spec["cases"]:
        row = dict(c)
        key = (c["op"], c["m"], c["n"], c["dtype"])
        predicted = last[key][1] * c["batch"] / last[key][0] if key in last else None
        if predicted is not None and spec.get("max_call_s") and predicted > spec["max_call_s"] * 1e3:
            row["skipped"] = f"predicted {predicted / 1e3:.2g} s a call from batch {last[key][0]}"
            row["predicted_ms"] = predicted
        else:
            try:
                args = _inputs(xp, normal, c)
                fn = ops[c["op"]]
                row["ms"], row["reps"] = _median_ms(lambda: fn(*args), wait, spec["budget_s"], spec["max_reps"])
                last[key] = (c["batch"], row["ms"])
            except Exception as e:          # one failing case (size limit, memory) must not lose the rest
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            args = None                     # the inputs' memory back before the next case's
        _emit({"result": row})
    _emit({"done": True})


def _emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def main(argv: list[str]) -> None:
    runner, spec = argv[0], json.loads(argv[1])
    try:
        _run(runner, spec)
    except ImportError as e:
        _emit({"peer": runner, "available": False, "reason": f"not importable: {e}"})


if __name__ == "__main__":
    main(sys.argv[1:])
