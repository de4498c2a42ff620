"""CUDA-graph replay of launch-bound paths: the second and later calls of a path on the same shapes
launch one graph instead of hundreds of kernels.

Why: the two-stage eigh (:mod:`metalcore.linalg.eigh_twostage`) issues 323 kernels for 64×256²
(fp32, vectors) and its Python side took 10.9 ms of host time a call on the H100 machine's CPU
(~34 µs a launch, Triton's and torch's together) against 5.3 ms of GPU time: the call was
host-bound (bench/linalg.md, "two-stage eigh above 128: first H100 run"). Replaying a captured graph
costs one launch and the copies in and out.

:func:`replay` captures ``fn`` once per function, options, and input shapes, dtypes and device, on a
static copy of the inputs, and replays it on later calls: inputs copied into the static buffers, one
``graph.replay()``, outputs cloned (the graph writes them again on its next replay). Everything is
ordered on the caller's current stream; an event recorded after the output clones makes a call from
another stream wait until the previous replay's outputs are copied out.

Contract of ``fn``: tensors in, plus hashable options by keyword; a tuple of tensors out; no host
synchronisation and no host-side control flow that depends on tensor values (a capture would record
one branch). ``fn`` and the options are part of the key, so callers pass a module-level function,
not a closure made per call. A capture that
fails falls back to the eager call for that key from then on, with one ``RuntimeWarning`` that says
why. The cache has no lock: host threads
that call the same path on the same shapes at once can interleave their copies into the one set of
static buffers, so such programs set ``METALCORE_CUDA_GRAPHS=0``.

Cost: the first call runs ``fn`` twice (a warm-up outside capture that compiles kernels and sets up
cuBLAS's workspaces, then the capture) and replays once. Each graph keeps its own memory pool (the
intermediates of one call), so at most :data:`MAX_GRAPHS` are kept, least recently used first out;
:func:`clear` releases them all.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch
from torch import Tensor

# Replay on CUDA; ``METALCORE_CUDA_GRAPHS=0`` (read at import) or False here: every call eager (to
# time the host side, or to keep the graphs' memory pools free).
ENABLED = os.environ.get("METALCORE_CUDA_GRAPHS", "1") != "0"
# Graphs kept, each with its pool: ~10 inputs' worth for eigh_twostage (340 MB at 8×1024² fp32).
MAX_GRAPHS = 8
# Larger inputs (elements, all inputs together) run eagerly: their GPU time outgrows the host's
# (8×1024² eigh, 8.4M elements: 36.7 ms of GPU against 39 ms of host; 64×1024² would be ~4× the GPU
# time for the same launches), and a pool of ~10 inputs' worth would hold gigabytes.
MAX_ELEMENTS = 1 << 24

_graphs: OrderedDict[Hashable, tuple] = OrderedDict()
_failed: set[Hashable] = set()


def _capture(fn: Callable[..., tuple[Tensor, ...]], inputs: tuple[Tensor, ...], options: dict) -> tuple:
    static = tuple(t.clone(memory_format=torch.contiguous_format) for t in inputs)
    side = torch.cuda.Stream(device=static[0].device)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(*static, **options)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static, **options)
    return graph, static, out, torch.cuda.Event()


def replay(fn: Callable[..., tuple[Tensor, ...]], *inputs: Tensor, **options: Hashable) -> tuple[Tensor, ...]:
    """``fn(*inputs, **options)``, through a CUDA graph captured for ``fn``, ``options`` and the inputs'
    shapes and dtypes when they are on a CUDA device (eagerly elsewhere, above :data:`MAX_ELEMENTS`,
    while :data:`ENABLED` is False, or inside another capture)."""
    if (not ENABLED or inputs[0].device.type != "cuda" or sum(t.numel() for t in inputs) > MAX_ELEMENTS
            or torch.cuda.is_current_stream_capturing()):
        return fn(*inputs, **options)
    full = ((fn, tuple(sorted(options.items()))), *((t.shape, t.dtype, t.device) for t in inputs))
    if full in _failed:
        return fn(*inputs, **options)
    entry = _graphs.get(full)
    if entry is None:
        try:
            with torch.cuda.device(inputs[0].device):
                entry = _capture(fn, inputs, options)
        except RuntimeError as error:
            # Once a key: the user learns why the call stays eager (e.g. a host synchronisation in fn).
            warnings.warn(f"metalcore: CUDA graph capture of {getattr(fn, '__name__', fn)} failed, so calls with "
                          f"these shapes run eagerly: {str(error).splitlines()[0][:200]}", RuntimeWarning,
                          stacklevel=2)
            _failed.add(full)
            return fn(*inputs, **options)
        _graphs[full] = entry
        while len(_graphs) > MAX_GRAPHS:
            _graphs.popitem(last=False)
    else:
        _graphs.move_to_end(full)
    graph, static, out, done = entry
    stream = torch.cuda.current_stream(inputs[0].device)
    stream.wait_event(done)
    for s, t in zip(static, inputs):
        s.copy_(t)
    graph.replay()
    result = tuple(o.clone() for o in out)
    done.record(stream)
    return result


def clear() -> None:
    """Drop every captured graph and its memory pool."""
    _graphs.clear()
    _failed.clear()
