"""The selection sweep: measure metalcore's kernels against torch over a size × batch × dtype grid,
write the table automatic selection reads, and check the "never slower" rule.

``python -m metalcore.bench --selection`` times, at every grid point of every swept op, the wall
time of one eager call, synchronised (what a user's loop feels, host work included), of

* ``kernel``: metalcore's public function with the device's backend forced (``use_backend``; for an
  op with alternative paths, ``use_path(op, "kernel")`` as below),
* each alternative path of the op that takes the input (``_selection.register_path``: e.g. eigh's
  register-tile Jacobi), forced by ``_selection.use_path`` alone (``kernel``: the kernel's own
  routing), so that the ops a path calls choose as they do when automatic selection picks it — the
  forcing entered outside the timed call, which takes the route's record of its signature as an
  automatic call does (:class:`_Forced`), and
* ``torch``: torch's own function for the same call (``torch.linalg.X``, ``F.rms_norm``, ...),

interleaved round by round so that drift slows all alike, and writes
``metalcore/_tables/<device>.json``: per op, variant, dtype and grid point, every median (the
alternatives under ``paths``) and the winner by name. :mod:`metalcore._selection` reads it. A path
wins a point only if it is the fastest there *and* its output agrees with torch's (a wrong fast
answer never wins).

``--check`` then times the public function as a user calls it (automatic selection, no forcing)
against torch at every grid point and applies the rule of DESIGN.md §3: automatic ≥ 0.95× torch
where torch's call takes ≥ 100 µs, ≥ 0.8× below (host-bound calls). A point that fails is timed
again on more calls, and that timing decides (the first is kept in the point as ``first``). It
prints each violation and exits non-zero if there is one.

Where a call would take more than ``LONG_CALL_S`` (torch loops cuSOLVER per matrix: eigh of
4096×128² is ~8 s), the point is not run: both times are extrapolated linearly in the batch from
the previous batch point of the same row and flagged ``extrapolated`` (both paths are linear in
the batch there: one matrix after another, or more programs than the device has slots).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import functools
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from metalcore import _selection
from metalcore._backend import automatic_backend, use_backend

# Grids. Linear algebra: the matrix size n (square matrices; the lookup uses the larger side) and
# the batch. Training ops: rows (tokens) and the row width (hidden size).
LINALG_N = (1, 2, 3, 4, 8, 16, 31, 32, 33, 64, 65, 128)
LINALG_BATCH = (1, 16, 256, 1024, 4096, 65536)
# The large-matrix paths (blocked QR, QR + QDWH + eigh SVD) at the sizes where they start.
LARGE_N = (256, 512, 1024)
LARGE_BATCH = (1, 8, 16)
ROWS = (1, 16, 256, 4096, 32768)
WIDTHS = (128, 1024, 4096, 8192)

# A call predicted longer than this is extrapolated, not run (see the module docstring). 1 s, not
# less: a batched path's time is nearly flat in the batch (the two-stage eigh: 45.7 ms at 1×1024²,
# ~50 at 8×1024², H100), which the linear prediction puts at 0.37 s, and at 0.3 s the sweep took
# the extrapolation for a measurement and missed the path's win there.
LONG_CALL_S = 1.0
# Nor is one whose inputs would exceed this many bytes (65536×128² fp64 is 8.6 GB).
MAX_INPUT_BYTES = 2 << 30
# Timing per callable and point: about this much wall time, within [MIN_REPS, MAX_REPS] calls.
BUDGET_S = 0.02
MIN_REPS, MAX_REPS = 3, 25
# The check times two paths at every point again, with fewer calls (its medians decide pass/fail, not
# a crossover).
CHECK_BUDGET_S, CHECK_MAX_REPS = 0.01, 12
# A point that fails on those few calls is timed again with this many (interleaved, medians), and the
# second timing decides: on the H100 two runs of the same 240 points flagged 3 and 2 *different*
# points at 0.91-0.95x (bench/selection.md v3), i.e. 12 calls of a 100-200 µs synchronised call
# do not resolve the route's 3-6 µs; the second timing takes up to 100 calls (0.25 s a path).
CONFIRM_BUDGET_S, CONFIRM_REPS = 0.25, 100
# The sweep re-times, the same way, a path that beat torch by less than this factor (its first
# timing may rest on an inflated torch median; :func:`_confirm_wins`). Wins of 2x or more stand.
CONFIRM_BELOW = 2.0
# Agreement of the kernel's canonical output with torch's, relative to the largest entry.
AGREE_TOL = {torch.float32: 1e-3, torch.float64: 1e-8, torch.bfloat16: 3e-2, torch.float16: 1e-2}
# The rule (DESIGN.md §3): the automatic path against torch, same run.
RULE_SLOW_S = 100e-6
RULE_RATIO_SLOW, RULE_RATIO_FAST = 0.95, 0.8


@dataclasses.dataclass(frozen=True)
class Sweep:
    """One swept op (and variant): how to build a grid point's inputs and the two callables."""

    key: str                       # table key: the registered op's name
    variant: str                   # "" or what else selects the path ("values" for eigvalsh)
    grid: str                      # "linalg" or "rows"
    dtypes: tuple[torch.dtype, ...]
    build: Callable[[torch.device, torch.dtype, int, int], tuple[Any, ...]]
    metalcore: Callable[..., Any]  # the public function, on the built inputs
    torch: Callable[..., Any]      # torch's own, on the same inputs
    op_args: Callable[..., tuple[Any, ...]]  # the registered op's arguments (to ask who serves)
    canonical: Callable[[Any], torch.Tensor]  # what both must agree on
    large: bool = False            # also swept at LARGE_N × LARGE_BATCH
    widths: tuple[int, ...] = WIDTHS  # the row widths of a "rows" sweep

    @property
    def name(self) -> str:
        return f"{self.key}:{self.variant}" if self.variant else self.key


# --- inputs ------------------------------------------------------------------------------------

def _general(device, dtype, n, batch):
    return torch.randn(batch, n, n, device=device, dtype=dtype)


def _spd(device, dtype, n, batch):
    A = torch.randn(batch, n, n, device=device, dtype=dtype)
    return A @ A.mT / n + torch.eye(n, device=device, dtype=dtype)


def _well_conditioned(device, dtype, n, batch):
    return torch.randn(batch, n, n, device=device, dtype=dtype) + n**0.5 * torch.eye(n, device=device, dtype=dtype)


def _lower(device, dtype, n, batch):
    return torch.linalg.cholesky(_spd(device, dtype, n, batch))


def _rows(device, dtype, rows, width):
    return torch.randn(rows, width, device=device, dtype=dtype)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _linalg_sweeps() -> list[Sweep]:
    import metalcore.linalg as ml

    f32_64 = (torch.float32, torch.float64)
    return [
        Sweep("cholesky_ex", "", "linalg", f32_64, lambda d, t, n, b: (_spd(d, t, n, b),),
              ml.cholesky, torch.linalg.cholesky, lambda A: (A, False, True), lambda L: L),
        Sweep("solve_ex", "", "linalg", f32_64,
              lambda d, t, n, b: (_well_conditioned(d, t, n, b), torch.randn(b, n, n, device=d, dtype=t)),
              ml.solve, torch.linalg.solve, lambda A, B: (A, B, True, True), lambda X: X),
        Sweep("solve_triangular", "", "linalg", f32_64,
              lambda d, t, n, b: (_lower(d, t, n, b), torch.randn(b, n, n, device=d, dtype=t)),
              lambda L, B: ml.solve_triangular(L, B, upper=False),
              lambda L, B: torch.linalg.solve_triangular(L, B, upper=False),
              lambda L, B: (L, B, False, True, False), lambda X: X),
        Sweep("cholesky_solve", "", "linalg", f32_64,
              lambda d, t, n, b: (torch.randn(b, n, n, device=d, dtype=t), _lower(d, t, n, b)),
              ml.cholesky_solve, torch.cholesky_solve, lambda B, L: (B, L, False), lambda X: X),
        Sweep("eigh", "vectors", "linalg", f32_64, lambda d, t, n, b: (_spd(d, t, n, b),),
              ml.eigh, torch.linalg.eigh, lambda A: (A, "L", True), lambda out: out[0], large=True),
        Sweep("eigh", "values", "linalg", f32_64, lambda d, t, n, b: (_spd(d, t, n, b),),
              ml.eigvalsh, torch.linalg.eigvalsh, lambda A: (A, "L", False), lambda w: w, large=True),
        Sweep("svd", "vectors", "linalg", f32_64, lambda d, t, n, b: (_general(d, t, n, b),),
              lambda A: ml.svd(A, full_matrices=False), lambda A: torch.linalg.svd(A, full_matrices=False),
              lambda A: (A, False, True), lambda out: out[1], large=True),
        Sweep("svd", "values", "linalg", f32_64, lambda d, t, n, b: (_general(d, t, n, b),),
              ml.svdvals, torch.linalg.svdvals, lambda A: (A, False, False), lambda S: S, large=True),
        Sweep("qr", "", "linalg", f32_64, lambda d, t, n, b: (_general(d, t, n, b),),
              ml.qr, torch.linalg.qr, lambda A: (A, "reduced"), lambda out: out[1].abs(), large=True),
    ]


def _rope_inputs(device, dtype, tokens, head_dim):
    """HF layout: q (1, 32, tokens, D), k (1, 8, tokens, D), cos/sin (1, tokens, D)."""
    q = torch.randn(1, 32, tokens, head_dim, device=device, dtype=dtype)
    k = torch.randn(1, 8, tokens, head_dim, device=device, dtype=dtype)
    angle = torch.randn(1, tokens, head_dim, device=device, dtype=dtype)
    return q, k, angle.cos(), angle.sin()


def _torch_rope(q, k, cos, sin):
    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _training_sweeps() -> list[Sweep]:
    import metalcore.nn as mn

    dtypes = (torch.bfloat16, torch.float32)

    def rms_inputs(d, t, rows, width):
        return _rows(d, t, rows, width), torch.randn(width, device=d, dtype=t)

    def swiglu_inputs(d, t, rows, width):
        return _rows(d, t, rows, width), _rows(d, t, rows, width)

    return [
        Sweep("rms_norm_fwd", "", "rows", dtypes, rms_inputs,
              lambda x, w: mn.rms_norm(x, (x.shape[-1],), w, 1e-6), lambda x, w: F.rms_norm(x, (x.shape[-1],), w, 1e-6),
              lambda x, w: (x, w, 1e-6, 0.0), lambda y: y),
        Sweep("fused_add_rms_norm_fwd", "", "rows", dtypes, lambda d, t, r, w: (*swiglu_inputs(d, t, r, w),
                                                                               torch.randn(w, device=d, dtype=t)),
              lambda x, res, w: mn.fused_add_rms_norm(x, res, w, 1e-6),
              lambda x, res, w: (F.rms_norm(x + res, (x.shape[-1],), w, 1e-6), x + res),
              lambda x, res, w: (x, res, w, 1e-6, 0.0), _first),
        Sweep("gelu_fwd", "", "rows", dtypes, lambda d, t, r, w: (_rows(d, t, r, w),),
              mn.metal_gelu, F.gelu, lambda x: (x, "none"), lambda y: y),
        Sweep("silu_fwd", "", "rows", dtypes, lambda d, t, r, w: (_rows(d, t, r, w),),
              mn.metal_silu, F.silu, lambda x: (x,), lambda y: y),
        Sweep("swiglu_fwd", "", "rows", dtypes, swiglu_inputs,
              mn.swiglu, lambda g, u: F.silu(g) * u, lambda g, u: (g, u), lambda y: y),
        Sweep("rope_fwd", "", "rows", dtypes, _rope_inputs,
              mn.apply_rotary_pos_emb, _torch_rope,
              lambda q, k, cos, sin: (q, k, cos, sin), _first, widths=(64, 128)),  # head dims
    ]


def sweeps() -> list[Sweep]:
    return _linalg_sweeps() + _training_sweeps()


# Registered ops with a kernel that the sweep does not cover, and why (the coverage test reads this).
NOT_SWEPT = {
    "sdpa_fwd": "attention has its own check (bench/scripts/attention_public_check.py); the Triton kernel is explicit-only",
    "sdpa_bwd": "as sdpa_fwd",
    "adamw_step_": "an optimizer step over many tensors: its grid (tensor count × size) is bench/scripts/adamw_check.py",
    "rms_norm_bwd": "follows rms_norm_fwd: the backward runs where the forward ran",
    "gelu_bwd": "follows gelu_fwd", "silu_bwd": "follows silu_fwd", "swiglu_bwd": "follows swiglu_fwd",
    "rope_bwd": "follows rope_fwd",
    "geqr2": "served by qr's measurements: the same kernel (qr is geqr2 + householder_product)",
    "householder_product": "served by qr's measurements (see geqr2)",
    "larft": "a primitive with no torch counterpart; explicit-only on CUDA",
    "larfb": "a primitive with no torch counterpart (GEMMs on every backend)",
    "gram_poly": "explicit-only (polar's Newton–Schulz step); measured by bench/scripts/muon_check.py",
    "cross_entropy_chunk_": "its grid is tokens × vocabulary under a memory budget, not n × batch: "
                            "bench/scripts/flce_check.py measures it against torch and Liger",
    "fused_linear_cross_entropy_fwd": "the chunk loop around cross_entropy_chunk_ (torch GEMMs on every backend)",
    "fused_linear_cross_entropy_bwd": "as fused_linear_cross_entropy_fwd",
}


def grid_points(s: Sweep) -> list[tuple[int, int]]:
    """(size, batch) pairs of a sweep: (n, batch) for linalg, (width, rows) for training ops."""
    if s.grid == "linalg":
        pts = [(n, b) for n in LINALG_N for b in LINALG_BATCH]
        if s.large:
            pts += [(n, b) for n in LARGE_N for b in LARGE_BATCH]
        return pts
    return [(w, r) for w in s.widths for r in ROWS]


def _build(s: Sweep, device, dtype, size, batch):
    if s.grid == "rows":
        return s.build(device, dtype, batch, size)
    return s.build(device, dtype, size, batch)


def _input_bytes(s: Sweep, dtype: torch.dtype, size: int, batch: int) -> int:
    per = torch.empty((), dtype=dtype).element_size()
    if s.grid == "linalg":
        return 2 * batch * size * size * per
    return 3 * batch * size * per


# --- timing ------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def wall_times(fns: dict[str, Callable[[], Any]], device: torch.device, budget_s: float = BUDGET_S,
               max_reps: int = MAX_REPS, min_reps: int = MIN_REPS) -> dict[str, float | None]:
    """Median wall seconds of one synchronised eager call of each callable (after one untimed call),
    interleaved round by round: between ``min_reps`` and ``max_reps`` calls, about ``budget_s`` each.
    A callable that raises gets None."""
    live: dict[str, Callable[[], Any]] = {}
    for name, fn in fns.items():
        try:
            fn()
            _sync(device)
            live[name] = fn
        except Exception:  # noqa: BLE001 — a path that fails (e.g. cuSOLVER's batch limit) loses the point
            _sync(device)
    times: dict[str, list[float]] = {name: [] for name in live}

    def one_round(names):
        for name in names:
            fn = live[name]
            forced = isinstance(fn, _Forced)
            with fn.forcing() if forced else contextlib.nullcontext():
                call = fn.bare if forced else fn
                _sync(device)
                t0 = time.perf_counter()
                call()
                _sync(device)
                times[name].append(time.perf_counter() - t0)

    one_round(list(live))
    reps = {name: max(min_reps, min(max_reps, int(budget_s / max(t[0], 1e-7)))) for name, t in times.items()}
    while due := [name for name in live if len(times[name]) < reps[name]]:
        one_round(due)
    return {name: (statistics.median(times[name]) if name in times else None) for name in fns}


def _agree(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    a, b = a.double(), b.double()
    if a.shape != b.shape:
        return False
    scale = b.abs().max().clamp_min(1e-30)
    return bool(((a - b).abs().max() / scale <= AGREE_TOL[dtype]).item()) and bool(torch.isfinite(a).all().item())


# --- the sweep ---------------------------------------------------------------------------------

def _registered(s: Sweep):
    from metalcore._op import registered_ops

    return registered_ops()[s.key]


def measure_row(s: Sweep, device: torch.device, backend: str, dtype: torch.dtype, size: int,
                batches: Sequence[int], log: Callable[[str], None],
                seed: dict[str, tuple[int, float]] | None = None) -> list[dict[str, Any]]:
    """Every batch of one (op, variant, dtype, size) row, in increasing batch order: torch, the
    kernel as it routes itself, and each alternative path of the op that takes the input
    (:func:`metalcore._selection.register_path`). A path whose call would take longer than
    ``LONG_CALL_S`` (predicted from its previous batch, or from ``seed`` before the row's first) is
    extrapolated instead of run, the others are still measured."""
    op = _registered(s)
    alternatives = _selection.paths(s.key, backend)
    points: list[dict[str, Any]] = []
    last: dict[str, tuple[int, float]] = dict(seed or {})  # callable → (batch, seconds) of its last measurement
    agreed: dict[str, bool | None] = {}       # path → whether its output agreed with torch's last time
    served_by = None
    for batch in batches:
        point: dict[str, Any] = dict(variant=s.variant, dtype=str(dtype).removeprefix("torch."), size=size,
                                     batch=batch, torch_s=None, kernel_s=None, extrapolated=[],
                                     served_by=served_by, agree=agreed.get(_selection.KERNEL))
        if alternatives:
            point["paths"] = {}
        too_big = _input_bytes(s, dtype, size, batch) > MAX_INPUT_BYTES
        predicted = {name: t * batch / b for name, (b, t) in last.items()}
        long = {name for name, t in predicted.items() if too_big or t > LONG_CALL_S}
        for name in sorted(long):
            _record(point, name, predicted[name], agreed.get(name))
            point["extrapolated"].append(name)
        if too_big and not long:
            point["skipped"] = "inputs too large and no smaller batch to extrapolate from"
        elif not too_big:
            try:
                inputs = _build(s, device, dtype, size, batch)
            except Exception as e:  # noqa: BLE001 — recorded, the row goes on
                point["skipped"] = f"inputs: {type(e).__name__}: {e}"[:200]
                points.append(point)
                continue
            args = s.op_args(*inputs)
            with use_backend(backend):
                try:
                    served_by = op.backend_for(*args)
                except Exception as e:  # noqa: BLE001
                    served_by = f"error: {type(e).__name__}"
            point["served_by"] = served_by
            fns: dict[str, Callable[[], Any]] = {}
            if "torch" not in long:
                fns["torch"] = functools.partial(s.torch, *inputs)
            if served_by == backend:
                runnable = [_selection.KERNEL, *(name for name, p in alternatives.items() if p.supports(*args))]
                fns.update({name: _Forced(s, backend, name, inputs, bool(alternatives))
                            for name in runnable if name not in long})
            times = wall_times(fns, device)
            if any(name != "torch" for name in times):
                reference = _reference(s, inputs, times.get("torch") is not None)
            for name, t in times.items():
                if t is not None:
                    last[name] = (batch, t)
                if name == "torch":
                    point["torch_s"] = t
                    continue
                agreed[name] = None if t is None else _agrees(s, fns[name], reference, dtype)
                _record(point, name, t, agreed[name])
            if served_by == backend:
                _confirm_wins(point, fns, device, agreed)
            del inputs, fns
        if served_by != backend:
            point["kernel_s"] = None
            point.pop("paths", None)
        point["winner"] = _selection.winner(point)
        points.append(point)
        log(_fmt_point(s, point))
    return points


def _confirm_wins(point: dict[str, Any], fns: dict[str, Callable[[], Any]], device: torch.device,
                  agreed: dict[str, bool | None]) -> None:
    """A path that won the point by less than ``CONFIRM_BELOW`` is timed again against torch alone,
    on more calls, and that timing decides (the first stays in ``point["first"]``); then the next
    winner, until torch wins or the winner is confirmed. The sweep times torch interleaved with every
    path of the point, and that inflated torch's median: 1.34x the check's at eigh n <= 32, 1.3-2x at
    fp64 solve n = 32 on the H100, where the kernel then lost to torch in the checks
    (bench/selection.md v5, v6)."""
    confirmed: set[str] = set()
    while (winner := _selection.winner(point)) != _selection.TORCH and winner not in confirmed:
        if "torch" not in fns or winner not in fns or point["torch_s"] is None:
            return
        won = point["kernel_s"] if winner == _selection.KERNEL else point["paths"][winner]["s"]
        if point["torch_s"] >= CONFIRM_BELOW * won:
            return
        point.setdefault("first", {"torch_s": point["torch_s"]})[winner] = won
        again = wall_times({"torch": fns["torch"], winner: fns[winner]}, device, CONFIRM_BUDGET_S, CONFIRM_REPS)
        if again.get("torch") is None or again.get(winner) is None:
            return
        point["torch_s"] = again["torch"]
        _record(point, winner, again[winner], agreed.get(winner))
        confirmed.add(winner)


class _Forced:
    """The public function with ``backend``'s kernel forced: for an op with alternatives (``choose``),
    the path ``name`` (``kernel``: the kernel's own routing, whatever the table says), for the swept
    op alone where ``backend`` is the device's own; otherwise ``backend`` for every op. Calling it
    enters the forcing around the call; :func:`wall_times` enters it outside the timed region
    (``forcing``) and times ``bare``, so a path is timed as the public function runs it when the
    table chooses it: the forced call takes the route's record like an automatic one
    (metalcore/_route.py), and the two context managers' ~1-2 µs stay out of its time."""

    def __init__(self, s: Sweep, backend: str, name: str, inputs: tuple[Any, ...], choose: bool):
        self.s, self.backend, self.name, self.inputs, self.choose = s, backend, name, inputs, choose
        device = next(t.device for t in inputs if isinstance(t, torch.Tensor))
        self.own_backend = backend == automatic_backend(device)

    @contextlib.contextmanager
    def forcing(self):
        if not self.choose:
            with use_backend(self.backend):
                yield
            return
        # On the device's own backend only the swept op is forced: a path that calls other ops (the
        # qdwh svd: qr, eigh) then runs them as their tables choose, as it does when automatic
        # selection picks it. Forcing the backend for every op timed another composition: fp64
        # 64×256² qdwh 5.6 ms in the v9 sweep, its automatic call 27 ms in the check (the stacked
        # 128×64 QR went to the kernel forced, to torch by the table's square 128² point).
        backend = contextlib.nullcontext() if self.own_backend else use_backend(self.backend)
        with backend, _selection.use_path(self.s.key, self.name):
            yield

    def bare(self) -> Any:
        return self.s.metalcore(*self.inputs)

    def __call__(self) -> Any:
        with self.forcing():
            return self.bare()


def _record(point: dict[str, Any], name: str, seconds: float | None, agree: bool | None) -> None:
    if name == "torch":
        point["torch_s"] = seconds
    elif name == _selection.KERNEL:
        point["kernel_s"] = seconds
        point["agree"] = agree
    else:
        point["paths"][name] = {"s": seconds, "agree": agree}


# Matrices (rows) of the reference answer where torch's own call at the full batch failed or was
# too long to run: its first ones, enough to catch a wrong kernel without a long call.
REFERENCE_SLICE = 64


def _reference(s: Sweep, inputs: tuple[Any, ...], full: bool) -> tuple[torch.Tensor | None, int | None]:
    """Torch's canonical answer and the leading slice it covers (None: all of it): at the full batch
    where torch's call ran, else on the first ``REFERENCE_SLICE`` matrices (rows). ``(None, None)``
    where torch fails on those too."""
    if full:
        try:
            return s.canonical(s.torch(*inputs)), None
        except Exception:  # noqa: BLE001 — timed once, failed now: no reference at this point
            return None, None
    sliced = tuple(x[:REFERENCE_SLICE] if isinstance(x, torch.Tensor) and x.dim() else x for x in inputs)
    try:
        return s.canonical(s.torch(*sliced)), REFERENCE_SLICE
    except Exception:  # noqa: BLE001
        return None, None


def _agrees(s: Sweep, fn: Callable[[], Any], reference: tuple[torch.Tensor | None, int | None],
            dtype: torch.dtype) -> bool:
    """Whether a path's canonical output agrees with torch's (on the slice the reference covers). A
    point without any reference agrees by default: only a path that is wrong where torch answers loses."""
    expected, count = reference
    try:
        out = s.canonical(fn())
    except Exception:  # noqa: BLE001
        return False
    if expected is None:
        return bool(torch.isfinite(out).all().item())
    return _agree(out if count is None else out[:count], expected, dtype)


def _fmt_point(s: Sweep, p: dict[str, Any]) -> str:
    def us(x):
        return "-" if x is None else f"{x * 1e6:.1f}"
    ratio = "" if not (p["kernel_s"] and p["torch_s"]) else f" {p['torch_s'] / p['kernel_s']:.2f}x"
    others = "".join(f" {name}={us(q['s'])}µs" + ("" if q["agree"] is not False else "(disagrees)")
                     for name, q in p.get("paths", {}).items())
    flag = f" (extrapolated: {', '.join(p['extrapolated'])})" if p["extrapolated"] else ""
    return (f"{s.name:24s} {p['dtype']:8s} size={p['size']:<5d} batch={p['batch']:<6d} torch={us(p['torch_s'])}µs "
            f"kernel={us(p['kernel_s'])}µs{ratio}{others} served_by={p['served_by']} agree={p['agree']} "
            f"-> {p['winner']}{flag}")


def _rows_of(s: Sweep, sizes: Sequence[int] | None = None, batches: Sequence[int] | None = None
             ) -> dict[int, list[int]]:
    """The sweep's grid as rows: size → increasing batches (optionally restricted)."""
    rows: dict[int, list[int]] = {}
    for size, batch in grid_points(s):
        if (not sizes or size in sizes) and (not batches or batch in batches):
            rows.setdefault(size, []).append(batch)
    return rows


def torch_seed(table: dict[str, Any] | None, s: Sweep, dtype: torch.dtype, size: int, first_batch: int
               ) -> dict[str, tuple[int, float]]:
    """Torch's time at the largest batch below ``first_batch`` of this row in ``table`` (a table as
    written before, on the same card), as ``{"torch": (batch, seconds)}``; empty where there is none.
    A row swept from a later batch (``--batches 1024``) then extrapolates torch's per-matrix loop as a
    whole row does, instead of running it: svd at batch 1024 took 218 s on the H100 for want of it
    (torch 0.9-3.7 s a call at n = 33-128, bench/selection.md v7)."""
    name = str(dtype).removeprefix("torch.")
    below = [p for p in (table or {}).get("ops", {}).get(s.key, [])
             if (p["variant"], p["dtype"], p["size"]) == (s.variant, name, size)
             and p["batch"] < first_batch and p.get("torch_s")]
    if not below:
        return {}
    p = max(below, key=lambda p: p["batch"])
    return {"torch": (p["batch"], p["torch_s"])}


def sweep(device: torch.device, backend: str, selected: Sequence[Sweep], log: Callable[[str], None],
          dtypes: Sequence[torch.dtype] | None = None, sizes: Sequence[int] | None = None,
          batches: Sequence[int] | None = None, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the sweep; returns the table (see :mod:`metalcore._selection` for its layout).
    ``previous``: the card's table so far, whose torch times seed rows swept from a later batch."""
    ops: dict[str, list[dict[str, Any]]] = {}
    for s in selected:
        for dtype in s.dtypes:
            if dtypes and dtype not in dtypes:
                continue
            for size, row in _rows_of(s, sizes, batches).items():
                seed = torch_seed(previous, s, dtype, size, row[0])
                ops.setdefault(s.key, []).extend(measure_row(s, device, backend, dtype, size, row, log, seed))
    return ops


def _metadata(device: torch.device) -> dict[str, Any]:
    from metalcore.bench.harness import device_info, run_metadata

    return run_metadata(device, device_info(device))


def table_path(device: torch.device, root: Path | None = None) -> Path:
    return (root or _selection.TABLE_DIR) / f"{_selection.device_kind(device)}.json"


def read_table(path: Path) -> dict[str, Any] | None:
    """The table written at ``path``, or None where there is none yet."""
    return json.loads(path.read_text()) if path.exists() else None


def merge_into(path: Path, new_ops: dict[str, list[dict[str, Any]]], meta: dict[str, Any]) -> dict[str, Any]:
    """Replace the swept points of ``path``'s table (same op, variant, dtype, size and batch) by the
    new measurements, keeping the rest: a sweep of some ops or sizes refreshes those points only."""
    table = read_table(path) or {"ops": {}}
    for key, points in new_ops.items():
        fresh = {(p["variant"], p["dtype"], p["size"], p["batch"]) for p in points}
        kept = [p for p in table["ops"].get(key, [])
                if (p["variant"], p["dtype"], p["size"], p["batch"]) not in fresh]
        table["ops"][key] = kept + points
    table["meta"] = meta
    table["grids"] = {"linalg": {"size": list(LINALG_N), "batch": list(LINALG_BATCH)},
                      "large": {"size": list(LARGE_N), "batch": list(LARGE_BATCH)},
                      "rows": {"size": sorted(set(WIDTHS) | {64, 128}), "batch": list(ROWS)}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=None, separators=(",", ":")) + "\n")
    return table


def refute(path: Path, violations: Sequence[dict[str, Any]]) -> list[str]:
    """At each violating check point where the table chose a path, mark every path measured faster
    than torch there as ``refuted``, so that the point goes to torch; returns what changed. The
    sweep times torch interleaved with every path of a point, the check with the chosen one alone
    and on more calls: on the H100 the sweep's torch median sat 1.34x above the check's at eigh
    n <= 32, and two register-tile choices it made lost to torch in the check (fp64 n = 3 at batches
    16 and 256, 0.79-0.80x; bench/selection.md v5). The other paths' wins at such a point were
    measured against the same slow torch reading, so none of them stands either."""
    table = json.loads(path.read_text())
    done = []
    for v in violations:
        key, _, variant = v["op"].partition(":")
        for point in table["ops"].get(key, []):
            if (point["variant"], point["dtype"], point["size"], point["batch"]) != (variant, v["dtype"], v["size"], v["batch"]):
                continue
            chosen = _selection.winner(point)
            if chosen != _selection.TORCH:
                point["refuted"] = sorted({*point.get("refuted", ()), *_selection.faster_paths(point)})
                point["winner"] = _selection.winner(point)
                done.append(f"{v['op']} {v['dtype']} size={v['size']} batch={v['batch']}: {chosen} -> {point['winner']}")
    path.write_text(json.dumps(table, indent=None, separators=(",", ":")) + "\n")
    _selection.reload()
    return done


# --- the check ---------------------------------------------------------------------------------

def check(device: torch.device, selected: Sequence[Sweep], log: Callable[[str], None],
          dtypes: Sequence[torch.dtype] | None = None, sizes: Sequence[int] | None = None,
          batches: Sequence[int] | None = None, previous: dict[str, Any] | None = None
          ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Time the public function (automatic) against torch at every grid point; returns all points
    and the violations of the rule. ``previous``: as :func:`sweep`'s."""
    points, violations = [], []
    for s in selected:
        for dtype in s.dtypes:
            if dtypes and dtype not in dtypes:
                continue
            for size, row in _rows_of(s, sizes, batches).items():
                last = torch_seed(previous, s, dtype, size, row[0])
                for batch in row:
                    p: dict[str, Any] = dict(op=s.name, dtype=str(dtype).removeprefix("torch."), size=size,
                                             batch=batch, extrapolated=[], torch_s=None, auto_s=None)
                    big = _input_bytes(s, dtype, size, batch) > MAX_INPUT_BYTES
                    long = {name for name, (b, t) in last.items() if big or t * batch / b > LONG_CALL_S}
                    for name in long:
                        b, t = last[name]
                        p[f"{name}_s"] = t * batch / b
                        p["extrapolated"].append(name)
                    if not big:
                        inputs = _build(s, device, dtype, size, batch)
                        # Where the table gives the call to torch, a failing point is torch's own
                        # call behind metalcore's route: its host cost, not a path's choice.
                        p["served"] = "torch" if _runs_torch(s, inputs) else "metalcore"
                        if "torch" in long and "auto" not in long and p["served"] == "torch":
                            # The automatic path is torch's own call here (the table chose torch): it
                            # costs what torch's does, whatever the kernel took at the previous batch
                            # (eigh 65536×64²: torch's loop, 53 s, after the kernel's 9 ms at 4096).
                            long.add("auto")
                            p["auto_s"] = p["torch_s"]
                            p["extrapolated"].append("auto")
                        fns = {name: fn for name, fn in (("torch", lambda: s.torch(*inputs)),
                                                         ("auto", lambda: s.metalcore(*inputs))) if name not in long}
                        for name, t in wall_times(fns, device, CHECK_BUDGET_S, CHECK_MAX_REPS).items():
                            p[f"{name}_s"] = t
                            if t is not None:
                                last[name] = (batch, t)
                        if p["auto_s"] is None and "auto" in fns:
                            p["auto_error"] = _error_of(fns["auto"], device)
                        if _violates(p) and len(fns) == 2 and p["auto_s"] is not None:
                            # Confirm on more calls; the first timing stays in the point.
                            p["first"] = {"torch_s": p["torch_s"], "auto_s": p["auto_s"]}
                            p.update({f"{name}_s": t for name, t in
                                      wall_times(fns, device, CONFIRM_BUDGET_S, CONFIRM_REPS).items()})
                        del inputs
                    p["ratio"] = (p["torch_s"] / p["auto_s"]) if p["torch_s"] and p["auto_s"] else None
                    p["violation"] = _violates(p)
                    points.append(p)
                    if p["violation"]:
                        violations.append(p)
                    log(f"check {p['op']:24s} {p['dtype']:8s} size={size:<5d} batch={batch:<6d} "
                        f"torch={_us(p['torch_s'])} auto={_us(p['auto_s'])} ratio={_r(p['ratio'])}"
                        + (" VIOLATION" if p["violation"] else "")
                        + (f" (extrapolated: {', '.join(p['extrapolated'])})" if p["extrapolated"] else ""))
    return points, violations


def _runs_torch(s: Sweep, inputs: tuple[Any, ...]) -> bool:
    """Whether the public function, automatic, gives these inputs to torch's own op."""
    try:
        return _registered(s).backend_for(*s.op_args(*inputs)) == "reference"
    except Exception:  # noqa: BLE001 — the call itself will raise and be recorded
        return False


def _us(x):
    return "-" if x is None else f"{x * 1e6:.1f}µs"


def _r(x):
    return "-" if x is None else f"{x:.2f}x"


def _error_of(fn: Callable[[], Any], device: torch.device) -> str | None:
    """What a call that failed in :func:`wall_times` raises, for the check's report."""
    try:
        fn()
        _sync(device)
    except Exception as e:  # noqa: BLE001 — reported, not handled
        return f"{type(e).__name__}: {e}"[:300]
    return None


def _violates(p: dict[str, Any]) -> bool:
    if p["auto_s"] is None:
        return p["torch_s"] is not None  # metalcore failed where torch answers
    if p["torch_s"] is None:
        return False
    need = RULE_RATIO_SLOW if p["torch_s"] >= RULE_SLOW_S else RULE_RATIO_FAST
    return p["torch_s"] / p["auto_s"] < need


def summary_line(points: Sequence[dict[str, Any]], violations: Sequence[dict[str, Any]], device_name: str) -> str:
    ratios = [p["ratio"] for p in points if p["ratio"]]
    worst = min(points, key=lambda p: p["ratio"] or math.inf) if ratios else None
    text = (f"selection check on {device_name}: {len(points)} grid points, {len(violations)} below the rule "
            f"(>= {RULE_RATIO_SLOW}x torch where torch takes >= {RULE_SLOW_S * 1e6:.0f} µs, >= {RULE_RATIO_FAST}x "
            f"below); median ratio {statistics.median(ratios):.2f}x" if ratios else "no timed points")
    if worst is not None:
        text += (f"; worst {worst['op']} {worst['dtype']} size={worst['size']} batch={worst['batch']} "
                 f"{worst['ratio']:.2f}x")
    by_torch = sum(v.get("served") == "torch" for v in violations)
    if by_torch:
        text += f"; {by_torch} of the points below the rule served by torch's own call"
    return text


# --- charts ------------------------------------------------------------------------------------

def write_heatmaps(points: Sequence[dict[str, Any]], path: Path, title: str) -> bool:
    """One panel per op and dtype: the automatic path's speed ratio to torch (> 1: faster) over the
    size × batch grid, on a diverging scale centred at 1.0×, the ratio printed in each cell."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import LogNorm
    except ImportError:
        return False
    panels: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for p in points:
        if p["ratio"]:
            panels.setdefault((p["op"], p["dtype"]), []).append(p)
    if not panels:
        return False
    cols = 2
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(13, 3.6 * rows), squeeze=False)
    norm = LogNorm(vmin=0.1, vmax=10)
    for ax, ((op, dtype), pts) in zip(axes.flat, sorted(panels.items())):
        sizes = sorted({p["size"] for p in pts})
        batches = sorted({p["batch"] for p in pts})
        grid = [[math.nan] * len(batches) for _ in sizes]
        for p in pts:
            grid[sizes.index(p["size"])][batches.index(p["batch"])] = p["ratio"]
        im = ax.imshow(grid, cmap="RdYlGn", norm=norm, aspect="auto", origin="lower")
        ax.set_xticks(range(len(batches)), [str(b) for b in batches])
        ax.set_yticks(range(len(sizes)), [str(s) for s in sizes])
        ax.set_xlabel("batch (rows for training ops)")
        ax.set_ylabel("n (width)")
        ax.set_title(f"{op} {dtype}", fontsize=12)
        for i, row in enumerate(grid):
            for j, r in enumerate(row):
                if not math.isnan(r):
                    ax.text(j, i, f"{r:.2f}", ha="center", va="center", fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.6, label="torch time / metalcore time (1.0 = parity)")
    fig.suptitle(title, fontsize=14)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return True


# --- the command line --------------------------------------------------------------------------

def parse_dtypes(text: str) -> list[torch.dtype]:
    return [getattr(torch, name.strip()) for name in text.split(",") if name.strip()]


def main(args: Any) -> int:
    """``--selection`` of ``python -m metalcore.bench`` (arguments parsed there)."""
    from metalcore.bench.harness import detect_device

    device = detect_device(args.device)
    backend = {"cuda": "triton", "mps": "metal"}.get(device.type)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        backend = "triton"  # a smoke run of the sweep itself on the interpreter (tests)
    if backend is None:
        print("metalcore.bench --selection: needs a device with kernels (cuda or mps); the CPU runs the reference",
              file=sys.stderr)
        return 2
    wanted = [o.strip() for o in args.ops.split(",") if o.strip()]
    selected = [s for s in sweeps() if not wanted or s.key in wanted or s.name in wanted]
    if not selected:
        print(f"metalcore.bench --selection: no swept op matches {args.ops!r}", file=sys.stderr)
        return 2
    dtypes = parse_dtypes(args.dtypes) if args.dtypes else None
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else None
    batches = [int(x) for x in args.batches.split(",")] if args.batches else None
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    meta = _metadata(device)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M")
    kind = _selection.device_kind(device)
    code = 0
    table_file = table_path(device)
    if not args.check_only:
        t0 = time.time()
        count = 0
        for s in selected:  # the table is rewritten after each op: a run cut short keeps what it measured
            ops = sweep(device, backend, [s], log, dtypes, sizes, batches, read_table(table_file))
            meta["sweep_s"] = round(time.time() - t0, 1)
            merge_into(table_file, ops, meta)
            count += sum(len(v) for v in ops.values())
        _selection.reload()
        print(f"wrote {table_file} ({count} points, {meta['sweep_s']} s)")
    if args.check or args.check_only:
        t0 = time.time()
        points, violations = [], []
        check_file = out_dir / f"selection-check-{kind}-{stamp}.json"
        previous = read_table(table_file)
        for s in selected:  # written after each op: a run cut short keeps what it checked
            p, v = check(device, [s], log, dtypes, sizes, batches, previous)
            points += p
            violations += v
            check_file.write_text(json.dumps({"meta": meta, "partial": True, "points": points}, indent=1))
        for v in violations:
            print(f"VIOLATION {v['op']} {v['dtype']} size={v['size']} batch={v['batch']}: "
                  f"torch {_us(v['torch_s'])}, metalcore {_us(v['auto_s'])} ({_r(v['ratio'])})"
                  + (f" raised {v['auto_error']}" if v.get("auto_error") else "")
                  + (" [served by torch's own call]" if v.get("served") == "torch" else ""))
        line = summary_line(points, violations, meta.get("device", {}).get("name", device.type))
        print(line)
        if not args.check_only and violations:
            # A sweep and its check in one run: the check's pairwise timing overrules the sweep's.
            for text in refute(table_path(device), violations):
                print(f"refuted {text}")
        result = {"meta": meta, "summary": line, "check_s": round(time.time() - t0, 1), "points": points}
        check_file.write_text(json.dumps(result, indent=1))
        write_heatmaps(points, out_dir / f"selection-check-{kind}-{stamp}.png", line[:110])
        code = 1 if violations else 0
    return code


def warm_compile(ops: str, device_name: str, workers: int, sizes: Sequence[int] | None = None,
                 dtypes: Sequence[torch.dtype] | None = None) -> None:
    """Compile every Triton kernel variant the sweep will launch (each path of each swept op, at the
    sizes and dtypes asked for), in ``workers`` processes sharing Triton's on-disk cache, so that
    the timed sweep finds them compiled (a serial first launch of ~200 variants costs minutes of
    compilation)."""
    import subprocess

    wanted = [o for o in ops.split(",") if o]
    jobs = []
    for s in sweeps():
        if wanted and s.key not in wanted and s.name not in wanted:
            continue
        for dtype in s.dtypes:
            if dtypes and dtype not in dtypes:
                continue
            for size in _rows_of(s, sizes):
                jobs.append(f"{s.name}|{str(dtype).removeprefix('torch.')}|{size}")
    chunks = [jobs[i::workers] for i in range(workers)]
    procs = [subprocess.Popen([sys.executable, "-m", "metalcore.bench.selection", "--warm", device_name, *chunk],
                              env=os.environ.copy()) for chunk in chunks if chunk]
    for p in procs:
        p.wait()


def _warm_worker(device_name: str, jobs: Sequence[str]) -> None:
    device = torch.device(device_name)
    backend = {"cuda": "triton", "mps": "metal"}[device.type]
    by_name = {s.name: s for s in sweeps()}
    for job in jobs:
        name, dtype_name, size = job.split("|")
        s = by_name[name]
        dtype = getattr(torch, dtype_name)
        alternatives = _selection.paths(s.key, backend)
        for batch in (1, 16, 256, 4096):
            if _input_bytes(s, dtype, int(size), batch) > MAX_INPUT_BYTES // 8:
                break
            try:
                inputs = _build(s, device, dtype, int(size), batch)
                args = s.op_args(*inputs)
            except Exception:  # noqa: BLE001 — the sweep records failures; warming only compiles
                continue
            for path in [_selection.KERNEL, *(n for n, p in alternatives.items() if p.supports(*args))]:
                try:
                    _Forced(s, backend, path, inputs, bool(alternatives))()
                    _sync(device)
                except Exception:  # noqa: BLE001
                    pass


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--warm":
        _warm_worker(sys.argv[2], sys.argv[3:])
