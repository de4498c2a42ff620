"""The torch route: a public function that automatic selection sends to torch's own op calls it
straight away, before any of metalcore's argument checks, once its call signature has been through
the full path; one that it sends to metalcore's kernel makes that op call with its recorded plan.

Where metalcore has nothing faster, a public function (``metalcore.linalg.cholesky``,
``metalcore.rms_norm``) calls torch's op for the same math (``MetalcoreOp.plan(...).prefers_torch``).
On the full path that still costs the argument checks, reshapes, broadcasts and the plan key before
torch runs: 4-12 µs a call on the development CPU, 8-13 µs on the H100 host, where it put the
cholesky/solve family at 0.82-0.92× torch's 80-200 µs calls (bench/host.md). All of that depends on
argument metadata only, so its outcome is kept per call signature:

* the key: grad mode and, per argument, a plain tensor's shape, contiguity, dtype, device and
  ``requires_grad``; anything else by type and value (keyword arguments with their names);
* the value: whether the full path, run once with that key, returned the torch route's result: it
  called the twin through the decorated function's ``by_torch``. Only a call that returned is
  recorded, so a key that failed validation stays a miss and raises again.

On a hit the call is ``twin(*args, **kwargs)``: torch's function with the public function's own
signature, the same one its full path calls with the same arguments (so both give the same result
and raise the same errors). A miss, a key recorded as running metalcore's op, an ``out=`` tensor,
``torch.compile`` tracing and a dispatch mode (FakeTensorMode, FlopCounterMode, export) run the full
path, which decides as before. Data is never cached: a mutated tensor is read by torch's op like any
other. The decisions are dropped with the op's plans (``clear_plans``, a kernel plugged in, a
selection table reloaded) and capped like them.

An explicitly requested backend or a path forced by ``_selection.use_path`` is part of the key (with
``TRITON_INTERPRET``, which decides what an explicit ``triton`` request does on CPU tensors), so a
forced call is recorded and repeated like an automatic one. The selection sweep times every path
that way: forced calls that skipped the route paid the full path's checks and plan lookup (10-20 µs
a call on the H100 host, bench/host.md v5) that the same kernel chosen automatically does not, and
lost tiny grid points to torch on that cost alone (bench/host.md v7).

The same record serves calls that run metalcore's kernel. A public function whose op arguments are
its own tensors (no broadcast copy, no vector made a matrix) and whose result is the op's, reshaped
into torch's return type at most, offers the op call with the plan it just decided
(``remember``); the route keeps it under the key and, second level, the positional tensors' strides
(plans depend on them), and later calls of that signature make that op call directly: no argument
checks, no plan lookup. A call with other strides under the same key takes the full path once and
is recorded beside it. On the development CPU, with the Triton launch itself stubbed out:
``solve_triangular`` 16×8×8 12.0 → 5.9 µs a call, ``cholesky_solve`` 11.0 → 5.1, ``solve_ex``
14.2 → 7.5, ``cholesky_ex`` 9.6 → 7.5, ``qr`` 8.4 → 6.2. ``eigh``, ``eigvalsh``, ``svd`` and
``svdvals`` record theirs too (their kernels and paths now win most small calls).

Two things the plan key holds are left out of the first level. Strides, beyond contiguity: a torch
decision is a choice between two correct paths, and no ``supports``/``automatic`` rule of a routed
op reads more than contiguity (a stride tuple costs ~0.1 µs a tensor to build and hash); only a
recorded kernel call, whose plan holds a launch specialized to the strides, is looked up by them.
``TRITON_INTERPRET``: it only matters to an explicit ``triton`` request on CPU tensors, whose key
holds it.

Cost of a hit, per layer, on the development CPU: docs/op_core.md.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

import torch

from metalcore._backend import automatic_selection, requested_backend, triton_interpreting
from metalcore._selection import forced_paths

# Decisions kept per public function before they are emptied and refilled (as plans are: a sweep
# over shapes must not grow memory without bound).
MAX_DECISIONS = 1024

# Bound once: each attribute lookup on the torch module costs ~0.03 µs a call. ``is_compiling`` is
# the public function (dynamo folds it to True while tracing, where the full path keeps the op).
_is_compiling = torch.compiler.is_compiling
# Non-empty while ``use_path`` forces a path of some op (the plan key holds the forced path, and so
# does the route's key then: :func:`_forced`).
_forced_paths = forced_paths()
_dispatch_modes = torch._C._len_torch_dispatch_stack
_grad_enabled = torch.is_grad_enabled
_Tensor = torch.Tensor
_Parameter = torch.nn.Parameter
_PLAIN = frozenset((_Tensor, _Parameter))
# Non-tensor argument types whose value can sit in a key: immutable, compared by value. Containers
# of them (normalized_shape) are checked element by element when a decision is recorded.
_VALUE_TYPES = (type(None), bool, int, float, str, torch.dtype, torch.device)


class _Deciding(threading.local):
    """The route whose public function's full path runs on this thread, whether it called the twin,
    and the kernel call it offered to repeat (:func:`torch_route`'s ``remember``)."""
    decisions: Any = None
    took_torch = False
    fast: Any = None


_deciding = _Deciding()


def _key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Grad mode, then each argument in one flat tuple: a plain tensor as its shape, contiguity,
    dtype, device and ``requires_grad`` (contiguity for strides: no rule of a routed op reads more,
    and a stride tuple costs ~0.1 µs more to build and hash); any other positional argument, a
    subclass such as DTensor included, as one ``(type, value)`` pair (never recorded: :func:`_by_value`);
    a keyword argument as its name, then its tensor's five items or its type and value. Unambiguous
    (read left to right, a ``torch.Size`` of ints starts a tensor, a pair starting with a type is one
    argument, a string starts the keywords), so two calls share a key only if they agree in all of
    it. One or two positional tensors, the routed calls' usual arguments, are one tuple display
    without the loop, and no argument has a tuple of its own: 0.11-0.13 µs less a call than one
    tuple per argument (development CPU, bench/host.md v3)."""
    n = len(args)
    if n == 1:
        a = args[0]
        t = type(a)
        if t is _Tensor or t is _Parameter:
            key = (_grad_enabled(), a.shape, a.is_contiguous(), a.dtype, a.device, a.requires_grad)
        else:
            key = (_grad_enabled(), (t, a))
    elif n == 2 and type(args[0]) in _PLAIN and type(args[1]) in _PLAIN:
        a, b = args
        key = (_grad_enabled(), a.shape, a.is_contiguous(), a.dtype, a.device, a.requires_grad,
               b.shape, b.is_contiguous(), b.dtype, b.device, b.requires_grad)
    else:
        key = (_grad_enabled(),)
        for a in args:
            t = type(a)
            if t is _Tensor or t is _Parameter:
                key += (a.shape, a.is_contiguous(), a.dtype, a.device, a.requires_grad)
            else:
                key += ((t, a),)
    if kwargs:
        for name, a in kwargs.items():
            t = type(a)
            if t is _Tensor or t is _Parameter:
                key += (name, a.shape, a.is_contiguous(), a.dtype, a.device, a.requires_grad)
            else:
                key += (name, t, a)
    return key


def _forced() -> tuple[Any, ...]:
    """What an explicit request decides beyond the arguments: the backend, the forced paths and the
    interpreter flag, as one tuple that starts a forced call's key (an automatic key starts with the
    grad mode, a bool, so the two never meet)."""
    return (requested_backend(), tuple(sorted(_forced_paths.items())), triton_interpreting())


def _strides(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """The strides of the positional tensor arguments, in order (the second half of a kernel call's
    key: its plan, and a launch specialized to it, depend on them)."""
    return tuple([a.stride() for a in args if type(a) is _Tensor or type(a) is _Parameter])


def _by_value(a: Any) -> bool:
    """Whether ``a`` sits in a key by its value (a tensor anywhere inside would be compared by its
    identity, and an id is reused once its tensor is freed)."""
    t = type(a)
    if t is _Tensor or t is _Parameter:
        return True   # by its metadata
    return isinstance(a, _VALUE_TYPES) or (isinstance(a, tuple) and all(isinstance(e, _VALUE_TYPES) for e in a))


def torch_route(twin: Callable[..., Any], decisions: dict[tuple[Any, ...], bool]
                ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: the public function calls ``twin`` directly for call signatures whose full path
    called ``twin`` (through the decorated function's ``by_torch``). ``decisions`` is the cache,
    owned by the op (:meth:`MetalcoreOp.torch_route`) so that it is dropped with the op's plans."""

    def decorate(public: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(public)
        def call(*args: Any, **kwargs: Any) -> Any:
            if _is_compiling() or _dispatch_modes() or (kwargs and kwargs.get("out") is not None):
                return public(*args, **kwargs)
            key = _key(args, kwargs)
            if _forced_paths or not automatic_selection():
                key = (_forced(), *key)
            try:
                decided = decisions.get(key)
            except TypeError:   # an unhashable argument (a list): decide without the cache
                return public(*args, **kwargs)
            if decided is True:
                return twin(*args, **kwargs)
            if decided.__class__ is dict:
                # Kernel calls, by the strides of the positional tensors (their plans depend on them).
                fast = decided.get(_strides(args))
                if fast is not None:
                    return fast(*args, **kwargs)
            elif decided is not None:
                return public(*args, **kwargs)
            outer = _deciding.decisions, _deciding.took_torch, _deciding.fast
            _deciding.decisions, _deciding.took_torch, _deciding.fast = decisions, False, None
            try:
                result = public(*args, **kwargs)
                took_torch, fast = _deciding.took_torch, _deciding.fast
            finally:
                _deciding.decisions, _deciding.took_torch, _deciding.fast = outer
            if all(map(_by_value, args)) and all(map(_by_value, kwargs.values())):
                if len(decisions) >= MAX_DECISIONS:
                    decisions.clear()
                if decided.__class__ is dict:
                    if took_torch or fast is not None:
                        decided[_strides(args)] = twin if took_torch else fast
                elif fast is not None and not took_torch and not any(
                        type(v) in _PLAIN for v in kwargs.values()):   # tensors positional: fast takes them so
                    decisions[key] = {_strides(args): fast}
                else:
                    decisions[key] = took_torch
            return result

        def by_torch(*args: Any, **kwargs: Any) -> Any:
            if _deciding.decisions is decisions:
                _deciding.took_torch = True
            return twin(*args, **kwargs)

        def remember(fast: Callable[..., Any]) -> None:
            """Offer ``fast`` — called with the public function's own arguments — as this call
            signature's path from now on: the op's kernel call with the plan just decided, for a
            call whose op arguments are the public function's own tensors and whose result the
            public function returns as the op gives it. Only while this route decides."""
            if _deciding.decisions is decisions:
                _deciding.fast = fast

        call.by_torch = by_torch
        call.remember = remember
        return call

    return decorate
