"""Run a function on N gloo processes on the CPU, bounded in time: the distributed tests' launcher.

``run_ranks(fn, world_size, *args)`` spawns ``world_size`` processes that join one gloo group
(rendezvous through a file, so no port can clash) and call ``fn(rank, world_size, *args)``. An
exception on any rank fails the caller with that rank's traceback; a run that outlives ``timeout``
seconds (a hang in a collective) has its processes killed and fails too.
"""

import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _load(path: str, name: str):
    """``name`` from the file at ``path``: test modules are imported by path (pytest's importlib
    mode), so a rank cannot import them by module name."""
    spec = importlib.util.spec_from_file_location(f"rank_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def _entry(rank: int, where: tuple[str, str], world_size: int, init_file: str, args: tuple) -> None:
    fn = _load(*where)
    torch.set_num_threads(1)  # N processes share the machine's cores; more threads only contend
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # A rank that finished cleanly leaves without the interpreter's finalization, where gloo's threads
    # can abort a process (one rank died of SIGABRT, "terminate called without an active exception",
    # in 1 of ~25 runs before this; none in 14 after). Failures raise above, as usual.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn, world_size: int, *args, timeout: float = 180.0) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        where = (fn.__code__.co_filename, fn.__name__)
        context = mp.start_processes(_entry, args=(where, world_size, os.path.join(tmp, "rendezvous"), args),
                                     nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                    process.join(5)
                pytest.fail(f"{fn.__name__} on {world_size} processes did not finish within {timeout:.0f} s")


def init_device_mesh(world_size: int, shape=None):
    from torch.distributed.device_mesh import init_device_mesh as init

    return init("cpu", shape or (world_size,))
