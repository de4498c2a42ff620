"""The `tridiag` eigh and `bidiag` svd paths with the back-transformation in the kernel (rank-1 loop)
or by batched GEMMs after it (``householder_gemm.reflect_rows``): GPU ms (CUDA events over
back-to-back launches), wall ms per synchronised call, and LAPACK's residual and orthogonality ratios
(bench/linalg_triton.md v21). Writes $OUT/back-gemm-check.jsonl a case at a time.

    python bench/scripts/back_gemm_check.py [seconds]
"""

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from back_gemm_probe import gpu_ms, wall_ms  # noqa: E402  (same-folder scripts)
from jacobi_check import ratios_eigh, ratios_svd  # noqa: E402

from metalcore.linalg.eigh_tridiag_triton import eigh_tridiag_launcher  # noqa: E402
from metalcore.linalg.svd_bidiag_triton import svd_bidiag_launcher  # noqa: E402

CASES = [("eigh", "float32", 64, 128), ("eigh", "float32", 100, 64), ("svd", "float32", 64, 128),
         ("eigh", "float32", 1, 128), ("eigh", "float32", 256, 128), ("svd", "float32", 100, 64),
         ("eigh", "float32", 1000, 32), ("svd", "float32", 1000, 32), ("eigh", "float32", 1024, 33),
         ("eigh", "float32", 4096, 64), ("eigh", "float64", 64, 128), ("svd", "float64", 64, 128),
         ("eigh", "float64", 100, 64), ("svd", "float32", 1, 128), ("eigh", "float32", 16, 64)]


def main(budget: float) -> None:
    out = open(os.path.join(os.environ.get("OUT", "."), "back-gemm-check.jsonl"), "w")
    t0 = time.time()
    print(torch.cuda.get_device_name(), flush=True)
    for op, dt, batch, n in CASES:
        if time.time() - t0 > budget:
            print("time up", flush=True)
            break
        torch.manual_seed(0)
        X = torch.randn(batch, n, n, dtype=getattr(torch, dt), device="cuda")
        A = X + X.mT if op == "eigh" else X
        row = {"op": op, "dtype": dt, "batch": batch, "n": n}
        for name, gemm in (("loop", False), ("gemm", True)):
            run = (eigh_tridiag_launcher(A, False, True, back_gemm=gemm) if op == "eigh"
                   else svd_bidiag_launcher(A, True, back_gemm=gemm))
            launches = 20 if batch * n * n < 2 ** 22 else 5
            row[f"{name}_gpu"] = round(gpu_ms(lambda: run(A), launches), 4)
            row[f"{name}_wall"] = round(wall_ms(lambda: run(A), 20), 4)
            got = run(A)
            r = ratios_eigh(A, *got) if op == "eigh" else ratios_svd(A, *got)
            row[f"{name}_ratio"] = round(max(r.values()), 2)
        print(json.dumps(row), flush=True)
        out.write(json.dumps(row) + "\n")
        out.flush()


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 150)
