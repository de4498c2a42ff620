"""Torch dispatches of stage 3 (``tridiag_eig``) around its kernels, counted on the CPU with the Triton
launches stubbed out: the fused steps (``tridiag_plan_triton``, two launches) against the torch steps
of ``tridiag_host`` (the Metal solver's). Each dispatch that computes is a kernel on a GPU: ~5 µs of
host time eager, a dependent graph node in the replay.

    python bench/scripts/tridiag_glue_count.py [nb n]        # default 64 256
"""

from __future__ import annotations

import collections
import sys
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from metalcore._triton import LazyKernel
from metalcore.linalg import tridiag_eig_triton, tridiag_host


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count(nb: int, n: int, compute_v: bool) -> collections.Counter:
    d, e = torch.randn(2, nb, n)
    with mock.patch.object(LazyKernel, "__getitem__", lambda self, grid: lambda *a, **k: None), Count() as c:
        tridiag_eig_triton.tridiag_eig(d, e, compute_v)
    return c.ops


def main() -> None:
    nb, n = (int(a) for a in sys.argv[1:3]) if len(sys.argv) > 2 else (64, 256)
    for label, patches in (("torch steps", {"prepare": tridiag_host.prepare, "vector_plan": tridiag_host.vector_plan}),
                           ("fused", {"prepare": tridiag_eig_triton.prepare,
                                      "vector_plan": tridiag_eig_triton.vector_plan})):
        with mock.patch.multiple(tridiag_eig_triton, **patches):
            for compute_v in (False, True):
                ops = count(nb, n, compute_v)
                print(f"{label:12s} {'vectors' if compute_v else 'values':8s} {sum(ops.values()):4d} dispatches: "
                      + ", ".join(f"{k} {v}" for k, v in ops.most_common()))


if __name__ == "__main__":
    main()
