"""Backend selection: the one place that decides which implementation of an op runs.

Three backends exist:

* ``"triton"``    — Triton kernels, for CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``,
  which is how CI runs every Triton kernel without a GPU);
* ``"metal"``     — Metal shaders, for MPS tensors;
* ``"reference"`` — plain PyTorch, for every device.

The automatic choice follows the tensor's device and falls back to the reference quietly when the
device's backend is unavailable or has no kernel for an op or input. An *explicit* request — the
``METALCORE_BACKEND`` environment variable or :func:`use_backend` — must be honoured or it raises
:class:`BackendUnavailableError`: a user who forces a backend wants to know when they don't get it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Callable, Iterator

import torch

BACKENDS = ("reference", "triton", "metal")
_ENV_VAR = "METALCORE_BACKEND"


class _EnvironmentFlag:
    """One environment variable, parsed again only when its value changes.

    ``os.environ.get`` costs ~0.5 µs (key encoding, a ``Mapping`` lookup, value decoding) and the
    dispatcher reads two variables on every call; comparing the raw value held in ``os.environ``'s
    own dict costs ~0.1 µs. ``os.environ[...] = ...`` (and pytest's ``monkeypatch.setenv``) update that
    dict, so a change is seen on the next call."""

    def __init__(self, name: str, parse: Callable[[str], str | bool]):
        self.name = name
        self._parse = parse
        # CPython's os._Environ keeps the encoded variables in ``_data``; elsewhere read os.environ.
        self._data = getattr(os.environ, "_data", os.environ)
        self._key = os.environ.encodekey(name) if self._data is not os.environ else name
        # Never an environment value (those cannot hold NUL), and a constant torch.compile can
        # compare: an ``object()`` sentinel made dynamo fail a compiled first call.
        self._raw: bytes | str | None = "\0"
        self._value: str | bool = ""

    def get(self) -> str | bool:
        raw = self._data.get(self._key)
        if raw != self._raw:
            # Parsed before ``_raw`` is updated, so that an invalid value raises on every call.
            self._value = self._parse(os.environ.get(self.name, ""))
            self._raw = raw
        return self._value


# Process-wide, like torch.backends' flags: autograd runs CUDA backward passes on its own device
# threads, and a thread-local choice made around ``loss.backward()`` never reached the backward
# ops there (seen on the H100: the flash-attention backward silently ran on the reference).
_forced: str | None = None


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this op on this input."""


def _validate_name(name: str) -> str:
    if name not in BACKENDS and name != "auto":
        raise ValueError(
            f"metalcore backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; got {name!r}"
        )
    return name


_REQUESTED = _EnvironmentFlag(_ENV_VAR, lambda value: _validate_name(value.strip().lower() or "auto"))
_INTERPRET = _EnvironmentFlag("TRITON_INTERPRET", lambda value: value == "1")


# The usual state, the variable unset, is seen in one lookup of os.environ's own dict: ~0.05 µs a
# call less than the flag's ``get`` (development CPU), on every op call and torch-route hit.
_REQUESTED_DATA, _REQUESTED_KEY = _REQUESTED._data, _REQUESTED._key


def requested_backend() -> str:
    """The backend asked for explicitly (context manager first, then environment), or ``'auto'``."""
    if _forced is not None:
        return _forced
    if _REQUESTED_DATA.get(_REQUESTED_KEY) is None:
        return "auto"
    return _REQUESTED.get()


def automatic_selection() -> bool:
    """Whether nothing is forced: ``requested_backend() == 'auto'`` in one call (the torch route
    and the public attention ask on every call)."""
    if _forced is None:
        return _REQUESTED_DATA.get(_REQUESTED_KEY) is None or _REQUESTED.get() == "auto"
    return _forced == "auto"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force every metalcore op inside the block onto one backend (``'auto'`` restores the default).

    The choice is process-wide while the block runs (so it also holds for a ``backward()`` inside
    it, which autograd may run on other threads), and blocks nest.

    >>> with metalcore.use_backend("reference"):
    ...     L = metalcore.cholesky(A)
    """
    global _forced
    previous = _forced
    _forced = _validate_name(name)
    try:
        yield
    finally:
        _forced = previous


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    return _INTERPRET.get()


def backend_runs_on(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` can execute on tensors living on ``device``."""
    if backend == "reference":
        return True
    if backend == "triton":
        if not triton_importable():
            return False
        return device.type == "cuda" or (device.type == "cpu" and triton_interpreting())
    if backend == "metal":
        if device.type == "mps":
            return hasattr(torch.mps, "compile_shader")
        # CPU tensors run the shaders on the CPU executor (metalcore/executor/), a test vehicle: only when the metal
        # backend is requested explicitly and the executor can be built (clang); never automatically.
        if device.type == "cpu" and requested_backend() == "metal":
            from metalcore._metal import executor_available

            return executor_available()
        return False
    raise ValueError(f"unknown backend {backend!r}")


def automatic_backend(device: torch.device) -> str:
    """The backend the device would use with nothing forced."""
    if device.type == "cuda" and triton_importable():
        return "triton"
    if device.type == "mps" and hasattr(torch.mps, "compile_shader"):
        return "metal"
    return "reference"
