"""Batched eigh/eigvalsh/svd/svdvals against every peer: ``python -m metalcore.bench --peers``.

At each point (op, dtype, n, batch) of a grid, the wall time of one eager call, synchronised, median
(the headline figure of DESIGN.md §7) of

* ``metalcore``: the public function as a user calls it (automatic selection, measured table
  included); ``served_by`` says what ran: ``torch`` (its own function), or ``triton:<path>`` with
  the kernel's path (``kernel``: its own routing, else an alternative the table chose);
* ``torch``: ``torch.linalg`` on the same inputs, interleaved with metalcore round by round;
* ``jax`` and ``cupy``: each in its own process (:mod:`metalcore.bench.peers`; JAX with
  ``XLA_PYTHON_CLIENT_PREALLOCATE=false``), on inputs of the same shape and distribution, run before
  the torch process times anything so that neither holds the other's memory;

and the ratio ``best peer / metalcore`` (> 1: metalcore faster). A peer that is not importable is
reported as such in every row, never an error. Grids: ``headline`` (the shapes of the issue's
targets: 10000×3², 4096×8², 500×16², 1000×32², 100×64², 64×128²) and ``full`` (n × batch below,
optionally restricted by ``--sizes``/``--batches``). A call predicted from the previous batch of
its row to take longer than ``LONG_CALL_S`` is extrapolated linearly in the batch (flagged ``~``),
not run, and inputs over ``MAX_INPUT_BYTES`` are skipped ("where memory allows").
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from metalcore.bench import peers as peer_runners
from metalcore.bench.selection import AGREE_TOL, LINALG_BATCH, parse_dtypes, wall_times
from metalcore.bench.timing import fmt_time

OPS = ("eigh", "eigvalsh", "svd", "svdvals")
GRID_N = (2, 3, 4, 8, 16, 32, 33, 64, 65, 128)
GRID_BATCH = LINALG_BATCH   # the selection grid's batches
HEADLINE = ((10000, 3), (4096, 8), (500, 16), (1000, 32), (100, 64), (64, 128))   # (batch, n)
DTYPES = (torch.float32, torch.float64)
PEERS = ("jax", "cupy")
# Timing per callable and point: about this much wall time, within [3, MAX_REPS] calls.
BUDGET_S = 0.1
MAX_REPS = 50
# torch loops cuSOLVER per matrix above n = 32 (eigh of 100×64² is 81 ms on the H100), so its
# calls at large batches take seconds: above this they are extrapolated from the previous batch.
LONG_CALL_S = 1.0
# 65536×128² in fp64 is 8.6 GB an input, more with the workspaces of four libraries.
MAX_INPUT_BYTES = 2 << 30


@dataclasses.dataclass(frozen=True)
class Point:
    op: str
    dtype: str
    n: int
    batch: int

    @property
    def label(self) -> str:
        return f"{self.op} {self.dtype} {self.batch}x{self.n}x{self.n}"


def grid(name: str, ops: Sequence[str], dtypes: Sequence[torch.dtype], sizes: Sequence[int] | None = None,
         batches: Sequence[int] | None = None) -> list[Point]:
    """The points of a grid, ordered op, dtype, n, batch (increasing batch: extrapolation needs the
    previous batch of a row)."""
    if name == "headline":
        shapes = [(b, n) for b, n in HEADLINE]
    elif name == "full":
        shapes = [(b, n) for n in GRID_N for b in GRID_BATCH]
    else:
        raise ValueError(f"grid must be 'headline' or 'full'; got {name!r}")
    shapes = [(b, n) for b, n in shapes if (not sizes or n in sizes) and (not batches or b in batches)]
    return sorted((Point(op, str(dt).removeprefix("torch."), n, b) for op in ops for dt in dtypes for b, n in shapes),
                  key=lambda p: (OPS.index(p.op), p.dtype, p.n, p.batch))


def _input_bytes(p: Point) -> int:
    return p.batch * p.n * p.n * torch.empty((), dtype=getattr(torch, p.dtype)).element_size()


# --- the torch process: metalcore and torch -----------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Op:
    metalcore: Callable[[torch.Tensor], Any]
    torch: Callable[[torch.Tensor], Any]
    canonical: Callable[[Any], torch.Tensor]   # what metalcore and torch must agree on
    key: str                                   # the registered op
    op_args: Callable[[torch.Tensor], tuple[Any, ...]]
    symmetric: bool


def _ops() -> dict[str, _Op]:
    import metalcore.linalg as ml

    return {
        "eigh": _Op(ml.eigh, torch.linalg.eigh, lambda out: out[0], "eigh", lambda A: (A, "L", True), True),
        "eigvalsh": _Op(ml.eigvalsh, torch.linalg.eigvalsh, lambda w: w, "eigh", lambda A: (A, "L", False), True),
        "svd": _Op(lambda A: ml.svd(A, full_matrices=False), lambda A: torch.linalg.svd(A, full_matrices=False),
                   lambda out: out[1], "svd", lambda A: (A, False, True), False),
        "svdvals": _Op(ml.svdvals, torch.linalg.svdvals, lambda s: s, "svd", lambda A: (A, False, False), False),
    }


def _inputs(op: _Op, p: Point, device: torch.device) -> torch.Tensor:
    """Standard normal entries, symmetrised for eigh (X + Xᵀ): the distribution the peers draw."""
    X = torch.randn(p.batch, p.n, p.n, device=device, dtype=getattr(torch, p.dtype))
    return X + X.mT if op.symmetric else X


def served_by(op: _Op, A: torch.Tensor) -> str:
    """What metalcore's automatic path runs for ``A``: ``torch``, ``reference``, or
    ``<backend>:<path>``."""
    from metalcore import _selection
    from metalcore._op import registered_ops

    registered = registered_ops()[op.key]
    args = op.op_args(A)
    if registered.plan(*args).prefers_torch:
        return "torch"
    backend = registered.backend_for(*args)
    if backend not in registered.kernels:
        return backend
    path = _selection.route(op.key, backend, args)
    return f"{backend}:{path.name if path is not None else _selection.KERNEL}"


def measure(points: Sequence[Point], device: torch.device, log: Callable[[str], None],
            deadline: float = math.inf, on_row: Callable[[dict[Point, dict[str, Any]]], None] | None = None
            ) -> dict[Point, dict[str, Any]]:
    """metalcore and torch at each point (wall time per call, seconds), with what served metalcore and
    whether the two agree. Points past ``deadline`` (``time.time()``) are left out; ``on_row``
    receives the rows so far after each point."""
    ops = _ops()
    rows: dict[Point, dict[str, Any]] = {}
    last: dict[tuple[str, str, int, str], tuple[int, float]] = {}   # (op, dtype, n, who) → (batch, s)
    for p in points:
        if time.time() > deadline:
            log(f"{p.label}: not run (past --max-seconds)")
            continue
        op = ops[p.op]
        row: dict[str, Any] = {"metalcore_s": None, "torch_s": None, "extrapolated": [], "served_by": None,
                               "agree": None}
        too_big = _input_bytes(p) > MAX_INPUT_BYTES
        fns: dict[str, Callable[[], Any]] = {}
        if not too_big:
            A = _inputs(op, p, device)
            fns = {"metalcore": lambda: op.metalcore(A), "torch": lambda: op.torch(A)}
            row["served_by"] = served_by(op, A)
        for who in ("metalcore", "torch"):
            previous = last.get((p.op, p.dtype, p.n, who))
            predicted = previous[1] * p.batch / previous[0] if previous else None
            if predicted is not None and (too_big or predicted > LONG_CALL_S):
                row[f"{who}_s"] = predicted
                row["extrapolated"].append(who)
                fns.pop(who, None)
        if too_big and not row["extrapolated"]:
            row["skipped"] = f"inputs of {_input_bytes(p) / 2**30:.1f} GiB"
        times = wall_times(fns, device, BUDGET_S, MAX_REPS)
        for who, t in times.items():
            row[f"{who}_s"] = t
            if t is not None:
                last[(p.op, p.dtype, p.n, who)] = (p.batch, t)
        if times.get("metalcore") is not None and times.get("torch") is not None:
            row["agree"] = _agree(op.canonical(op.metalcore(A)), op.canonical(op.torch(A)), getattr(torch, p.dtype))
        fns = A = None     # the inputs' memory back before the next point's
        rows[p] = row
        flags = f" extrapolated: {', '.join(row['extrapolated'])}" if row["extrapolated"] else ""
        log(f"{p.label}: torch {fmt_time(row['torch_s'])} metalcore {fmt_time(row['metalcore_s'])} "
            f"[{row['served_by']}]{flags}")
        if on_row is not None:
            on_row(rows)
    return rows


def _agree(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    """Agreement relative to the largest value, over finite values only (torch fails with NaN on
    what it cannot do; a NaN of metalcore's where torch has a number disagrees)."""
    a, b = a.double(), b.double()
    if a.shape != b.shape or not bool(torch.isfinite(a).eq(torch.isfinite(b)).all()):
        return False
    ok = torch.isfinite(b)
    if not bool(ok.any()):
        return True
    scale = b[ok].abs().max().clamp_min(1e-30)
    return bool(((a[ok] - b[ok]).abs().max() / scale <= AGREE_TOL[dtype]).item())


# --- the peers, each in its own process ---------------------------------------------------------

def peer_cases(points: Sequence[Point]) -> list[dict[str, Any]]:
    return [peer_runners.case(p.op, p.batch, p.n, dtype=p.dtype) for p in points if _input_bytes(p) <= MAX_INPUT_BYTES]


def run_peers(points: Sequence[Point], runners: Sequence[str], log: Callable[[str], None],
              timeout_s: float) -> dict[str, dict[str, Any]]:
    """Each peer's timings of the points: ``{runner: peer_timings(...)}``."""
    cases = peer_cases(points)
    out = {}
    for runner in runners:
        t0 = time.time()
        out[runner] = peer_runners.peer_timings(runner, cases, timeout_s=timeout_s, budget_s=BUDGET_S,
                                                max_reps=MAX_REPS, max_call_s=LONG_CALL_S)
        state = (f"{out[runner].get('version')}, {len(out[runner]['results'])} cases" if out[runner]["available"]
                 else f"not available: {out[runner]['reason']}")
        log(f"peer {runner}: {state} ({time.time() - t0:.1f} s)")
    return out


def _peer_cell(result: dict[str, Any] | None) -> tuple[float | None, bool, str]:
    """(seconds, extrapolated, note) of one peer at one point."""
    if result is None:
        return None, False, "not run"
    if "ms" in result:
        return result["ms"] / 1e3, False, ""
    if "predicted_ms" in result:
        return result["predicted_ms"] / 1e3, True, result["skipped"]
    return None, False, result.get("error", result.get("skipped", "no time"))


# --- rows ---------------------------------------------------------------------------------------

def rows(points: Sequence[Point], ours: dict[Point, dict[str, Any]], theirs: dict[str, dict[str, Any]]
         ) -> list[dict[str, Any]]:
    """One row per measured point: every library's time (seconds), notes for the absent ones, the
    best peer and the ratio ``best peer / metalcore``."""
    by_case = {runner: {(r["op"], r["dtype"], r["n"], r["batch"]): r for r in res["results"]}
               for runner, res in theirs.items()}
    out = []
    for p in points:
        if p not in ours:
            continue
        mine = ours[p]
        row: dict[str, Any] = {"op": p.op, "dtype": p.dtype, "n": p.n, "batch": p.batch,
                               "metalcore_s": mine["metalcore_s"], "served_by": mine["served_by"],
                               "agree": mine["agree"], "torch_s": mine["torch_s"], "notes": {},
                               "extrapolated": list(mine["extrapolated"])}
        if "skipped" in mine:
            row["notes"]["metalcore"] = mine["skipped"]
        for runner, res in theirs.items():
            if not res["available"]:
                row[f"{runner}_s"] = None
                row["notes"][runner] = res["reason"]
                continue
            seconds, guessed, note = _peer_cell(by_case[runner].get((p.op, p.dtype, p.n, p.batch)))
            row[f"{runner}_s"] = seconds
            if guessed:
                row["extrapolated"].append(runner)
            if note:
                row["notes"][runner] = note
        peer_times = {name: row[f"{name}_s"] for name in ("torch", *theirs) if row.get(f"{name}_s") is not None}
        row["best_peer"] = min(peer_times, key=peer_times.get) if peer_times else None
        row["ratio"] = (peer_times[row["best_peer"]] / row["metalcore_s"]
                        if row["best_peer"] and row["metalcore_s"] else None)
        out.append(row)
    return out


def format_table(table: Sequence[dict[str, Any]], runners: Sequence[str]) -> str:
    """The rows as text: ``~`` marks an extrapolated time, ``n/a`` a peer that did not run there."""
    head = ["op", "dtype", "batch x n x n", "torch", *runners, "metalcore", "served by", "best peer", "ratio"]

    def cell(row, who):
        seconds = row.get(f"{who}_s")
        if seconds is None:
            return "n/a" if who in row["notes"] else "-"
        return ("~" if who in row["extrapolated"] else "") + fmt_time(seconds)

    lines = [head]
    for r in table:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        if r["ratio"] is not None and ({"metalcore", r["best_peer"]} & set(r["extrapolated"])):
            ratio = "~" + ratio
        if r["agree"] is False:
            ratio += " (disagrees)"
        lines.append([r["op"], r["dtype"], f"{r['batch']}x{r['n']}x{r['n']}", cell(r, "torch"),
                      *(cell(r, name) for name in runners), cell(r, "metalcore"), r["served_by"] or "-",
                      r["best_peer"] or "-", ratio])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    left = {0, 1, 2, len(head) - 3, len(head) - 2}    # names; times and the ratio are right-aligned
    text = ["  ".join(c.ljust(w) if i in left else c.rjust(w)
                      for i, (c, w) in enumerate(zip(line, widths))).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    notes = sorted({f"{who}: {note}" for r in table for who, note in r["notes"].items()
                    if not (who in runners and note.startswith("not importable"))})
    absent = sorted({f"{who}: {note}" for r in table for who, note in r["notes"].items()
                     if who in runners and note.startswith("not importable")})
    return "\n".join(text + [""] + absent + notes[:20] + ([f"... {len(notes) - 20} more notes in the JSON"]
                                                         if len(notes) > 20 else []))


def summary(table: Sequence[dict[str, Any]]) -> str:
    timed = [r for r in table if r["ratio"] is not None]
    if not timed:
        return "no point has both a metalcore and a peer time"
    slower = [r for r in timed if r["ratio"] < 1]
    worst = min(timed, key=lambda r: r["ratio"])
    return (f"{len(timed)} points; metalcore slower than the best peer at {len(slower)}; geometric mean ratio "
            f"{math.exp(sum(math.log(r['ratio']) for r in timed) / len(timed)):.2f}x; worst {worst['op']} "
            f"{worst['dtype']} {worst['batch']}x{worst['n']}² {worst['ratio']:.2f}x against {worst['best_peer']}")


# --- warming: compile metalcore's kernels in parallel before anything is timed -----------------

def warm(points: Sequence[Point], device_name: str, workers: int) -> None:
    """Call metalcore's automatic path once at every point in ``workers`` processes sharing Triton's
    on-disk cache, so that the timed run finds every kernel it launches compiled."""
    jobs = [f"{p.op}|{p.dtype}|{p.n}|{p.batch}" for p in points if _input_bytes(p) <= MAX_INPUT_BYTES]
    procs = [subprocess.Popen([sys.executable, "-m", "metalcore.bench.linalg_peers", "--warm", device_name,
                               *jobs[i::workers]], env=os.environ.copy())
             for i in range(workers) if jobs[i::workers]]
    for proc in procs:
        proc.wait()


def _warm_worker(device_name: str, jobs: Sequence[str]) -> None:
    device = torch.device(device_name)
    ops = _ops()
    for job in jobs:
        name, dtype, n, batch = job.split("|")
        op = ops[name]
        try:
            op.metalcore(_inputs(op, Point(name, dtype, int(n), int(batch)), device))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except Exception:  # noqa: BLE001 — the timed run records failures; warming only compiles
            pass


# --- the command line ---------------------------------------------------------------------------

def main(args: Any) -> int:
    """``--peers`` of ``python -m metalcore.bench`` (arguments parsed there)."""
    from metalcore.bench.harness import detect_device, device_info, device_slug, run_metadata

    t0 = time.time()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    wanted = [o.strip() for o in args.ops.split(",") if o.strip()] or list(OPS)
    unknown = [o for o in wanted if o not in OPS]
    if unknown:
        print(f"metalcore.bench --peers: --ops must be among {', '.join(OPS)}; got {', '.join(unknown)}",
              file=sys.stderr)
        return 2
    device = detect_device(args.device)
    dtypes = parse_dtypes(args.dtypes) if args.dtypes else list(DTYPES)
    sizes = [int(x) for x in args.sizes.split(",") if x] or None
    batches = [int(x) for x in args.batches.split(",") if x] or None
    points = grid(args.grid, wanted, dtypes, sizes, batches)
    info = device_info(device)
    meta = run_metadata(device, info)
    meta["settings"] = {"grid": args.grid, "ops": wanted, "dtypes": [str(d).removeprefix("torch.") for d in dtypes],
                        "budget_s": BUDGET_S, "max_reps": MAX_REPS, "long_call_s": LONG_CALL_S}
    runners = tuple(args.peer_runners.split(",")) if args.peer_runners else PEERS
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M")
    path = args.json or Path(args.out_dir) / f"peers-{device_slug(device, info)}-{stamp}.json"
    log(f"metalcore.bench --peers: {len(points)} points on {info['name']}, peers {', '.join(runners)}")

    if args.warm_workers and device.type == "cuda":
        warm(points, str(device), args.warm_workers)
        log(f"warmed in {time.time() - t0:.1f} s")
    theirs = run_peers(points, runners, log, timeout_s=args.peer_timeout)
    deadline = t0 + args.max_seconds if args.max_seconds else math.inf

    def write(ours: dict[Point, dict[str, Any]], partial: bool) -> list[dict[str, Any]]:
        table = rows(points, ours, theirs)
        record = {**meta, "partial": partial, "elapsed_s": round(time.time() - t0, 1),
                  "peers": {k: {f: v.get(f) for f in ("available", "version", "device", "reason")}
                            for k, v in theirs.items()}, "rows": table}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
        return table

    # The JSON is rewritten after every point: a run cut short keeps its rows.
    ours = measure(points, device, log, deadline, on_row=lambda so_far: write(so_far, partial=True))
    table = write(ours, partial=False)
    print(f"metalcore.bench --peers on {info['name']}, torch {meta['versions']['torch']}, commit "
          f"{(meta['git']['commit'] or 'unknown')[:10]}, {meta['date']}; wall time per synchronised eager call, "
          f"median; ratio = best peer / metalcore (> 1: metalcore faster)\n")
    print(format_table(table, runners))
    print("\n" + summary(table))
    print(f"wrote {path} ({time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--warm":
        _warm_worker(sys.argv[2], sys.argv[3:])
