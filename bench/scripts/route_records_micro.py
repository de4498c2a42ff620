"""Python cost of a recorded kernel call (metalcore/_route.py) of eigh, eigvalsh, svd and svdvals on the
development CPU: the path the H100 table names at n ≤ 32 (``shifted``, ``registers``) with the Triton
launch replaced by a no-op, the public function with its route records against the same call with
recording switched off (full path every call). Thread time per call, best of 7 blocks of 3000.

    TRITON_INTERPRET=1 python bench/scripts/route_records_micro.py
"""

import sys
import time

import torch

import metalcore._op as op
import metalcore._selection as sel
import metalcore.linalg as mla
from metalcore import _triton

# The paths the H100 table names at n ≤ 32, the launch a no-op: the Python layers alone.
PATHS = {"eigh": "shifted", "svd": "registers"}


def stub() -> None:
    op.automatic_backend = lambda device: "triton"
    sel.measured_choice = lambda *a: True
    sel.route = lambda o, backend, args: sel.paths(o, backend).get(PATHS.get(o, ""))
    _triton.BoundLaunch.__call__ = lambda self, *t: None
    _triton.LazyKernel._launch = lambda self, *a, **k: None
    _triton.LazyKernel.__getitem__ = lambda self, grid: (lambda *a, **k: None)


def best_us(f, n: int = 3000, rounds: int = 7) -> float:
    for _ in range(300):
        f()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            f()
        best = min(best, (time.perf_counter() - t) / n)
    return best * 1e6


def main() -> None:
    torch.set_num_threads(1)
    stub()
    A = torch.randn(16, 8, 8)
    A = A @ A.mT
    M = torch.randn(16, 8, 8)
    cases = {"eigh": lambda: mla.eigh(A), "eigvalsh": lambda: mla.eigvalsh(A),
             "svd": lambda: mla.svd(M, full_matrices=False), "svdvals": lambda: mla.svdvals(M)}
    recorded = {k: best_us(f) for k, f in cases.items()}
    # The full path every call: no record offered.
    for fn in (sys.modules["metalcore.linalg.eigh"].eigh, sys.modules["metalcore.linalg.eigh"].eigvalsh,
               sys.modules["metalcore.linalg.svd"].svd, sys.modules["metalcore.linalg.svd"].svdvals):
        fn.remember = lambda fast: None
    sel._clear_plans()
    full = {k: best_us(f) for k, f in cases.items()}
    for k in cases:
        print(f"{k} 16x8x8 (path): full path {full[k]:.1f} µs, recorded {recorded[k]:.1f} µs")


if __name__ == "__main__":
    main()
