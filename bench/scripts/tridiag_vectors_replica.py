"""A torch replica of the ``tridiag`` eigh kernel's steps (metalcore/linalg/eigh_tridiag_triton.py),
batched over matrices and lanes, to study the inverse iteration's numerics on the CPU in seconds
where the interpreter takes minutes (bench/linalg_triton.md, v18).

    python bench/scripts/tridiag_vectors_replica.py                    # fp32 and fp64, ~2.5 minutes
    python bench/scripts/tridiag_vectors_replica.py --tight none       # per-lane shifts (before v18)

Each case: 400 matrices (100 at n = 128) of a test family, Householder tridiagonalisation, bisection,
two rounds of inverse iteration with Gram-Schmidt within clusters, LAPACK's residual and
orthogonality ratios of T's eigenvectors (the back-transformation is orthogonal). The starting
vectors come from torch's generator, not the kernel's Philox stream, so single matrices differ from
the kernel's; the failure rates are what carries over."""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from linalg_matrices import symmetric  # noqa: E402

ORTOL_N, ROUNDS, RHO = 0.25, 2, 8.0


def tridiagonalise(A):
    """``(d, e)`` of the kernel's lower Householder reduction, scaled to entries at most 1."""
    a = A.clone()
    B, n, _ = a.shape
    rows = torch.arange(n)
    for k in range(n - 2):
        x = torch.where(rows >= k + 1, a[:, :, k], 0.0)
        alpha = x[:, k + 1]
        m = x.abs().amax(1)
        m = torch.where(m > 0, m, 1.0)
        sigma = torch.where(rows > k + 1, (x / m[:, None]) ** 2, 0.0).sum(1)
        norm = m * torch.sqrt((alpha / m) ** 2 + sigma)
        beta = torch.where(alpha >= 0, -norm, norm)
        trivial = sigma == 0
        tau = torch.where(trivial, 0.0, (beta - alpha) / torch.where(trivial, 1.0, beta))
        v = torch.where(rows == k + 1, 1.0,
                        torch.where(rows > k + 1, x / torch.where(trivial, 1.0, alpha - beta)[:, None], 0.0))
        p = tau[:, None] * (a * v[:, None, :]).sum(2)
        w = p - (0.5 * tau * (p * v).sum(1))[:, None] * v
        a = a - v[:, :, None] * w[:, None, :] - w[:, :, None] * v[:, None, :]
    d = torch.diagonal(a, dim1=1, dim2=2).clone()
    e = torch.cat([torch.diagonal(a, 1, dim1=1, dim2=2), torch.zeros(B, 1, dtype=a.dtype)], 1)
    s = torch.maximum(d.abs().amax(1), e.abs().amax(1))
    s = torch.where(s > 0, s, 1.0)[:, None]
    return d / s, e / s


def bisection(d, e):
    """Every eigenvalue of T by the Sturm count, lane j for the j-th smallest (the kernel's bisection)."""
    B, n = d.shape
    eps, pivmin = torch.finfo(d.dtype).eps, torch.finfo(d.dtype).tiny
    radius = e.abs() + torch.cat([torch.zeros(B, 1, dtype=d.dtype), e[:, :-1]], 1).abs()
    low, high = (d - radius).amin(1), (d + radius).amax(1)
    pad = 4 * eps * torch.maximum(low.abs(), high.abs()) + 2 * pivmin
    left = (low - pad)[:, None].expand(B, n).clone()
    right = (high + pad)[:, None].expand(B, n).clone()
    for _ in range(28 if d.dtype == torch.float32 else 55):
        x = left + (right - left) * 0.5
        q = d[:, :1] - x
        q = torch.where(q.abs() < pivmin, -pivmin, q)
        count = (q < 0).int()
        for i in range(1, n):
            q = (d[:, i:i + 1] - x) - e[:, i - 1:i] ** 2 / q
            q = torch.where(q.abs() < pivmin, -pivmin, q)
            count += (q < 0).int()
        above = count > torch.arange(n)
        right = torch.where(above, torch.minimum(right, x), right)
        left = torch.where(above, left, torch.maximum(left, x))
    return 0.5 * (left + right)


def clusters(lam, tol):
    starts = torch.ones_like(lam, dtype=torch.bool)
    starts[:, 1:] = (lam[:, 1:] - lam[:, :-1]) > tol
    return starts.int().cumsum(1)


def shifts(lam, tight):
    """The kernel's ``shifts()``: a group within ``tight`` shares one shift beside it."""
    eps = torch.finfo(lam.dtype).eps
    group = clusters(lam, tight)
    same = group[:, :, None] == group[:, None, :]
    big = torch.finfo(lam.dtype).max
    lo = torch.where(same, lam[:, None, :], big).amin(2)
    hi = torch.where(same, lam[:, None, :], -big).amax(2)
    below = torch.where(lam[:, None, :] < lo[:, :, None], lo[:, :, None] - lam[:, None, :], 8.0).amin(2)
    above = torch.where(lam[:, None, :] > hi[:, :, None], lam[:, None, :] - hi[:, :, None], 8.0).amin(2)
    width = hi - lo
    offset = torch.clamp(width, min=8 * eps)
    shared = torch.where(below >= above, lo - offset, hi + offset)
    distance = torch.minimum(torch.maximum(below, above) - offset, torch.minimum(below, above) + width + offset)
    use = (same.sum(2) > 1) & (width + offset <= RHO * eps ** 0.5 * distance)
    return torch.where(use, shared, lam)


def unit_columns(z):
    m = z.abs().amax(1, keepdim=True)
    z = z / torch.where(m > 0, m, 1.0)
    return z / torch.sqrt(torch.clamp((z * z).sum(1, keepdim=True), min=1.0))


def orthonormalise_clusters(z, cluster):
    lanes = torch.arange(z.shape[2])
    for j in range(1, z.shape[2]):
        mates = (lanes < j)[None, :] & (cluster == cluster[:, j:j + 1])
        zj = z[:, :, j]
        for _ in range(2):
            c = torch.where(mates, (z * zj[:, :, None]).sum(1), 0.0)
            zj = zj - (z * c[:, None, :]).sum(2)
        zj = torch.where(mates.any(1)[:, None], zj / torch.sqrt((zj * zj).sum(1, keepdim=True)), z[:, :, j])
        z = z.clone()
        z[:, :, j] = zj
    return z


def eigenvectors(d, e, lam, tight, generator):
    B, n = d.shape
    eps = torch.finfo(d.dtype).eps
    cluster = clusters(lam, ORTOL_N / n)
    shift = lam if tight is None else shifts(lam, tight * eps)
    P = torch.empty(B, n, n, dtype=d.dtype)                   # pivots [matrix, row, lane]
    q = d[:, :1] - shift
    P[:, 0] = q = torch.where(q.abs() < eps, torch.where(q < 0, -eps, eps), q)
    for i in range(1, n):
        q = (d[:, i:i + 1] - shift) - e[:, i - 1:i] * (e[:, i - 1:i] / q)
        P[:, i] = q = torch.where(q.abs() < eps, torch.where(q < 0, -eps, eps), q)
    z = (torch.rand(B, n, n, generator=generator) - 0.5).to(d.dtype)
    for _ in range(ROUNDS):
        Y = torch.empty_like(z)
        q, y = P[:, 0], z[:, 0]
        Y[:, 0] = y / q
        for i in range(1, n):
            y = z[:, i] - (e[:, i - 1:i] / q) * y
            q = P[:, i]
            Y[:, i] = y / q
        X = torch.empty_like(z)
        X[:, n - 1] = x = Y[:, n - 1]
        for i in range(n - 2, -1, -1):
            X[:, i] = x = Y[:, i] - (e[:, i:i + 1] / P[:, i]) * x
        z = orthonormalise_clusters(unit_columns(X), cluster)
    return z


def ratios(d, e, lam, z):
    eps, n = torch.finfo(d.dtype).eps, d.shape[1]
    T = torch.diag_embed(d.double()) + torch.diag_embed(e[:, :-1].double(), 1) + torch.diag_embed(e[:, :-1].double(), -1)
    Z = z.double()
    residual = torch.linalg.matrix_norm(T @ Z - Z * lam.double()[:, None, :]) / (n * eps * torch.linalg.matrix_norm(T))
    orthogonality = torch.linalg.matrix_norm(Z.mT @ Z - torch.eye(n, dtype=torch.float64)) / (n * eps)
    return residual, orthogonality


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--tight", default="16", help="group tolerance in ε, comma-separated; 'none': per-lane shifts")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    for dtype in [getattr(torch, name) for name in args.dtypes.split(",")]:
        for tight in [None if t == "none" else float(t) for t in args.tight.split(",")]:
            worst_r = worst_o = 0.0
            bad = total = 0
            for kind in ("random", "ill", "rank", "cluster", "graded"):
                for n in (13, 33, 64, 128):
                    B = 400 if n <= 64 else 100
                    torch.manual_seed(args.seed)
                    A = symmetric(kind, (B,), n, dtype)
                    d, e = tridiagonalise(A)
                    lam = bisection(d, e)
                    z = eigenvectors(d, e, lam, tight, torch.Generator().manual_seed(args.seed))
                    r, o = ratios(d, e, lam, z)
                    worst_r, worst_o = max(worst_r, r.max().item()), max(worst_o, o.max().item())
                    over = int(((r > 30) | (o > 30)).sum())
                    bad, total = bad + over, total + B
                    if over:
                        print(f"  {kind} {n}: worst residual {r.max().item():.1f}, orthogonality {o.max().item():.1f}, "
                              f"{over} of {B} over 30", flush=True)
            print(f"{str(dtype)[6:]} tight {tight}: {bad} of {total} over 30; worst residual {worst_r:.2f}, "
                  f"orthogonality {worst_o:.2f}", flush=True)


if __name__ == "__main__":
    main()
