"""GPU and wall ms of a back-transformation ``Q Z`` by the UT transform with batched GEMMs (issue 17;
bench/linalg_triton.md v21: slower than the kernels' own loop at these sizes, not used):
``Q = H_0 … H_{m−1} = I − W S⁻¹ Wᵀ``, ``S = ½ diag(WᵀW) + striu(WᵀW)``, so ``Q Z = Z − W S⁻¹ (Wᵀ Z)``.
Times each torch op of it at the tridiag/bidiag paths' shapes, against the accuracy of the rank-1
loop in float64. Usage: python bench/scripts/back_gemm_probe.py [seconds]"""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tridiag_stages import gpu_ms  # noqa: E402  (same-folder script)

import metalcore
from metalcore.bench.timing import call_ms
from metalcore.linalg.householder_gemm import larfb_gemm, larft_gemm


def wall_ms(fn):
    """Median ms of a synchronised call, host issue included (the project's per-call timer)."""
    return call_ms(fn, torch.device("cuda"), reps=30)


def reflectors(batch, n, dtype, device):
    """W of n − 2 unit-Householder vectors w_k (‖w‖² = 2, zero above row k + 1), as sytd2 leaves them."""
    W = torch.randn(batch, n, n - 2, dtype=dtype, device=device).tril(-1)
    return W * (2.0 / (W * W).sum(1, keepdim=True)).sqrt()


def ut_apply(W, Z, solve):
    G = W.mT @ torch.cat([W, Z], dim=-1)
    m = W.shape[-1]
    S = G[..., :m].triu(1)
    d = G[..., :m].diagonal(dim1=-2, dim2=-1)
    S.diagonal(dim1=-2, dim2=-1).copy_(torch.where(d > 0, 0.5 * d, 1.0))     # w = 0 (τ = 0): H = I
    return torch.baddbmm(Z, W, solve(S, G[..., m:]), alpha=-1)


def larft_apply(W, Z):
    T = larft_gemm(W, torch.ones(W.shape[0], W.shape[-1], dtype=W.dtype, device=W.device))
    return larfb_gemm(W, T, Z, left=True, transpose=False)


def rank1(W, Z):
    for k in range(W.shape[-1] - 1, -1, -1):
        w = W[..., k:k + 1]
        Z = Z - w @ (w.mT @ Z)
    return Z


def main(budget):
    out = open(os.path.join(os.environ.get("OUT", "."), "back-gemm-probe.jsonl"), "w")
    t0 = time.time()
    torch_solve = lambda S, X: torch.linalg.solve_triangular(S, X, upper=True)
    mc_solve = lambda S, X: metalcore.linalg.solve_triangular(S, X, upper=True)
    for dtype in (torch.float32, torch.float64):
        for batch, n in ((64, 128), (100, 64), (256, 128), (1000, 32), (1, 128)) if dtype == torch.float32 else ((64, 128),):
            if time.time() - t0 > budget:
                print("time up")
                return
            W = reflectors(batch, n, dtype, "cuda")
            Z = torch.linalg.qr(torch.randn(batch, n, n, dtype=dtype, device="cuda"))[0]
            m = n - 2
            G = W.mT @ torch.cat([W, Z], dim=-1)
            S = G[..., :m].triu(1) + torch.diag_embed(0.5 * G[..., :m].diagonal(dim1=-2, dim2=-1))
            X = G[..., m:]
            row = {"dtype": str(dtype)[6:], "batch": batch, "n": n}
            row["gemm_WtWZ"] = gpu_ms(lambda: W.mT @ torch.cat([W, Z], dim=-1))
            row["trsm_torch"] = gpu_ms(lambda: torch_solve(S, X))
            row["trsm_metalcore"] = gpu_ms(lambda: mc_solve(S, X))
            row["baddbmm"] = gpu_ms(lambda: torch.baddbmm(Z, W, X, alpha=-1))
            for name, solve in (("torch", torch_solve), ("metalcore", mc_solve)):
                row[f"ut_{name}_gpu"] = gpu_ms(lambda: ut_apply(W, Z, solve))
                row[f"ut_{name}_wall"] = wall_ms(lambda: ut_apply(W, Z, solve))
            row["larft_gpu"] = gpu_ms(lambda: larft_apply(W, Z))
            row["larft_wall"] = wall_ms(lambda: larft_apply(W, Z))
            row["larft_vs_rank1_maxabs"] = (larft_apply(W, Z).double() - rank1(W.double(), Z.double())).abs().amax().item()
            ref = rank1(W.double(), Z.double())
            got = ut_apply(W, Z, torch_solve).double()
            orth = (got.mT @ got - torch.eye(n, dtype=torch.float64, device="cuda")).abs().amax()
            row["ut_vs_rank1_maxabs"] = (got - ref).abs().amax().item()
            row["ut_orth_over_n_eps"] = orth.item() / (n * torch.finfo(dtype).eps)
            row = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
            print(json.dumps(row), flush=True)
            out.write(json.dumps(row) + "\n")
            out.flush()


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 120)
