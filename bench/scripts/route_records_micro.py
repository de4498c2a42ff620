"""Python cost of a recorded kernel call (metalcore/_route.py) of eigh, eigvalsh, svd and svdvals on the
development CPU: the path the H100 table names at n ≤ 32 (``shifted``, ``registers``) with the Triton
launch replaced by a no-op, the public function with its route records against the same call with
recording switched off (full path every call). Thread time per call, best of 7 blocks of 3000.

    TRITON_INTERPRET=1 python bench/scripts/route_records_micro.py
"""

import time, sys, torch, metalcore, metalcore.linalg as mla
from metalcore import _triton
import metalcore._op as op
torch.set_num_threads(1)
op.automatic_backend = lambda device: "triton"
import metalcore._selection as sel
sel.measured_choice = lambda *a: True
_paths = {"eigh": "shifted", "svd": "registers"}
sel.route = lambda o, backend, args: sel.paths(o, backend).get(_paths.get(o, ""))
_triton.BoundLaunch.__call__ = lambda self, *t: None
_triton.LazyKernel._launch = lambda self, *a, **k: None
_triton.LazyKernel.__getitem__ = lambda self, grid: (lambda *a, **k: None)
def bench(f, n=3000, r=7):
    for _ in range(300): f()
    best=1e9
    for _ in range(r):
        t=time.perf_counter()
        for _ in range(n): f()
        best=min(best,(time.perf_counter()-t)/n)
    return best*1e6
A=torch.randn(16,8,8); A=A@A.mT; M=torch.randn(16,8,8)
cases={"eigh":lambda: mla.eigh(A),"eigvalsh":lambda: mla.eigvalsh(A),"svd":lambda: mla.svd(M, full_matrices=False),"svdvals":lambda: mla.svdvals(M)}
with_rec={k:bench(f) for k,f in cases.items()}
# The full path every call: no record offered.
E=sys.modules['metalcore.linalg.eigh']; S=sys.modules['metalcore.linalg.svd']
for fn in (E.eigh,E.eigvalsh,S.svd,S.svdvals): fn.remember=lambda fast: None
sel._clear_plans()
without={k:bench(f) for k,f in cases.items()}
for k in cases: print(f"{k} 16x8x8 (path): full path {without[k]:.1f} µs, recorded {with_rec[k]:.1f} µs")
