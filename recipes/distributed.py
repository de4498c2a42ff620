"""FSDP2 for the recipes (``--fsdp`` under ``torchrun``): process group, sharding, DCP checkpoints,
per-rank reports.

    torchrun --nproc-per-node 4 recipes/finetune.py --fsdp --device cuda --model PATH
    torchrun --nproc-per-node 2 recipes/finetune.py --fsdp --device cpu     # gloo on the CPU

* **Process group.** NCCL on CUDA (each rank on ``cuda:LOCAL_RANK``), gloo on the CPU. Started by
  ``torchrun`` (its ``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` variables); without them, a group of one
  process, so ``--fsdp`` also runs as ``python recipes/finetune.py --fsdp``.
* **Sharding.** ``metalcore.patch.patch_model`` first (it swaps modules and forwards, which FSDP2
  must see as they will run), then ``fully_shard`` on every decoder layer and on the root: a layer's
  weights are gathered just before its forward and freed after, so a rank holds its 1/N of the
  model, of the gradients and of the optimizer state.
* **Data.** ``--batch-size`` is per rank: every rank draws the same ``batch_size × world_size``
  examples from the seeded sampler and trains on its own slice.
* **Checkpoints.** ``torch.distributed.checkpoint`` (DCP): each rank writes its shards of the model
  and optimizer (``get_model_state_dict``/``get_optimizer_state_dict``) into ``OUT/dcp``, written to
  a temporary folder and renamed by rank 0 once every rank is done; the rest (step, sampler, RNG,
  losses) goes to ``OUT/checkpoint.pt`` in the recipes' checksummed format, written after the DCP
  folder. A run resumes from them on any number of processes (DCP reshards).

Imports no torch at load time (like common.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# NVLink multicast (NVLS) and symmetric-memory multicast stay off: the GPU machines these recipes
# are measured on do not allow them.
_NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    device: Any  # torch.device of this rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_name: str) -> Ranks:
    """Join (or start, for one process) the default process group; pick this rank's device."""
    import torch
    import torch.distributed as dist

    for key, value in _NCCL_ENV.items():
        os.environ.setdefault(key, value)
    if "RANK" not in os.environ:  # plain `python recipe.py --fsdp`: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29511"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device_name in ("cpu", "auto"):
        device = torch.device("cpu")
    else:
        raise SystemExit(f"--fsdp runs on CUDA (NCCL) or the CPU (gloo); got --device {device_name}")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return Ranks(dist.get_rank(), dist.get_world_size(), device)


def teardown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def exit_cleanly() -> None:
    """End a rank that finished its run without the interpreter's finalization, where gloo's threads
    can abort the process ("terminate called without an active exception": 1 in ~25 test runs, and
    once in CI under torchrun). Every artifact is already written atomically; failures raise earlier."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@contextlib.contextmanager
def main_first(ranks: Ranks):
    """Rank 0 runs the body first (building the data and tokenizer caches), then the others (which
    find them built): no two processes write one cache file."""
    import torch.distributed as dist

    if not ranks.is_main:
        dist.barrier()
    yield
    if ranks.is_main:
        dist.barrier()


def decoder_layers(model) -> list:
    """The repeated blocks to shard one by one: Hugging Face causal LMs keep them in
    ``model.model.layers`` (Llama, Mistral, Qwen) or ``model.transformer.h`` (GPT-2)."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers"):
        module = model
        for name in path.split("."):
            module = getattr(module, name, None)
        if module is not None:
            return list(module)
    raise SystemExit(f"--fsdp: no decoder layers found in {type(model).__name__} (looked for model.layers, "
                     "transformer.h, gpt_neox.layers)")


def shard(model, ranks: Ranks):
    """``fully_shard`` every decoder layer, then the root (embeddings, final norm, head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(ranks.device.type, (ranks.world_size,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def mean_across(value, ranks: Ranks) -> float:
    """The mean of a scalar tensor over the ranks (one all-reduce; the value reported per step)."""
    import torch
    import torch.distributed as dist

    total = value.detach().float().reshape(1).clone()
    if ranks.world_size > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return float(total) / ranks.world_size


def broadcast_from_main(tensor) -> None:
    """Overwrite ``tensor`` with rank 0's (in place), so that every rank takes the same branch."""
    import torch.distributed as dist

    if dist.get_world_size() > 1:
        dist.broadcast(tensor, src=0)


def any_nonfinite(model) -> bool:
    """Whether any rank's shard of any weight holds a NaN or infinity (one all-reduce)."""
    import torch
    import torch.distributed as dist

    bad = torch.zeros(1)
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        if local.numel() and not bool(torch.isfinite(local).all()):
            bad += 1
            break
    if dist.get_world_size() > 1:
        bad = bad.to(_collective_device())
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bool(bad.item())


def _collective_device():
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def save(folder: Path, model, optimizer, ranks: Ranks) -> None:
    """Every rank's shards of ``model`` and ``optimizer`` into ``folder`` (DCP), replacing it whole:
    written beside it, renamed by rank 0 after every rank has finished."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    tmp = folder.with_name(f".{folder.name}.tmp")
    if ranks.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)},
             checkpoint_id=str(tmp))
    dist.barrier()
    if ranks.is_main:
        old = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load(folder: Path, model, optimizer) -> None:
    """Load ``folder`` (written by :func:`save` on any number of ranks) into the sharded ``model`` and
    ``optimizer``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=str(folder))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])


def full_state_dict(model) -> dict:
    """The whole model's weights on rank 0's CPU (empty on the other ranks); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gather_stats(stats: dict[str, float], ranks: Ranks) -> list[dict[str, float]]:
    """Every rank's ``stats`` (throughput, memory), in rank order, on every rank."""
    import torch.distributed as dist

    out: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(out, stats)
    return out


def format_ranks(rows: list[dict[str, float]]) -> str:
    """Per-rank tokens/s and peak memory as a small table, with the total throughput."""
    lines = ["rank  tokens/s  peak memory"]
    for r, row in enumerate(rows):
        rate = row.get("tokens_per_second") or 0.0
        lines.append(f"{r:>4}  {rate:>8,.0f}  {row.get('peak_memory_bytes', 0) / 2**20:>8,.0f} MiB")
    total = sum(row.get("tokens_per_second") or 0.0 for row in rows)
    lines.append(f"all ranks: {total:,.0f} tokens/s")
    return "\n".join(lines)
