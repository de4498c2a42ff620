"""Automatic selection from measurements: the per-device tables written by
``python -m metalcore.bench --selection`` (``metalcore/_tables/<device kind>.json``), and the
alternative paths an op's kernel may take.

:func:`measured_choice` answers, for one call's metadata, whether the measured table prefers the
backend's kernel (True), the torch path (False), or has no measurement for it (None, and the
kernel's own ``automatic`` rule decides). It depends on shapes and dtypes only, never on data, so
the dispatcher caches its answer per call signature.

A table holds, per op, points ``(variant, dtype, size, batch)`` on a grid: linear algebra by matrix
size ``n`` (the larger side) × batch, training ops by row width × rows. Each point records the
median times of torch and of every path metalcore has there (:func:`faster_paths` reads them): the
backend's kernel as it routes itself (``kernel``) and its alternatives (``paths``: e.g. eigh's
register-tile Jacobi, ``registers``). A call between grid points takes a path only if *every*
surrounding grid point measured *that path* faster than torch: where neighbours disagree the
crossover lies somewhere between them, unmeasured, and torch's own path is the one that cannot be
slower than torch. Among the paths that pass, the one with the least time relative to the fastest,
summed over the surrounding points. Outside the grid the nearest edge decides (times grow linearly
in the batch past the largest one measured). A point that names a path this metalcore does not
have (a table from another version) counts as not measured faster for it, with a warning.

Alternative paths (:func:`register_path`) are implementations of an op on one backend that only
the table chooses (none is automatic without a measurement); the kernel asks :func:`route` which
one runs. :func:`use_path` forces one (the sweep times each of them that way).

Device kinds: a CUDA card by its name (``nvidia-h100-80gb-hbm3``), ``mps`` for Apple GPUs. A card
without a table of its own uses the table of its vendor's measured card, if one exists, since the
kernels' launch shapes were tuned there too; no table at all means None everywhere.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import json
import math
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from metalcore._backend import BackendUnavailableError

TABLE_DIR = Path(__file__).parent / "_tables"
# The name of a backend's kernel routing itself (its own rules: sizes, libraries), and of torch.
KERNEL, TORCH = "kernel", "torch"

# Backward ops and the primitives of an op follow the measured op: the backward runs where its
# forward would (same sizes), geqr2/householder_product are qr's kernel in two halves.
_ALIAS = {"rms_norm_bwd": "rms_norm_fwd", "gelu_bwd": "gelu_fwd", "silu_bwd": "silu_fwd",
          "swiglu_bwd": "swiglu_fwd", "rope_bwd": "rope_fwd", "geqr2": "qr", "householder_product": "qr"}
# Which argument holds the matrix whose size and batch locate a linear-algebra call.
_MATRIX_ARG = {"cholesky_ex": 0, "solve_ex": 0, "solve_triangular": 0, "cholesky_solve": 1, "eigh": 0,
               "svd": 0, "qr": 0, "geqr2": 0, "householder_product": 0}
# Ops whose third argument selects the variant of the table (eigh's compute_v, svd's compute_uv).
_VARIANT_ARG = frozenset({"eigh", "svd"})
_ROWS_OPS = {"rms_norm_fwd", "rms_norm_bwd", "fused_add_rms_norm_fwd", "gelu_fwd", "gelu_bwd", "silu_fwd",
             "silu_bwd", "swiglu_fwd", "swiglu_bwd", "rope_fwd", "rope_bwd"}


# --- alternative paths -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AlternativePath:
    """One alternative implementation of an op on one backend: ``fn`` takes the op's arguments and
    returns its outputs; ``supports`` (same arguments, metadata only) bounds the inputs it takes;
    ``specialize`` (optional, as the kernel's in ``MetalcoreOp.implement``) returns ``fn`` specialized
    to a call signature, or None."""

    op: str
    backend: str
    name: str
    fn: Callable[..., Any]
    supports: Callable[..., bool]
    specialize: Callable[..., Callable[..., Any] | None] | None = None


_PATHS: dict[tuple[str, str], dict[str, AlternativePath]] = {}
# op → the path forced by use_path. Process-wide like use_backend, for the same reason (autograd's
# device threads). Read by the op core's plan key and the torch route.
_forced: dict[str, str] = {}


def forced_paths() -> dict[str, str]:
    """The paths :func:`use_path` forces now, by op (the live dict: read it, do not change it)."""
    return _forced


def _clear_plans() -> None:
    from metalcore._op import clear_plans   # here: the op core imports this module

    clear_plans()


def register_path(op: str, backend: str, name: str, *, supports: Callable[..., bool],
                  specialize: Callable[..., Callable[..., Any] | None] | None = None
                  ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``fn`` becomes the alternative path ``name`` of ``op`` on ``backend``. It runs only
    where a measured table names it (or :func:`use_path` forces it), never by default. ``specialize``:
    as ``MetalcoreOp.implement``'s, kept in the op's plan for plain tensors."""
    if name in (KERNEL, TORCH) or not name.isidentifier():
        raise ValueError(f"path name must be an identifier other than {KERNEL!r} and {TORCH!r}; got {name!r}")

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        _PATHS.setdefault((op, backend), {})[name] = AlternativePath(op, backend, name, fn, supports, specialize)
        _known.cache_clear()
        _clear_plans()
        return fn

    return register


def paths(op: str, backend: str) -> dict[str, AlternativePath]:
    """The alternative paths of ``op`` on ``backend`` by name (the kernel's own routing is not one)."""
    return dict(_PATHS.get((op, backend), {}))


def path_names(op: str) -> list[str]:
    """Every name :func:`use_path` accepts for ``op``: ``kernel`` and the alternatives of any backend."""
    return [KERNEL, *sorted({name for (o, _), named in _PATHS.items() if o == op for name in named})]


@contextlib.contextmanager
def use_path(op: str, name: str) -> Iterator[None]:
    """Inside the block, ``op``'s kernel runs the path ``name`` (``kernel``: its own routing, ignoring
    the table) whatever the table says; a path that does not take an input raises
    :class:`BackendUnavailableError` there. With automatic backend selection, ``op`` takes the
    device's backend's kernel over torch, and every other op chooses as usual; combine with
    ``metalcore.use_backend`` to force a backend (for every op inside the block)."""
    known = path_names(op)
    if name not in known:
        raise ValueError(f"metalcore.{op} has no path {name!r}; it has: {', '.join(known)}")
    previous = _forced.get(op)
    _forced[op] = name
    # The forced path is part of each plan's key (metalcore/_op.py), so plans need not be dropped:
    # the selection sweep enters this block on every timed call, and re-planning each call cost
    # ~80 µs on the H100 host (the syevj check: 500×16² forced through the op 0.352 ms, the path
    # called directly 0.273), which hid paths' wins at latency-bound sizes.
    try:
        yield
    finally:
        if previous is None:
            del _forced[op]
        else:
            _forced[op] = previous


def route(op: str, backend: str, args: tuple[Any, ...]) -> AlternativePath | None:
    """The alternative path ``op``'s ``backend`` kernel runs for ``args``, or None for its own
    routing: the forced one, else the one the measured table chose (where it takes the input).
    The op core asks once per call signature and keeps the answer in the call's plan (~5.6 µs a
    decision on the 2-core CI machine, nothing a call after it)."""
    registered = _PATHS.get((op, backend))
    forced = _forced.get(op)
    if forced is not None:
        if forced == KERNEL:
            return None
        path = registered.get(forced) if registered else None
        if path is None:
            raise BackendUnavailableError(f"metalcore.{op}: the path {forced!r} is not one of the {backend} "
                                          f"backend's (it has: {', '.join([KERNEL, *(registered or {})])})")
        if not path.supports(*args):
            raise BackendUnavailableError(f"metalcore.{op}: the {backend} path {forced!r} does not take this input "
                                          f"({_describe(args)})")
        return path
    if not registered:
        return None
    A = args[_MATRIX_ARG.get(op, 0)]
    path = registered.get(measured_path(op, backend, A.device, args))
    return path if path is not None and path.supports(*args) else None


def _describe(args: tuple[Any, ...]) -> str:
    return ", ".join(f"{tuple(a.shape)} {str(a.dtype).removeprefix('torch.')} on {a.device.type}"
                     if isinstance(a, torch.Tensor) else repr(a) for a in args)


# --- the tables --------------------------------------------------------------------------------

def device_kind(device: torch.device) -> str | None:
    """File-name form of the device kind whose table applies, or None (the CPU runs the reference)."""
    if device.type == "cuda":
        return _cuda_kind(device.index if device.index is not None else torch.cuda.current_device())
    if device.type == "mps":
        return "mps"
    return None


@functools.cache
def _cuda_kind(index: int) -> str:
    name = torch.cuda.get_device_name(index).lower()
    slug = "".join(c if c.isalnum() else "-" for c in name)
    return "-".join(p for p in slug.split("-") if p)


# A path counts as faster than torch at a point only if it was measured at least this much faster.
# Below that, the sweep's order is a coin toss on another run or host: of the H100 table's kernel
# choices that had beaten torch by less than 10% in the sweep, the whole-grid check (another machine,
# same table) found 13 of 23 (< 5%) and 8 of 19 (5-10%) slower than torch, medians 0.99x and 1.02x,
# 12 of them below the rule; by 10-20%, 4 of 24 (median 1.15x), by 20% or more 7 of 456
# (bench/selection.md v4 outcome). Giving torch the near-ties costs a few percent where the path
# would have won and removes the losses.
WIN_MARGIN = 1.10


def faster_paths(point: dict[str, Any]) -> dict[str, float]:
    """The paths measured faster than torch by :data:`WIN_MARGIN` at one table point (and agreeing
    with it), each with its time relative to the fastest of them (1.0), less those the rule check
    ``refuted`` there (``bench.selection.refute``). A point given only by its ``winner`` (hand-made
    tables) stands for that path alone."""
    if "kernel_s" not in point and "paths" not in point:
        return {} if point["winner"] == TORCH else {point["winner"]: 1.0}
    times: dict[str, float] = {}
    if point.get("kernel_s") is not None and point.get("agree", True):
        times[KERNEL] = point["kernel_s"]
    for name, measured in point.get("paths", {}).items():
        if measured.get("s") is not None and measured.get("agree"):
            times[name] = measured["s"]
    for name in point.get("refuted", ()):
        times.pop(name, None)
    torch_s = point.get("torch_s")
    if torch_s is not None:  # None: torch failed there (cuSOLVER's batch limit) and any path that works wins
        times = {name: t for name, t in times.items() if t * WIN_MARGIN < torch_s}
    best = min(times.values(), default=1.0)
    return {name: t / best for name, t in times.items()}


def winner(point: dict[str, Any]) -> str:
    """The fastest path of a point that beats torch there, or ``torch``."""
    faster = faster_paths(point)
    return min(faster, key=lambda name: (faster[name], name != KERNEL, name)) if faster else TORCH


class _Table:
    """One device's table, indexed for lookup: (op, variant, dtype) → sorted sizes, and per size
    its sorted batches and, per batch, the paths faster than torch there (:func:`faster_paths`)."""

    def __init__(self, data: dict[str, Any]):
        self.rows: dict[tuple[str, str, str], dict[int, tuple[list[int], list[dict[str, float]]]]] = {}
        self.names: dict[str, set[str]] = {}       # op → every path name its points mention
        for op, points in data.get("ops", {}).items():
            grouped: dict[tuple[str, str, str], dict[int, dict[int, dict[str, float]]]] = {}
            for p in points:
                if "winner" not in p:
                    continue
                faster = faster_paths(p)
                self.names.setdefault(op, set()).update(faster)
                grouped.setdefault((op, p["variant"], p["dtype"]), {}).setdefault(p["size"], {})[p["batch"]] = faster
            for key, by_size in grouped.items():
                self.rows[key] = {size: (sorted(b), [b[x] for x in sorted(b)]) for size, b in by_size.items()}
        self.sizes = {key: sorted(by_size) for key, by_size in self.rows.items()}

    def path(self, op: str, variant: str, dtype: str, size: int, batch: int,
             known: frozenset[str] = frozenset({KERNEL})) -> str | None:
        """The path among ``known`` that every grid point around the call measured faster than torch
        (the least total relative time if several), ``torch`` if none did, None if unmeasured."""
        key = (op, variant, dtype)
        sizes = self.sizes.get(key)
        if not sizes:
            return None
        by_size = self.rows[key]
        around = [faster for s in _bracket(sizes, size) for faster in _around(*by_size[s], batch)]
        passing = set(known).intersection(*around)
        if not passing:
            return TORCH
        return min(passing, key=lambda name: (sum(f[name] for f in around), name != KERNEL, name))

    def prefers_kernel(self, op: str, variant: str, dtype: str, size: int, batch: int) -> bool | None:
        """Whether the kernel's own routing (no alternative path) is measured faster around the call."""
        chosen = self.path(op, variant, dtype, size, batch)
        return None if chosen is None else chosen != TORCH


def _bracket(values: list[int], x: int) -> list[int]:
    """The grid values around ``x``: itself if measured, else its neighbours (one at the edges)."""
    i = bisect.bisect_left(values, x)
    if i < len(values) and values[i] == x:
        return [x]
    return [values[j] for j in (i - 1, i) if 0 <= j < len(values)]


def _around(batches: list[int], faster: list[dict[str, float]], batch: int) -> list[dict[str, float]]:
    return [faster[batches.index(b)] for b in _bracket(batches, batch)]


@functools.cache
def _load(kind: str) -> _Table | None:
    path = _table_file(kind)
    return None if path is None else _Table(json.loads(path.read_text()))


def _table_file(kind: str) -> Path | None:
    path = TABLE_DIR / f"{kind}.json"
    if path.exists():
        return path
    vendor = kind.split("-", 1)[0]
    same_vendor = sorted(TABLE_DIR.glob(f"{vendor}-*.json")) if kind != "mps" else []
    return same_vendor[0] if same_vendor else None


def reload() -> None:
    """Forget loaded tables (after the sweep rewrites one, or a test swaps ``TABLE_DIR``) and the
    decisions taken from them."""
    _load.cache_clear()
    _lookup.cache_clear()
    _warn_unknown.cache_clear()
    _clear_plans()


def coordinates(op: str, args: tuple[Any, ...]) -> tuple[str, str, int, int] | None:
    """``(variant, dtype, size, batch)`` of a call, or None for an op the tables do not cover."""
    if op in _MATRIX_ARG:
        A = args[_MATRIX_ARG[op]]
        size = max(A.shape[-2:])
        batch = math.prod(A.shape[:-2])
        variant = ("vectors" if args[2] else "values") if op in _VARIANT_ARG else ""
        return variant, str(A.dtype).removeprefix("torch."), size, batch
    if op in _ROWS_OPS:
        x = args[0]
        width = x.shape[-1]
        return "", str(x.dtype).removeprefix("torch."), width, x.numel() // max(width, 1)
    return None


def measured_path(op: str, backend: str, device: torch.device, args: tuple[Any, ...]) -> str | None:
    """The path the measured table for ``device`` chooses for ``op`` on these arguments: ``kernel``
    (the backend's own routing), the name of one of its alternative paths, ``torch``, or None where
    no table or no grid point covers the call."""
    kind = device_kind(device)
    if kind is None:
        return None
    coords = coordinates(op, args)
    if coords is None:
        return None
    return _lookup(kind, _ALIAS.get(op, op), coords, _known(op, backend))


@functools.cache
def _known(op: str, backend: str) -> frozenset[str]:
    """The paths a table may choose for ``op`` on ``backend``: its kernel and its alternatives."""
    return frozenset([KERNEL, *_PATHS.get((op, backend), {})])


@functools.lru_cache(maxsize=4096)
def _lookup(kind: str, op: str, coords: tuple[str, str, int, int], known: frozenset[str]) -> str | None:
    table = _load(kind)
    if table is None:
        return None
    _warn_unknown(kind, op, known)
    return table.path(op, *coords, known=known)


@functools.cache
def _warn_unknown(kind: str, op: str, known: frozenset[str]) -> None:
    table = _load(kind)
    unknown = sorted(table.names.get(op, set()) - known) if table is not None else []
    if unknown:
        warnings.warn(f"metalcore: the selection table {_table_file(kind)} names path(s) {', '.join(unknown)} for "
                      f"{op}, which this metalcore does not have (it has: {', '.join(sorted(known))}); those "
                      f"measurements are ignored, and their points count as torch's unless another path won "
                      f"there too", RuntimeWarning, stacklevel=2)


def measured_choice(op: str, backend: str, device: torch.device, args: tuple[Any, ...]) -> bool | None:
    """Whether the measured table for ``device`` prefers ``backend``'s kernel (any of its paths) for
    ``op`` on these arguments; None where no table or no grid point covers the call. A path forced
    by :func:`use_path` takes the kernel whatever the table says: that is how the selection sweep
    times a path with only the swept op forced, every op the path calls choosing as it would."""
    if op in _forced:
        return True
    chosen = measured_path(op, backend, device, args)
    if chosen in (None, TORCH, KERNEL):
        return None if chosen is None else chosen == KERNEL
    # An alternative path that does not take this input (a bound other than size, batch and dtype):
    # torch, which the neighbours measured slower than that path but not slower than itself.
    return _PATHS[(op, backend)][chosen].supports(*args)
