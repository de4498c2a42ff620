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


# torch's C accessor for the current stream's handle (what Triton's driver uses), ~0.1 µs a call.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)

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
        jit = self.compiled
        device = torch.cuda.current_device()
        binder = jit.device_caches[device][4]
        bound, specialization, _ = binder(*args, **options)
        try:
            key = (device, tuple(specialization), tuple(options.items()))
            entry = self._launchers.get(key)
        except TypeError:  # an unhashable constexpr: no shortcut for this kernel
            key, entry = None, None
        if entry is None or _launch_hooks_registered():
            kernel = jit.run(*args, grid=grid, warmup=False, **options)
            if key is not None and kernel is not None and not jit.pre_run_hooks and not hasattr(kernel, "result"):
                self._launchers[key] = (kernel.run, kernel.function, kernel.packed_metadata)
            return
        launcher, function, metadata = entry
        n = len(grid)
        # Launcher arguments as run() passes them; None for the launch metadata and both hooks.
        launcher(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1,
                 torch.cuda.current_stream(device).cuda_stream if _raw_stream is None else _raw_stream(device),
                 function, metadata, None, None, None, *bound.values())

    def __repr__(self) -> str:
        return f"<metalcore triton kernel {self.fn.__name__}>"


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
