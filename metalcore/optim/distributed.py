r"""Optimizers on ``torch.distributed``: sharded (FSDP2 DTensor) and replicated (DDP) parameters.

Elementwise optimizers (AdamW) need nothing but the local shard: :func:`local_tensors` unwraps
DTensors and the step runs on the shards; the state stays DTensors with the parameters'
placements, so ``torch.distributed.checkpoint`` saves and reshards it.

Muon needs whole matrices (the polar factor of a row block is not a row block of the polar factor),
so it uses **owner-computes** (:func:`owner_computes_muon_update`):

1. momentum, on each rank's local rows (elementwise: the same numbers as on the full matrix);
2. every matrix gets an owner rank, balanced by the FLOPs of its orthogonalization
   (:func:`assign_owners`, longest-processing-time first, identical on every rank because it
   depends only on shapes);
3. per bucket of same-shape matrices, one ``all_to_all_single`` on the parameters' process group
   sends each rank's rows of the momentum-updated gradients to their owners; all buckets are
   issued at once (``async_op=True``), so bucket k+1 is in flight while bucket k is orthogonalized;
4. each owner orthogonalizes its matrices of the bucket in one batched call
   (:func:`metalcore.optim.muon.orthogonalize_batch`), then issues the reverse all-to-all of that
   bucket (also async) which returns every rank's rows of the result;
5. each rank applies the update to its rows (decay, then the LR-adjusted step, as Muon does).

Replicated parameters (DDP, a ``Replicate()`` DTensor) skip step 3 — the owner already holds the
matrix — and step 4 sends the owner's result to every rank (an all-gather through the same
all-to-all), so each matrix is orthogonalized once instead of on every rank.

The update equals the single-process :func:`metalcore.optim.muon_update` term for term. What is
refused, with an error naming the parameter: device meshes with more than one dimension (FSDP2
combined with tensor parallelism, HSDP), and any placement but ``Shard(0)`` or ``Replicate()``
(``Shard(1)`` of tensor parallelism, ``Partial``, strided shards): a row block is the only piece of
a matrix this scheme reassembles.

Nothing here runs for plain tensors without a process group: :func:`dtensor_class` returns None
until ``torch.distributed.tensor`` has been imported by someone else, so a single-device user pays
one dictionary lookup per step and imports nothing.
"""

import heapq
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor


def dtensor_class() -> Optional[type]:
    """``torch.distributed.tensor.DTensor`` if that module is loaded (no parameter can be a DTensor
    otherwise), else None; never imports it."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def has_dtensor(tensors: Sequence[Tensor]) -> bool:
    cls = dtensor_class()
    return cls is not None and any(isinstance(t, cls) for t in tensors)


def local_tensors(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Each DTensor's local shard (a tensor sharing its storage: in-place updates reach the
    DTensor), plain tensors as they are."""
    cls = dtensor_class()
    if cls is None:
        return list(tensors)
    return [t.to_local() if isinstance(t, cls) else t for t in tensors]


@dataclass(frozen=True)
class RowLayout:
    """Which rows of a parameter's matrix view ``(rows, cols)`` each rank of its group holds.

    ``ranges[r] = (start, stop)``; ``replicated`` when every rank holds every row (DDP, Replicate)."""
    rows: int
    cols: int
    ranges: tuple[tuple[int, int], ...]
    replicated: bool

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)


def _describe(index: Optional[int], p: Tensor) -> str:
    placements = getattr(p, "placements", None)
    where = f", placements {tuple(placements)}" if placements is not None else ""
    which = "a parameter" if index is None else f"parameter {index} of the group"
    return f"{which} (shape {tuple(p.shape)}{where})"


def shard_rows(rows: int, world_size: int) -> tuple[tuple[int, int], ...]:
    """Row ranges of ``Shard(0)`` over ``world_size`` ranks: torch.chunk's split (ceil(rows / world)
    rows per rank, the last ranks short or empty), which DTensor and FSDP2 use."""
    chunk = -(-rows // world_size)
    return tuple((min(r * chunk, rows), min((r + 1) * chunk, rows)) for r in range(world_size))


def row_layout(p: Tensor, world_size: int, cls: str = "Muon") -> RowLayout:
    """The layout of ``p`` (a DTensor on a 1-D mesh of ``world_size`` ranks, or a plain tensor
    replicated over a group of that size); ValueError naming the parameter for anything else."""
    rows, cols = p.shape[0], math.prod(p.shape[1:])
    placements = getattr(p, "placements", None)
    if placements is None:
        return RowLayout(rows, cols, ((0, rows),) * world_size, True)
    check_placements(cls, p)
    placement = placements[0]
    if placement.is_replicate():
        return RowLayout(rows, cols, ((0, rows),) * world_size, True)
    ranges = shard_rows(rows, world_size)
    rank = p.device_mesh.get_local_rank(0)
    start, stop = ranges[rank]
    if p.to_local().shape[0] != stop - start:
        raise ValueError(f"{cls}: {_describe(None, p)} holds {p.to_local().shape[0]} rows on rank {rank}, not the "
                         f"{stop - start} of an even Shard(0) split; only torch.chunk-style row sharding (FSDP2, "
                         f"distribute_tensor) is supported")
    return RowLayout(rows, cols, ranges, False)


def check_placements(cls: str, p: Tensor, index: Optional[int] = None) -> None:
    """Refuse what owner-computes cannot reassemble: a mesh of more than one dimension, or a
    placement other than Shard(0) and Replicate (e.g. tensor parallelism's Shard(1), Partial)."""
    mesh, placements = getattr(p, "device_mesh", None), getattr(p, "placements", None)
    if mesh is None or placements is None:
        return
    if mesh.ndim != 1:
        raise ValueError(f"{cls}: {_describe(index, p)} lives on a {mesh.ndim}-D device mesh {tuple(mesh.shape)}; "
                         f"whole-matrix orthogonalization supports 1-D meshes only (FSDP2 or replication over one "
                         f"group), not tensor parallelism or HSDP: shard it with fully_shard on a 1-D mesh, or "
                         f"optimize it with AdamW")
    placement = placements[0]
    is_row_shard = type(placement).__name__ == "Shard" and placement.dim == 0
    if not (is_row_shard or placement.is_replicate()):
        raise ValueError(f"{cls}: {_describe(index, p)} is placed as {placement}; whole-matrix orthogonalization "
                         f"supports Shard(0) (FSDP2's row sharding) and Replicate() only: a column shard or a "
                         f"partial sum is not a block of rows it can reassemble")


def refuse_sharded(cls: str, p: Tensor, index: Optional[int] = None) -> None:
    """For optimizers that need whole matrices and have no owner-computes path yet (SOAP, Shampoo):
    a DTensor parameter with any shard or partial placement raises ValueError naming it; replicated
    DTensors and plain tensors pass (every rank then holds the whole matrix)."""
    placements = getattr(p, "placements", None)
    if placements is not None and not all(placement.is_replicate() for placement in placements):
        raise ValueError(f"{cls}: {_describe(index, p)} is sharded; {cls}'s preconditioners need whole matrices and "
                         f"it has no sharded path: an update of the local shard alone would be wrong. Use "
                         f"metalcore.optim.Muon or MetalAdamW under FSDP2, or replicate the parameter")


def orthogonalization_flops(shape: tuple[int, int], steps: int) -> int:
    """Matmul FLOPs of ``steps`` quintic Newton–Schulz iterations on one ``(A, B)`` matrix
    (m = min, n = max): X Xᵀ (2m²n), its square (2m³) and the product with X (2m²n) per step."""
    m, n = min(shape), max(shape)
    return steps * (4 * m * m * n + 2 * m ** 3)


def assign_owners(costs: Sequence[float], world_size: int) -> list[int]:
    """Owner rank per item: longest-processing-time first (each item, costliest first, to the least
    loaded rank; ties to the lower index and rank), within 4/3 of the best possible maximum load.
    Depends on ``costs`` only, so every rank computes the same assignment without communicating."""
    loads = [(0.0, r) for r in range(world_size)]  # a heap of (load, rank): least loaded, lowest rank first
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, r = heapq.heappop(loads)
        owners[i] = r
        heapq.heappush(loads, (load + costs[i], r))
    return owners


def result_dtype(method: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype :func:`orthogonalize_batch` returns for inputs of ``dtype`` (known on ranks that
    own nothing in a bucket, which must size their receive buffers)."""
    if method == "svd":
        return torch.float64 if dtype == torch.float64 else torch.float32
    return torch.bfloat16


@dataclass
class _Bucket:
    """Same-shape, same-dtype matrices exchanged together: ``owned[r]`` lists the indices (into the
    parameter lists) of the matrices rank r owns, in parameter order."""
    shape: tuple[int, int]
    dtype: torch.dtype
    owned: list[list[int]]


def _start_all_to_all(pieces: list[list[Tensor]], recv_sizes: list[int], dtype: torch.dtype, device: torch.device,
                      group: Any) -> tuple[Any, list[Tensor]]:
    """Start one ``all_to_all_single`` (async): the flat ``pieces[r]`` go to rank r, in order;
    ``recv_sizes[s]`` elements arrive from rank s. Returns the work handle and the received
    elements split by source rank."""
    flat = [t.reshape(-1) for per_rank in pieces for t in per_rank]
    send = torch.cat(flat) if flat else torch.empty(0, dtype=dtype, device=device)
    recv = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
    send_sizes = [sum(t.numel() for t in per_rank) for per_rank in pieces]
    work = torch.distributed.all_to_all_single(recv, send, output_split_sizes=recv_sizes, input_split_sizes=send_sizes,
                                               group=group, async_op=True)
    return work, list(recv.split(recv_sizes))


def _rows(layout: RowLayout, rank: int) -> slice:
    return slice(*layout.ranges[rank])


def _numel(layout: RowLayout, rank: int) -> int:
    start, stop = layout.ranges[rank]
    return (stop - start) * layout.cols


@torch.no_grad()
def owner_computes_muon_update(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], *,
                               process_group: Any = None, lr: float, weight_decay: float, momentum: float,
                               nesterov: bool, ns_coefficients: tuple[float, float, float], eps: float, ns_steps: int,
                               adjust_lr_fn: Optional[str], orthogonalize: str, cls: str = "Muon") -> None:
    """One Muon step, in place, for parameters sharded or replicated over one process group.

    ``params`` are DTensors on one 1-D mesh (their mesh's group is used) or plain tensors replicated
    over ``process_group``; ``grads`` and ``momentum_buffers`` alike. Every rank of the group must
    call it with the same parameters in the same order (as every rank steps the same optimizer).
    Same arguments and math as :func:`metalcore.optim.muon_update` (module docstring for the
    schedule)."""
    from metalcore.optim.muon import adjust_lr, muon_update, orthogonalize_batch  # (muon imports this module)

    options = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                   ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
                   orthogonalize=orthogonalize)
    cls_dtensor = dtensor_class()
    meshes = {p.device_mesh for p in params if cls_dtensor is not None and isinstance(p, cls_dtensor)}
    if len(meshes) > 1:
        raise ValueError(f"{cls}: the parameters of one group live on {len(meshes)} different device meshes; "
                         f"put parameters of different meshes in different optimizers")
    group = next(iter(meshes)).get_group(0) if meshes else process_group
    if process_group is None:
        # Plain tensors with no group to share them over are this rank's own: the single-process step.
        local = [i for i, p in enumerate(params) if not (cls_dtensor is not None and isinstance(p, cls_dtensor))]
        if local:
            muon_update([params[i] for i in local], [grads[i] for i in local], [momentum_buffers[i] for i in local],
                        **options)
            keep = sorted(set(range(len(params))) - set(local))
            params, grads = [params[i] for i in keep], [grads[i] for i in keep]
            momentum_buffers = [momentum_buffers[i] for i in keep]
    # A matrix with no elements has nothing to orthogonalize (muon_update and torch's Muon skip it too).
    keep = [i for i, p in enumerate(params) if p.numel() > 0]
    params, grads = [params[i] for i in keep], [grads[i] for i in keep]
    momentum_buffers = [momentum_buffers[i] for i in keep]
    if group is None or not params:
        return
    world, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
    layouts = [row_layout(p, world, cls) for p in params]
    local_params = local_tensors(params)
    updates: list[Tensor] = []
    for g, buf, layout in zip(local_tensors(grads), local_tensors(momentum_buffers), layouts):
        buf.lerp_(g, 1 - momentum)
        update = g.lerp(buf, momentum) if nesterov else buf
        updates.append(update.reshape(update.shape[0], layout.cols))

    # Buckets of one shape and dtype, in first-seen order; owners by FLOPs over all of them.
    items: dict[tuple[tuple[int, int], torch.dtype], list[int]] = {}
    for i, (layout, u) in enumerate(zip(layouts, updates)):
        items.setdefault((layout.shape, u.dtype), []).append(i)
    order = [i for idx in items.values() for i in idx]
    owner_of = dict(zip(order, assign_owners([orthogonalization_flops(layouts[i].shape, ns_steps) for i in order],
                                             world)))
    buckets = []
    for (shape, dtype), idx in items.items():
        owned: list[list[int]] = [[] for _ in range(world)]
        for i in idx:
            owned[owner_of[i]].append(i)
        buckets.append(_Bucket(shape, dtype, owned))
    device = updates[0].device

    # Gather: every bucket's all-to-all is started before any orthogonalization, so that later
    # buckets travel while earlier ones are computed. Replicated matrices are already whole.
    gathers = []
    for b in buckets:
        pieces = [[updates[i] for i in b.owned[r] if not layouts[i].replicated] for r in range(world)]
        recv_sizes = [sum(_numel(layouts[i], s) for i in b.owned[rank] if not layouts[i].replicated)
                      for s in range(world)]
        gathers.append(_start_all_to_all(pieces, recv_sizes, b.dtype, device, group))

    scatters = []
    for b, (work, received) in zip(buckets, gathers):
        work.wait()
        mine = b.owned[rank]
        out_dtype = result_dtype(orthogonalize, b.dtype)
        O = None
        if mine:
            full = torch.empty((len(mine), *b.shape), dtype=b.dtype, device=device)
            offsets = [0] * world
            for k, i in enumerate(mine):
                layout = layouts[i]
                if layout.replicated:
                    full[k].copy_(updates[i])
                    continue
                for s in range(world):
                    n = _numel(layout, s)
                    full[k, _rows(layout, s)].copy_(received[s][offsets[s]: offsets[s] + n].view(-1, layout.cols))
                    offsets[s] += n
            O = orthogonalize_batch(full, method=orthogonalize, ns_coefficients=ns_coefficients, ns_steps=ns_steps,
                                    eps=eps)
        # Scatter: each rank's rows of the results of this bucket, started as soon as they exist.
        pieces = [[O[k, _rows(layouts[i], r)] for k, i in enumerate(mine)] for r in range(world)]
        recv_sizes = [sum(_numel(layouts[i], rank) for i in b.owned[s]) for s in range(world)]
        scatters.append((b, _start_all_to_all(pieces, recv_sizes, out_dtype, device, group)))

    for b, (work, received) in scatters:
        work.wait()
        step = adjust_lr(lr, adjust_lr_fn, b.shape)
        for s in range(world):
            offset = 0
            for i in b.owned[s]:
                p = local_params[i]
                o = received[s][offset: offset + p.numel()]
                offset += p.numel()
                p.mul_(1 - lr * weight_decay)
                p.add_(o.view(p.shape), alpha=-step)
