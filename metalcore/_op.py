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
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from metalcore._backend import (
    BACKENDS,
    BackendUnavailableError,
    automatic_backend,
    backend_runs_on,
    requested_backend,
    triton_importable,
)

_REGISTRY: dict[str, MetalcoreOp] = {}


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


def _first_tensor(args: Iterable[Any]) -> torch.Tensor | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (list, tuple)):
            for t in a:
                if isinstance(t, torch.Tensor):
                    return t
    return None


def _eager_plain(first: torch.Tensor | None) -> bool:
    """Whether a call may bypass the library op: real data in plain tensors (not meta, fake or a
    tensor subclass such as DTensor, which need the op's fake implementation or their own dispatch)."""
    return first is None or (
        (type(first) is torch.Tensor or type(first) is torch.nn.Parameter) and first.device.type != "meta")


class MetalcoreOp:
    """A registered op: callable like the function it wraps; holds the per-backend kernels."""

    def __init__(self, name: str, reference: Callable[..., Any], mutates_args: tuple[str, ...],
                 check: Callable[..., None] | None):
        self.name = name
        self.reference = reference
        self.kernels: dict[str, _Kernel] = {}
        self._check = check
        self._mutated = tuple(mutates_args)
        self._signature = inspect.signature(reference)
        self._function: type[torch.autograd.Function] | None = None

        @functools.wraps(reference)
        def body(*args: Any, **kwargs: Any) -> Any:
            return self._run(args, kwargs)

        self.custom_op = torch.library.custom_op(f"metalcore::{name}", mutates_args=mutates_args)(body)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return self.custom_op(*args, **kwargs)
        if kwargs:
            args = self._signature.bind(*args, **kwargs).args
        first = _first_tensor(args)
        # Under a dispatch mode (FakeTensorMode, FlopCounterMode, export) the library op is what the
        # mode must see.
        if not _eager_plain(first) or torch._C._len_torch_dispatch_stack():
            return self.custom_op(*args)
        if self._function is not None and torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return self._function.apply(*args)
        result = self._run(args, {})
        if self._mutated:
            # Kernels write through raw pointers; tell autograd, as the library op does.
            bound = self._signature.bind(*args).arguments
            for name in self._mutated:
                torch.autograd.graph.increment_version(bound[name])
        return result

    def _run(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        result = self._select(args, kwargs)(*args, **kwargs)
        if self._check is not None:
            self._check(result, *args, **kwargs)
        return result

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
        # binds default arguments through inspect.signature on every call (~40 µs of host time).
        def forward(ctx: Any, *args: Any) -> Any:
            output = op._run(args, {})
            setup_context(ctx, args, output)
            return output

        self._function = type(f"{self.name}_function", (torch.autograd.Function,), {
            "forward": staticmethod(forward),
            "backward": staticmethod(backward),
        })

    def implement(
        self, backend: str, *, supports: Callable[..., bool] | None = None,
        automatic: bool | Callable[..., bool] = True,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator that plugs a backend's kernel into this op.

        ``supports(*args)`` bounds the inputs the kernel takes; ``automatic=False`` keeps a kernel
        that measured slower than the reference out of automatic selection (say why, with numbers),
        and ``automatic=predicate`` (same arguments as ``supports``) does so for some inputs only.
        """
        if backend not in BACKENDS or backend == "reference":
            raise ValueError(f"backend must be 'triton' or 'metal'; got {backend!r}")

        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.kernels[backend] = _Kernel(fn, supports, automatic)
            return fn

        return register

    def automatic_kernel(self, backend: str) -> bool:
        """Whether automatic selection may pick ``backend``'s kernel (for some inputs, when its
        ``automatic`` is a predicate) on a device that backend runs on."""
        kernel = self.kernels.get(backend)
        return kernel is not None and kernel.automatic is not False

    def backend_for(self, *args: Any, **kwargs: Any) -> str:
        """Name of the backend that would serve this call (raises like the call itself would)."""
        kernel = self._select(args, kwargs)
        for name, k in self.kernels.items():
            if k.fn is kernel:
                return name
        return "reference"

    def _select(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable[..., Any]:
        first = _first_tensor((*args, *kwargs.values()))
        device = first.device if first is not None else torch.device("cpu")
        requested = requested_backend()
        if requested == "reference":
            return self.reference
        backend = automatic_backend(device) if requested == "auto" else requested
        kernel = self.kernels.get(backend)
        if kernel is not None and backend_runs_on(backend, device):
            if requested == "auto" and not (kernel.automatic if isinstance(kernel.automatic, bool)
                                            else kernel.automatic(*args, **kwargs)):
                return self.reference
            if kernel.supports is None or kernel.supports(*args, **kwargs):
                return kernel.fn
            return self.reference
        if requested == "auto":
            return self.reference
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


def metalcore_op(
    name: str, *, mutates_args: tuple[str, ...] = (), check: Callable[..., None] | None = None
) -> Callable[[Callable[..., Any]], MetalcoreOp]:
    """Declare a metalcore op from its (annotated) reference implementation.

    ``check(result, *args)`` runs after whichever backend served the call, inside the op, so that
    errors that depend on the result (``LinAlgError`` from ``info``) are raised identically by every
    backend and also under ``torch.compile``, where the op is opaque.
    """

    def declare(reference: Callable[..., Any]) -> MetalcoreOp:
        if name in _REGISTRY:
            raise RuntimeError(f"metalcore op {name!r} is declared twice")
        op = MetalcoreOp(name, reference, mutates_args, check)
        _REGISTRY[name] = op
        return op

    return declare


def registered_ops() -> dict[str, MetalcoreOp]:
    """Every declared op by name (tests iterate this to prove each one passes ``opcheck``)."""
    return dict(_REGISTRY)
