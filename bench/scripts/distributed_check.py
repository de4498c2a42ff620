"""Muon under FSDP2 on N processes (issue 22 §1): the trajectory against one process, the optimizer
step time against torch.optim.Muon on unsharded copies and against the naive gather-everything
scheme, and the bytes the all-to-alls move per step against the model in docs/distributed.md.

    torchrun --nproc-per-node N bench/scripts/distributed_check.py --out $OUT/distributed-N.json   # GPUs, NCCL
    torchrun --nproc-per-node 1 bench/scripts/distributed_check.py --out $OUT/distributed-1.json   # one GPU
    torchrun --nproc-per-node 2 bench/scripts/distributed_check.py --device cpu --tiny --out /tmp/d.json  # smoke test

Parameter sets (the hidden matrices Muon owns; embeddings and norms belong to AdamW):

* ``gpt2-small``: 12 layers × (768×2304 qkv, 768×768 proj, 3072×768 fc, 768×3072 proj) = 85M;
* ``llama-1b``: 16 layers × (2048² q and o, 512×2048 k and v, 8192×2048 gate and up,
  2048×8192 down) = 973M (Llama-3.2-1B's shapes).

They are held by an ``nn.Module`` sharded with ``fully_shard`` on a 1-D mesh (fp32 parameters,
``Shard(0)`` DTensors, as a model's layers would be). Gradients are ``sin(3θ + t)``, computed
elementwise on each shard, so every variant sees the same gradients as one process would and the
trajectory check isolates the optimizer.

Variants timed (median of ``--reps`` steps after ``--warmup``, each step between a device
synchronisation and a barrier, so the figure is the slowest rank's wall time):

* ``metalcore_sharded``: metalcore.optim.Muon on the FSDP2 parameters (owner-computes, all-to-all);
* ``naive_gather``: all-gather every update (``DTensor.full_tensor``), orthogonalize every matrix on
  every rank (metalcore's batched call), keep the local rows: N× the orthogonalization work;
* ``torch_unsharded``: torch.optim.Muon on an unsharded copy on each rank (what torch offers: no
  sharding, one Newton–Schulz per matrix);
* ``metalcore_unsharded``: metalcore.optim.Muon on the same unsharded copy (batched per shape).

Bytes: what ``all_to_all_single`` sends to other ranks per step (counted on each rank, summed),
beside the model's prediction. Trajectory: ``--trajectory-steps`` (20) steps of the sharded Muon
against metalcore's Muon on the unsharded copy in the same process; max |Δθ| and max |θ|.
NCCL_NVLS_ENABLE=0 and TORCH_SYMM_MEM_DISABLE_MULTICAST=1 are set here (NVLink multicast stays off).
"""

from __future__ import annotations

import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from metalcore.optim import Muon  # noqa: E402
from metalcore.optim.distributed import orthogonalization_flops  # noqa: E402
from metalcore.linalg.polar import NS_COEFFICIENTS, NS_EPS, NS_STEPS  # noqa: E402
from metalcore.optim.muon import adjust_lr, orthogonalize_batch  # noqa: E402

LR, WEIGHT_DECAY, MOMENTUM = 0.02, 0.1, 0.95


def shapes(name: str) -> list[tuple[int, int]]:
    """(rows, cols) of each matrix, rows the dimension FSDP2 shards."""
    if name == "gpt2-small":
        return [(768, 2304), (768, 768), (3072, 768), (768, 3072)] * 12
    if name == "llama-1b":
        return [(2048, 2048), (512, 2048), (512, 2048), (2048, 2048), (8192, 2048), (8192, 2048), (2048, 8192)] * 16
    if name == "tiny":
        return [(48, 32), (32, 32), (32, 32), (13, 40), (5, 16)] * 2
    raise ValueError(name)


class Matrices(nn.Module):
    def __init__(self, sizes: list[tuple[int, int]], device: torch.device):
        super().__init__()
        g = torch.Generator(device=device).manual_seed(0)  # on the device: 973M CPU draws would take seconds
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(s, generator=g, device=device) * 0.02) for s in sizes)


def set_grads(model: nn.Module, t: int) -> None:
    from torch.distributed.tensor import DTensor

    for p in model.parameters():
        if isinstance(p, DTensor):
            local = torch.sin(3 * p.to_local() + t)
            p.grad = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
        else:
            p.grad = torch.sin(3 * p + t)


class NaiveGather:
    """The scheme owner-computes replaces: every rank all-gathers every update and orthogonalizes
    every matrix (batched per shape), then keeps its rows."""

    def __init__(self, params):
        self.params = list(params)
        self.buffers = [torch.zeros_like(p.to_local()) for p in self.params]

    @torch.no_grad()
    def step(self) -> None:
        from torch.distributed.tensor import DTensor

        full_updates, locals_ = [], []
        for p, buf in zip(self.params, self.buffers):
            g = p.grad.to_local()
            buf.lerp_(g, 1 - MOMENTUM)
            update = g.lerp(buf, MOMENTUM)
            full_updates.append(DTensor.from_local(update, p.device_mesh, p.placements, shape=p.shape,
                                                   stride=p.stride()).full_tensor())
            locals_.append(p.to_local())
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, u in enumerate(full_updates):
            by_shape.setdefault(tuple(u.shape), []).append(i)
        rank, world = dist.get_rank(), dist.get_world_size()
        for shape, idx in by_shape.items():
            O = orthogonalize_batch(torch.stack([full_updates[i] for i in idx]), method="newton_schulz",
                                    ns_coefficients=NS_COEFFICIENTS, ns_steps=NS_STEPS, eps=NS_EPS)
            rows = -(-shape[0] // world)
            for i, o in zip(idx, O.unbind(0)):
                p = locals_[i]
                p.mul_(1 - LR * WEIGHT_DECAY)
                p.add_(o[rank * rows: rank * rows + p.shape[0]], alpha=-adjust_lr(LR, None, shape))


class ByteCounter:
    """Counts the bytes ``all_to_all_single`` sends to other ranks (wraps it for this process)."""

    def __init__(self):
        self.sent = 0
        self._original = dist.all_to_all_single

        def counting(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
            rank, world = dist.get_rank(group), dist.get_world_size(group)
            splits = input_split_sizes or [input.numel() // world] * world
            self.sent += sum(n for r, n in enumerate(splits) if r != rank) * input.element_size()
            return self._original(output, input, output_split_sizes, input_split_sizes, group, async_op)

        dist.all_to_all_single = counting

    def close(self) -> None:
        dist.all_to_all_single = self._original


def modelled_bytes(sizes: list[tuple[int, int]], world: int) -> int:
    """docs/distributed.md's model, summed over ranks: each matrix's rows held by ranks other than
    its owner travel there in fp32 and back in bf16: (W−1)/W of it, 4 + 2 bytes per element."""
    return sum(round(r * c * (world - 1) / world) * (4 + 2) for r, c in sizes)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


def time_steps(step, model, device, warmup: int, reps: int) -> dict:
    times = []
    for t in range(warmup + reps):
        set_grads(model, t)
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        if t >= warmup:
            times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times)}


def measure(name: str, args, device: torch.device, mesh) -> dict:
    from torch.distributed.fsdp import fully_shard

    sizes = shapes(name)
    world, rank = dist.get_world_size(), dist.get_rank()
    out = {"matrices": len(sizes), "parameters": sum(r * c for r, c in sizes),
           "flops_per_step_total": sum(orthogonalization_flops(s, 5) for s in sizes)}

    # Trajectory: sharded metalcore Muon against the same optimizer on an unsharded copy.
    sharded = fully_shard(Matrices(sizes, device), mesh=mesh)
    plain = Matrices(sizes, device)
    opt, ref = Muon(sharded.parameters(), lr=LR, weight_decay=WEIGHT_DECAY), Muon(plain.parameters(), lr=LR,
                                                                                 weight_decay=WEIGHT_DECAY)
    for t in range(args.trajectory_steps):
        set_grads(sharded, t)
        set_grads(plain, t)
        opt.step()
        ref.step()
    with torch.no_grad():
        diff = max(float((p.full_tensor() - q).abs().max()) for p, q in zip(sharded.parameters(), plain.parameters()))
    scale = max(float(q.abs().max()) for q in plain.parameters())
    out["trajectory"] = {"steps": args.trajectory_steps, "max_abs_diff": diff, "max_abs_param": scale}

    counter = ByteCounter()
    timed = {"metalcore_sharded": time_steps(opt.step, sharded, device, args.warmup, args.reps)}
    counter.close()
    steps = args.warmup + args.reps
    sent = torch.tensor([counter.sent / steps], dtype=torch.float64, device=device)
    dist.all_reduce(sent)
    out["bytes_per_step"] = {"measured_all_ranks": float(sent), "modelled": modelled_bytes(sizes, world)}
    if world > 1:
        naive = NaiveGather(sharded.parameters())
        timed["naive_gather"] = time_steps(naive.step, sharded, device, args.warmup, args.reps)
        del naive
    del opt, sharded
    torch_opt = torch.optim.Muon(plain.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    timed["torch_unsharded"] = time_steps(torch_opt.step, plain, device, args.warmup, args.reps)
    del torch_opt
    timed["metalcore_unsharded"] = time_steps(ref.step, plain, device, args.warmup, args.reps)
    out["step_time"] = timed
    del ref, plain
    if device.type == "cuda":
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="small shapes, few steps (CPU smoke test)")
    p.add_argument("--sets", default=None, help="comma-separated parameter sets (default gpt2-small,llama-1b)")
    p.add_argument("--trajectory-steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default=None, help="JSON file for the results (rank 0 writes it)")
    args = p.parse_args()
    if args.tiny:
        args.trajectory_steps, args.warmup, args.reps = min(args.trajectory_steps, 3), 1, 2
    names = (args.sets or ("tiny" if args.tiny else "gpt2-small,llama-1b")).split(",")

    from torch.distributed.device_mesh import init_device_mesh

    cuda = args.device == "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh(device.type, (world,))
    results = {"world_size": world, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
               "torch": torch.__version__, "sets": {}}
    try:
        for name in names:
            results["sets"][name] = measure(name, args, device, mesh)
    finally:
        dist.destroy_process_group()
    if rank != 0:
        return
    print(f"world size {world} on {results['device']} (torch {results['torch']})")
    for name, r in results["sets"].items():
        tr = r["trajectory"]
        print(f"\n{name}: {r['matrices']} matrices, {r['parameters'] / 1e6:.0f}M parameters, "
              f"{r['flops_per_step_total'] / 1e12:.2f} TFLOP of Newton-Schulz per step")
        print(f"  trajectory ({tr['steps']} steps) sharded vs one process: max |dtheta| {tr['max_abs_diff']:.3e} "
              f"(max |theta| {tr['max_abs_param']:.3e})")
        b = r["bytes_per_step"]
        print(f"  all-to-all bytes per step, all ranks: measured {b['measured_all_ranks'] / 2**20:,.1f} MiB, "
              f"modelled {b['modelled'] / 2**20:,.1f} MiB")
        base = r["step_time"]["torch_unsharded"]["median_s"]
        for variant, t in r["step_time"].items():
            print(f"  {variant:<20} {t['median_s'] * 1e3:9.2f} ms  ({base / t['median_s']:.2f}x torch_unsharded)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
