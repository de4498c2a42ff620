"""Kronecker-factored preconditioner pieces shared by :mod:`metalcore.optim.soap` and
:mod:`metalcore.optim.shampoo`: dimension merging, stacked state, products along one axis of a stack,
the batched refresh calls (one ``metalcore.linalg`` call per matrix size), hyperparameter checks.

Stacks. Both optimizers work on *stacks*: every unit (a SOAP parameter, a Shampoo block) of one shape
is stacked into a ``(k, d₁, …, d_r)`` tensor so that each product is one batched matmul over all of
them rather than one launch per unit. Optimizer state stays per parameter (``state_dict`` is torch's
layout), but each state tensor is a *view* into the stack of its kind: :func:`joined` returns that
stack without a copy when the views are still in place, and otherwise stacks once and rebinds the
state to views of the new stack (after ``load_state_dict``, or when the set of parameters with
gradients changes), so the per-step products update the state in place.

Refresh batching: by size, not padding. The matrices refreshed in one step have a handful of sizes
(GPT-2 small under SOAP: 768, 2304, 3072); eigh and QR cost O(n³), so padding a 768 factor into a
3072 batch would cost 64× its own work. :func:`by_size` concatenates all matrices of one size (from
every parameter and side) and makes one call per size.
"""

import math
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from metalcore.optim.adamw import state_dtype


def check_number(cls: str, name: str, value: Any, low: float, high: Optional[float] = None, *,
                 closed: bool = False) -> None:
    """ValueError naming ``value`` unless it is a real number in ``[low, high)`` (``[low, high]`` when
    ``closed``; no upper bound without ``high``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{cls}: {name} must be a number; got {value!r}")
    if value < low or (high is not None and (value > high if closed else value >= high)):
        bound = f">= {low}" if high is None else f"in [{low}, {high}{']' if closed else ')'}"
        raise ValueError(f"{cls}: Invalid {name}: {value} (must be {bound})")


def check_int(cls: str, name: str, value: Any, low: int) -> None:
    """ValueError naming ``value`` unless it is an integer ≥ ``low`` (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{cls}: {name} must be an integer >= {low}; got {value!r}")


def merged_shape(shape: Sequence[int], max_dim: int) -> tuple[int, ...]:
    """Merge consecutive dimensions while their product stays ≤ ``max_dim`` (the SOAP reference's
    ``merge_dims`` and distributed Shampoo's ``merge_small_dims``): ``(64, 32, 3, 3)`` with 10000 →
    ``(18432,)``? no: 64·32 = 2048, ·3 = 6144, ·3 = 18432 > 10000 → ``(6144, 3)``. A dimension larger
    than ``max_dim`` stays alone (and is left unpreconditioned)."""
    merged: list[int] = []
    current = 1
    for d in shape:
        if current * d > max_dim:
            if current > 1:
                merged.append(current)
                current = d
            else:
                merged.append(d)
        else:
            current *= d
    if current > 1 or not merged:
        merged.append(current)
    return tuple(merged)


def _joined_base(items: list[Tensor], cat: bool) -> Optional[Tensor]:
    """The tensor that ``items`` are consecutive views of along dimension 0 (``base[i]`` each, or
    ``base[s_i:s_i + n_i]`` with ``cat``), in order and covering it, or None."""
    base = items[0]._base
    tail = items[0].shape[1:] if cat else items[0].shape
    if base is None or base.shape[1:] != tail:
        return None
    step, offset, count = base.stride(0), base.storage_offset(), 0
    for t in items:
        if t._base is not base or t.storage_offset() != offset + count * step:
            return None
        count += t.shape[0] if cat else 1
    return base if count == base.shape[0] else None


def joined(entries: list[tuple[Any, Any]], *, cat: bool = False) -> Tensor:
    """The stack (``cat=False``: ``(k, …)`` of equal tensors) or concatenation (``cat=True``, along
    dimension 0) of the state tensors ``container[key]`` for ``(container, key)`` in ``entries``.

    When the entries are already consecutive views of one tensor, that tensor is returned (no copy);
    otherwise a new one is made and the entries are rebound to its views, so in-place updates of the
    result update the state."""
    items = [c[k] for c, k in entries]
    if len(items) == 1:
        return items[0] if cat else items[0].unsqueeze(0)
    base = _joined_base(items, cat)
    if base is not None:
        return base
    base = torch.cat(items) if cat else torch.stack(items)
    views = base.split([t.shape[0] for t in items]) if cat else base.unbind(0)
    for (c, k), view in zip(entries, views):
        c[k] = view
    return base


def along(X: Tensor, M: Tensor, axis: int) -> Tensor:
    """``Y[b, …, i, …] = Σ_j M[b, i, j] X[b, …, j, …]``: the matrix ``M[b]`` applied along ``axis``
    of each ``X[b]`` (one batched matmul; a middle axis costs one transposing copy)."""
    k, d = X.shape[0], X.shape[axis]
    if axis == X.ndim - 1:
        return (X.reshape(k, -1, d) @ M.mT).view(X.shape)
    moved = X.movedim(axis, 1)
    return (M @ moved.reshape(k, d, -1)).view(moved.shape).movedim(1, axis)


def gram(X: Tensor, axis: int) -> Tensor:
    """``G[b] = X_(axis)[b] X_(axis)[b]ᵀ``, the Gram matrix of the mode-``axis`` unfolding: ``X Xᵀ`` and
    ``Xᵀ X`` for a stack of matrices along axes 1 and 2."""
    k, d = X.shape[0], X.shape[axis]
    if axis == X.ndim - 1:
        flat = X.reshape(k, -1, d)
        return flat.mT @ flat
    flat = X.movedim(axis, 1).reshape(k, d, -1)
    return flat @ flat.mT


def by_size(fn: Callable[..., tuple[Tensor, ...]], batches: list[tuple[Tensor, ...]],
            keys: Optional[list[Any]] = None) -> list[tuple[Tensor, ...]]:
    """Apply ``fn(key, *tensors)`` to every entry of ``batches`` (tuples of ``(k_i, n_i, n_i)`` stacks),
    making one call per ``(n, dtype, device, key)`` (``keys[i]``, None without ``keys``): entries of one
    size are concatenated along the batch axis, and the results are split back in the input order."""
    buckets: dict[Any, list[int]] = {}
    for i, tensors in enumerate(batches):
        t = tensors[0]
        buckets.setdefault((t.shape[-1], t.dtype, t.device, None if keys is None else keys[i]), []).append(i)
    out: list[Any] = [None] * len(batches)
    for (_, _, _, key), idx in buckets.items():
        parts = [torch.cat([batches[i][j] for i in idx]) if len(idx) > 1 else batches[idx[0]][j]
                 for j in range(len(batches[idx[0]]))]
        results = fn(key, *parts)
        counts = [batches[i][0].shape[0] for i in idx]
        pieces = [r.split(counts) for r in results]
        for n, i in enumerate(idx):
            out[i] = tuple(p[n] for p in pieces)
    return out


class KroneckerOptimizer(Optimizer):
    """What SOAP and Shampoo share around their update functions: hyperparameter validation for every
    group (``HYPERPARAMETERS`` and ``check_hyperparameters`` of the subclass's module), refusal of
    sharded (FSDP2) parameters, float32 state kept through ``load_state_dict``, and the parameters of
    each group that have gradients, checked, for ``step``."""

    NAME: str
    HYPERPARAMETERS: tuple[str, ...]
    check_hyperparameters: Callable[..., None]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch's, and also validates the group's own hyperparameters."""
        type(self).check_hyperparameters(*(param_group.get(k, self.defaults.get(k)) for k in self.HYPERPARAMETERS))
        super().add_param_group(param_group)
        from metalcore.optim import distributed

        for index, p in enumerate(self.param_groups[-1]["params"]):
            distributed.refuse_sharded(self.NAME, p, index)  # FSDP2 shards: no sharded path yet

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, keeping float32 state for bf16/fp16 parameters (torch's loader would cast it)."""
        super().load_state_dict(state_dict)
        restore_state_dtypes(self, state_dict)

    def groups_to_step(self):
        """``(group, params with a gradient, their hyperparameters)`` for every group that has any."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if torch.is_complex(p):
                    raise RuntimeError(f"{self.NAME} does not support complex parameters")
                if p.grad.is_sparse:
                    raise RuntimeError(f"{self.NAME} does not support sparse gradients")
            if params:
                yield group, params, {k: group[k] for k in self.HYPERPARAMETERS}


def restore_state_dtypes(optimizer: Optimizer, state_dict: dict[str, Any]) -> None:
    """After ``Optimizer.load_state_dict``: torch's loader casts floating state to the parameter's
    dtype, but the moments, factors and bases of bf16/fp16 parameters are float32 here; reload them
    as :func:`~metalcore.optim.adamw.state_dtype` says (copies, so the loaded dict is not aliased)."""
    saved_ids = (i for group in state_dict["param_groups"] for i in group["params"])
    params = (p for group in optimizer.param_groups for p in group["params"])
    for saved_id, p in zip(saved_ids, params):
        saved = state_dict["state"].get(saved_id)
        if saved is None:
            continue
        state = optimizer.state[p]
        for key, value in saved.items():
            if isinstance(value, Tensor):
                state[key] = value.to(device=p.device, dtype=state_dtype(p), copy=True)
            elif isinstance(value, list):
                state[key] = [v if v is None else v.to(device=p.device, dtype=state_dtype(p), copy=True)
                              for v in value]
