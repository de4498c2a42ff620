"""Automatic selection from measurements: the per-device tables written by
``python -m metalcore.bench --selection`` (``metalcore/_tables/<device kind>.json``).

:func:`measured_choice` answers, for one call's metadata, whether the measured table prefers the
backend's kernel (True), the torch path (False), or has no measurement for it (None, and the
kernel's own ``automatic`` rule decides). It depends on shapes and dtypes only, never on data, so
the dispatcher caches its answer per call signature.

A table holds, per op, points ``(variant, dtype, size, batch) → winner`` on a grid: linear
algebra by matrix size ``n`` (the larger side) × batch, training ops by row width × rows. A call
between grid points takes the kernel only if *every* surrounding grid point measured the kernel
faster: where neighbours disagree the crossover lies somewhere between them, unmeasured, and torch's
own path is the one that cannot be slower than torch. Outside the grid the nearest edge decides
(times grow linearly in the batch past the largest one measured).

Device kinds: a CUDA card by its name (``nvidia-h100-80gb-hbm3``), ``mps`` for Apple GPUs. A card
without a table of its own uses the table of its vendor's measured card, if one exists, since the
kernels' launch shapes were tuned there too; no table at all means None everywhere.
"""

from __future__ import annotations

import bisect
import functools
import json
import math
from pathlib import Path
from typing import Any

import torch

TABLE_DIR = Path(__file__).parent / "_tables"

# Backward ops and the primitives of an op follow the measured op: the backward runs where its
# forward would (same sizes), geqr2/householder_product are qr's kernel in two halves.
_ALIAS = {"rms_norm_bwd": "rms_norm_fwd", "gelu_bwd": "gelu_fwd", "silu_bwd": "silu_fwd",
          "swiglu_bwd": "swiglu_fwd", "rope_bwd": "rope_fwd", "geqr2": "qr", "householder_product": "qr"}
# Which argument holds the matrix whose size and batch locate a linear-algebra call.
_MATRIX_ARG = {"cholesky_ex": 0, "solve_ex": 0, "solve_triangular": 0, "cholesky_solve": 1, "eigh": 0,
               "svd": 0, "qr": 0, "geqr2": 0, "householder_product": 0}
_ROWS_OPS = {"rms_norm_fwd", "rms_norm_bwd", "fused_add_rms_norm_fwd", "gelu_fwd", "gelu_bwd", "silu_fwd",
             "silu_bwd", "swiglu_fwd", "swiglu_bwd", "rope_fwd", "rope_bwd"}


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


class _Table:
    """One device's table, indexed for lookup: (op, variant, dtype) → sorted sizes, and per size
    its sorted batches and their winners."""

    def __init__(self, data: dict[str, Any]):
        self.rows: dict[tuple[str, str, str], dict[int, tuple[list[int], list[bool]]]] = {}
        for op, points in data.get("ops", {}).items():
            grouped: dict[tuple[str, str, str], dict[int, dict[int, bool]]] = {}
            for p in points:
                if "winner" not in p:
                    continue
                grouped.setdefault((op, p["variant"], p["dtype"]), {}).setdefault(p["size"], {})[p["batch"]] = (
                    p["winner"] == "kernel")
            for key, by_size in grouped.items():
                self.rows[key] = {size: (sorted(b), [b[x] for x in sorted(b)]) for size, b in by_size.items()}
        self.sizes = {key: sorted(by_size) for key, by_size in self.rows.items()}

    def prefers_kernel(self, op: str, variant: str, dtype: str, size: int, batch: int) -> bool | None:
        key = (op, variant, dtype)
        sizes = self.sizes.get(key)
        if not sizes:
            return None
        by_size = self.rows[key]
        return all(_row_prefers(*by_size[s], batch) for s in _bracket(sizes, size))


def _bracket(values: list[int], x: int) -> list[int]:
    """The grid values around ``x``: itself if measured, else its neighbours (one at the edges)."""
    i = bisect.bisect_left(values, x)
    if i < len(values) and values[i] == x:
        return [x]
    return [values[j] for j in (i - 1, i) if 0 <= j < len(values)]


def _row_prefers(batches: list[int], winners: list[bool], batch: int) -> bool:
    return all(winners[batches.index(b)] for b in _bracket(batches, batch))


@functools.cache
def _load(kind: str) -> _Table | None:
    path = TABLE_DIR / f"{kind}.json"
    if not path.exists():
        vendor = kind.split("-", 1)[0]
        same_vendor = sorted(TABLE_DIR.glob(f"{vendor}-*.json")) if kind != "mps" else []
        if not same_vendor:
            return None
        path = same_vendor[0]
    return _Table(json.loads(path.read_text()))


def reload() -> None:
    """Forget loaded tables (after the sweep rewrites one, or a test swaps ``TABLE_DIR``) and the
    decisions taken from them."""
    from metalcore._op import clear_plans   # here: the op core imports this module

    _load.cache_clear()
    clear_plans()


def coordinates(op: str, args: tuple[Any, ...]) -> tuple[str, str, int, int] | None:
    """``(variant, dtype, size, batch)`` of a call, or None for an op the tables do not cover."""
    if op in _MATRIX_ARG:
        A = args[_MATRIX_ARG[op]]
        size = max(A.shape[-2:])
        batch = math.prod(A.shape[:-2])
        variant = ""
        if op == "eigh":
            variant = "vectors" if args[2] else "values"
        elif op == "svd":
            variant = "vectors" if args[2] else "values"
        return variant, str(A.dtype).removeprefix("torch."), size, batch
    if op in _ROWS_OPS:
        x = args[0]
        width = x.shape[-1]
        return "", str(x.dtype).removeprefix("torch."), width, x.numel() // max(width, 1)
    return None


def measured_choice(op: str, backend: str, device: torch.device, args: tuple[Any, ...]) -> bool | None:
    """Whether the measured table for ``device`` prefers ``backend``'s kernel for ``op`` on these
    arguments; None where no table or no grid point covers the call."""
    kind = device_kind(device)
    if kind is None:
        return None
    table = _load(kind)
    if table is None:
        return None
    coords = coordinates(op, args)
    if coords is None:
        return None
    variant, dtype, size, batch = coords
    return table.prefers_kernel(_ALIAS.get(op, op), variant, dtype, size, batch)
