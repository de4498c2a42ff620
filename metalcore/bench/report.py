"""Reports of a run: the stdout table, the JSON record and the PNG chart of ratios."""

from __future__ import annotations

import json
import math
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


# Chart layout, in inches at 100 dpi: a 10-pt label is readable at 100% zoom; one bar row per 0.32 in.
_PNG_DPI = 100
_ROW_IN = 0.32
_FASTER, _SLOWER = "#2a9d55", "#d1495b"


def _ratio_label(x: float, _pos=None) -> str:
    return f"{x:g}×"


def png_paths(path: Path, rows: Sequence[Row]) -> list[Path]:
    """One chart per op family: ``path`` with ``-<family>`` before the suffix (bench-linalg.png, ...)."""
    families = sorted({r.family for r in rows if r.ratio is not None})
    return [path.with_name(f"{path.stem}-{family}{path.suffix}") for family in families]


def write_png(path: Path, rows: Sequence[Row], meta: dict[str, Any]) -> list[Path]:
    """One horizontal-bar chart per op family (:func:`png_paths`): each row's ratio on a log axis,
    bars drawn from the parity line at 1.0× (green where metalcore is faster, red where the peer
    is), the ratio printed at the bar's end. Returns the files written; none without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        return []
    written = []
    for out in png_paths(path, rows):
        family = out.stem.rsplit("-", 1)[1]
        timed = [r for r in rows if r.ratio is not None and r.family == family]
        ratios = [r.ratio for r in timed]
        fig, ax = plt.subplots(figsize=(11, _ROW_IN * len(timed) + 2.3), dpi=_PNG_DPI)
        y = list(range(len(timed)))
        ax.barh(y, [r - 1.0 for r in ratios], left=1.0, height=0.7,
                color=[_FASTER if r >= 1 else _SLOWER for r in ratios])
        labels = [" ".join(p for p in (r.op, r.variant, r.shape, r.dtype, r.mode) if p) + f"  [{r.best_peer}]"
                  for r in timed]
        ax.set_yticks(y, labels, fontsize=10)
        ax.set_ylim(len(timed) - 0.4, -0.6)
        ax.set_xscale("log")
        lo, hi = min(ratios + [0.5]) / 2.5, max(ratios + [2.0]) * 3.0
        ax.set_xlim(lo, hi)
        decades = math.log10(hi / lo)  # tick density that keeps labels apart: about 8 labels whatever the range
        subs = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0) if decades <= 1.3 else (1.0, 2.0, 5.0) if decades <= 3 else (1.0,)
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
        ax.xaxis.set_major_formatter(FuncFormatter(_ratio_label))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.tick_params(axis="x", labelsize=10)
        ax.grid(axis="x", which="major", alpha=0.3)
        ax.axvline(1.0, color="black", linewidth=1.5, zorder=3)
        for yi, r in zip(y, ratios):
            ax.text(r * (1.06 if r >= 1 else 1 / 1.06), yi, f"{r:.2f}×", va="center", fontsize=9,
                    ha="left" if r >= 1 else "right")
        ax.set_xlabel("best peer time / metalcore time (log scale; > 1×: metalcore faster)", fontsize=10)
        ax.set_title(f"metalcore {family} ops vs the best peer [in brackets], same run\n"
                     f"{meta['device']['name']}, {meta['date'][:10]}", fontsize=11, pad=30)
        ax.legend(handles=[Patch(color=_FASTER, label="metalcore faster"), Patch(color=_SLOWER, label="peer faster"),
                           plt.Line2D([], [], color="black", linewidth=1.5, label="parity (1.0×)")],
                  loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=9, frameon=False)
        fig.tight_layout()
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out)
        plt.close(fig)
        written.append(out)
    return written
