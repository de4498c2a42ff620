"""The op contract: every kernel-backed op is one ``torch.library`` custom op with three backends.

An op is declared once, by decorating its reference implementation (plain PyTorch, type-annotated
so that ``torch.library`` can infer the schema)::

    @metalcore_op("rms_norm_fwd")
    def rms_norm_fwd(x: Tensor, weight: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor]:
        ...  # the reference

    rms_norm_fwd.register_fake(...)          # shapes for torch.compile / meta tensors
    rms_norm_fwd.register_autograd(...)      # where the op is differentiable

and a backend plugs its kernel in from its own module::

    @rms_norm_fwd.implement("triton", supports=lambda x, weight, eps: x.shape[-1] <= 65536)
    def _rms_norm_fwd_triton(x, weight, eps): ...

The body of the custom op is the dispatcher below, so ``torch.compile`` sees one opaque op whatever
backend runs, and the choice of backend is made in exactly one place (:mod:`metalcore._backend`).

Eager calls take a shorter road to the same code. Going through the ``torch.library`` op costs
about 100 µs of host time per call (its dispatcher hops, autograd wrapper and dynamo guard; measured
on an H100 host: ``metalcore.rms_norm`` 131 µs a call against 29 µs for ``F.rms_norm``, more than the
kernel itself), so outside ``torch.compile`` and for plain tensors an op runs the dispatcher
directly, under an ``autograd.Function`` built from the same ``setup_context``/``backward`` that
were registered. Semantics are identical; ``opcheck`` and the compile tests exercise the library op.

Every decision that does not depend on tensor data is made once per call signature and kept in a
:class:`_Plan`: the backend and function that serve the call (automatic rule, measured table,
``supports``), whether the autograd Function is needed, whether the call must go through the
library op (meta tensors, subclasses), empty inputs sent to the reference, and oversized batches
split into chunks. The key is the requested backend, whether Triton interprets, and for each
argument its type, device, dtype, shape, strides and ``requires_grad`` (other arguments by value),
so any change of those misses and is decided afresh; data is never cached, so a mutated tensor is
always seen and result checks (``LinAlgError``) run on every call. docs/op_core.md gives the
per-layer host budget and how each layer was measured (``bench/scripts/host_overhead.py``).

Public functions that have torch's own op for the same math call it where the plan prefers torch
(automatic selection chose the reference), and once a call signature has done so, call it before
any of their checks: the torch route (:meth:`MetalcoreOp.torch_route`, metalcore/_route.py).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from metalcore import _route, _selection
from metalcore._backend import (
    BACKENDS,
    BackendUnavailableError,
    automatic_backend,
    backend_runs_on,
    requested_backend,
    triton_interpreting,
    triton_importable,
)

_REGISTRY: dict[str, MetalcoreOp] = {}
# Plans kept per op before the cache is emptied and refilled: a training loop sees a handful of
# signatures per op; a sweep over shapes must not grow memory without bound.
MAX_PLANS = 1024
# The paths ``_selection.use_path`` forces now, by op: part of each plan's key.
_forced_paths = _selection.forced_paths()
# Called with (op name, backend) each time an op runs (:func:`observe_backends`).
_observers: list[Callable[[str, str], None]] = []


@dataclass(frozen=True)
class _Kernel:
    fn: Callable[..., Any]
    # Predicate on the op's arguments: False sends this input to the reference (e.g. a matrix too
    # large for a one-program-per-matrix kernel). None means the kernel takes every input.
    supports: Callable[..., bool] | None
    # False: the kernel is correct but not (yet) faster than the reference on its device, so only an
    # explicit request runs it (tests, tuning); automatic selection keeps the faster reference. A
    # predicate on the op's arguments when that holds for some inputs only (a large-matrix path
    # measured faster where the small-matrix kernel is not).
    automatic: bool | Callable[..., bool] = True
    # Most matrices one launch takes (a grid limit), for ops that declare their batched arguments;
    # larger batches are split by the op core. None: no limit.
    max_batch: int | None = None
    # ``specialize(*args)``: ``fn`` for this call signature, with everything that does not depend on
    # tensor data worked out once (output shapes, strides, launch grid, kernel constants) and kept
    # in the call's plan; None where it cannot (``fn`` serves). Same arguments and result as ``fn``.
    specialize: Callable[..., Callable[..., Any] | None] | None = None


@dataclass(frozen=True)
class _Plan:
    """What the dispatcher decided for one call signature; nothing in it depends on tensor data."""
    backend: str                # the backend that serves the call ("reference" for torch's path)
    fn: Callable[..., Any]      # what runs: the kernel or the reference, chunked where needed
    autograd: bool              # a tensor argument requires grad and the op has a backward
    library: bool               # the call must go through the torch.library op (meta, subclasses)
    # Automatic selection (nothing forced) chose the reference, in one piece: a public function
    # that has torch's own op for the same math calls that instead (:meth:`MetalcoreOp.plan`).
    prefers_torch: bool = False


class _Kernels(dict):
    """An op's kernels by backend; any change (a backend module plugging in, a test's monkeypatch)
    drops the op's cached plans, which were decided from the old set."""

    def __init__(self, on_change: Callable[[], None]):
        super().__init__()
        self._on_change = on_change

    def __setitem__(self, key: str, value: _Kernel) -> None:
        super().__setitem__(key, value)
        self._on_change()

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self._on_change()


def _tensors(args: tuple[Any, ...]) -> list[torch.Tensor]:
    return [a for a in args if isinstance(a, torch.Tensor)]


def _eager_plain(first: torch.Tensor | None) -> bool:
    """Whether a call may bypass the library op: real data in plain tensors (not meta, fake or a
    tensor subclass such as DTensor, which need the op's fake implementation or their own dispatch)."""
    return first is None or (
        (type(first) is torch.Tensor or type(first) is torch.nn.Parameter) and first.device.type != "meta")


def _batch_size(shape: torch.Size) -> int:
    count = 1
    for s in shape:
        count *= s
    return count


def _join(parts: list[Any], sizes: list[int], batch: torch.Size) -> Any:
    """Outputs of the chunks as one result: a tensor whose leading dim is its chunk's size is
    concatenated and given the batch dims back; anything else (a ``(0,)`` placeholder such as
    ``eigh``'s eigenvectors without ``compute_v``) is the first chunk's."""
    first = parts[0]
    if isinstance(first, tuple):
        return tuple(_join([p[i] for p in parts], sizes, batch) for i in range(len(first)))
    if isinstance(first, torch.Tensor) and first.dim() >= 1 and first.shape[0] == sizes[0]:
        return torch.cat(parts).reshape(*batch, *first.shape[1:])
    return first


def _run_chunked(fn: Callable[..., Any], positions: tuple[int, ...], limit: int, *args: Any) -> Any:
    """``fn`` on slices of at most ``limit`` matrices of the batched arguments at ``positions``
    (stacks ``(*, m, n)`` with the same batch dims), joined back into one result."""
    batch = args[positions[0]].shape[:-2]
    flat = {i: args[i].reshape(-1, *args[i].shape[-2:]) for i in positions}
    total = flat[positions[0]].shape[0]
    parts, sizes = [], []
    for start in range(0, total, limit):
        sliced = list(args)
        for i, stack in flat.items():
            sliced[i] = stack[start:start + limit]
        parts.append(fn(*sliced))
        sizes.append(min(limit, total - start))
    return _join(parts, sizes, batch)


class MetalcoreOp:
    """A registered op: callable like the function it wraps; holds the per-backend kernels."""

    def __init__(self, name: str, reference: Callable[..., Any], mutates_args: tuple[str, ...],
                 check: Callable[..., None] | None, batched: tuple[str, ...],
                 max_batch: dict[str, int | Callable[..., int | None]] | None):
        self.name = name
        self.reference = reference
        self._plans: dict[tuple[Any, ...], _Plan] = {}
        # The torch-route decisions of the public functions that call this op (:meth:`torch_route`)
        # and other caches dropped with the plans (:meth:`dropped_with_plans`).
        self._plan_caches: list[dict[Any, Any]] = []
        self.kernels: dict[str, _Kernel] = _Kernels(self.clear_plans)
        self._check = check
        self._mutated = tuple(mutates_args)
        self._signature = inspect.signature(reference)
        self._function: type[torch.autograd.Function] | None = None
        parameters = list(self._signature.parameters)
        self._batched = tuple(parameters.index(a) for a in batched)
        # Most matrices the reference takes in one call, per device type (torch's own limits).
        self.max_batch = dict(max_batch or {})
        # Ops over lists of tensors (the optimizers' steps) and ops that mutate their arguments keep the
        # uncached path: a key over hundreds of tensors costs more than the decision it would save.
        self._cached = not mutates_args and not any(
            "list" in str(p.annotation) for p in self._signature.parameters.values())

        @functools.wraps(reference)
        def body(*args: Any, **kwargs: Any) -> Any:
            return self._run(self._bind(args, kwargs))

        self.custom_op = torch.library.custom_op(f"metalcore::{name}", mutates_args=mutates_args)(body)
        self._library_plan = _Plan("library", self.custom_op, autograd=False, library=True)

    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        return self._signature.bind(*args, **kwargs).args if kwargs else args

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return self.custom_op(*args, **kwargs)
        if kwargs:
            args = self._bind(args, kwargs)
        if not self._cached:
            return self._call_uncached(args)
        return self._dispatch(self._plan(args), args)

    def _dispatch(self, plan: _Plan, args: tuple[Any, ...]) -> Any:
        # Under a dispatch mode (FakeTensorMode, FlopCounterMode, export) the library op is what the
        # mode must see.
        if plan.library or torch._C._len_torch_dispatch_stack():
            return self.custom_op(*args)
        if plan.autograd and torch.is_grad_enabled():
            if torch._C._are_functorch_transforms_active():
                return self._function.apply(*args, plan)
            return self._apply(*args, plan)
        return self._execute(plan, args)

    def _call_uncached(self, args: tuple[Any, ...]) -> Any:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        for a in args:
            if isinstance(a, (list, tuple)):
                tensors.extend(t for t in a if isinstance(t, torch.Tensor))
        if not _eager_plain(tensors[0] if tensors else None) or torch._C._len_torch_dispatch_stack():
            return self.custom_op(*args)
        plan = self._decide(args, tensors)
        if plan.autograd and torch.is_grad_enabled():
            return self._function.apply(*args, plan)
        result = self._execute(plan, args)
        if self._mutated:
            # Kernels write through raw pointers; tell autograd, as the library op does.
            bound = self._signature.bind(*args).arguments
            for name in self._mutated:
                torch.autograd.graph.increment_version(bound[name])
        return result

    def _plan(self, args: tuple[Any, ...]) -> _Plan:
        """The cached plan for this call signature, decided on a miss. The key holds everything a
        decision reads: the requested backend, whether Triton interprets, the path ``use_path`` forces
        for this op, and each argument's type,
        device, dtype, shape, strides and ``requires_grad`` (non-tensor arguments by value)."""
        key = [requested_backend(), triton_interpreting(), _forced_paths.get(self.name)]
        for a in args:   # a loop, not a generator: ~0.35 µs less a call (of ~1.4)
            if isinstance(a, torch.Tensor):
                key.append((a.__class__, a.device, a.dtype, a.shape, a.stride(), a.requires_grad))
            else:
                key.append(a)
        key = tuple(key)
        try:
            plan = self._plans.get(key)
        except TypeError:
            # Symbolic shapes (tracing with dynamic shapes) do not hash: decide without the cache.
            return self._decide(args, _tensors(args))
        if plan is None:
            plan = self._decide(args, _tensors(args))
            if len(self._plans) >= MAX_PLANS:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def _run(self, args: tuple[Any, ...]) -> Any:
        """The library op's body: whatever backend the plan names, never the library op again (a
        tensor subclass without its own dispatch reaches the body as itself)."""
        plan = self._plan(args) if self._cached else self._decide(args, _tensors(args))
        if plan.library:
            plan = self._decide(args, _tensors(args), eager=False)
        return self._execute(plan, args)

    def _execute(self, plan: _Plan, args: tuple[Any, ...]) -> Any:
        if _observers:
            for observe in _observers:
                observe(self.name, plan.backend)
        result = plan.fn(*args)
        if self._check is not None:
            self._check(result, *args)
        return result

    def _decide(self, args: tuple[Any, ...], tensors: list[torch.Tensor], eager: bool = True) -> _Plan:
        first = tensors[0] if tensors else None
        if eager and not _eager_plain(first):
            return self._library_plan
        device = first.device if first is not None else torch.device("cpu")
        specialize = None
        if any(t.numel() == 0 for t in tensors):
            # Empty inputs: torch's answer, whatever backend was asked for (no kernel launches on
            # nothing, and the kernels' reshapes need not handle zero-size dims).
            backend, fn, limit, kernel = "reference", self.reference, None, None
        else:
            backend, kernel = self._choose(args, device)
            if kernel is None:
                fn = self.reference
            else:
                # An alternative path of the kernel (a register tile, batched cuSOLVER) where it is
                # forced or the measured table chose it.
                path = _selection.route(self.name, backend, args)
                fn = kernel.fn if path is None else path.fn
                specialize = kernel.specialize if path is None else path.specialize
            limit = self.max_batch.get(device.type) if kernel is None else kernel.max_batch
            if callable(limit):
                limit = limit(*args)
        if limit is not None and self._batched:
            batches = {args[i].shape[:-2] for i in self._batched}
            if len(batches) == 1 and _batch_size(next(iter(batches))) > limit:
                fn = functools.partial(_run_chunked, fn, self._batched, limit)
                specialize = None                   # a split batch: each chunk has its own signature
        if specialize is not None and all(map(_eager_plain, tensors)):
            fn = specialize(*args) or fn
        return _Plan(backend, fn,
                     autograd=self._function is not None and any(t.requires_grad for t in tensors),
                     library=False,
                     # A chunked reference (a batch beyond what torch's library call takes) keeps the op.
                     prefers_torch=fn is self.reference and requested_backend() == "auto")

    def _choose(self, args: tuple[Any, ...], device: torch.device) -> tuple[str, _Kernel | None]:
        """The one place that picks a backend: ``(name, kernel)``, kernel None for the reference."""
        requested = requested_backend()
        if requested == "reference":
            return "reference", None
        backend = automatic_backend(device) if requested == "auto" else requested
        kernel = self.kernels.get(backend)
        if kernel is not None and backend_runs_on(backend, device):
            if requested == "auto":
                measured = _selection.measured_choice(self.name, backend, device, args)
                if measured is None:
                    measured = (kernel.automatic if isinstance(kernel.automatic, bool)
                                else kernel.automatic(*args))
                if not measured:
                    return "reference", None
            if kernel.supports is None or kernel.supports(*args):
                return backend, kernel
            return "reference", None
        if requested == "auto":
            return "reference", None
        if kernel is None:
            raise BackendUnavailableError(
                f"metalcore.{self.name} has no {backend} kernel (requested through "
                f"METALCORE_BACKEND or metalcore.use_backend); it has: reference"
                + "".join(f", {k}" for k in self.kernels)
            )
        hint = ""
        if backend == "triton" and not triton_importable():
            hint = " (triton is not installed)"
        elif backend == "triton" and device.type == "cpu":
            hint = " (set TRITON_INTERPRET=1 to run Triton kernels on CPU tensors)"
        elif backend == "metal" and device.type == "cpu":
            from metalcore._metal import executor_missing_reason

            hint = f" (the CPU executor for Metal is unavailable: {executor_missing_reason()})"
        raise BackendUnavailableError(
            f"metalcore.{self.name}: the {backend} backend cannot run on {device.type} tensors{hint}"
        )

    def __repr__(self) -> str:
        return f"<metalcore op {self.name}: {', '.join(['reference', *self.kernels])}>"

    @property
    def opoverload(self) -> torch._ops.OpOverload:
        """The ``torch.ops.metalcore.<name>.default`` overload (for ``opcheck`` and graph inspection)."""
        return getattr(torch.ops.metalcore, self.name).default

    def register_fake(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        self.custom_op.register_fake(fn)
        return fn

    def register_autograd(self, backward: Callable[..., Any], *, setup_context: Callable[..., Any]) -> None:
        self.custom_op.register_autograd(backward, setup_context=setup_context)
        op = self

        # The old-style forward(ctx, ...) on purpose: with a separate setup_context, Function.apply
        # binds default arguments through inspect.signature on every call (~40 µs of host time). The
        # plan rides along as the last argument (after the op's own, so that ``ctx.needs_input_grad``
        # keeps the op's indices) and gets no gradient.
        def forward(ctx: Any, *args: Any) -> Any:
            *args, plan = args
            args = tuple(args)
            output = op._execute(plan, args)
            setup_context(ctx, args, output)
            return output

        def backward_with_plan(ctx: Any, *grads: Any) -> Any:
            result = backward(ctx, *grads)
            return (*result, None) if isinstance(result, tuple) else (result, None)

        self._function = type(f"{self.name}_function", (torch.autograd.Function,), {
            "forward": staticmethod(forward),
            "backward": staticmethod(backward_with_plan),
        })
        # Function.apply's C core, without the Python wrapper around it (~1.5 µs a call: the
        # setup_context probe and the functorch dead-wrapper unwrapping, which only matter inside
        # functorch transforms, where __call__ takes Function.apply instead).
        self._apply = super(torch.autograd.Function, self._function).apply
        self.clear_plans()

    def implement(
        self, backend: str, *, supports: Callable[..., bool] | None = None,
        automatic: bool | Callable[..., bool] = True, max_batch: int | None = None,
        specialize: Callable[..., Callable[..., Any] | None] | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator that plugs a backend's kernel into this op.

        ``supports(*args)`` bounds the inputs the kernel takes; ``automatic=False`` keeps a kernel
        that measured slower than the reference out of automatic selection (say why, with numbers),
        and ``automatic=predicate`` (same arguments as ``supports``) does so for some inputs only.
        Both must depend on the arguments' metadata (shapes, dtypes, strides, devices), never their
        values: the decision is cached per call signature. ``max_batch`` caps the matrices of one
        launch for ops declared with ``batched=`` (larger batches are split). ``specialize(*args)``
        returns ``fn`` specialized to the call signature (same arguments, same result), or None: the
        plan keeps it, so a call repeats only what depends on data (allocations and the launch).
        """
        if backend not in BACKENDS or backend == "reference":
            raise ValueError(f"backend must be 'triton' or 'metal'; got {backend!r}")

        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.kernels[backend] = _Kernel(fn, supports, automatic, max_batch, specialize)
            return fn

        return register

    def automatic_kernel(self, backend: str) -> bool:
        """Whether automatic selection may pick ``backend``'s kernel (for some inputs, when its
        ``automatic`` is a predicate) on a device that backend runs on."""
        kernel = self.kernels.get(backend)
        return kernel is not None and kernel.automatic is not False

    def plan(self, *args: Any) -> _Plan:
        """The plan of a call that a public function is about to make. Where ``plan.prefers_torch``,
        automatic selection (nothing forced) sends it to the reference, and a public function that
        has torch's own op for the same math (``F.rms_norm``, ``torch.linalg.cholesky``) calls that
        instead, with none of the op's layers: never slower than torch, never a materializing
        reference on a GPU (DESIGN.md §3). Otherwise it passes the plan to :meth:`call_planned`
        (one plan lookup a call, not two). An explicit backend, the reference included (the
        oracle), keeps the op; so do tracing and dispatch modes (export, FakeTensor), which must see
        the op. For ops without list or mutated arguments (those :meth:`torch_route` takes)."""
        if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
            return self._library_plan
        return self._plan(args)

    def call_planned(self, plan: _Plan, *args: Any) -> Any:
        """The op called with ``args`` (positional, as the op declares them) and their :meth:`plan`."""
        return self._dispatch(plan, args)

    def torch_route(self, twin: Callable[..., Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator for a public function whose full path calls ``twin`` — torch's function for the
        same math, with the public function's signature — where its :meth:`plan` ``prefers_torch``::

            @cholesky_ex_op.torch_route(torch.linalg.cholesky)
            def cholesky(A, *, upper=False, out=None):
                ...  # checks
                plan = cholesky_ex_op.plan(A, upper, True)
                if plan.prefers_torch:
                    return write_out(fn, cholesky.by_torch(A, upper=upper), out)
                ...

        ``by_torch`` is ``twin`` that also records the outcome: later calls with the same call
        signature call ``twin`` straight away, before any check (metalcore/_route.py).
        """
        if not self._cached:
            raise TypeError(f"metalcore op {self.name}: ops over lists or mutating their arguments have no torch route")
        return _route.torch_route(twin, self.dropped_with_plans({}))

    def dropped_with_plans(self, decisions: dict[Any, Any]) -> dict[Any, Any]:
        """``decisions``, a cache of what depends on this op's kernels and selection (not on the
        arguments' data), registered to be emptied whenever the op's plans are (a kernel plugged
        in, a path registered, a selection table reloaded, :meth:`clear_plans`)."""
        self._plan_caches.append(decisions)
        return decisions

    def clear_plans(self) -> None:
        """Forget this op's cached decisions: its plans, its public functions' torch routes and every
        cache registered with :meth:`dropped_with_plans`."""
        self._plans.clear()
        for decisions in self._plan_caches:
            decisions.clear()

    def backend_for(self, *args: Any, **kwargs: Any) -> str:
        """Name of the backend that would serve this call (raises like the call itself would)."""
        args = self._bind(args, kwargs)
        return self._decide(args, _tensors(args)).backend


def metalcore_op(
    name: str, *, mutates_args: tuple[str, ...] = (), check: Callable[..., None] | None = None,
    batched: tuple[str, ...] = (), max_batch: dict[str, int | Callable[..., int | None]] | None = None,
) -> Callable[[Callable[..., Any]], MetalcoreOp]:
    """Declare a metalcore op from its (annotated) reference implementation.

    ``check(result, *args)`` runs after whichever backend served the call, inside the op, so that
    errors that depend on the result (``LinAlgError`` from ``info``) are raised identically by every
    backend and also under ``torch.compile``, where the op is opaque.

    ``batched`` names the arguments that are stacks of matrices ``(*, m, n)`` with common batch dims,
    which the op core may split; ``max_batch`` (per device type) is the most matrices the reference
    takes in one call there, e.g. ``{"cuda": 32768}`` where a cuSOLVER call fails on larger batches,
    or a function of the op's arguments giving that number (None: no limit for these inputs).
    """

    def declare(reference: Callable[..., Any]) -> MetalcoreOp:
        if name in _REGISTRY:
            raise RuntimeError(f"metalcore op {name!r} is declared twice")
        op = MetalcoreOp(name, reference, mutates_args, check, batched, max_batch)
        _REGISTRY[name] = op
        return op

    return declare


def registered_ops() -> dict[str, MetalcoreOp]:
    """Every declared op by name (tests iterate this to prove each one passes ``opcheck``)."""
    return dict(_REGISTRY)


def clear_plans() -> None:
    """Forget every op's cached decisions. Needed only after changing what a ``supports`` or
    ``automatic`` rule reads besides the arguments (a module constant a test or sweep patches)."""
    for op in _REGISTRY.values():
        op.clear_plans()


@contextlib.contextmanager
def observing(callback: Callable[[str, str], None]) -> Iterator[None]:
    """Inside the block, ``callback(op_name, backend)`` runs each time an op executes (eager calls,
    the library op under ``torch.compile`` and backward passes alike): how tests and the benchmark
    harness see which backend served a call. Costs nothing outside such a block."""
    _observers.append(callback)
    try:
        yield
    finally:
        _observers.remove(callback)


@contextlib.contextmanager
def observe_backends() -> Iterator[dict[str, str]]:
    """Inside the block, record for every op that runs the backend that served it: ``{op: backend}``."""
    served: dict[str, str] = {}
    with observing(served.__setitem__):
        yield served
