"""LAPACK ratios of the two-stage eigh on every matrix family of the tests (tests/linalg_matrices.py),
one matrix a family, through the Triton kernels or the Metal shaders: the accuracy check of issue 18's
item 5 at a size of one's choice, on any machine (the interpreter and the executor on a CPU).

    TRITON_INTERPRET=1 python bench/scripts/twostage_families.py triton 257   # CPU: ~2 min a matrix
    python bench/scripts/twostage_families.py metal 257                        # CPU executor: seconds
    python bench/scripts/twostage_families.py triton 1024 --device cuda

Ratios as LAPACK's tests define them: ‖A − Q Λ Qᵀ‖₁ / (n ε ‖A‖₂), ‖QᵀQ − I‖₁ / (n ε), and the largest
eigenvalue error against float64 LAPACK / (n ε ‖A‖₂); ≤ 30 passes.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests"))
from linalg_matrices import KINDS, symmetric  # noqa: E402  (the tests' matrix families)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("backend", choices=("triton", "metal"))
    ap.add_argument("n", type=int)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.backend == "metal":
        from metalcore.linalg.eigh_twostage_metal import eigh_twostage_metal as solve
        dtypes = (torch.float32,)                 # Apple GPUs have no float64
    else:
        from metalcore.linalg.eigh_twostage import eigh_twostage as solve
        dtypes = (torch.float32, torch.float64)
    torch.manual_seed(11)
    worst = 0.0
    for dtype in dtypes:
        eps = torch.finfo(dtype).eps
        for kind in KINDS:
            A = symmetric(kind, (1,), args.n, dtype).to(args.device)
            start = time.time()
            L, Q = solve(A, False, True)
            A64, L64, Q64 = A.double().cpu(), L.double().cpu(), Q.double().cpu()
            norm = torch.linalg.matrix_norm(A64, 2)
            eye = torch.eye(args.n, dtype=torch.float64)
            ratios = {
                "residual": torch.linalg.matrix_norm(A64 - (Q64 * L64.unsqueeze(-2)) @ Q64.mT, 1)
                / (args.n * eps * norm),
                "orthogonality": torch.linalg.matrix_norm(Q64.mT @ Q64 - eye, 1) / (args.n * eps),
                "values": (L64 - torch.linalg.eigvalsh(A64)).abs().amax(-1) / (args.n * eps * norm)}
            ratios = {k: float(v.max()) for k, v in ratios.items()}
            worst = max(worst, *ratios.values())
            text = "  ".join(f"{k} {v:6.3f}" for k, v in ratios.items())
            print(f"{args.backend} n={args.n} {str(dtype)[6:]:8} {kind:8} {text}  {time.time() - start:6.1f} s", flush=True)
    print(f"worst ratio {worst:.3f}: {'ok' if worst <= 30 else 'FAIL'}")
    sys.exit(0 if worst <= 30 else 1)


if __name__ == "__main__":
    main()
