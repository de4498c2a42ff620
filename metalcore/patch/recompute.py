"""Norm outputs recomputed in the backward instead of kept: ``patch_model(recompute_norms=True)``.

In a pre-norm decoder layer the output ``y`` of each RMSNorm feeds linear layers (``q/k/v_proj``,
``gate/up_proj``), and every one of them saves ``y`` for its weight gradient. The norm itself keeps
its input ``x`` (and ``rstd``), from which ``y`` is one cheap pass away. So while a patched layer
runs its forward, a pair of saved-tensor hooks (``torch.autograd.graph.saved_tensors_hooks``) packs
any save of a registered norm output — ``y`` itself or a view of it, recognised by its storage, its
extent inside ``y`` and its version — as a *recipe* (the norm's function, ``x``, its weight and eps),
and the backward's unpack re-runs the norm on ``x`` (no grad) and returns the same view of the fresh
``y``. ``x`` is alive anyway (the norm saved it), so nothing is kept in ``y``'s place: at hidden
2048 in bf16 that is 4,096 B per token per norm, two norms a layer (``bench/training.md``). The
same function on the same inputs gives the same bits, so gradients are bit-identical to keeping ``y``.

One fresh ``y`` serves all the saves of one norm output (q, k and v's weight gradients run one after
another in the backward): it is cached until the last of them has unpacked it, so each norm runs once
more per backward, not once per consumer.

The hooks step aside — the layer runs exactly as unpatched — when gradients are off (evaluation,
``no_grad``, reentrant checkpointing's forward), under ``torch.compile`` (whose partitioner chooses what
to save and recompute itself), when saved-tensor hooks are disabled, and when hooks that are not
metalcore's are active around the layer (activation checkpointing, ``save_on_cpu``, a user's own):
those keep every tensor they would have seen. A layer nested in another patched layer's hooks pushes
its own, and finds the outer layer's norm outputs through them.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Optional

import torch

class _Recipe:
    """How to recompute one registered norm output ``y = fn(x, *args)``, and the bookkeeping of its saves."""

    __slots__ = ("fn", "x", "args", "x_version", "arg_versions", "y_ref", "y_version", "shape", "dtype", "device",
                 "start", "end", "pending", "fresh")

    def __init__(self, y: torch.Tensor, fn: Callable[..., torch.Tensor], x: torch.Tensor, args: tuple):
        self.fn, self.x, self.args = fn, x, args
        self.x_version = x._version
        self.arg_versions = tuple(a._version if isinstance(a, torch.Tensor) else None for a in args)
        self.y_ref, self.y_version = weakref.ref(y), y._version
        self.shape, self.dtype, self.device = y.shape, y.dtype, y.device
        self.start = y.storage_offset()
        self.end = self.start + y.numel()
        self.pending = 0  # saves packed and not yet unpacked
        self.fresh: Optional[torch.Tensor] = None

    def covers(self, t: torch.Tensor) -> bool:
        """Is ``t`` (sharing ``y``'s storage) ``y`` or a view of it, unmodified since the norm wrote it?"""
        if (self.y_ref() is None or t._version != self.y_version or t.dtype != self.dtype or t.device != self.device
                or t.numel() == 0):
            return False
        low = high = t.storage_offset()
        for size, stride in zip(t.shape, t.stride()):
            reach = (size - 1) * stride
            low, high = (low + reach, high) if reach < 0 else (low, high + reach)
        return self.start <= low and high < self.end

    def recompute(self) -> torch.Tensor:
        if self.fresh is None:
            if self.x._version != self.x_version or any(
                    v is not None and a._version != v for a, v in zip(self.args, self.arg_versions)):
                raise RuntimeError("one of the variables needed for gradient computation has been modified by an "
                                   "inplace operation: the input or weight of a norm whose output metalcore "
                                   "recomputes in the backward (patch_model(recompute_norms=True))")
            with torch.no_grad():
                self.fresh = self.fn(self.x, *self.args).contiguous()
            if self.fresh.shape != self.shape:
                raise RuntimeError(f"metalcore: recomputed norm output has shape {tuple(self.fresh.shape)}, "
                                   f"the forward's had {tuple(self.shape)}")
        return self.fresh


class _Packed:
    """A saved view of a norm output: the recipe and where the view lies in it."""

    __slots__ = ("recipe", "size", "stride", "offset")

    def __init__(self, recipe: _Recipe, t: torch.Tensor):
        self.recipe, self.size, self.stride = recipe, t.shape, t.stride()
        self.offset = t.storage_offset() - recipe.start
        recipe.pending += 1

    def unpack(self) -> torch.Tensor:
        recipe = self.recipe
        y = recipe.recompute()
        recipe.pending -= 1
        if recipe.pending <= 0:
            recipe.fresh = None  # the last save of this output: the next backward (retain_graph) recomputes
        return y.as_strided(self.size, self.stride, y.storage_offset() + self.offset)


class _Context:
    """The hooks of one patched layer's forward: its registered norm outputs, by storage address."""

    def __init__(self, parent: Optional["_Context"]):
        self.parent = parent
        self.recipes: dict[int, _Recipe] = {}

    def pack(self, t: torch.Tensor) -> Any:
        if type(t) is torch.Tensor and t.layout == torch.strided:
            ptr = t.untyped_storage().data_ptr()
            context = self
            while context is not None:
                recipe = context.recipes.get(ptr)
                if recipe is not None and recipe.covers(t):
                    return _Packed(recipe, t)
                context = context.parent
        return t


def _unpack(packed: Any) -> torch.Tensor:
    return packed.unpack() if type(packed) is _Packed else packed


def _innermost() -> tuple[bool, Optional[_Context]]:
    """``(foreign, ours)``: whether saved-tensor hooks other than metalcore's are innermost (or hooks are
    disabled), and else the innermost metalcore context, if any. Torch keeps the hooks per thread."""
    if not torch._C._autograd._saved_tensors_hooks_is_enabled():
        return True, None
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if top is None:
        return False, None
    context = getattr(top[0], "__self__", None)
    return (False, context) if isinstance(context, _Context) else (True, None)


def run(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``forward(*args, **kwargs)`` with the saves of norm outputs registered inside it packed as recipes."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return forward(*args, **kwargs)
    foreign, parent = _innermost()
    if foreign:
        return forward(*args, **kwargs)
    context = _Context(parent)
    try:
        with torch.autograd.graph.saved_tensors_hooks(context.pack, _unpack):
            return forward(*args, **kwargs)
    finally:
        context.recipes.clear()  # the graph keeps the hooks (and so this context): keep nothing heavy in it
        context.parent = None


def register(y: torch.Tensor, fn: Callable[..., torch.Tensor], x: torch.Tensor, *args: Any) -> None:
    """Declare ``y = fn(x, *args)`` recomputable (deterministically, from tensors the norm keeps anyway)
    to the patched layer whose hooks are innermost; nothing happens outside one."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return
    _, context = _innermost()
    if (context is None or type(y) is not torch.Tensor or y.numel() == 0 or not y.is_contiguous()
            or type(x) is not torch.Tensor):
        return
    context.recipes[y.untyped_storage().data_ptr()] = _Recipe(y, fn, x, args)
