"""Muon and MuonWithAuxAdamW on FSDP2 (DTensor) and DDP-style replicated parameters equal the
single-process optimizer, step for step (owner-computes, metalcore/optim/distributed.py).

Each rank shards a copy of one seeded model with ``fully_shard`` and keeps an unsharded copy as the
single-process reference. Gradients are an elementwise function of the parameters (``sin(3θ + t)``),
computed on each rank's local shard: no forward/backward reduction whose summation order could
differ, so any difference is the optimizer's. The trajectories are compared bit for bit: momentum
and the update are elementwise, and the orthogonalization of a matrix on its owner is the same
batched computation as in one process (on the CPU a batched matmul computes each matrix alone, so
which other matrices share the batch does not change a bit).

Parameters that AdamW updates (MuonWithAuxAdamW's biases) are compared with ``TOL[float32]``
instead: torch's fused CPU AdamW, which MetalAdamW calls on the CPU, runs vector-width blocks
(with fused multiply-adds) and a scalar remainder, so an element whose offset in its shard differs
from its offset in the whole tensor can be rounded differently — measured 1.9e-9 (about 1 ulp)
after two steps on 4 ranks.
"""

import copy

import pytest
import torch
from torch import nn

from ranks import init_device_mesh, run_ranks
from tolerances import TOL

STEPS = 10


def _model() -> nn.Module:
    """Matrices whose rows do not divide evenly over 2 or 4 ranks (13 rows: 4,4,4,1; 5 rows: 2,2,1,0 —
    an empty shard), two of one shape (a batch of two on one owner), a conv kernel ((out, in·k·k)),
    and biases (AdamW's in MuonWithAuxAdamW)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 24), nn.Linear(24, 24), nn.Linear(24, 13),
                         nn.Linear(13, 5), nn.Conv2d(2, 6, 3))


def _grad(x: torch.Tensor, t: int) -> torch.Tensor:
    return torch.sin(3 * x + t)


def _set_grads(model: nn.Module, t: int) -> None:
    from torch.distributed.tensor import DTensor

    for p in model.parameters():
        if isinstance(p, DTensor):
            p.grad = DTensor.from_local(_grad(p.to_local(), t), p.device_mesh, p.placements, shape=p.shape,
                                        stride=p.stride())
        else:
            p.grad = _grad(p, t)


def _optimizer(kind: str, model: nn.Module, **kwargs):
    from metalcore.optim import Muon, MuonWithAuxAdamW, muon_param_groups

    if kind == "muon":
        return Muon([p for p in model.parameters() if p.ndim >= 2], lr=0.05, weight_decay=0.1, **kwargs)
    groups = muon_param_groups(model, lr=0.05, adamw_lr=0.01, weight_decay=0.1, orthogonalize="polar_express")
    return MuonWithAuxAdamW(groups, **kwargs)


def _shard(model: nn.Module, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def assert_same(sharded: nn.Module, reference: nn.Module, where: str, exact_matrices: bool = True) -> None:
    """Every parameter of ``sharded`` (gathered) against ``reference``: matrices (Muon's) bit for bit
    when ``exact_matrices``, the others within TOL[float32] (module docstring)."""
    from torch.distributed.tensor import DTensor

    for (name, p), q in zip(sharded.named_parameters(), reference.parameters()):
        full = p.full_tensor() if isinstance(p, DTensor) else p
        if p.ndim >= 2 and exact_matrices:
            assert torch.equal(full, q), f"{where}: {name} differs by {(full - q).abs().max():.3e}"
        else:
            torch.testing.assert_close(full, q, **TOL[torch.float32], msg=lambda m: f"{where}: {name}: {m}")


def _fsdp_trajectory(rank: int, world_size: int, kind: str) -> None:
    reference = _model()
    sharded = _shard(copy.deepcopy(reference), init_device_mesh(world_size))
    opt, ref_opt = _optimizer(kind, sharded), _optimizer(kind, reference)
    for t in range(STEPS):
        _set_grads(sharded, t)
        _set_grads(reference, t)
        opt.step()
        ref_opt.step()
        assert_same(sharded, reference, f"{kind}, {world_size} ranks, step {t + 1}")


@pytest.mark.parametrize("world_size,kind", [(2, "muon"), (4, "muon_adamw")], ids=["w2-Muon", "w4-MuonWithAuxAdamW"])
def test_fsdp2_trajectory_equals_single_process(world_size, kind):
    run_ranks(_fsdp_trajectory, world_size, kind)


def _replicated_and_refusals(rank: int, world_size: int) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from metalcore.optim import Muon

    # DDP: every rank holds the whole model and the same (all-reduced) gradients; with the process
    # group, each matrix is orthogonalized by its owner only and the result shared.
    reference = _model()
    replicated = copy.deepcopy(reference)
    opt = _optimizer("muon", replicated, process_group=dist.group.WORLD)
    ref_opt = _optimizer("muon", reference)
    for t in range(STEPS):
        _set_grads(replicated, t)
        _set_grads(reference, t)
        opt.step()
        ref_opt.step()
        assert_same(replicated, reference, f"replicated, step {t + 1}")

    # Tensor parallelism's column shard and a 2-D mesh: refused at construction, naming the parameter.
    column = nn.Parameter(distribute_tensor(torch.randn(8, 6), init_device_mesh(world_size), [Shard(1)]))
    with pytest.raises(ValueError, match=r"Muon: a parameter \(shape \(8, 6\).*Shard\(dim=1\)"):
        Muon([column])
    # Optimizers with no sharded path (SOAP, Shampoo) refuse any shard through refuse_sharded.
    from metalcore.optim.distributed import refuse_sharded

    with pytest.raises(ValueError, match=r"SOAP: a parameter \(shape \(8, 6\).* is sharded"):
        refuse_sharded("SOAP", column)
    replicated_dtensor = distribute_tensor(torch.randn(8, 6), init_device_mesh(world_size), [Replicate()])
    refuse_sharded("SOAP", replicated_dtensor)
    mesh_2d = init_device_mesh(world_size, (1, world_size))
    rows = nn.Parameter(distribute_tensor(torch.randn(8, 6), mesh_2d, [Shard(0), Shard(0)]))
    with pytest.raises(ValueError, match=r"Muon: a parameter .* 2-D device mesh \(1, 2\)"):
        Muon([rows])


def test_replicated_ddp_parameters_and_refusals():
    run_ranks(_replicated_and_refusals, 2)
