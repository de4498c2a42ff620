"""Timers and ceilings: how one callable is timed on each device, and what "fast" is measured against.

* CUDA: CUDA events around each call, with the L2 cache flushed before every call by writing a
  256 MB buffer (the method of ``triton.testing.do_bench``), so that inputs smaller than L2 (a
  500×16×16 batch is 0.5 MB, an H100's L2 50 MB) are timed from HBM as in a real step. A GPU
  sleep (``torch.cuda._sleep``) queued ahead of the start event, 1.5× the call's host time, lets
  the host issue the whole call before the GPU reaches it: the time is the GPU's, as in a training
  step where the host runs ahead. The host time per call is measured too and reported beside it
  (``host_s``): an op whose host time exceeds its GPU time is launch-bound in practice.
* MPS: ``torch.mps.synchronize()`` around each call and ``time.perf_counter``; the same flush.
* CPU: ``time.perf_counter`` around each call, no flush (writing 256 MB costs ~20 ms on the 2-core
  reference machine, more than most calls it would precede).

Every callable is called once untimed first (which compiles ``torch.compile`` peers and builds
shaders), then metalcore and its peers are called in turn, round after round, until each has
about the budget's time of calls; the result per callable is the median and the interquartile
range of its per-call times.

Ceilings are measured in the same run, never taken from a datasheet: memory bandwidth as a
device-to-device copy (bytes read + bytes written per second), compute as a large matrix product
in the op's dtype. An op's *roofline fraction* is ``max(bytes / bandwidth, flops / gemm) / time``:
1.0 means the op runs at the speed of a copy of its data or of a GEMM of its FLOPs.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

_FLUSH_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Budget:
    """How long to warm up and to time each callable (seconds), and the bounds on repetitions."""

    warmup_s: float
    measure_s: float
    min_reps: int
    max_reps: int


# GPU: do_bench's order of magnitude (25 ms warm-up, 100 ms timing) raised for tighter medians.
GPU_BUDGET = Budget(warmup_s=0.1, measure_s=0.3, min_reps=5, max_reps=300)
# CPU: sized so that the whole CPU run takes about 2 minutes on 2 idle cores (19 min measured at load ~7).
CPU_BUDGET = Budget(warmup_s=0.0, measure_s=0.25, min_reps=3, max_reps=200)
QUICK_BUDGET = Budget(warmup_s=0.0, measure_s=0.03, min_reps=3, max_reps=50)


@dataclass(frozen=True)
class Timing:
    median_s: float
    q1_s: float
    q3_s: float
    min_s: float  # the least disturbed call, for readers of noisy CPU runs
    reps: int
    # GPUs: median time the host spends issuing one call (no synchronisation). When it nears
    # median_s the call is launch-bound: the GPU waits for Python, not for memory or arithmetic.
    host_s: float | None = None
    # Median wall time of one eager call followed by a synchronisation: what a user's loop feels,
    # host work and launch latency included (the headline figure, DESIGN.md §7). On the CPU it is
    # median_s itself.
    wall_s: float | None = None

    @property
    def iqr_s(self) -> float:
        return self.q3_s - self.q1_s

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "iqr_s": self.iqr_s}


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def summarize(times: list[float], host: list[float] | None = None, wall: list[float] | None = None) -> Timing:
    host_s = statistics.median(host) if host else None
    if len(times) == 1:
        return Timing(times[0], times[0], times[0], times[0], 1, host_s, statistics.median(wall) if wall else times[0])
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return Timing(median, q1, q3, min(times), len(times), host_s, statistics.median(wall) if wall else median)


def sleep_cycles_per_s() -> float:
    """Rate of ``torch.cuda._sleep``'s clock on the current CUDA device, to turn seconds of host time
    into the cycles of a sleep that hides them."""
    torch.cuda._sleep(1000)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    return 10_000_000 / (start.elapsed_time(end) / 1e3)


def call_ms(fn: Callable[[], Any], device: torch.device, *, reps: int = 3, budget_s: float | None = None,
            max_reps: int = 20) -> float:
    """Median milliseconds of single calls of ``fn`` from an idle device, host issue included (CUDA
    events around each call, a synchronisation after it), after one warm-up call: the per-call view
    of the standalone device scripts in bench/scripts/, where one call may take a second (the
    :class:`Timer` method hides host time and interleaves peers instead). ``reps`` calls, or with
    ``budget_s`` as many as fit that many seconds, between ``reps`` and ``max_reps``."""
    fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    times: list[float] = []
    while len(times) < reps or (budget_s is not None and len(times) < max_reps and sum(times) < budget_s * 1e3):
        if cuda:
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
    return statistics.median(times)


class Timer:
    """Times zero-argument callables on one device."""

    def __init__(self, device: torch.device, budget: Budget):
        self.device = device
        self.budget = budget
        self._flush_buffer: torch.Tensor | None = None
        if device.type in ("cuda", "mps"):
            self._flush_buffer = torch.empty(_FLUSH_BYTES // 4, dtype=torch.int32, device=device)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()

    def _flush(self) -> None:
        if self._flush_buffer is not None:
            self._flush_buffer.zero_()

    @functools.cached_property
    def _gpu_cycles_per_s(self) -> float:
        return sleep_cycles_per_s()

    def _start(self, fn: Callable[[], Any], hide_s: float) -> tuple[Callable[[], float], float]:
        """Flush, call ``fn`` once; return a function that reads its time in seconds (CUDA reads
        events after a later synchronisation, so a round of calls is queued back to back) and the
        host time of the call (the whole time, on the CPU). ``hide_s``: CUDA's sleep before the
        start event, to cover the host's issuing of the call."""
        self._flush()
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if hide_s > 0:
                torch.cuda._sleep(int(hide_s * self._gpu_cycles_per_s))
            start.record()
            t0 = time.perf_counter()
            fn()
            host = time.perf_counter() - t0
            end.record()
            return (lambda: start.elapsed_time(end) / 1e3), host
        self.synchronize()
        t0 = time.perf_counter()
        fn()
        host = time.perf_counter() - t0
        self.synchronize()
        elapsed = time.perf_counter() - t0
        return (lambda: elapsed), host

    def _round(self, fns: dict[str, Callable[[], Any]], hide: dict[str, float]) -> dict[str, tuple[float, float]]:
        """One call of each of ``fns`` in turn; their (device, host) times in seconds."""
        pending = {name: self._start(fn, hide[name]) for name, fn in fns.items()}
        self.synchronize()
        return {name: (read(), host) for name, (read, host) in pending.items()}

    def time_all(self, fns: dict[str, Callable[[], Any]], *, called: bool = False) -> dict[str, Timing]:
        """Time each of ``fns`` (metalcore and its peers) for about the budget's ``measure_s``.

        The callables are called in turn, one call each per round, rather than one after the
        other: a background load or a clock change then slows every callable alike, and the
        ratios stay right on a busy laptop or a shared CI machine. ``called``: each callable has
        had its first call already (the harness checks outputs with it).
        """
        if not called:
            for fn in fns.values():
                fn()  # the first call compiles, allocates and builds; it is never timed
        self.synchronize()
        times: dict[str, list[float]] = {name: [] for name in fns}
        host: dict[str, list[float]] = {name: [] for name in fns}

        def record(results: dict[str, tuple[float, float]]) -> None:
            for name, (t, h) in results.items():
                times[name].append(t)
                host[name].append(h)

        # 1 ms of sleep covers the host's issuing of most calls until their own host time is known.
        hide = {name: 1e-3 if self.device.type == "cuda" else 0.0 for name in fns}
        for _ in range(3):
            record(self._round(fns, hide))
        estimate = {name: max(statistics.median(t), 1e-9) for name, t in times.items()}
        if self.device.type == "cuda":
            # Capped at 5 ms: a call that long on the host is one that waits for the GPU inside
            # (a linalg info check), where no sleep can hide anything.
            hide = {name: min(1.5 * statistics.median(h) + 20e-6, 5e-3) for name, h in host.items()}
        # The budget is wall time: a call costs its GPU time plus the sleep ahead of it, or its host
        # time where that is longer (CUDA), plus the flush (~0.1 ms for 256 MB at 3 TB/s).
        cost = {name: max(statistics.median(host[name]), hide[name] + estimate[name])
                + (1e-4 if self._flush_buffer is not None else 0.0) for name in fns}
        b = self.budget
        if b.warmup_s:  # GPUs: let clocks and caches settle, then start the sample afresh
            for _ in range(min(int(b.warmup_s / sum(cost.values())), 100)):
                self._round(fns, hide)
            times = {name: [] for name in fns}
            host = {name: [] for name in fns}
        reps = {name: max(b.min_reps, min(b.max_reps, int(b.measure_s / cost[name]))) for name in fns}
        while True:
            due = {name: fn for name, fn in fns.items() if len(times[name]) < reps[name]}
            if not due:
                break
            record(self._round(due, hide))
        on_gpu = self.device.type != "cpu"
        wall = self._wall(fns, estimate) if on_gpu else {}
        return {name: summarize(t, host[name] if on_gpu else None, wall.get(name)) for name, t in times.items()}

    def _wall(self, fns: dict[str, Callable[[], Any]], estimate: dict[str, float]) -> dict[str, list[float]]:
        """Wall seconds of single synchronised eager calls, interleaved, for about a third of the
        budget: the per-call time a user's loop sees (no sleep hides the host, no flush)."""
        wall: dict[str, list[float]] = {name: [] for name in fns}
        reps = {name: max(self.budget.min_reps, min(self.budget.max_reps // 2,
                                                    int(self.budget.measure_s / 3 / max(estimate[name], 20e-6))))
                for name in fns}
        while due := [name for name in fns if len(wall[name]) < reps[name]]:
            for name in due:
                self.synchronize()
                t0 = time.perf_counter()
                fns[name]()
                self.synchronize()
                wall[name].append(time.perf_counter() - t0)
        return wall

    def time(self, fn: Callable[[], Any]) -> Timing:
        """Time one callable (see :meth:`time_all`)."""
        return self.time_all({"fn": fn})["fn"]


def _gemm_size(device: torch.device) -> int:
    # Large enough to reach the plateau: 8192³ on an H100 (1.1 TFLOP, ~1.4 ms in bf16), 1024³ on a
    # 2-core CPU (2.1 GFLOP, ~12 ms in fp32).
    return {"cuda": 8192, "mps": 4096}.get(device.type, 1024)


class Ceilings:
    """Memory bandwidth and GEMM throughput of the device, measured once per run, lazily."""

    def __init__(self, timer: Timer):
        self.timer = timer
        self._copy_gbps: float | None = None
        self._gemm_tflops: dict[torch.dtype, float] = {}

    @property
    def copy_gbps(self) -> float:
        """Device-to-device copy: (bytes read + bytes written) / time, in GB/s."""
        if self._copy_gbps is None:
            device = self.timer.device
            # Far above the last-level cache: 1 GiB on GPUs, 128 MiB on a CPU.
            nbytes = (1 << 30) if device.type in ("cuda", "mps") else (128 << 20)
            src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
            dst = torch.empty_like(src)
            t = self.timer.time(lambda: dst.copy_(src)).median_s
            self._copy_gbps = 2 * nbytes / t / 1e9
            del src, dst
        return self._copy_gbps

    def gemm_tflops(self, dtype: torch.dtype) -> float:
        """``n×n @ n×n`` in ``dtype`` (TF32 off for float32, as torch's default), in TFLOP/s."""
        if dtype not in self._gemm_tflops:
            device = self.timer.device
            n = _gemm_size(device)
            a = torch.randn(n, n, device=device).to(dtype)
            b = torch.randn(n, n, device=device).to(dtype)
            out = torch.empty(n, n, device=device, dtype=dtype)
            t = self.timer.time(lambda: torch.mm(a, b, out=out)).median_s
            self._gemm_tflops[dtype] = 2 * n**3 / t / 1e12
            del a, b, out
        return self._gemm_tflops[dtype]

    def to_json(self) -> dict[str, Any]:
        return {
            "copy_gbps": self._copy_gbps,
            "gemm_tflops": {str(d).removeprefix("torch."): v for d, v in self._gemm_tflops.items()},
        }
