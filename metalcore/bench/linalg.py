"""Linear-algebra cases: batches of small matrices and large LLM-sized matrices, in fp32.

Batched shapes (the same on every device: torch's CPU LAPACK does the whole set in ~1 s, so the
CPU times the real workloads): 500×16×16, 1000×32×32, 100×64×64, 4096×8×8, 64×128×128,
10000×3×3. Large shapes: 4096×4096 and 11008×4096 on GPUs (svd, qr; eigh square only), scaled
by 1/4 to 1024×1024 and 2752×1024 on the CPU.

Peers: ``torch.linalg`` eager; on CUDA once with each of its libraries (cuSOLVER, MAGMA) since its
heuristic choice is not always the faster; on MPS also through the CPU (copy there, solve, copy
back), which is what torch does for the ops MPS lacks.

FLOPs are the LAPACK counts per matrix (Golub & Van Loan, *Matrix Computations*, 4th ed., §5.2,
§8.3; the SVD as the cheaper of Golub–Reinsch and R-SVD): they credit the classic algorithm's
work, so a method that does more arithmetic (Jacobi) shows a lower TFLOP/s for the same time.
Bytes: the input read once and every output written once.
"""

from __future__ import annotations

import math

import torch
from torch.utils._pytree import tree_map

from metalcore.bench.harness import Bench, Context, case, metalcore_fn

BATCHED = [dict(shape=s) for s in ((500, 16, 16), (1000, 32, 32), (100, 64, 64), (4096, 8, 8), (64, 128, 128),
                                   (10000, 3, 3))]
LARGE = [dict(shape=(4096, 4096)), dict(shape=(11008, 4096))]
LARGE_SMALL = [dict(shape=(1024, 1024)), dict(shape=(2752, 1024))]
DTYPE = torch.float32
_F32 = 4


def _label(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _count(shape: tuple[int, ...]) -> int:
    return math.prod(shape[:-2])


def _peers(ctx: Context, fn, *args, **kwargs) -> dict:
    """``fn(*args, **kwargs)`` (a ``torch.linalg`` function) on this device, in every variant worth
    beating (see the module docstring), as zero-argument callables."""
    if ctx.device.type == "cuda":
        def with_library(name):
            def call():
                previous = torch.backends.cuda.preferred_linalg_library()
                torch.backends.cuda.preferred_linalg_library(name)
                try:
                    return fn(*args, **kwargs)
                finally:
                    torch.backends.cuda.preferred_linalg_library(previous)
            return call
        return {"torch cusolver": with_library("cusolver"), "torch magma": with_library("magma")}
    peers = {"torch": lambda: fn(*args, **kwargs)}
    if ctx.device.type == "mps":
        def via_cpu():
            out = fn(*(a.cpu() for a in args), **kwargs)
            return tree_map(lambda t: t.to(ctx.device) if isinstance(t, torch.Tensor) else t, out)
        peers["torch via cpu"] = via_cpu
    return peers


def _general(ctx: Context, shape) -> torch.Tensor:
    return torch.randn(*shape, device=ctx.device, dtype=DTYPE)


def _spd(ctx: Context, shape) -> torch.Tensor:
    """Symmetric positive definite, well conditioned (eigenvalues in about [1, 5])."""
    n = shape[-1]
    A = torch.randn(*shape, device=ctx.device, dtype=DTYPE)
    return A @ A.mT / n + torch.eye(n, device=ctx.device, dtype=DTYPE)


@case("qr", family="linalg", full=BATCHED + LARGE, small=BATCHED + LARGE_SMALL)
def qr(ctx: Context, shape) -> Bench:
    fn = metalcore_fn("linalg.qr")
    A = _general(ctx, shape)
    m, n = shape[-2:]
    k = min(m, n)
    # geqrf 2mn² − 2n³/3, then orgqr the same again for the reduced Q.
    flops = _count(shape) * 2 * (2 * m * n * k - 2 * k**3 / 3)
    return Bench(metalcore=lambda: fn(A), peers=_peers(ctx, torch.linalg.qr, A),
                 shape=_label(shape), dtype=DTYPE, flops=flops,
                 bytes=_F32 * _count(shape) * (2 * m * n + k * n),
                 canonical=lambda out: out[1].abs())  # R is unique up to the signs of its rows


@case("svd", family="linalg", full=BATCHED + LARGE, small=BATCHED + LARGE_SMALL)
def svd(ctx: Context, shape) -> Bench:
    fn = metalcore_fn("linalg.svd")
    A = _general(ctx, shape)
    m, n = max(shape[-2:]), min(shape[-2:])
    flops = _count(shape) * min(14 * m * n * n + 8 * n**3, 6 * m * n * n + 20 * n**3)
    return Bench(metalcore=lambda: fn(A, full_matrices=False),
                 peers=_peers(ctx, torch.linalg.svd, A, full_matrices=False),
                 shape=_label(shape), dtype=DTYPE, flops=flops,
                 bytes=_F32 * _count(shape) * (2 * m * n + n + n * n),
                 canonical=lambda out: out[1])  # the singular values; vectors are free up to sign


@case("eigh", family="linalg", full=BATCHED + LARGE[:1], small=BATCHED + LARGE_SMALL[:1])
def eigh(ctx: Context, shape) -> Bench:
    fn = metalcore_fn("linalg.eigh")
    A = _spd(ctx, shape)
    n = shape[-1]
    return Bench(metalcore=lambda: fn(A), peers=_peers(ctx, torch.linalg.eigh, A),
                 shape=_label(shape), dtype=DTYPE, flops=_count(shape) * 9 * n**3,
                 bytes=_F32 * _count(shape) * (2 * n * n + n),
                 canonical=lambda out: out[0])  # the eigenvalues


@case("cholesky", family="linalg", full=BATCHED)
def cholesky(ctx: Context, shape) -> Bench:
    fn = metalcore_fn("linalg.cholesky")
    A = _spd(ctx, shape)
    n = shape[-1]
    return Bench(metalcore=lambda: fn(A), peers=_peers(ctx, torch.linalg.cholesky, A),
                 shape=_label(shape), dtype=DTYPE, flops=_count(shape) * n**3 / 3,
                 bytes=_F32 * _count(shape) * 2 * n * n)


@case("solve", family="linalg", full=BATCHED)
def solve(ctx: Context, shape) -> Bench:
    """``A X = B`` with ``A`` general (LU with pivoting) and ``B`` as many columns as ``A``."""
    fn = metalcore_fn("linalg.solve")
    n = shape[-1]
    A = _general(ctx, shape) + n**0.5 * torch.eye(n, device=ctx.device, dtype=DTYPE)
    B = _general(ctx, shape)
    return Bench(metalcore=lambda: fn(A, B), peers=_peers(ctx, torch.linalg.solve, A, B),
                 shape=_label(shape), dtype=DTYPE, flops=_count(shape) * (2 * n**3 / 3 + 2 * n**3),
                 bytes=_F32 * _count(shape) * 3 * n * n, note="B: n right-hand sides")


@case("solve_triangular", family="linalg", full=BATCHED)
def solve_triangular(ctx: Context, shape) -> Bench:
    """``L X = B`` with ``L`` lower triangular (a Cholesky factor) and ``B`` as many columns as ``L``."""
    fn = metalcore_fn("linalg.solve_triangular")
    n = shape[-1]
    L = torch.linalg.cholesky(_spd(ctx, shape))
    B = _general(ctx, shape)
    return Bench(metalcore=lambda: fn(L, B, upper=False),
                 peers=_peers(ctx, torch.linalg.solve_triangular, L, B, upper=False),
                 shape=_label(shape), dtype=DTYPE, flops=_count(shape) * n**3,
                 bytes=_F32 * _count(shape) * (n * n / 2 + 2 * n * n), note="B: n right-hand sides")


# --- values only, derived factors, least squares ---------------------------------------------------

@case("svdvals", family="linalg", full=BATCHED + LARGE, small=BATCHED + LARGE_SMALL)
def svdvals(ctx: Context, shape) -> Bench:
    """Singular values alone (bidiagonalisation + QR iteration, no vectors): 4mn² − 4n³/3."""
    fn = metalcore_fn("linalg.svdvals")
    A = _general(ctx, shape)
    m, n = max(shape[-2:]), min(shape[-2:])
    return Bench(metalcore=lambda: fn(A), peers=_peers(ctx, torch.linalg.svdvals, A), shape=_label(shape),
                 dtype=DTYPE, flops=_count(shape) * (4 * m * n * n - 4 * n**3 / 3),
                 bytes=_F32 * _count(shape) * (m * n + n))


@case("eigvalsh", family="linalg", full=BATCHED + LARGE[:1], small=BATCHED + LARGE_SMALL[:1])
def eigvalsh(ctx: Context, shape) -> Bench:
    """Eigenvalues alone (tridiagonalisation + QR iteration): 4n³/3."""
    fn = metalcore_fn("linalg.eigvalsh")
    A = _spd(ctx, shape)
    n = shape[-1]
    return Bench(metalcore=lambda: fn(A), peers=_peers(ctx, torch.linalg.eigvalsh, A), shape=_label(shape),
                 dtype=DTYPE, flops=_count(shape) * 4 * n**3 / 3, bytes=_F32 * _count(shape) * (n * n + n))


@case("householder_product", family="linalg", full=BATCHED + LARGE, small=BATCHED + LARGE_SMALL)
def householder_product(ctx: Context, shape) -> Bench:
    """LAPACK ``orgqr``: the reduced Q from ``geqrf``'s reflectors: 2mn² − 2n³/3."""
    fn = metalcore_fn("linalg.householder_product")
    reflectors, tau = torch.geqrf(_general(ctx, shape))
    m, n = shape[-2:]
    return Bench(metalcore=lambda: fn(reflectors, tau),
                 peers=_peers(ctx, torch.linalg.householder_product, reflectors, tau),
                 shape=_label(shape), dtype=DTYPE, flops=_count(shape) * (2 * m * n * n - 2 * n**3 / 3),
                 bytes=_F32 * _count(shape) * (2 * m * n + n))


@case("polar", family="linalg", full=BATCHED + LARGE, small=BATCHED + LARGE_SMALL)
def polar(ctx: Context, shape) -> Bench:
    """The orthogonal polar factor ``U Vᴴ`` (Muon's update direction). Peer: torch's SVD and the
    product, the exact method; Newton–Schulz iterations are approximate and belong to the Muon case."""
    fn = metalcore_fn("linalg.polar", "polar", "linalg.polar.polar")
    A = _general(ctx, shape)
    m, n = max(shape[-2:]), min(shape[-2:])

    def torch_polar(A):
        U, _, Vh = torch.linalg.svd(A, full_matrices=False)
        return U @ Vh

    flops = _count(shape) * (min(14 * m * n * n + 8 * n**3, 6 * m * n * n + 20 * n**3) + 2 * m * n * n)
    return Bench(metalcore=lambda: fn(A), peers=_peers(ctx, torch_polar, A), shape=_label(shape), dtype=DTYPE,
                 flops=flops, bytes=_F32 * _count(shape) * 2 * m * n)


_TALL = [dict(shape=s) for s in ((500, 32, 16), (1000, 64, 32), (64, 256, 128))]


@case("lstsq", family="linalg", full=_TALL + [dict(shape=(11008, 4096))], small=_TALL + [dict(shape=(2752, 1024))])
def lstsq(ctx: Context, shape) -> Bench:
    """``min ‖A X − B‖`` for tall full-rank ``A`` and 16 right-hand sides, the ``gels`` driver (QR;
    the only one torch has on CUDA): 2mn² − 2n³/3 + 4mnk + n²k."""
    fn = metalcore_fn("linalg.lstsq")
    A = _general(ctx, shape)
    m, n = shape[-2:]
    k = 16
    B = torch.randn(*shape[:-1], k, device=ctx.device, dtype=DTYPE)
    flops = _count(shape) * (2 * m * n * n - 2 * n**3 / 3 + 4 * m * n * k + n * n * k)
    return Bench(metalcore=lambda: fn(A, B, driver="gels"), peers=_peers(ctx, torch.linalg.lstsq, A, B, driver="gels"),
                 shape=_label(shape), dtype=DTYPE, flops=flops, bytes=_F32 * _count(shape) * (m * n + m * k + n * k),
                 canonical=lambda out: out[0], note="B: 16 right-hand sides")


@case("pinv", family="linalg", full=BATCHED)
def pinv(ctx: Context, shape) -> Bench:
    """Moore–Penrose inverse through the SVD: the SVD, then ``V diag(1/σ) Uᴴ`` (2n³ more)."""
    fn = metalcore_fn("linalg.pinv")
    A = _general(ctx, shape)
    n = shape[-1]
    return Bench(metalcore=lambda: fn(A), peers=_peers(ctx, torch.linalg.pinv, A), shape=_label(shape),
                 dtype=DTYPE, flops=_count(shape) * (22 * n**3 + 2 * n**3), bytes=_F32 * _count(shape) * 2 * n * n)


# --- Householder building blocks (LAPACK names, top level) -------------------------------------------

@case("geqr2", family="linalg", full=BATCHED + LARGE, small=BATCHED + LARGE_SMALL)
def geqr2(ctx: Context, shape) -> Bench:
    """Compact Householder QR (``torch.geqrf``'s output): 2mn² − 2n³/3."""
    fn = metalcore_fn("geqr2", "linalg.householder.geqr2")
    A = _general(ctx, shape)
    m, n = shape[-2:]
    return Bench(metalcore=lambda: fn(A), peers=_peers(ctx, torch.geqrf, A), shape=_label(shape), dtype=DTYPE,
                 flops=_count(shape) * (2 * m * n * n - 2 * n**3 / 3), bytes=_F32 * _count(shape) * (2 * m * n + n),
                 canonical=lambda out: out[0].triu().abs())  # |R|: reflector signs are free


@case("larfb", family="linalg", full=BATCHED)
def larfb(ctx: Context, shape) -> Bench:
    """``H C`` with the block reflector ``H = I − V T Vᴴ`` of a full QR (k = n) and a square ``C``;
    peer ``torch.ormqr`` (LAPACK's apply-Q, from ``tau`` rather than ``T``): about 4n³ each."""
    fn = metalcore_fn("larfb", "linalg.householder.larfb")
    T_of = metalcore_fn("larft", "linalg.householder.larft")
    V, tau = torch.geqrf(_general(ctx, shape))
    T = T_of(V, tau)
    C = _general(ctx, shape)
    n = shape[-1]
    return Bench(metalcore=lambda: fn(V, T, C), peers=_peers(ctx, torch.ormqr, V, tau, C), shape=_label(shape),
                 dtype=DTYPE, flops=_count(shape) * 4 * n**3, bytes=_F32 * _count(shape) * 3 * n * n)
