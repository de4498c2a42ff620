"""The owner-computes plan (metalcore/optim/distributed.py) in one process: owner balance, torch.chunk
row ranges, and plain single-device use untouched."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metalcore.optim.distributed import assign_owners, orthogonalization_flops, shard_rows

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("world_size", [1, 2, 3, 8, 64])
def test_owners_are_balanced_within_lpt_bound(world_size):
    """Llama-1B's hidden matrices: the busiest owner carries at most 4/3 of the best possible load
    (LPT's guarantee; the best is at least the mean and at least the largest item)."""
    shapes = [(2048, 2048), (512, 2048), (512, 2048), (2048, 2048), (8192, 2048), (8192, 2048), (2048, 8192)] * 16
    costs = [orthogonalization_flops(s, 5) for s in shapes]
    owners = assign_owners(costs, world_size)
    loads = [0] * world_size
    for c, o in zip(costs, owners):
        loads[o] += c
    lower_bound = max(sum(costs) / world_size, max(costs))
    assert max(loads) <= 4 / 3 * lower_bound
    assert owners == assign_owners(costs, world_size)  # the same plan on every rank, from shapes alone


@pytest.mark.parametrize("rows,world_size", [(13, 4), (5, 4), (8, 2), (1, 3), (64, 64)])
def test_shard_rows_follow_torch_chunk(rows, world_size):
    chunks = torch.arange(rows).chunk(world_size)
    expected = [(int(c[0]), int(c[-1]) + 1) for c in chunks] + [(rows, rows)] * (world_size - len(chunks))
    assert list(shard_rows(rows, world_size)) == expected


def test_importing_the_optimizers_imports_no_dtensor():
    code = "import sys, metalcore.optim; print('torch.distributed.tensor' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_single_device_steps_never_enter_the_distributed_path(monkeypatch):
    """Plain tensors without a process group: Muon, MetalAdamW and MuonWithAuxAdamW step as before.
    (torch's own Optimizer imports torch.distributed.tensor through torch._dynamo, so the import
    itself is no test here; the path taken is.)"""
    import metalcore.optim.distributed as distributed
    from metalcore.optim import MetalAdamW, Muon, MuonWithAuxAdamW, muon_param_groups

    def refuse(*args, **kwargs):
        raise AssertionError("the distributed path ran for plain single-device tensors")

    monkeypatch.setattr(distributed, "owner_computes_muon_update", refuse)
    monkeypatch.setattr(distributed, "local_tensors", refuse)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
    for opt in (Muon([p for p in model.parameters() if p.ndim == 2]), MetalAdamW(model.parameters()),
                MuonWithAuxAdamW(muon_param_groups(model))):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
