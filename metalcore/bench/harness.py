"""The benchmark harness: the case table, the run loop and the command line.

A *case* is one setup function per op, registered with :func:`case`. For each of its parameter
sets (shapes, variants) and modes it builds inputs on the device and returns a :class:`Bench`:
the metalcore callable, its peers (the best implementations the device offers, timed in the same
process), and the bytes and FLOPs the op must move and do. The harness

1. records which metalcore backend served each registered op inside the call (``backend``),
2. checks that metalcore and the first peer agree (``check_rel_err``; a benchmark of a wrong
   result is worthless),
3. times every callable (:mod:`metalcore.bench.timing`) and reports the ratio
   ``best peer time / metalcore time`` (> 1: metalcore is faster) and the fraction of the
   device's measured roofline.

See bench/README.md for the columns and for how to add a case.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import importlib
import os
import sys
import time
import traceback
import types
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from metalcore._op import observe_backends
from metalcore.bench.timing import CPU_BUDGET, GPU_BUDGET, QUICK_BUDGET, Ceilings, Timer, Timing, fmt_time

FAMILIES = ("training", "linalg")
# "fwd": the op's call; "fwd+bwd": the call and its backward; "step": one optimizer step.
MODES = ("fwd", "fwd+bwd", "step")
# Modules whose @case functions fill the table, imported by load_cases() (not at import time).
CASE_MODULES = ("metalcore.bench.training", "metalcore.bench.linalg")

# Largest acceptable max|metalcore − peer| / max|peer| per dtype, over every output tensor (or
# gradient in fwd+bwd). Loose: this guards the benchmark against timing a wrong result; accuracy
# itself is the test suite's job. bf16 holds 8 mantissa bits (3.9e-3 relative), and a gradient
# summed over 4096 rows in a different order differs by a few of those.
CHECK_TOL = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 1e-3, torch.float64: 1e-9}


class Skip(Exception):
    """The case cannot run here: the op is not in metalcore yet, or the device lacks something."""


def _identity(out: Any) -> Any:
    return out


@dataclass
class Bench:
    """What a setup function returns: callables on ready inputs, and the op's work.

    ``metalcore`` and each peer take no arguments (they close over inputs built on the device)
    and return the op's output(s). ``bytes`` is the minimum traffic of the op (every input read
    once, every output written once) and ``flops`` its arithmetic, both for the whole call in the
    case's mode. ``grad_inputs`` lists the tensors whose gradients the fwd+bwd mode computes (the
    harness adds the backward). ``canonical`` maps an output to what metalcore and the peers must
    agree on (e.g. the singular values of an SVD, whose vectors are free up to sign); ``None``
    skips the check (an optimizer step returns nothing).
    """

    metalcore: Callable[[], Any]
    peers: dict[str, Callable[[], Any]]
    shape: str
    dtype: torch.dtype
    bytes: int = 0
    flops: float = 0.0
    variant: str = ""
    grad_inputs: Sequence[torch.Tensor] = ()
    canonical: Callable[[Any], Any] | None = _identity
    note: str = ""


@dataclass(frozen=True)
class Context:
    """What a setup function knows of the run."""

    device: torch.device
    mode: str  # one of MODES
    small: bool  # CPU/--quick shapes
    compile: bool  # whether torch.compile peers are built

    @property
    def train_dtype(self) -> torch.dtype:
        """Storage dtype of the training ops: bf16 on GPUs (as models train), fp32 on the CPU."""
        return torch.float32 if self.device.type == "cpu" else torch.bfloat16

    @property
    def backward(self) -> bool:
        return self.mode == "fwd+bwd"

    def randn(self, *shape: int, dtype: torch.dtype | None = None, grad: bool = False) -> torch.Tensor:
        """Standard normal on the device; ``grad`` asks for ``requires_grad`` in the fwd+bwd mode."""
        x = torch.randn(*shape, device=self.device, dtype=dtype or torch.float32)
        return x.requires_grad_(grad and self.backward)


@dataclass(frozen=True)
class Case:
    name: str
    family: str
    setup: Callable[..., Bench]
    full: tuple[dict[str, Any], ...]
    small: tuple[dict[str, Any], ...]
    modes: tuple[str, ...]

    def params(self, small: bool) -> tuple[dict[str, Any], ...]:
        return self.small if small else self.full


CASES: dict[str, Case] = {}


def case(name: str, *, family: str, full: Sequence[dict[str, Any]], small: Sequence[dict[str, Any]] | None = None,
         modes: Sequence[str] = ("fwd",)) -> Callable[[Callable[..., Bench]], Callable[..., Bench]]:
    """Register ``setup(ctx, **params) -> Bench`` as the case ``name``.

    ``full`` lists the parameter sets timed on GPUs; ``small`` those timed on the CPU and with
    ``--quick`` (defaults to ``full``). ``modes`` adds ``"fwd+bwd"`` for differentiable ops.
    Case names are stable: results and issues refer to them.
    """
    if family not in FAMILIES:
        raise ValueError(f"case {name!r}: family must be one of {FAMILIES}; got {family!r}")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"case {name!r}: modes must be among {MODES}; got {bad}")

    def register(setup: Callable[..., Bench]) -> Callable[..., Bench]:
        if name in CASES:
            raise RuntimeError(f"benchmark case {name!r} is registered twice")
        CASES[name] = Case(name, family, setup, tuple(full), tuple(small if small is not None else full),
                           tuple(modes))
        return setup

    return register


def param_label(params: dict[str, Any]) -> tuple[str, str]:
    """``(shape, variant)`` labels of a parameter set: integers and integer tuples make the shape
    (``4x32x2048x128``), anything else the variant (``causal=True``). Rows use the labels their
    setup gives; these serve ``--list`` and rows whose setup did not run."""
    dims, rest = [], []
    for k, v in params.items():
        if isinstance(v, bool) or not isinstance(v, (int, tuple)):
            rest.append(f"{k}={v}")
        else:
            dims.extend(v if isinstance(v, tuple) else (v,))
    return "x".join(map(str, dims)), " ".join(rest)


def load_cases() -> dict[str, Case]:
    for module in CASE_MODULES:
        importlib.import_module(module)
    return CASES


# --- helpers for setup functions ------------------------------------------------------------

def metalcore_fn(*paths: str) -> Callable[..., Any]:
    """The first of ``metalcore.<path>`` that exists, else :class:`Skip` (the op has not landed)."""
    for path in paths:
        module, _, attr = f"metalcore.{path}".rpartition(".")
        try:
            found = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name is not None and module.startswith(e.name):  # the module itself is missing,
                continue  # not something it imports (that is a bug to report, not a skip)
            raise
        obj = getattr(found, attr, None)
        if callable(obj) and not isinstance(obj, types.ModuleType):  # not a submodule of that name
            return obj
    raise Skip(f"metalcore.{paths[0]} does not exist yet")


def compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compile`` of an eager formula, for the ``torch.compile`` peer (compiles on first call)."""
    return torch.compile(fn, dynamic=False, fullgraph=True)


def liger(ctx: Context, module: str, name: str) -> Any | None:
    """``liger_kernel.ops.<module>.<name>`` on CUDA when Liger Kernel is importable, else None."""
    if ctx.device.type != "cuda":
        return None
    try:
        return getattr(importlib.import_module(f"liger_kernel.ops.{module}"), name)
    except Exception:  # not installed, or an API that moved: the peer is simply absent
        return None


# --- one row -----------------------------------------------------------------------------------

def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
            torch.float64: "fp64"}.get(dtype, str(dtype).removeprefix("torch."))


@dataclass
class Row:
    op: str
    family: str
    mode: str
    variant: str = ""
    shape: str = ""
    dtype: str = ""
    status: str = "ok"  # ok | mismatch | skipped | error
    reason: str = ""
    backend: str = ""
    backend_ops: dict[str, str] = field(default_factory=dict)
    metalcore: Timing | None = None
    peers: dict[str, Timing] = field(default_factory=dict)
    peer_errors: dict[str, str] = field(default_factory=dict)
    bytes: int = 0
    flops: float = 0.0
    check_rel_err: float | None = None
    check_against: str = ""
    # derived from metalcore's time and the run's ceilings
    gbps: float | None = None
    tflops: float | None = None
    bound: str = ""
    roofline: float | None = None

    @property
    def id(self) -> str:
        parts = [self.op, self.variant, self.shape, self.dtype, self.mode]
        return "/".join(p for p in parts if p)

    @property
    def best_peer(self) -> str | None:
        return min(self.peers, key=lambda k: self.peers[k].median_s) if self.peers else None

    @property
    def ratio(self) -> float | None:
        """Best peer's median / metalcore's median (GPU time on GPUs): above 1, metalcore is faster."""
        best = self.best_peer
        if best is None or self.metalcore is None:
            return None
        return self.peers[best].median_s / self.metalcore.median_s

    @property
    def best_peer_wall(self) -> str | None:
        return min(self.peers, key=lambda k: self.peers[k].wall_s or self.peers[k].median_s) if self.peers else None

    @property
    def wall_ratio(self) -> float | None:
        """The headline: best peer's wall time per synchronised eager call / metalcore's."""
        best = self.best_peer_wall
        if best is None or self.metalcore is None:
            return None
        theirs, ours = self.peers[best], self.metalcore
        return (theirs.wall_s or theirs.median_s) / (ours.wall_s or ours.median_s)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "op": self.op, "family": self.family, "variant": self.variant,
            "shape": self.shape, "dtype": self.dtype, "mode": self.mode, "status": self.status,
            "reason": self.reason, "backend": self.backend, "backend_ops": self.backend_ops,
            "metalcore": self.metalcore.to_json() if self.metalcore else None,
            "peers": {k: v.to_json() for k, v in self.peers.items()},
            "peer_errors": self.peer_errors, "best_peer": self.best_peer, "ratio": self.ratio,
            "best_peer_wall": self.best_peer_wall, "wall_ratio": self.wall_ratio,
            "bytes": self.bytes, "flops": self.flops, "gbps": self.gbps, "tflops": self.tflops,
            "bound": self.bound, "roofline": self.roofline,
            "check_rel_err": self.check_rel_err, "check_against": self.check_against,
        }


@contextlib.contextmanager
def _record_backends() -> Iterator[dict[str, str]]:
    """Inside the block, record for every metalcore op the backend that serves it: ``{op: backend}``
    (eager calls, the library op under ``torch.compile`` and the backward alike)."""
    with observe_backends() as served:
        yield served


def _tensors(out: Any) -> Iterator[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for o in out:
            yield from _tensors(o)


def _with_backward(fn: Callable[[], Any], inputs: Sequence[torch.Tensor],
                   grads: list[torch.Tensor]) -> Callable[[], Any]:
    """``fn`` followed by the gradients of its outputs w.r.t. ``inputs``; the output gradients
    are drawn once (on the first call of the first callable) and shared by all callables."""

    def step() -> tuple[torch.Tensor, ...]:
        outs = [o for o in _tensors(fn()) if o.requires_grad]
        if not grads:
            grads.extend(torch.randn_like(o) for o in outs)
        return torch.autograd.grad(outs, inputs, grads[: len(outs)])

    return step


def _rel_err(a: Any, b: Any) -> float:
    ta, tb = list(_tensors(a)), list(_tensors(b))
    if len(ta) != len(tb):
        raise ValueError(f"metalcore returned {len(ta)} tensors and the peer {len(tb)}")
    err = 0.0
    for x, y in zip(ta, tb):
        if x.shape != y.shape:
            raise ValueError(f"output shapes differ: metalcore {tuple(x.shape)}, peer {tuple(y.shape)}")
        if x.numel() == 0:
            continue
        x, y = x.detach().double(), y.detach().double()
        scale = y.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
        err = max(err, float((x - y).abs().max() / scale))
    return err


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


class Runner:
    """Runs cases on one device and turns each parameter set and mode into a :class:`Row`."""

    def __init__(self, device: torch.device, *, small: bool, quick: bool, compile: bool, log=None):
        self.device = device
        self.small = small
        self.compile = compile
        budget = QUICK_BUDGET if quick else (CPU_BUDGET if device.type == "cpu" else GPU_BUDGET)
        self.timer = Timer(device, budget)
        self.ceilings = Ceilings(self.timer)
        self.log = log or (lambda msg: None)

    def rows(self, cases: Sequence[Case], modes: Sequence[str],
             on_row: Callable[[list[Row]], None] | None = None) -> list[Row]:
        work = [(c, p, m) for c in cases for p in c.params(self.small) for m in c.modes if m in modes]
        rows: list[Row] = []
        for i, (c, params, mode) in enumerate(work, 1):
            t0 = time.perf_counter()
            row = self.run_one(c, params, mode)
            rows.append(row)
            timed = ""
            if row.ratio is not None:
                timed = (f": metalcore {fmt_time(row.metalcore.median_s)}, {row.best_peer} "
                         f"{fmt_time(row.peers[row.best_peer].median_s)}, {row.ratio:.2f}x")
            self.log(f"[{i}/{len(work)}] {row.id}: {row.status}{timed}"
                     + (f" ({row.reason})" if row.reason else "") + f" [{time.perf_counter() - t0:.1f} s]")
            if on_row is not None:
                on_row(rows)
        return rows

    def run_one(self, c: Case, params: dict[str, Any], mode: str) -> Row:
        row = Row(op=c.name, family=c.family, mode=mode)
        row.shape, row.variant = param_label(params)
        ctx = Context(self.device, mode, self.small, self.compile)
        torch.manual_seed(0)
        try:
            bench = c.setup(ctx, **params)
            row.variant, row.shape, row.dtype = bench.variant, bench.shape, dtype_name(bench.dtype)
            row.bytes, row.flops, row.reason = int(bench.bytes), float(bench.flops), bench.note
            self._measure(row, bench, ctx)
        except Skip as e:
            row.status, row.reason = "skipped", str(e)
        except Exception as e:  # one broken case must not hide the others; it fails the run
            row.status, row.reason = "error", _short(e)
            self.log(traceback.format_exc())
        finally:
            bench = None
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return row

    def _measure(self, row: Row, bench: Bench, ctx: Context) -> None:
        fns = {"metalcore": bench.metalcore, **bench.peers}
        if ctx.backward:
            if not bench.grad_inputs:
                raise ValueError(f"case {row.op}: fwd+bwd needs Bench.grad_inputs")
            grads: list[torch.Tensor] = []
            fns = {k: _with_backward(f, bench.grad_inputs, grads) for k, f in fns.items()}

        # First call of metalcore: which backend serves each op, and the output to check.
        metalcore = fns.pop("metalcore")
        with _record_backends() as served:
            ours = metalcore()
        row.backend_ops = dict(served)
        # No metalcore op ran: the public function called torch's own op (automatic selection's choice).
        row.backend = "+".join(sorted(set(served.values()))) or "torch"
        canonical = bench.canonical if not ctx.backward else _identity
        expected = canonical(ours) if canonical is not None else None
        del ours

        # First call of each peer: drop those that cannot run here, check against the first.
        for name, fn in list(fns.items()):
            try:
                theirs = fn()
            except Exception as e:
                row.peer_errors[name] = _short(e)
                del fns[name]
                continue
            if expected is not None and not row.check_against:
                row.check_against = name
                row.check_rel_err = _rel_err(expected, canonical(theirs))
            del theirs
        expected = None
        if not fns:  # DESIGN.md §7: never a time without the baseline from the same run
            raise RuntimeError("no peer could run here: " + "; ".join(f"{k}: {v}" for k, v in row.peer_errors.items()))
        if row.check_rel_err is not None and row.check_rel_err > CHECK_TOL.get(bench.dtype, 1e-3):
            row.status = "mismatch"
            row.reason = f"metalcore differs from {row.check_against}: rel err {row.check_rel_err:.1e}"

        timings = self.timer.time_all({"metalcore": metalcore, **fns}, called=True)
        row.metalcore = timings.pop("metalcore")
        row.peers = timings
        self._roofline(row, bench.dtype)

    def _roofline(self, row: Row, dtype: torch.dtype) -> None:
        t = row.metalcore.median_s
        t_mem = t_flop = 0.0
        if row.bytes:
            row.gbps = row.bytes / t / 1e9
            t_mem = row.bytes / (self.ceilings.copy_gbps * 1e9)
        if row.flops:
            row.tflops = row.flops / t / 1e12
            t_flop = row.flops / (self.ceilings.gemm_tflops(dtype) * 1e12)
        if t_mem or t_flop:
            row.bound = "memory" if t_mem >= t_flop else "compute"
            row.roofline = max(t_mem, t_flop) / t



# --- the run -----------------------------------------------------------------------------------

def detect_device(name: str = "auto") -> torch.device:
    """``auto``: cuda, then mps, then cpu. An explicit device that is not there raises."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("metalcore.bench: --device cuda, but torch.cuda.is_available() is False")
    if name == "mps" and not torch.backends.mps.is_available():
        raise SystemExit("metalcore.bench: --device mps, but torch.backends.mps.is_available() is False")
    if name not in ("cpu", "cuda", "mps"):
        raise SystemExit(f"metalcore.bench: --device must be auto, cpu, cuda or mps; got {name!r}")
    return torch.device(name)


def _run_text(*cmd: str, cwd: Path | None = None) -> str | None:
    import subprocess

    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def device_info(device: torch.device) -> dict[str, Any]:
    import platform

    info: dict[str, Any] = {"type": device.type}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                    cuda=torch.version.cuda)
    elif device.type == "mps":
        info["name"] = _run_text("sysctl", "-n", "machdep.cpu.brand_string") or "Apple GPU (mps)"
    else:
        name = platform.processor()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        info.update(name=name or platform.machine(), cores=os.cpu_count())
    info["torch_threads"] = torch.get_num_threads()
    return info


def device_slug(device: torch.device, info: dict[str, Any]) -> str:
    """File-name form of the device: ``cpu``, ``nvidia-h100-80gb-hbm3``, ``apple-m3-max``."""
    if device.type == "cpu":
        return "cpu"
    slug = "".join(c if c.isalnum() else "-" for c in info["name"].lower())
    return "-".join(p for p in slug.split("-") if p) or device.type


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def run_metadata(device: torch.device, info: dict[str, Any]) -> dict[str, Any]:
    import platform

    import metalcore

    root = Path(metalcore.__file__).resolve().parent.parent
    commit = _run_text("git", "rev-parse", "HEAD", cwd=root)
    # Dirty: uncommitted changes, untracked files included, where the code that runs lives.
    dirty = _run_text("git", "status", "--porcelain", "--", "metalcore", "shaders", cwd=root)
    # Set by whoever copied the tree: a copy without .git (a CI artifact), or one whose .git is older
    # than the files (the GPU machine's copy reported its first commit, "dirty", at later runs).
    if os.environ.get("METALCORE_BENCH_COMMIT"):
        commit, dirty = os.environ["METALCORE_BENCH_COMMIT"], None
    return {
        "schema": 1,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": info,
        "versions": {"metalcore": metalcore.__version__, "torch": torch.__version__, "triton": _version("triton"),
                     "liger_kernel": _version("liger-kernel"), "python": platform.python_version()},
        "platform": platform.platform(),
        "git": {"commit": commit, "dirty": bool(dirty) if commit else None},
        "backend_env": os.environ.get("METALCORE_BACKEND", "auto"),
        # Other processes on the machine when the run started (1, 5, 15 min): CPU figures taken
        # under load are noisier, though the interleaved timing keeps their ratios.
        "load_average": _load_average(),
    }


def _load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


@dataclass
class Result:
    rows: list[Row]
    meta: dict[str, Any]

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.status in ("error", "mismatch")]


def select_cases(ops: Sequence[str] | None) -> list[Case]:
    """Cases by name or family, in table order; unknown names raise ``ValueError``."""
    cases = load_cases()
    if not ops:
        return list(cases.values())
    unknown = [o for o in ops if o not in cases and o not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown benchmark case(s) {', '.join(unknown)}; known: {', '.join(cases)} "
                         f"(or a family: {', '.join(FAMILIES)})")
    return [c for c in cases.values() if c.name in ops or c.family in ops]


def run(device: str | torch.device = "auto", ops: Sequence[str] | None = None, *, quick: bool = False,
        modes: Sequence[str] = MODES, compile: bool | None = None, log=None,
        on_row: Callable[[Result], None] | None = None) -> Result:
    """Run the selected cases and return the rows with the run's metadata (no files written).

    Shapes are the small ones on the CPU and with ``quick``; ``compile`` (torch.compile peers)
    defaults to on for CUDA only, where compilation takes seconds per case and pays off.
    ``on_row`` receives the partial result (``meta["partial"]`` True) after every row, so that a
    run cut short still leaves its rows behind.
    """
    device = device if isinstance(device, torch.device) else detect_device(device)
    cases = select_cases(ops)
    small = quick or device.type == "cpu"
    compile = device.type == "cuda" if compile is None else compile
    runner = Runner(device, small=small, quick=quick, compile=compile, log=log)
    # torch warns once per process that MAGMA is deprecated and the preference experimental; the
    # "torch magma" peer exists to find out whether it is still the faster library here.
    warnings.filterwarnings("ignore", message=".*MAGMA.*deprecated")
    warnings.filterwarnings("ignore", message=".*preferred_linalg_library is an experimental")
    meta = run_metadata(device, device_info(device))
    meta["settings"] = {"quick": quick, "small_shapes": small, "modes": list(modes), "compile": compile,
                        "ops": [c.name for c in cases], "budget": vars(runner.timer.budget)}
    t0 = time.perf_counter()
    runner.ceilings.copy_gbps  # measured first, on an idle device

    def finish(rows: list[Row], partial: bool) -> Result:
        meta.update(partial=partial, elapsed_s=round(time.perf_counter() - t0, 1),
                    ceilings=runner.ceilings.to_json(), load_average_end=_load_average())
        return Result(rows, meta)

    rows = runner.rows(cases, modes, on_row=None if on_row is None else (lambda rs: on_row(finish(rs, True))))
    return finish(rows, False)


def list_cases() -> str:
    lines = []
    for c in load_cases().values():
        lines.append(f"{c.name:20s} {c.family:9s} modes: {', '.join(c.modes)}")
        for label, params in (("full", c.full), ("small", c.small)):
            lines.append(f"    {label:5s}: " + ", ".join(" ".join(filter(None, param_label(p))) for p in params))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from metalcore.bench import report

    parser = argparse.ArgumentParser(
        prog="python -m metalcore.bench",
        description="Time metalcore's ops against the best peers on this device (see bench/README.md).")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                        help="auto: cuda, then mps, then cpu")
    parser.add_argument("--ops", default="", help="comma-separated case names or families (default: all)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, among {', '.join(MODES)}")
    parser.add_argument("--quick", action="store_true", help="small shapes and short timing (a smoke run)")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="torch.compile peers (auto: on CUDA only)")
    parser.add_argument("--json", type=Path, default=None,
                        help="output JSON (default: bench/results/<device>-<YYYYMMDD>[-quick].json)")
    parser.add_argument("--png", type=Path, default=None,
                        help="bar charts of the ratios, one per op family: PATH with -<family> before .png (default: the JSON path)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for the run (default: torch's, all cores)")
    parser.add_argument("--list", action="store_true", help="list the cases and their shapes, then exit")
    sel = parser.add_argument_group("selection", "the size x batch x dtype sweep that automatic selection reads "
                                    "(metalcore/bench/selection.py)")
    sel.add_argument("--selection", action="store_true",
                     help="sweep kernel vs torch over the grid and rewrite metalcore/_tables/<device>.json")
    sel.add_argument("--check", action="store_true",
                     help="with --selection: then time the automatic path against torch and apply the rule "
                          "(exit 1 on a violation); alone: only the check")
    sel.add_argument("--dtypes", default="", help="comma-separated dtypes to sweep (default: each op's)")
    sel.add_argument("--sizes", default="", help="comma-separated grid sizes to sweep (default: the whole grid)")
    sel.add_argument("--batches", default="", help="comma-separated batches (rows) to sweep (default: the whole grid)")
    sel.add_argument("--out-dir", default="bench/results", help="where the check's JSON and heat map go")
    sel.add_argument("--warm-workers", type=int, default=0,
                     help="compile the sweep's Triton kernels first in N processes (shared on-disk cache)")
    grid = parser.add_argument_group("peers", "batched eigh/eigvalsh/svd/svdvals against torch, JAX and CuPy over a "
                                     "grid (metalcore/bench/linalg_peers.py); --ops, --dtypes, --sizes, --batches, "
                                     "--warm-workers and --json apply")
    grid.add_argument("--peers", action="store_true", help="run the peers grid instead of the cases")
    grid.add_argument("--grid", default="headline", choices=("headline", "full"),
                      help="headline: the issue's six batch x n shapes; full: n x batch "
                           "(restrict with --sizes/--batches)")
    grid.add_argument("--peer-runners", default="", help="comma-separated peers (default: jax,cupy; numpy for tests)")
    grid.add_argument("--peer-timeout", type=float, default=150.0, help="seconds each peer's process may take")
    grid.add_argument("--max-seconds", type=float, default=0.0,
                      help="stop starting metalcore/torch points after this many seconds of the run (0: no limit)")
    args = parser.parse_args(argv)

    if args.peers:
        from metalcore.bench import linalg_peers

        return linalg_peers.main(args)
    if args.selection or args.check:
        from metalcore.bench import selection

        if args.warm_workers:
            selection.warm_compile(args.ops, args.device if args.device != "auto" else "cuda", args.warm_workers,
                                   [int(x) for x in args.sizes.split(",") if x] or None,
                                   selection.parse_dtypes(args.dtypes) or None)
        args.check_only = args.check and not args.selection
        return selection.main(args)

    if args.list:
        print(list_cases())
        return 0
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        parser.error(f"--modes: unknown {', '.join(bad)}; choose among {', '.join(MODES)}")
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    try:
        select_cases(ops)
    except ValueError as e:
        parser.error(str(e))
    compile = {"auto": None, "on": True, "off": False}[args.compile]
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    device = detect_device(args.device)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d")
    slug = device_slug(device, device_info(device))
    json_path = args.json or Path("bench/results") / f"{slug}-{stamp}{'-quick' if args.quick else ''}.json"

    result = run(device, ops, quick=args.quick, modes=modes, compile=compile,
                 log=lambda msg: print(msg, file=sys.stderr, flush=True),
                 on_row=lambda partial: report.write_json(json_path, partial.rows, partial.meta))
    print(report.format_table(result.rows, result.meta))
    report.write_json(json_path, result.rows, result.meta)
    png_path = args.png or json_path.with_suffix(".png")
    pngs = report.write_png(png_path, result.rows, result.meta)
    no_png = " (no PNG: matplotlib missing or no timed row)"
    print(f"\nwrote {json_path}" + (f" and {', '.join(map(str, pngs))}" if pngs else no_png)
          + f"; {result.meta['elapsed_s']} s")
    if result.failed:
        print(f"{len(result.failed)} row(s) failed: " + ", ".join(r.id for r in result.failed), file=sys.stderr)
        return 1
    return 0
