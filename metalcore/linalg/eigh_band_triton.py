"""Stage 2 of the two-stage symmetric eigensolver (:mod:`metalcore.linalg.eigh_twostage`): a band
matrix reduced to tridiagonal form by bulge chasing, and the back-transformation of its reflectors.

Layers: ``_band_wave_kernel`` / ``_band_wave_step_kernel`` / ``_band_to_tridiag_kernel`` →
:func:`band_to_tridiag`, ``_band_back_wave_kernel`` / ``_band_back_kernel`` /
``_band_back_sweep_tiles_kernel`` → :func:`apply_band_reflectors`; both called by
:func:`metalcore.linalg.eigh_twostage.eigh_twostage`.

**Bulge chasing** (Schwarz's one-column scheme, as LAPACK's ``dsytrd_sb2st`` kernels run it), one
program a matrix, the lower band of width ``b`` held in the matrix's own dense storage (only the
lower triangle is read or written). Sweep ``st = 0 … n − 3`` zeroes column ``st`` below the
sub-diagonal:

1. the reflector ``H`` of ``A[st+1 : st+b+1, st]`` (``dlarfg``) leaves ``β`` at the sub-diagonal;
2. with ``J`` its rows (``ℓ ≤ b`` of them) and ``K`` the ``≤ b`` rows below ``J``: ``A[J, J] ← H A[J, J] H``
   (``p = τ A v``, ``w = p − ½τ(pᵀv)v``, ``A ← A − v wᵀ − w vᵀ``) and ``A[K, J] ← A[K, J] H``, which fills
   the block ``A[K, J]`` below the band (the bulge);
3. the reflector of the bulge's first column ``A[K, J₀]`` is applied from the left to ``A[K, J]``
   (its first column becomes ``(β, 0, …)``), and becomes the next step's ``H`` with ``J ← K``.

The rest of each bulge lies one column to the right of where the next sweep's steps pass, and they
remove it: after ``n − 2`` sweeps ``A`` is tridiagonal. A step touches a ``2b × b`` window (rows
``J ∪ K``, columns ``J``), ``~8 b²`` flops and 4 dependent reductions (the reflector, ``Av``, ``pᵀv``,
the bulge's ``Av``); a matrix takes ``Σ_st ⌈(n − 2 − st)/b⌉ ≈ n²/(2b)`` steps (2,048 at n = 256,
b = 16; 32,768 at n = 1024). Its latency, not its ``~6 n² b`` flops, is the stage's cost
(bench/linalg.md, "two-stage eigh above 128").

**Schedules.** ``'sweeps'`` (``_band_to_tridiag_kernel``) takes the steps in that order, one at a
time. ``'wave'`` (``_band_wave_kernel``) runs step ``s`` of sweep ``st`` at time ``2·st + s``: every
sweep begun is in flight, one step each a time step, as a ``[slots, b, b]`` tile of windows. Step
``(st, s)``'s window starts at ``j₀ = st + 1 + s·b``; two steps overlap only if their ``j₀`` differ by
less than ``b``, which for sweeps ``δ ≥ 1`` apart means ``s' − s ≥ −1 − ⌊(δ − 1)/b⌋``: their time
steps then differ by ``2δ + s' − s > 0``, so every overlapping pair runs in the sequential order, and
two steps of one time step never share an entry. ``≈ 2n`` time steps instead of ``n²/(2b)`` steps;
at most ``⌈steps/2⌉`` sweeps in flight (a slot each, its next reflector carried in global memory).
This is the pipelined schedule of PLASMA's and MAGMA's bulge chasing, run in one program.
``'wave-launches'`` (``_band_wave_step_kernel``) runs the same time steps as launches, a few slots a
program, so that a time step's windows spread over several SMs (the launch boundary orders the time
steps).

**Back-transformation** ``Q₂ Z``: the reflectors are kept as ``√τ v`` (``H = I − w wᵀ``) at
``[sweep, step]`` and applied to the tridiagonal eigenvectors ``Z`` in reverse order, by programs of
``BC`` columns each (the columns are independent), ``4 b`` flops per column of ``Z`` and reflector:
``≈ 2n³`` per matrix. ``'sweeps'`` takes the ``n²/(2b)`` reflectors one at a time; ``'wave'`` walks the
time steps backwards, each time step's reflectors (disjoint rows) together; ``'sweep-tiles'``
walks the sweeps backwards, each sweep's reflectors (disjoint rows too) together.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from metalcore._triton import helper, jit
from metalcore.linalg.eigh_tridiag_triton import reflector
from metalcore.linalg.eigh_twostage import reflector_steps


@jit
def _band_to_tridiag_kernel(A, D, E, W, n, b, steps, s_ab, s_ar, s_ac, BB: tl.constexpr, BN: tl.constexpr,
                            WANT_V: tl.constexpr):
    mat = tl.program_id(0).to(tl.int64)
    base = A + mat * s_ab
    refl = W + mat * (n - 2) * steps * BB
    r = tl.arange(0, BB)
    rr = r[:, None]
    cc = r[None, :]
    for st in range(0, n - 2):
        j0 = st + 1
        ell = tl.minimum(b, n - j0)
        x = tl.load(base + (j0 + r) * s_ar + st * s_ac, mask=r < ell, other=0.0)
        v, tau, beta = reflector(x, r, 0)
        tl.store(base + (j0 + r) * s_ar + st * s_ac, tl.where(r == 0, beta, 0.0), mask=r < ell)
        step = 0
        while ell >= 2:
            if WANT_V:
                tl.store(refl + (st * steps + step) * BB + r, tl.sqrt(tau) * v)
            # A[J, J] ← H A[J, J] H on the mirrored lower triangle.
            inside = (rr < ell) & (cc < ell)
            hi = tl.maximum(rr, cc)
            lo = tl.minimum(rr, cc)
            y = tl.load(base + (j0 + hi) * s_ar + (j0 + lo) * s_ac, mask=inside, other=0.0)
            p = tau * tl.sum(y * v[None, :], axis=1)
            w = p - (0.5 * tau * tl.sum(p * v, axis=0)) * v
            y = y - v[:, None] * w[None, :] - w[:, None] * v[None, :]
            tl.debug_barrier()
            tl.store(base + (j0 + rr) * s_ar + (j0 + cc) * s_ac, y, mask=inside & (rr >= cc))
            # A[K, J] ← H_K (A[K, J] H): the bulge, and the next reflector from its first column.
            k0 = j0 + ell
            kl = tl.minimum(b, n - k0)
            below = (rr < kl) & (cc < ell)
            z = tl.load(base + (k0 + rr) * s_ar + (j0 + cc) * s_ac, mask=below, other=0.0)
            z = z - (tau * tl.sum(z * v[None, :], axis=1))[:, None] * v[None, :]
            v, tau, beta = reflector(tl.sum(tl.where(cc == 0, z, 0.0), axis=1), r, 0)
            z = z - (tau * v)[:, None] * tl.sum(v[:, None] * z, axis=0)[None, :]
            z = tl.where(cc == 0, tl.where(rr == 0, beta, 0.0), z)
            tl.store(base + (k0 + rr) * s_ar + (j0 + cc) * s_ac, z, mask=below)
            tl.debug_barrier()
            j0 = k0
            ell = kl
            step += 1

    i = tl.arange(0, BN)
    d = tl.load(base + i * (s_ar + s_ac), mask=i < n, other=0.0)
    e = tl.load(base + (i + 1) * s_ar + i * s_ac, mask=i < n - 1, other=0.0)
    tl.store(D + mat * n + i, d, mask=i < n)
    tl.store(E + mat * n + i, e, mask=i < n)


@helper
def _slot_reflectors(x, r):
    """Row ``k`` of the ``[slots, BB]`` tile ``x``: its reflector (:func:`reflector` on the transposed
    tile, one a column) as ``w = √τ v`` (``H = I − w wᵀ``), and ``β``, the entry it leaves in column 0."""
    v, tau, beta = reflector(tl.trans(x), r[:, None], 0)
    return tl.trans(tl.sqrt(tau)[None, :] * v), beta


@helper
def _wave_windows(base, refl, carry, t, k, n, b, steps, slots, s_ar, s_ac, r, BB: tl.constexpr, WANT_V: tl.constexpr):
    """The windows of the slots ``k`` at time step ``t`` of the wave (the module docstring): each
    slot's step of its sweep in flight, as one ``[slots, BB, BB]`` tile."""
    c2 = r[None, :]
    r3 = r[None, :, None]
    c3 = r[None, None, :]
    h = t // 2
    st = h - (h - k + slots) % slots                      # the latest sweep of slot k begun by time t
    s = t - 2 * st
    act = (k < slots) & (st >= 0) & (s <= (n - 3 - st) // b)
    first = act & (s == 0)
    j0 = st + 1 + s * b
    ell = tl.minimum(b, n - j0)
    # A sweep's first reflector, from column st below the diagonal.
    col = base + (j0[:, None] + c2) * s_ar + st[:, None] * s_ac
    head = first[:, None] & (c2 < ell[:, None])
    w0, beta0 = _slot_reflectors(tl.load(col, mask=head, other=0.0), r)
    tl.store(col, tl.where(c2 == 0, beta0[:, None], 0.0), mask=head)
    w = tl.load(carry + k[:, None] * BB + c2, mask=(act & (s > 0))[:, None], other=0.0)
    w = tl.where(first[:, None], w0, w)
    if WANT_V:
        tl.store(refl + (st * steps + s)[:, None] * BB + c2, w, mask=act[:, None])
    # A[J, J] ← H A[J, J] H on the mirrored lower triangle, every slot at once.
    j3 = j0[:, None, None]
    l3 = ell[:, None, None]
    inside = act[:, None, None] & (r3 < l3) & (c3 < l3)
    y = tl.load(base + (j3 + tl.maximum(r3, c3)) * s_ar + (j3 + tl.minimum(r3, c3)) * s_ac, mask=inside,
                other=0.0)
    p = tl.sum(y * w[:, None, :], axis=2)
    q = p - (0.5 * tl.sum(p * w, axis=1))[:, None] * w
    y = y - w[:, :, None] * q[:, None, :] - q[:, :, None] * w[:, None, :]
    tl.store(base + (j3 + r3) * s_ar + (j3 + c3) * s_ac, y, mask=inside & (r3 >= c3))
    # The bulge A[K, J] ← H_K (A[K, J] H) and the slot's next reflector H_K.
    k3 = j3 + l3
    below = act[:, None, None] & (r3 < tl.minimum(b, n - k3)) & (c3 < l3)
    z = tl.load(base + (k3 + r3) * s_ar + (j3 + c3) * s_ac, mask=below, other=0.0)
    z = z - tl.sum(z * w[:, None, :], axis=2)[:, :, None] * w[:, None, :]
    w2, beta2 = _slot_reflectors(tl.sum(tl.where(c3 == 0, z, 0.0), axis=2), r)
    z = z - w2[:, :, None] * tl.sum(w2[:, :, None] * z, axis=1)[:, None, :]
    z = tl.where(c3 == 0, tl.where(r3 == 0, beta2[:, None, None], 0.0), z)
    tl.store(base + (k3 + r3) * s_ar + (j3 + c3) * s_ac, z, mask=below)
    tl.store(carry + k[:, None] * BB + c2, w2, mask=act[:, None])


@jit
def _band_wave_kernel(A, D, E, W, C, n, b, steps, slots, s_ab, s_ar, s_ac, BB: tl.constexpr, BN: tl.constexpr,
                      KC: tl.constexpr, WANT_V: tl.constexpr):
    mat = tl.program_id(0).to(tl.int64)
    base = A + mat * s_ab
    refl = W + mat * (n - 2) * steps * BB
    carry = C + mat * slots * BB                          # each slot's next reflector, w = √τ v
    r = tl.arange(0, BB)
    kk = tl.arange(0, KC)
    # Sweep st takes step s at time 2·st + s: two steps in flight then never share an entry
    # (module docstring), and the last sweep, n − 3, has its one step at time 2n − 6.
    for t in range(0, 2 * n - 5):
        for c0 in range(0, slots, KC):
            _wave_windows(base, refl, carry, t, c0 + kk, n, b, steps, slots, s_ar, s_ac, r, BB, WANT_V)
        tl.debug_barrier()

    i = tl.arange(0, BN)
    d = tl.load(base + i * (s_ar + s_ac), mask=i < n, other=0.0)
    e = tl.load(base + (i + 1) * s_ar + i * s_ac, mask=i < n - 1, other=0.0)
    tl.store(D + mat * n + i, d, mask=i < n)
    tl.store(E + mat * n + i, e, mask=i < n)


@jit
def _band_wave_step_kernel(A, W, C, t, n, b, steps, slots, s_ab, s_ar, s_ac, BB: tl.constexpr, KC: tl.constexpr,
                           WANT_V: tl.constexpr):
    """Program ``(matrix, chunk)``: the windows of the slots ``chunk · KC + [0, KC)`` at time step ``t``
    of the wave; one launch a time step (``'wave-launches'``)."""
    mat = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1) * KC + tl.arange(0, KC)
    _wave_windows(A + mat * s_ab, W + mat * (n - 2) * steps * BB, C + mat * slots * BB, t, k, n, b, steps, slots,
                  s_ar, s_ac, tl.arange(0, BB), BB, WANT_V)


# Stage 2's schedule. 'wave': one launch runs every sweep in flight at once, a step of each a time
# step (``_band_wave_kernel``): ≈ 2n time steps of up to ⌈steps/2⌉ windows, against ≈ n²/(2b) steps
# one after another ('sweeps', ``_band_to_tridiag_kernel``): 507 against 2,048 at n = 256, b = 16,
# 2,043 against 32,768 at n = 1024. H100, b = 16, GPU ms, 'wave' against 'sweeps': 1.24 / 2.05 at
# 64×256², 3.75 / 7.98 at 16×512², 15.1 / 33.7 at 8×1024² (bench/linalg.md).
# 'wave-launches': the wave's time steps as launches, one program a few windows (WAVE_LAUNCH_SLOTS),
# so that a matrix's windows of a time step run on several SMs where the wave kernel takes them in
# chunks of 16 in one program: ~2n launches, dependent nodes of a few µs each in the op's CUDA graph,
# against the wave's 7.4 µs a time step at 8×1024² (15.1 ms / 2,043); ~20 µs of host time a launch
# eager. Not yet timed (bench/linalg.md, "the wave's time steps as launches").
SCHEDULES = ("wave", "sweeps", "wave-launches")
SCHEDULE = "wave"
WAVE_LAUNCH_SLOTS = 2
# The back-transformation's default schedule by order: both read the same reflectors (a sweep's
# steps keep their order in either), so it is chosen apart from stage 2's. H100, b = 16, GPU ms,
# 'wave' against 'sweeps': 1.75 / 1.15 at 64×256² (the wave's window tiles cost more than its 2n
# time steps save there), 1.72 / 4.10 at 16×512², 7.8 / 16.8 at 8×1024².
WAVE_BACK_MIN_N = 512
# The back-transformation's schedules: stage 2's two, and 'sweep-tiles' (``_band_back_sweep_tiles_kernel``):
# the sweeps backwards, each sweep's reflectors (disjoint rows) applied together as one
# ``[steps, b, columns]`` tile — n − 2 dependent steps, where 'sweeps' takes ≈ n²/(2b) and 'wave'
# 2n − 5 of the same tile size (254 / 2,048 / 507 at n = 256, b = 16; 1,022 / 32,768 / 2,043 at
# 1024). Not yet timed: predicted ~0.9 ms at 64×256² and ~4 ms at 8×1024² (half the wave's steps
# at its cost a step; bench/linalg.md), so not a default until measured.
BACK_SCHEDULES = ("wave", "sweeps", "sweep-tiles")
# Entries of one [slots, BB, BB] window tile of the wave kernel: 16 windows of 16 × 16 (4,096, 32 a
# lane at 4 warps); more slots than that are taken in chunks. Not yet timed.
WAVE_TILE = 4096


def band_to_tridiag(S: Tensor, b: int, compute_v: bool, schedule: str | None = None
                    ) -> tuple[Tensor, Tensor, Tensor | None]:
    """The symmetric matrices ``S`` ``(B, n, n)`` (lower band of width ``b``: every entry below it zero;
    the upper triangle is not read), reduced in place to tridiagonal form. Returns ``(d, e, W)``:
    the diagonals ``(B, n)``, the sub-diagonals ``(B, n)`` (``e[:, i] = T[i + 1, i]``, the last entry
    0) and, with ``compute_v``, the reflectors for :func:`apply_band_reflectors` (else ``None``).
    ``schedule``: one of :data:`SCHEDULES` (default :data:`SCHEDULE`)."""
    schedule = SCHEDULE if schedule is None else schedule
    if schedule not in SCHEDULES:
        raise ValueError(f"metalcore band_to_tridiag: schedule must be one of {SCHEDULES}; got {schedule!r}")
    B, n, _ = S.shape
    d = torch.empty(B, n, dtype=S.dtype, device=S.device)
    e = torch.empty_like(d)
    if B == 0 or n == 0:
        return d, e, (S.new_empty(B, 0) if compute_v else None)
    BB = triton.next_power_of_2(max(b, 2))
    BN = triton.next_power_of_2(n)
    steps = reflector_steps(n, b)
    W = torch.empty(B, max(n - 2, 0) * steps * BB, dtype=S.dtype, device=S.device) if compute_v else d
    strides = (S.stride(0), S.stride(1), S.stride(2))
    if schedule == "sweeps" or b < 2 or n < 3:           # width 1: already tridiagonal, nothing in flight
        # One warp holds a 16 × 16 window in registers (8 entries a lane); two a 32 × 32. Not yet timed.
        _band_to_tridiag_kernel[(B,)](S, d, e, W, n, b, steps, *strides, BB=BB, BN=BN, WANT_V=compute_v,
                                      num_warps=1 if BB <= 16 else 2)
        return d, e, (W if compute_v else None)
    slots = triton.cdiv(steps, 2)
    carry = torch.empty(B, slots * BB, dtype=S.dtype, device=S.device)   # each slot's next reflector
    if schedule == "wave-launches":
        KC = min(triton.next_power_of_2(slots), WAVE_LAUNCH_SLOTS)
        for t in range(2 * n - 5):
            _band_wave_step_kernel[(B, triton.cdiv(slots, KC))](S, W, carry, t, n, b, steps, slots, *strides, BB=BB,
                                                                KC=KC, WANT_V=compute_v, num_warps=1)
        d.copy_(S.diagonal(0, 1, 2))
        e[:, : n - 1] = S.diagonal(-1, 1, 2)
        e[:, n - 1] = 0.0
    else:
        _band_wave_kernel[(B,)](S, d, e, W, carry, n, b, steps, slots, *strides, BB=BB, BN=BN,
                                KC=min(triton.next_power_of_2(slots), max(1, WAVE_TILE // (BB * BB))),
                                WANT_V=compute_v, num_warps=4)
    return d, e, (W if compute_v else None)


@jit
def _band_back_kernel(W, Z, n, ncols, b, steps, s_zb, s_zr, s_zc, BB: tl.constexpr, BC: tl.constexpr):
    mat = tl.program_id(0).to(tl.int64)
    refl = W + mat * (n - 2) * steps * BB
    r = tl.arange(0, BB)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    at = Z + mat * s_zb + cols[None, :] * s_zc
    for u in range(0, n - 2):
        st = n - 3 - u
        count = (n - 3 - st) // b + 1                       # the sweep's steps: j0 = st + 1 + s·b ≤ n − 2
        for t in range(0, count):
            s = count - 1 - t
            j0 = st + 1 + s * b
            ell = tl.minimum(b, n - j0)
            w = tl.load(refl + (st * steps + s) * BB + r)
            inside = (r[:, None] < ell) & (cols[None, :] < ncols)
            z = tl.load(at + (j0 + r[:, None]) * s_zr, mask=inside, other=0.0)
            z = z - w[:, None] * tl.sum(w[:, None] * z, axis=0)[None, :]
            tl.store(at + (j0 + r[:, None]) * s_zr, z, mask=inside)
            tl.debug_barrier()


@helper
def _reflect_windows(refl, at, st, s, act, n, b, steps, s_zr, cols, ncols, BB: tl.constexpr):
    """``Z ← H Z`` for each active reflector of a ``[k]`` tile: reflector ``s`` of sweep ``st`` (``w = √τ v``
    at ``refl + (st · steps + s) · BB``) on its rows ``j₀ = st + 1 + s·b …`` of the columns ``cols`` of
    ``Z`` at ``at``; the windows of one tile must touch disjoint rows."""
    r = tl.arange(0, BB)
    r3 = r[None, :, None]
    j0 = st + 1 + s * b
    ell = tl.minimum(b, n - j0)
    w = tl.load(refl + (st * steps + s)[:, None] * BB + r[None, :], mask=act[:, None], other=0.0)
    rows = j0[:, None, None] + r3
    inside = act[:, None, None] & (r3 < ell[:, None, None]) & (cols[None, None, :] < ncols)
    z = tl.load(at + rows * s_zr, mask=inside, other=0.0)
    z = z - w[:, :, None] * tl.sum(w[:, :, None] * z, axis=1)[:, None, :]
    tl.store(at + rows * s_zr, z, mask=inside)


@jit
def _band_back_wave_kernel(W, Z, n, ncols, b, steps, slots, s_zb, s_zr, s_zc, BB: tl.constexpr, BC: tl.constexpr,
                           KC: tl.constexpr):
    mat = tl.program_id(0).to(tl.int64)
    refl = W + mat * (n - 2) * steps * BB
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    at = Z + mat * s_zb + cols[None, None, :] * s_zc
    kk = tl.arange(0, KC)
    # The bulge chase's time steps backwards: the reflectors of one time step act on disjoint rows.
    for u in range(0, 2 * n - 5):
        t = 2 * n - 6 - u
        h = t // 2
        for c0 in range(0, slots, KC):
            k = c0 + kk
            st = h - (h - k + slots) % slots
            s = t - 2 * st
            act = (k < slots) & (st >= 0) & (s <= (n - 3 - st) // b)
            _reflect_windows(refl, at, st, s, act, n, b, steps, s_zr, cols, ncols, BB)
        tl.debug_barrier()


@jit
def _band_back_sweep_tiles_kernel(W, Z, n, ncols, b, steps, s_zb, s_zr, s_zc, BB: tl.constexpr, BC: tl.constexpr,
                                  KC: tl.constexpr):
    mat = tl.program_id(0).to(tl.int64)
    refl = W + mat * (n - 2) * steps * BB
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    at = Z + mat * s_zb + cols[None, None, :] * s_zc
    kk = tl.arange(0, KC)
    # The sweeps backwards; a sweep's reflectors act on disjoint rows, so they go together.
    for u in range(0, n - 2):
        st = n - 3 - u
        count = (n - 3 - st) // b + 1
        for c0 in range(0, count, KC):
            s = c0 + kk
            _reflect_windows(refl, at, st, s, s < count, n, b, steps, s_zr, cols, ncols, BB)
        tl.debug_barrier()


# Columns of Z a program of the back-transformation: 32 columns of a 16-row window are 512 entries,
# two warps at 8 a lane ('sweeps'); 16 columns of up to 16 windows ('wave'). Not yet timed.
BACK_COLUMNS = 32
WAVE_BACK_COLUMNS = 16


def apply_band_reflectors(W: Tensor, Z: Tensor, b: int, columns: int | None = None,
                          schedule: str | None = None) -> Tensor:
    """``Z ← Q₂ Z`` in place for ``Z`` ``(B, n, k)``, with ``Q₂`` the product of the reflectors
    :func:`band_to_tridiag` kept in ``W``: ``Q₂ᵀ S Q₂`` is the tridiagonal matrix it returned.
    ``columns``: of ``Z`` a program; ``schedule``: one of :data:`BACK_SCHEDULES`, whichever stage 2
    ran (the reflectors of one time step of the wave, or of one sweep, touch disjoint rows, so they are
    applied together); by default ``'wave'`` from :data:`WAVE_BACK_MIN_N` rows on, else ``'sweeps'``."""
    if schedule is None:
        schedule = "wave" if Z.shape[1] >= WAVE_BACK_MIN_N else "sweeps"
    if schedule not in BACK_SCHEDULES:
        raise ValueError(f"metalcore apply_band_reflectors: schedule must be one of {BACK_SCHEDULES}; "
                         f"got {schedule!r}")
    B, n, k = Z.shape
    if B == 0 or n < 3 or k == 0 or b < 2:          # a band of width 1 is tridiagonal: no reflectors
        return Z
    BB = triton.next_power_of_2(max(b, 2))
    steps = reflector_steps(n, b)
    strides = (Z.stride(0), Z.stride(1), Z.stride(2))
    if schedule == "wave":
        columns = columns or WAVE_BACK_COLUMNS
        slots = triton.cdiv(steps, 2)
        KC = min(triton.next_power_of_2(slots), max(1, WAVE_TILE // (BB * columns)))
        _band_back_wave_kernel[(B, triton.cdiv(k, columns))](W, Z, n, k, b, steps, slots, *strides, BB=BB,
                                                            BC=columns, KC=KC, num_warps=4)
        return Z
    if schedule == "sweep-tiles":
        columns = columns or WAVE_BACK_COLUMNS
        KC = min(triton.next_power_of_2(steps), max(1, WAVE_TILE // (BB * columns)))
        _band_back_sweep_tiles_kernel[(B, triton.cdiv(k, columns))](W, Z, n, k, b, steps, *strides, BB=BB,
                                                                    BC=columns, KC=KC, num_warps=4)
        return Z
    columns = columns or BACK_COLUMNS
    _band_back_kernel[(B, triton.cdiv(k, columns))](W, Z, n, k, b, steps, *strides, BB=BB, BC=columns,
                                                   num_warps=max(1, min(4, BB * columns // 256)))
    return Z
