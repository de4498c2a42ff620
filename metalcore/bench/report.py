"""Reports of a run: the stdout table, the JSON record and the PNG chart of ratios."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metalcore.bench.harness import Row
from metalcore.bench.timing import fmt_time

COLUMNS = ("op", "variant", "shape", "dtype", "mode", "backend", "wall", "peer wall", "wall ratio", "metalcore",
           "±IQR", "host", "best peer", "peer", "ratio", "achieved", "roof")
_RIGHT = {"wall", "peer wall", "wall ratio", "metalcore", "±IQR", "host", "peer", "ratio", "achieved", "roof"}


def fmt_rate(row: Row) -> str:
    """Achieved throughput in the unit of the op's bound (GB/s for memory-bound, TFLOP/s otherwise)."""
    if row.bound == "compute" and row.tflops is not None:
        return f"{row.tflops:.3g} TFLOP/s"
    if row.gbps is not None:
        return f"{row.gbps:.3g} GB/s"
    return "-"


def _cells(row: Row) -> list[str]:
    if row.status in ("skipped", "error"):
        return [row.op, row.variant, row.shape, row.dtype, row.mode, row.status.upper()] + ["-"] + [""] * 10
    ratio, wall_ratio = row.ratio, row.wall_ratio
    mark = " !" if row.status == "mismatch" else ""
    peer_wall = row.peers[row.best_peer_wall] if row.best_peer_wall else None
    return [
        row.op, row.variant, row.shape, row.dtype, row.mode, row.backend,
        fmt_time(row.metalcore.wall_s), fmt_time(peer_wall.wall_s if peer_wall else None),
        (f"{wall_ratio:.2f}x" if wall_ratio is not None else "-") + mark,
        fmt_time(row.metalcore.median_s), fmt_time(row.metalcore.iqr_s), fmt_time(row.metalcore.host_s),
        row.best_peer or "-", fmt_time(row.peers[row.best_peer].median_s) if row.best_peer else "-",
        (f"{ratio:.2f}x" if ratio is not None else "-") + mark,
        fmt_rate(row), f"{100 * row.roofline:.1f}%" if row.roofline is not None else "-",
    ]


def format_table(rows: Sequence[Row], meta: dict[str, Any]) -> str:
    dev = meta["device"]
    ceil = meta["ceilings"]
    gemm = ", ".join(f"{k} {v:.3g}" for k, v in ceil["gemm_tflops"].items()) or "-"
    lines = [
        f"metalcore bench: {dev['name']} ({dev['type']}), torch {meta['versions']['torch']}, "
        f"commit {(meta['git']['commit'] or 'unknown')[:10]}{' (dirty)' if meta['git']['dirty'] else ''}, "
        f"{meta['date']}",
        f"ceilings measured in this run: copy {ceil['copy_gbps']:.4g} GB/s; GEMM TFLOP/s: {gemm}; "
        f"load average at start {meta.get('load_average')}, end {meta.get('load_average_end')}",
        "wall ratio (the headline) = best peer's wall time per synchronised eager call / metalcore's "
        "(> 1: metalcore faster, host work included); ratio = the same on GPU time with host issue hidden; "
        "roof = roofline time / metalcore time; host = metalcore's host time per call",
        "",
    ]
    table = [list(COLUMNS)] + [_cells(r) for r in rows if r.status != "skipped"]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    for k, line in enumerate(table):
        lines.append("  ".join(c.rjust(w) if COLUMNS[i] in _RIGHT else c.ljust(w)
                               for i, (c, w) in enumerate(zip(line, widths))).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    notes = []
    skipped: dict[tuple[str, str], int] = {}
    for r in rows:
        if r.status == "skipped":
            skipped[r.op, r.reason] = skipped.get((r.op, r.reason), 0) + 1
        elif r.status != "ok":
            notes.append(f"{r.status}: {r.id}: {r.reason}")
        for name, err in r.peer_errors.items():
            notes.append(f"peer dropped: {r.id}: {name}: {err}")
    notes += [f"not timed: {op} ({n} row{'s' if n > 1 else ''}): {reason}" for (op, reason), n in skipped.items()]
    return "\n".join(lines + ([""] + notes if notes else []))


def write_json(path: Path, rows: Sequence[Row], meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {**meta, "rows": [r.to_json() for r in rows]}
    path.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")


def write_png(path: Path, rows: Sequence[Row], meta: dict[str, Any]) -> bool:
    """Horizontal bars of ``ratio`` per row on a log axis; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    timed = [r for r in rows if r.ratio is not None]
    if not timed:
        return False
    colors = {"training": "tab:blue", "linalg": "tab:orange"}
    fig, ax = plt.subplots(figsize=(9, 0.22 * len(timed) + 1.5))
    y = range(len(timed))
    ax.barh(list(y), [r.ratio for r in timed], color=[colors.get(r.family, "tab:gray") for r in timed])
    ax.set_yticks(list(y), [f"{r.id} [{r.best_peer}]" for r in timed], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("best peer time / metalcore time  (> 1: metalcore faster)")
    ax.set_title(f"metalcore vs best peer: {meta['device']['name']}, {meta['date'][:10]}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
