"""Probe the first stage of a one-program tridiagonal eigh (bench/linalg_triton.md, "Plan, not
built"): Householder tridiagonalisation of each matrix in registers, one program per matrix. The
plan holds only if this stage alone stays under ~0.2 ms at 100×64² and ~0.4 ms at 64×128² (fp32) on
the H100; this script measures it, with the warps swept, and checks every result.

    python bench/scripts/tridiag_probe.py [--out FILE.json]                       # on a GPU
    TRITON_INTERPRET=1 python bench/scripts/tridiag_probe.py --device cpu --tiny  # smoke test of the probe

Checks, on the first matrices of each case against float64 torch: the eigenvalues of the tridiagonal
``T`` against ``eigvalsh(A)`` and the backward error of ``A = Q T Qᵀ`` (``Q`` the product of the
stored reflectors), both as LAPACK-style ratios (error / (n ε ‖A‖)). Exit status 1 if a ratio passes
30. Timing: wall time per synchronised call of the launch alone (median of repeated calls).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import triton
import triton.language as tl

from metalcore._triton import jit


@jit
def _tridiag_kernel(A, D, E, V, TAU, n, s_ab, s_ar, s_ac, BN: tl.constexpr):
    """``A (b, n, n)`` symmetric (lower triangle read as a full tile) → ``D (b, n)``, ``E (b, n-1)``,
    reflectors ``V (b, n-2, BN)`` (``v[k+1] = 1``) and ``TAU (b, n-2)``: ``QᵀAQ = T``, ``Q = H₀ ⋯ H_{n-3}``,
    ``H_k = I − τ_k v_k v_kᵀ`` (LAPACK ``sytd2``, lower)."""
    pid = tl.program_id(0)
    rows = tl.arange(0, BN)
    cols = tl.arange(0, BN)
    inside = (rows[:, None] < n) & (cols[None, :] < n)
    base = A + pid.to(tl.int64) * s_ab
    lower = tl.load(base + rows[:, None] * s_ar + cols[None, :] * s_ac, mask=inside & (cols[None, :] <= rows[:, None]), other=0.0)
    a = lower + tl.trans(tl.where(rows[:, None] == cols[None, :], 0.0, lower))
    for k in range(0, n - 2):
        x = tl.sum(tl.where(cols[None, :] == k, a, 0.0), axis=1)          # column k
        x = tl.where(rows > k, x, 0.0)
        alpha = tl.sum(tl.where(rows == k + 1, x, 0.0), axis=0)
        scale = tl.max(tl.abs(x), axis=0)
        safe = tl.where(scale > 0, scale, 1.0)
        xs = x / safe
        sigma = tl.sum(tl.where(rows > k + 1, xs * xs, 0.0), axis=0)
        norm = safe * tl.sqrt((alpha / safe) * (alpha / safe) + sigma)
        beta = tl.where(alpha >= 0, -norm, norm)
        trivial = sigma == 0.0
        tau = tl.where(trivial, 0.0, (beta - alpha) / tl.where(trivial, 1.0, beta))
        denom = tl.where(trivial, 1.0, alpha - beta)
        v = tl.where(rows == k + 1, 1.0, tl.where(rows > k + 1, x / denom, 0.0))
        beta = tl.where(trivial, alpha, beta)
        p = tau * tl.sum(a * v[None, :], axis=1)                            # τ A v
        w = p - (0.5 * tau * tl.sum(p * v, axis=0)) * v
        a = a - v[:, None] * w[None, :] - w[:, None] * v[None, :]
        tl.store(V + (pid * (n - 2) + k).to(tl.int64) * BN + rows, v)
        tl.store(TAU + pid * (n - 2) + k, tau)
        tl.store(E + pid * (n - 1) + k, beta)
    d = tl.sum(tl.where(rows[:, None] == cols[None, :], a, 0.0), axis=1)
    tl.store(D + pid * n + rows, d, mask=rows < n)
    last = tl.sum(tl.sum(tl.where((rows[:, None] == n - 1) & (cols[None, :] == n - 2), a, 0.0), axis=1), axis=0)
    tl.store(E + pid * (n - 1) + n - 2, last)


def tridiagonalize(A: torch.Tensor, num_warps: int = 4):
    b, n, _ = A.shape
    BN = triton.next_power_of_2(n)
    D = A.new_empty(b, n)
    E = A.new_empty(b, n - 1)
    V = A.new_zeros(b, max(n - 2, 1), BN)
    TAU = A.new_zeros(b, max(n - 2, 1))
    _tridiag_kernel[(b,)](A, D, E, V, TAU, n, A.stride(0), A.stride(1), A.stride(2), BN=BN, num_warps=num_warps)
    return D, E, V[..., :n], TAU


def ratios(A: torch.Tensor, D, E, V, TAU) -> tuple[float, float]:
    """(eigenvalue ratio, backward-error ratio), worst over the batch given."""
    eps = torch.finfo(A.dtype).eps
    A, D, E, V, TAU = (t.double().cpu() for t in (A, D, E, V, TAU))
    b, n, _ = A.shape
    T = torch.diag_embed(D) + torch.diag_embed(E, 1) + torch.diag_embed(E, -1)
    Q = torch.eye(n, dtype=torch.float64).expand(b, n, n).clone()
    for k in range(n - 2):
        v = V[:, k, :, None]
        Q = Q - (Q @ v) * (TAU[:, k, None, None] * v.mT)
    norm = torch.linalg.matrix_norm(A, ord=2).clamp_min(1e-300)
    lam = torch.linalg.eigvalsh(A)
    mu = torch.linalg.eigvalsh(T)
    value = ((lam - mu).abs().amax(-1) / (n * eps * norm)).max().item()
    backward = (torch.linalg.matrix_norm(A - Q @ T @ Q.mT, ord=1) / (n * eps * torch.linalg.matrix_norm(A, ord=1))).max().item()
    return value, backward


def wall(fn, device: torch.device, reps: int) -> float:
    fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small shapes (the interpreter's smoke test)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.tiny:
        cases = [(3, 12, torch.float32, (1,)), (2, 40, torch.float64, (1,))]
    else:
        cases = [(b, n, dtype, (2, 4, 8, 16)) for b, n in ((100, 64), (64, 128), (16, 64), (1024, 64), (256, 33))
                 for dtype in (torch.float32, torch.float64)]
    torch.manual_seed(0)
    results, worst = [], 0.0
    for b, n, dtype, warps in cases:
        A = torch.randn(b, n, n, dtype=dtype, device=device)
        A = A + A.mT
        for w in warps:
            D, E, V, TAU = tridiagonalize(A, w)
            value, backward = ratios(A[:4], D[:4], E[:4], V[:4], TAU[:4])
            worst = max(worst, value, backward)
            t = wall(lambda: tridiagonalize(A, w), device, 3 if args.tiny else 50)
            row = dict(batch=b, n=n, dtype=str(dtype).removeprefix("torch."), warps=w, wall_ms=round(t * 1e3, 4),
                       eig_ratio=round(value, 3), backward_ratio=round(backward, 3))
            results.append(row)
            print(f"{b:5d}×{n:<4d} {row['dtype']:8s} warps={w:<3d} {row['wall_ms']:9.3f} ms  "
                  f"eigenvalue ratio {value:6.2f}  backward ratio {backward:6.2f}", flush=True)
    if args.out:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        with open(args.out, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "triton": triton.__version__, "results": results}, f, indent=1)
    if worst > 30:
        print(f"FAILED: worst ratio {worst:.1f} > 30", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
