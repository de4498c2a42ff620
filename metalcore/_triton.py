"""Launch helpers shared by metalcore's Triton kernel modules.

``triton.jit`` decides at *decoration* time whether a kernel is compiled or interpreted (it reads
``TRITON_INTERPRET`` when the module is imported), while metalcore's dispatcher decides at *call*
time (:func:`metalcore._backend.triton_interpreting`). Kernel modules are imported with
``import metalcore``, so a process that sets ``TRITON_INTERPRET=1`` afterwards (a test fixture, a
notebook) would route CPU tensors to a kernel compiled for CUDA. :func:`jit` closes that gap: the
kernel is wrapped once, and each launch picks the interpreted or compiled twin by the variable's
value at that moment. A device function that kernels call is declared with :func:`helper`.

Compiled launches take a shorter road than ``JITFunction.run`` once a kernel variant has been
compiled (:meth:`LazyKernel._launch`): Triton's own binder still computes the specialization of
the arguments (dtypes, 16-byte alignment of pointers, integers equal to 1 or divisible by 16), which
selects the compiled variant, but the per-call work around it — reading the debug and
instrumentation settings, formatting the options into the cache key, checking the kernel's globals,
building launch metadata for hooks nobody registered — is skipped, and the compiled launcher is
called directly. It is tied to Triton 3.6's internals (``device_caches``, the binder, the
launcher's argument order), so other versions, registered launch hooks, and a first launch of
each variant go through ``JITFunction.run``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
import triton
import triton.runtime.interpreter as _interpreter
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from metalcore._backend import triton_interpreting


def _patch_interpreter_for_numpy_2_4() -> None:
    """Triton <= 3.6's interpreter turns a scalar into an int with ``int(array_of_shape_1)``, which
    numpy 2.4 rejects ("only 0-dimensional arrays can be converted"), so any loop with a run-time
    bound fails (triton-lang/triton#9171, fixed upstream by squeezing). Apply the same fix."""
    original = _interpreter._patch_lang_tensor
    if getattr(original, "_metalcore_fixed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._metalcore_fixed = True
    _interpreter._patch_lang_tensor = patched


# torch's C accessors for the current stream's handle (what Triton's driver uses) and the current
# device, ~0.1 µs a call each (``torch.cuda.current_device()`` wraps the second in Python).
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
_current_device = getattr(torch._C, "_cuda_getDevice", None)


def _stream(device: int) -> int:
    return torch.cuda.current_stream(device).cuda_stream if _raw_stream is None else _raw_stream(device)

_INTERPRETED_HELPERS: dict[Callable[..., Any], InterpretedFunction] = {}


def _call_interpreted(self: JITFunction, *args: Any, **kwargs: Any) -> Any:
    twin = _INTERPRETED_HELPERS.get(self.fn)
    if twin is None:
        twin = _INTERPRETED_HELPERS[self.fn] = InterpretedFunction(self.fn)
    return twin(*args, **kwargs)


@contextlib.contextmanager
def _jit_helpers_interpretable() -> Iterator[None]:
    """triton.language's own helpers (``tl.sum``, ``tl.cdiv``, ``tl.sigmoid``, ...) are
    ``@triton.jit`` functions too, fixed as compiled or interpreted when triton is imported. If
    triton was imported before ``TRITON_INTERPRET=1`` was set, calling one from an interpreted kernel
    raises "Cannot call @triton.jit'd outside of the scope of a kernel"; for the duration of an
    interpreted launch, such calls run their interpreted twin instead (what triton itself does when
    the variable is set before import). Compilation never calls ``JITFunction.__call__``."""
    original = JITFunction.__call__
    if original is _call_interpreted:
        yield
        return
    JITFunction.__call__ = _call_interpreted
    try:
        yield
    finally:
        JITFunction.__call__ = original


# The direct launch follows Triton 3.6's JITFunction.run line by line (runtime/jit.py); any other
# version launches through run() itself.
FAST_LAUNCH = triton.__version__.split(".")[:2] == ["3", "6"]
if FAST_LAUNCH:
    from triton import knobs


def _launch_hooks_registered() -> bool:
    """Whether a profiler (proton, a user) has registered launch hooks, which only run() calls."""
    enter, exit_ = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    return bool(getattr(enter, "calls", enter)) or bool(getattr(exit_, "calls", exit_))


class LazyKernel:
    """A Triton kernel that chooses compile-or-interpret at launch: ``kernel[grid](*args, ...)``."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self.__name__ = fn.__name__
        self.interpreted: InterpretedFunction | None = None
        self.compiled: JITFunction | None = None
        # (device, specialization, options) -> (launcher, function handle, packed metadata) of a
        # compiled variant already launched once through JITFunction.run.
        self._launchers: dict[tuple[Any, ...], tuple[Any, Any, Any]] = {}

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        if triton_interpreting():
            if self.interpreted is None:
                _patch_interpreter_for_numpy_2_4()
                self.interpreted = InterpretedFunction(self.fn)
            launch = self.interpreted[grid]

            def run(*args: Any, **kwargs: Any) -> Any:
                with _jit_helpers_interpretable():
                    return launch(*args, **kwargs)

            return run
        if self.compiled is None:
            self.compiled = JITFunction(self.fn)
        if not FAST_LAUNCH:
            return self.compiled[grid]
        return functools.partial(self._launch, grid)

    def _launch(self, grid: tuple[int, ...], *args: Any, **options: Any) -> None:
        """Launch on the current CUDA device and stream: the compiled variant directly when this
        specialization was launched before, else through ``JITFunction.run`` (which compiles)."""
        device = torch.cuda.current_device()
        entry, bound = self._entry(device, args, options)
        if entry is None or _launch_hooks_registered():
            self._run(device, grid, args, options)
            return
        launcher, function, metadata = entry
        n = len(grid)
        # Launcher arguments as run() passes them; None for the launch metadata and both hooks.
        launcher(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, _stream(device),
                 function, metadata, None, None, None, *bound.values())

    def _entry(self, device: int, args: tuple[Any, ...], options: dict[str, Any]) -> tuple[Any, Any]:
        """``(launcher entry or None, the binder's bound arguments)`` of these arguments' variant."""
        bound, specialization, _ = self.compiled.device_caches[device][4](*args, **options)
        try:
            return self._launchers.get((device, tuple(specialization), tuple(options.items()))), bound
        except TypeError:  # an unhashable constexpr: no shortcut for this kernel
            return None, bound

    def _run(self, device: int, grid: tuple[int, ...], args: tuple[Any, ...], options: dict[str, Any]) -> None:
        """``JITFunction.run`` (compiling a new variant), keeping the variant's launcher for later calls."""
        jit = self.compiled
        kernel = jit.run(*args, grid=grid, warmup=False, **options)
        if kernel is None or jit.pre_run_hooks or hasattr(kernel, "result"):
            return
        _, specialization, _ = jit.device_caches[device][4](*args, **options)
        try:
            self._launchers[(device, tuple(specialization), tuple(options.items()))] = (
                kernel.run, kernel.function, kernel.packed_metadata)
        except TypeError:
            pass

    def bind(self, grid: tuple[int, ...], *args: Any, **options: Any) -> Callable[..., None]:
        """``launch(*tensors)``: this kernel on ``grid`` with ``args`` and ``options`` fixed, the
        tensors filling the ``None`` entries of ``args`` in order (:class:`BoundLaunch`)."""
        return BoundLaunch(self, grid, args, options)

    def __repr__(self) -> str:
        return f"<metalcore triton kernel {self.fn.__name__}>"


class BoundLaunch:
    """A kernel's launch with its grid, options and every argument but the tensors fixed: what a
    launcher specialized to one call signature keeps (its integers, dtypes and grid are the
    signature's). ``launch(*tensors)`` fills the ``None`` entries of the arguments in order.

    The first compiled launch goes through :meth:`LazyKernel._launch` (compiling if needed); after
    it, a call skips Triton's argument binder and hands the compiled launcher the tensors' data
    pointers as integers (the launcher then neither calls ``data_ptr()`` nor asks the driver about
    each pointer), as long as each tensor's 16-byte alignment — the one property of a tensor argument
    besides its dtype that Triton specializes on — and the current device are what they were then.
    Anything else (another alignment or device, registered launch hooks, the interpreter, another
    Triton version) launches the way an unbound call would.

    On the H100 host (bench/host.md v4): binder 4.8 µs, launcher 5.8, our launch around them 15.0
    a call for a 17-argument kernel."""

    __slots__ = ("kernel", "grid", "args", "options", "slots", "direct")

    def __init__(self, kernel: LazyKernel, grid: tuple[int, ...], args: tuple[Any, ...], options: dict[str, Any]):
        self.kernel, self.args, self.options = kernel, args, options
        self.grid = (*grid, 1, 1)[:3]
        self.slots = [i for i, a in enumerate(args) if a is None]
        # (launcher, function, metadata, argument values, alignments, device) once launched compiled.
        self.direct: tuple[Any, ...] | None = None

    def __call__(self, *tensors: Any) -> None:
        direct = self.direct
        if direct is not None and FAST_LAUNCH:
            launcher, function, metadata, values, aligned, device = direct
            pointers = [t.data_ptr() for t in tensors]
            if [p & 15 == 0 for p in pointers] == aligned and _current_device() == device \
                    and not _launch_hooks_registered():
                values = values.copy()
                for i, p in zip(self.slots, pointers):
                    values[i] = p
                g = self.grid
                launcher(g[0], g[1], g[2], _stream(device), function, metadata, None, None, None, *values)
                return
        args = list(self.args)
        for i, t in zip(self.slots, tensors):
            args[i] = t
        if triton_interpreting() or not FAST_LAUNCH:
            self.kernel[self.grid](*args, **self.options)
            return
        kernel = self.kernel
        if kernel.compiled is None:
            kernel.compiled = JITFunction(kernel.fn)
        kernel._launch(self.grid, *args, **self.options)
        if direct is None and not _launch_hooks_registered():
            device = _current_device()
            entry, bound = kernel._entry(device, tuple(args), self.options)
            if entry is not None:
                values = list(bound.values())
                if all(values[i] is t for i, t in zip(self.slots, tensors)):   # positional, in order
                    self.direct = (*entry, values, [t.data_ptr() & 15 == 0 for t in tensors], device)


def jit(fn: Callable[..., Any]) -> LazyKernel:
    return LazyKernel(fn)


def helper(fn: Callable[..., Any]) -> JITFunction:
    """A device function called from :func:`jit` kernels. Always a ``JITFunction`` (what the
    compiler expects), whatever ``TRITON_INTERPRET`` was at import; interpreted launches run it
    through its interpreted twin (:func:`_jit_helpers_interpretable`)."""
    return JITFunction(fn)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def program_slots(device: torch.device) -> int:
    """Streaming multiprocessors on ``device`` (CUDA), or a small stand-in for the CPU interpreter,
    where every program runs one after another and fewer, fuller programs run faster."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def cdiv(a: int, b: int) -> int:
    """Ceiling division on the host. (``triton.cdiv`` is a constexpr function in Triton 3.6 and
    costs tens of microseconds a call from Python: 64 calls were most of an AdamW step's launch.)"""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (host-side twin of ``triton.next_power_of_2``)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def warps_for(elements: int) -> int:
    """Warps per program for a block of ``elements``: about 16 elements per thread, so that each
    thread issues two or more 16-byte loads for 16-bit data (Liger's rule, same thresholds)."""
    if elements >= 32768:
        return 32
    if elements >= 8192:
        return 16
    if elements >= 2048:
        return 8
    return 4
