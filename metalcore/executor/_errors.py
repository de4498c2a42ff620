"""The executor's exceptions: what went wrong, named so that a test can tell the cases apart."""


class MetalCompileError(RuntimeError):
    """The shader does not compile (with the executor's C++ compiler), or compiling it timed out."""


class UnsupportedMetalError(MetalCompileError):
    """The shader uses a Metal construct the executor does not implement."""


class MetalLimitError(ValueError):
    """A launch exceeds one of Apple's limits (threads per threadgroup, threadgroup memory, buffers)."""


class MetalOutOfBoundsError(IndexError):
    """A kernel accessed a device buffer or a threadgroup array out of bounds (bounds-checked mode)."""


class MetalKernelError(RuntimeError):
    """A kernel failed while running (a barrier in divergent control flow, a stack overflow, a crash)."""


class MetalTimeoutError(MetalKernelError, TimeoutError):
    """A launch ran past ``METALCORE_EXECUTOR_TIMEOUT`` seconds and was stopped."""


class MetalCacheError(PermissionError):
    """The shader cache is not safe to load native code from (ownership, permissions, contents)."""
