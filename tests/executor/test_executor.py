"""The CPU executor for Metal (metalcore.executor) against known results: purpose-written shaders for each Metal
feature the project's shaders rely on, and the limits and errors it must enforce.

Most kernels live in one source (one compile, cached on disk across runs); the negative
compile-time tests each need their own source.
"""

import math

import pytest
import torch

SOURCE = r"""
#include <metal_stdlib>
using namespace metal;

kernel void fill(device float* out, constant float& v, uint i [[thread_position_in_grid]]) {
    out[i] = v;
}

kernel void saxpy(device const float* x [[buffer(0)]], device float* y [[buffer(1)]],
                  constant float& a [[buffer(2)]], constant uint& n [[buffer(3)]],
                  uint i [[thread_position_in_grid]]) {
    if (i >= n) return;
    y[i] = fma(a, x[i], y[i]);
}

// Tree reduction in threadgroup memory: one sum per threadgroup, any group size (edge groups too).
kernel void tg_tree_sum(device const float* x, device float* out, constant uint& n,
                        uint gid [[thread_position_in_grid]], uint tid [[thread_position_in_threadgroup]],
                        uint group [[threadgroup_position_in_grid]], uint tpg [[threads_per_threadgroup]]) {
    threadgroup float buf[1024];
    buf[tid] = gid < n ? x[gid] : 0.0f;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint stride = 1; stride < tpg; stride *= 2) {
        float other = (tid % (2 * stride) == 0 && tid + stride < tpg) ? buf[tid + stride] : 0.0f;
        threadgroup_barrier(mem_flags::mem_threadgroup);
        buf[tid] += other;
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    if (tid == 0) out[group] = buf[0];
}

// SIMD-group reductions, per lane: sum, max, min, and the SIMD-group layout builtins.
kernel void simd_reduce(device const float* x, device float* sums, device float* maxs, device float* mins,
                        device uint* layout, uint gid [[thread_position_in_grid]],
                        uint lane [[thread_index_in_simdgroup]], uint sg [[simdgroup_index_in_threadgroup]],
                        uint nsg [[simdgroups_per_threadgroup]], uint tidx [[thread_index_in_threadgroup]]) {
    float v = x[gid];
    sums[gid] = simd_sum(v);
    maxs[gid] = simd_max(v);
    mins[gid] = simd_min(v);
    layout[4 * gid + 0] = lane;
    layout[4 * gid + 1] = sg;
    layout[4 * gid + 2] = nsg;
    layout[4 * gid + 3] = tidx;
}

kernel void simd_prefix(device const int* x, device int* excl, device int* incl, device float* fexcl,
                        uint gid [[thread_position_in_grid]]) {
    excl[gid] = simd_prefix_exclusive_sum(x[gid]);
    incl[gid] = simd_prefix_inclusive_sum(x[gid]);
    fexcl[gid] = simd_prefix_exclusive_sum(float(x[gid]));
}

kernel void simd_shuffles(device const float* x, device float* out, constant uint& delta,
                          uint gid [[thread_position_in_grid]], uint lane [[thread_index_in_simdgroup]]) {
    float v = x[gid];
    out[6 * gid + 0] = simd_shuffle(v, (lane + 5) % 32);
    out[6 * gid + 1] = simd_shuffle_down(v, delta);
    out[6 * gid + 2] = simd_shuffle_up(v, delta);
    out[6 * gid + 3] = simd_shuffle_xor(v, delta);
    out[6 * gid + 4] = simd_broadcast(v, 3);
    out[6 * gid + 5] = simd_broadcast_first(v);
}

kernel void simd_votes(device const int* x, device ulong* ballot, device int* flags,
                       uint gid [[thread_position_in_grid]]) {
    bool b = x[gid] != 0;
    ballot[gid] = static_cast<ulong>(simd_ballot(b));
    flags[3 * gid + 0] = simd_any(b);
    flags[3 * gid + 1] = simd_all(b);
    flags[3 * gid + 2] = simd_is_first();
}

// Lanes in different branches form different SIMD-group rendezvous.
kernel void simd_divergent(device float* out, uint lane [[thread_index_in_simdgroup]],
                           uint gid [[thread_position_in_grid]]) {
    if (lane < 10) {
        out[gid] = simd_sum(1.0f);
    } else {
        out[gid] = simd_sum(100.0f);
    }
}

// A vector SIMD-group reduction.
kernel void simd_vector(device float4* out, uint gid [[thread_position_in_grid]]) {
    out[gid] = simd_sum(float4(1.0f, float(gid), 2.0f, -1.0f));
}

kernel void atomics(device const int* bins_of, device atomic_int* hist, device atomic_uint* total,
                    device atomic_float* fsum, device atomic_int* imax, uint gid [[thread_position_in_grid]]) {
    atomic_fetch_add_explicit(&hist[bins_of[gid]], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(total, 2u, memory_order_relaxed);
    atomic_fetch_add_explicit(fsum, 0.5f, memory_order_relaxed);
    atomic_fetch_max_explicit(imax, int(gid), memory_order_relaxed);
}

kernel void tg_atomic(device int* out, uint tid [[thread_position_in_threadgroup]],
                      uint group [[threadgroup_position_in_grid]]) {
    threadgroup atomic_int counter;
    if (tid == 0) atomic_store_explicit(&counter, 0, memory_order_relaxed);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    atomic_fetch_add_explicit(&counter, int(tid), memory_order_relaxed);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (tid == 0) out[group] = atomic_load_explicit(&counter, memory_order_relaxed);
}

kernel void grid2d(device int* out, device uint* meta, constant uint& width, constant uint& height,
                   uint2 pos [[thread_position_in_grid]], uint2 tg [[threadgroup_position_in_grid]],
                   uint2 tpg [[threads_per_threadgroup]], uint2 grid [[threads_per_grid]],
                   uint2 ltid [[thread_position_in_threadgroup]]) {
    if (pos.x >= width || pos.y >= height) return;
    uint i = pos.y * width + pos.x;
    out[i] = int(pos.x + 1000 * pos.y);
    meta[6 * i + 0] = tg.x;
    meta[6 * i + 1] = tg.y;
    meta[6 * i + 2] = tpg.x;
    meta[6 * i + 3] = tpg.y;
    meta[6 * i + 4] = grid.x * grid.y;
    meta[6 * i + 5] = ltid.x + 100 * ltid.y;
}

kernel void grid3d(device int* out, uint3 pos [[thread_position_in_grid]], uint3 size [[threads_per_grid]],
                   uint3 groups [[threadgroups_per_grid]]) {
    uint i = (pos.z * size.y + pos.y) * size.x + pos.x;
    out[2 * i] = int(pos.x + 100 * pos.y + 10000 * pos.z);
    out[2 * i + 1] = int(groups.x * groups.y * groups.z);
}

// 2-D threadgroup array: a transpose through threadgroup memory.
kernel void tg_transpose(device const float* x, device float* y, uint2 t [[thread_position_in_threadgroup]]) {
    threadgroup float tile[8][9];
    tile[t.y][t.x] = x[t.y * 8 + t.x];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    y[t.y * 8 + t.x] = tile[t.x][t.y];
}

template <typename T>
static void scale_impl(device const T* x, device T* y, float s, uint i) {
    y[i] = T(float(x[i]) * s);
}
#define INSTANTIATE_SCALE(T, SUFFIX)                                                        \
kernel void scale_##SUFFIX(device const T* x, device T* y, constant float& s,               \
                           uint i [[thread_position_in_grid]]) { scale_impl<T>(x, y, s, i); }
INSTANTIATE_SCALE(float, float)
INSTANTIATE_SCALE(half, half)
INSTANTIATE_SCALE(bfloat, bfloat)

kernel void to_low(device const float* x, device half* h, device bfloat* b, uint i [[thread_position_in_grid]]) {
    h[i] = half(x[i]);
    b[i] = bfloat(x[i]);
}

kernel void half_math(device const half* a, device const half* b, device half* out, uint i [[thread_position_in_grid]]) {
    out[i] = a[i] * b[i] + 1.0h;
}

kernel void swizzles(device const float4* x, device float4* out, device half4* hout, device uint* bits,
                     uint i [[thread_position_in_grid]]) {
    float4 v = x[i];
    float2 a = v.xy;
    float3 b = v.zyx;
    float4 w = float4(a.yx, b.z, 7.0f);
    w.zw = v.wz;
    out[3 * i + 0] = w;
    out[3 * i + 1] = float4(b, v.w) * 2.0f + float4(1.0f);
    out[3 * i + 2] = float4(int4(v)) + float4(v.x);
    hout[i] = half4(v.wzyx);
    bits[i] = as_type<uint>(v.x);
}

kernel void math_fns(device const float* x, device float* out, uint i [[thread_position_in_grid]]) {
    float v = x[i];
    out[10 * i + 0] = exp(v);
    out[10 * i + 1] = precise::tanh(v);
    out[10 * i + 2] = erf(v);
    out[10 * i + 3] = rsqrt(abs(v) + 1.0f);
    out[10 * i + 4] = fast::exp(v);
    out[10 * i + 5] = clamp(v, -0.5f, 0.5f);
    out[10 * i + 6] = select(1.0f, 2.0f, v > 0.0f);
    out[10 * i + 7] = max(v, 0.0f) + min(v, 0.0f) * 2.0f;
    out[10 * i + 8] = metal::precise::sqrt(abs(v));
    out[10 * i + 9] = dot(float2(v, 1.0f), float2(2.0f, 3.0f));
}

// A tensor-list argument: an array of device pointers (torch.mps passes their GPU addresses).
kernel void list_sums(device float* constant* tensors [[buffer(0)]], constant long* sizes [[buffer(1)]],
                      device float* out [[buffer(2)]], uint t [[thread_position_in_grid]]) {
    device float* p = tensors[t];
    float s = 0.0f;
    for (long k = 0; k < sizes[t]; ++k) s += p[k];
    p[0] = -1.0f;
    out[t] = s;
}

kernel void list_oob(device float* constant* tensors [[buffer(0)]], uint t [[thread_position_in_grid]]) {
    device float* p = tensors[t];
    p[4] = 1.0f;
}

// Threads that return early count as arrived at later barriers.
kernel void early_exit(device float* out, constant uint& n, uint tid [[thread_position_in_threadgroup]]) {
    threadgroup float shared[64];
    if (tid >= n) return;
    shared[tid] = float(tid);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[tid] = shared[n - 1 - tid];
}

[[max_total_threads_per_threadgroup(64)]]
kernel void small_groups(device float* out, uint i [[thread_position_in_grid]]) {
    out[i] = 1.0f;
}

kernel void read_oob(device const float* x [[buffer(0)]], device float* y [[buffer(1)]],
                     uint i [[thread_position_in_grid]]) {
    y[i] = x[i + 1];
}

kernel void vector_oob(device const float* x, device float* y, uint i [[thread_position_in_grid]]) {
    y[i] = reinterpret_cast<device const float4*>(x)[i].w;
}

kernel void too_much_tg(device float* out, uint tid [[thread_position_in_threadgroup]]) {
    threadgroup float big[6000];
    threadgroup float more[3000];
    big[tid] = 1.0f;
    more[tid] = 2.0f;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[tid] = big[tid] + more[tid];
}

kernel void divergent_barrier(device float* out, uint tid [[thread_position_in_threadgroup]]) {
    if (tid < 16) {
        threadgroup_barrier(mem_flags::mem_threadgroup);
    } else {
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    out[tid] = 1.0f;
}

kernel void many_args(device float* a0, device float* a1, device float* a2, uint i [[thread_position_in_grid]]) {
    a0[i] = a1[i] + a2[i];
}
"""


@pytest.fixture(scope="module")
def lib(executor):
    return executor.compile_shader(SOURCE)


# ---- positive tests --------------------------------------------------------------------------------

def test_fill_defaults_to_one_thread_per_element(lib):
    x = torch.zeros(37)
    lib.fill(x, 2.5)
    assert torch.equal(x, torch.full((37,), 2.5))


def test_scalars_bind_in_argument_order_and_partial_edge_group(lib):
    x, y = torch.randn(1000), torch.randn(1000)
    expected = 3.0 * x + y
    lib.saxpy(x, y, 3.0, 1000, threads=1000, group_size=96)  # 1000 = 10 full groups of 96 + one of 40
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("group", [1, 7, 32, 40, 256, 1000, 1024])
def test_threadgroup_tree_reduction_with_barriers(lib, group):
    n = 2500
    x = torch.randn(n)
    ngroups = -(-n // group)
    out = torch.full((ngroups,), float("nan"))
    lib.tg_tree_sum(x, out, n, threads=n, group_size=group)
    expected = torch.nn.functional.pad(x, (0, ngroups * group - n)).view(ngroups, group).sum(1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("group", [32, 40, 70, 128])
def test_simd_reductions_and_partial_simdgroups(lib, group):
    n = 3 * group + 5  # partial threadgroup at the edge, too
    x = torch.randn(n)
    sums, maxs, mins = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    layout = torch.zeros(4 * n, dtype=torch.int32)
    lib.simd_reduce(x, sums, maxs, mins, layout, threads=n, group_size=group)
    layout = layout.view(n, 4)
    for start in range(0, n, group):  # each threadgroup (the last one is partial)
        size = min(group, n - start)
        for s0 in range(0, size, 32):  # each SIMD-group: only its existing lanes take part
            lanes = slice(start + s0, start + min(size, s0 + 32))
            seg = x[lanes]
            torch.testing.assert_close(sums[lanes], seg.sum().expand(seg.numel()), rtol=1e-5, atol=1e-5)
            assert torch.equal(maxs[lanes], seg.max().expand(seg.numel()))
            assert torch.equal(mins[lanes], seg.min().expand(seg.numel()))
            width = lanes.stop - lanes.start
            assert layout[lanes, 0].tolist() == list(range(width))
            assert set(layout[lanes, 1].tolist()) == {s0 // 32}
            assert set(layout[lanes, 2].tolist()) == {-(-size // 32)}
            assert layout[lanes, 3].tolist() == list(range(s0, s0 + width))


def test_simd_prefix_sums_over_partial_simdgroup(lib):
    n, group = 45, 45  # SIMD-groups of 32 and 13 lanes
    x = torch.randint(-5, 6, (n,), dtype=torch.int32)
    excl, incl, fexcl = torch.zeros_like(x), torch.zeros_like(x), torch.zeros(n)
    lib.simd_prefix(x, excl, incl, fexcl, threads=n, group_size=group)
    for seg in (slice(0, 32), slice(32, 45)):
        c = torch.cumsum(x[seg], 0, dtype=torch.int32)
        assert torch.equal(incl[seg], c)
        assert torch.equal(excl[seg], c - x[seg])
        assert torch.equal(fexcl[seg], (c - x[seg]).float())


@pytest.mark.parametrize("delta", [1, 4, 16])
def test_simd_shuffles(lib, delta):
    n = 64
    x = torch.arange(n, dtype=torch.float32) + 0.5
    out = torch.zeros(6 * n)
    lib.simd_shuffles(x, out, delta, threads=n, group_size=n)
    out = out.view(n, 6)
    for i in range(n):
        base, lane = i - i % 32, i % 32
        assert out[i, 0] == x[base + (lane + 5) % 32]
        assert out[i, 1] == (x[base + lane + delta] if lane + delta < 32 else x[i])  # upper lanes keep theirs
        assert out[i, 2] == (x[base + lane - delta] if lane >= delta else x[i])
        assert out[i, 3] == x[base + (lane ^ delta)]
        assert out[i, 4] == x[base + 3]
        assert out[i, 5] == x[base]


def test_simd_shuffle_from_missing_lane_is_poison(lib):
    # A threadgroup of 8: lanes 8..31 do not exist; reading them is undefined on a GPU, NaN here.
    x = torch.arange(8, dtype=torch.float32)
    out = torch.zeros(6 * 8)
    lib.simd_shuffles(x, out, 4, threads=8, group_size=8)
    out = out.view(8, 6)
    assert torch.equal(out[:4, 1], x[4:])
    assert out[4:, 1].isnan().all()
    assert torch.equal(out[:3, 0], x[5:8]) and out[3:, 0].isnan().all()


def test_simd_ballot_any_all(lib):
    n = 40  # one full SIMD-group, one of 8 lanes
    x = torch.zeros(n, dtype=torch.int32)
    x[[1, 5, 33]] = 1
    x[32:] = 1
    ballot = torch.zeros(n, dtype=torch.int64)
    flags = torch.zeros(3 * n, dtype=torch.int32)
    lib.simd_votes(x, ballot, flags, threads=n, group_size=n)
    flags = flags.view(n, 3)
    assert set(ballot[:32].tolist()) == {(1 << 1) | (1 << 5)}
    assert set(ballot[32:].tolist()) == {0xFF}
    assert flags[:32, 0].eq(1).all() and flags[:32, 1].eq(0).all()
    assert flags[32:, 0].eq(1).all() and flags[32:, 1].eq(1).all()  # all over the 8 existing lanes
    assert flags[:, 2].tolist() == [1] + [0] * 31 + [1] + [0] * 7


def test_simd_functions_in_divergent_branches(lib):
    out = torch.zeros(64)
    lib.simd_divergent(out, threads=64, group_size=64)
    lanes = torch.arange(64) % 32
    assert torch.equal(out, torch.where(lanes < 10, 10.0, 22 * 100.0))


def test_simd_sum_of_vectors(lib):
    out = torch.zeros(32, 4)
    lib.simd_vector(out, threads=32, group_size=32)
    assert torch.equal(out, torch.tensor([32.0, sum(range(32)), 64.0, -32.0]).expand(32, 4))


def test_device_atomics_across_threadgroups(lib):
    n = 5000
    bins_of = torch.randint(0, 16, (n,), dtype=torch.int32)
    hist = torch.zeros(16, dtype=torch.int32)
    total = torch.zeros(1, dtype=torch.int32)
    fsum = torch.zeros(1)
    imax = torch.full((1,), -1, dtype=torch.int32)
    lib.atomics(bins_of, hist, total, fsum, imax, threads=n, group_size=64)
    assert torch.equal(hist, torch.bincount(bins_of, minlength=16).int())
    assert total.item() == 2 * n
    assert fsum.item() == 0.5 * n
    assert imax.item() == n - 1


def test_threadgroup_atomic(lib):
    out = torch.zeros(3, dtype=torch.int32)
    lib.tg_atomic(out, threads=3 * 100, group_size=100)
    assert out.tolist() == [sum(range(100))] * 3


def test_2d_grid_with_edge_groups(lib):
    w, h = 37, 21
    out = torch.full((h, w), -1, dtype=torch.int32)
    meta = torch.zeros(h * w * 6, dtype=torch.int32)
    lib.grid2d(out, meta, w, h, threads=(w, h), group_size=(8, 4))
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    assert torch.equal(out, (xs + 1000 * ys).int())
    meta = meta.view(h, w, 6)
    assert torch.equal(meta[..., 0], xs // 8) and torch.equal(meta[..., 1], ys // 4)
    # threads_per_threadgroup is the actual size: 5 wide in the last column of groups, 1 high in the last row
    assert torch.equal(meta[..., 2], torch.where(xs >= 32, 5, 8))
    assert torch.equal(meta[..., 3], torch.where(ys >= 20, 1, 4))
    assert meta[..., 4].eq(w * h).all()
    assert torch.equal(meta[..., 5], (xs % 8 + 100 * (ys % 4)).int())


def test_3d_grid(lib):
    size = (5, 4, 3)
    out = torch.zeros(2 * math.prod(size), dtype=torch.int32)
    lib.grid3d(out, threads=size, group_size=(2, 2, 2))
    out = out.view(3, 4, 5, 2)
    zs, ys, xs = torch.meshgrid(torch.arange(3), torch.arange(4), torch.arange(5), indexing="ij")
    assert torch.equal(out[..., 0], (xs + 100 * ys + 10000 * zs).int())
    assert out[..., 1].eq(3 * 2 * 2).all()


def test_2d_threadgroup_array(lib):
    x = torch.randn(8, 8)
    y = torch.zeros(8, 8)
    lib.tg_transpose(x, y, threads=(8, 8), group_size=(8, 8))
    assert torch.equal(y, x.T)


@pytest.mark.parametrize("dtype,suffix", [(torch.float32, "float"), (torch.float16, "half"),
                                          (torch.bfloat16, "bfloat")])
def test_half_and_bfloat_load_store(lib, dtype, suffix):
    x = torch.randn(300).to(dtype)
    y = torch.zeros_like(x)
    getattr(lib, f"scale_{suffix}")(x, y, 0.75)
    assert torch.equal(y, (x.float() * 0.75).to(dtype))  # computed in float, rounded once


def test_float_to_half_and_bfloat_rounding_matches_torch(lib):
    x = torch.cat([torch.randn(1000) * 10, torch.tensor([65504.0, 7e4, 1e-8, -0.0, float("inf")])])
    h, b = torch.zeros(x.numel(), dtype=torch.float16), torch.zeros(x.numel(), dtype=torch.bfloat16)
    lib.to_low(x, h, b)
    assert torch.equal(h, x.half()) and torch.equal(b, x.bfloat16())


def test_half_arithmetic_rounds_each_operation(lib):
    a, b = torch.randn(500).half(), torch.randn(500).half()
    out = torch.zeros_like(a)
    lib.half_math(a, b, out)
    assert torch.equal(out, a * b + 1.0)  # torch also rounds the product to half first


def test_vector_swizzles_constructors_and_conversions(lib):
    x = torch.randn(10, 4) * 3
    out = torch.zeros(10, 3, 4)
    hout = torch.zeros(10, 4, dtype=torch.float16)
    bits = torch.zeros(10, dtype=torch.int32)
    lib.swizzles(x, out, hout, bits, threads=10)
    X, Y, Z, W = x.unbind(1)
    assert torch.equal(out[:, 0], torch.stack([Y, X, W, Z], 1))
    assert torch.equal(out[:, 1], torch.stack([Z, Y, X, W], 1) * 2 + 1)
    assert torch.equal(out[:, 2], x.trunc() + X[:, None])
    assert torch.equal(hout, x.flip(1).half())
    assert torch.equal(bits, X.view(torch.int32))


def test_math_functions(lib):
    x = torch.linspace(-3, 3, 61)
    out = torch.zeros(61, 10)
    lib.math_fns(x, out, threads=61)
    expected = torch.stack([x.exp(), x.tanh(), torch.erf(x), torch.rsqrt(x.abs() + 1), x.exp(), x.clamp(-0.5, 0.5),
                            torch.where(x > 0, 2.0, 1.0), x.clamp_min(0) + 2 * x.clamp_max(0), x.abs().sqrt(),
                            2 * x + 3], 1)
    torch.testing.assert_close(out, expected, rtol=2e-6, atol=1e-6)


def test_tensor_list_argument(lib):
    tensors = [torch.randn(n) for n in (3, 10, 1)]
    expected = torch.stack([t.sum() for t in tensors])
    out = torch.zeros(3)
    lib.list_sums(tensors, [3, 10, 1], out, threads=3, group_size=3)
    torch.testing.assert_close(out, expected)
    assert all(t[0] == -1.0 for t in tensors)


def test_early_returning_threads_count_as_arrived_at_barriers(lib):
    out = torch.zeros(64)
    lib.early_exit(out, 20, threads=64, group_size=64)
    assert torch.equal(out[:20], torch.arange(19, -1, -1).float()) and out[20:].eq(0).all()


def test_default_group_size_and_max_total_threads_attribute(lib, executor):
    out = torch.zeros(2000)
    lib.small_groups(out)  # default group: min(threads, 64) for this kernel
    assert out.eq(1).all()
    assert lib.small_groups.max_threads_per_threadgroup == 64
    with pytest.raises(executor.MetalLimitError, match="at most 64"):
        lib.small_groups(out, threads=2000, group_size=128)


def test_compiled_library_is_cached(executor, lib):
    assert executor.compile_shader(SOURCE) is lib
    assert "fill" in dir(lib) and "scale_bfloat" in dir(lib)
    assert list(executor.cache_dir().glob("shader-*.so"))


# ---- negative tests --------------------------------------------------------------------------------

def test_too_many_threads_per_threadgroup(lib, executor):
    with pytest.raises(executor.MetalLimitError, match="at most 1024"):
        lib.fill(torch.zeros(4096), 1.0, threads=4096, group_size=2048)
    with pytest.raises(executor.MetalLimitError, match="at most 1024"):
        lib.grid2d(torch.zeros(1, dtype=torch.int32), torch.zeros(6, dtype=torch.int32), 1, 1,
                   threads=(64, 64), group_size=(64, 32))


def test_too_much_threadgroup_memory(lib, executor):
    with pytest.raises(executor.MetalLimitError, match="32 KiB"):
        lib.too_much_tg(torch.zeros(32), threads=32, group_size=32)


def test_too_many_buffers(lib, executor):
    with pytest.raises(executor.MetalLimitError, match="at most 31"):
        lib.many_args(*[torch.zeros(4) for _ in range(32)])


def test_out_of_bounds_read_is_reported(lib, executor):
    x, y = torch.zeros(16), torch.zeros(16)
    with pytest.raises(executor.MetalOutOfBoundsError) as info:
        lib.read_oob(x, y, threads=16, group_size=16)
    msg = str(info.value)
    assert "kernel 'read_oob'" in msg and "buffer 0 ('x')" in msg and "byte offset 64" in msg
    assert "thread_position_in_grid=(15, 0, 0)" in msg


def test_out_of_bounds_vector_access_is_reported(lib, executor):
    with pytest.raises(executor.MetalOutOfBoundsError, match=r"buffer 0 \('x'\), byte offset 16, access of 16"):
        lib.vector_oob(torch.zeros(6), torch.zeros(2), threads=2, group_size=2)


def test_out_of_bounds_through_tensor_list_is_reported(lib, executor):
    with pytest.raises(executor.MetalOutOfBoundsError, match=r"tensor 1 of the list"):
        lib.list_oob([torch.zeros(5), torch.zeros(4)], threads=2, group_size=2)


def test_barrier_in_divergent_control_flow_is_reported(lib, executor):
    with pytest.raises(executor.MetalKernelError, match="divergent"):
        lib.divergent_barrier(torch.zeros(32), threads=32, group_size=32)


def test_argument_errors(lib):
    with pytest.raises(TypeError, match="CPU tensors"):
        lib.fill(torch.zeros(4, device="meta"), 1.0)
    with pytest.raises(TypeError, match="buffer 1"):
        lib.fill(torch.zeros(4))
    with pytest.raises(ValueError, match="same number of dimensions"):
        lib.fill(torch.zeros(4), 1.0, threads=(2, 2), group_size=4)


@pytest.mark.parametrize("snippet,construct", [
    ("simdgroup_float8x8 m;", "simdgroup_float8x8"),
    ("texture2d<float> t;", "texture2d"),
    ("float q = quad_sum(1.0f); out[0] = q;", "quad_sum"),
    ("float4 v = (float4)out[0];", "(float4)"),
    ("threadgroup float a[4], b[4];", "threadgroup float a[4]"),
])
def test_unsupported_construct_is_a_compile_error_naming_it(executor, snippet, construct):
    source = f"kernel void k(device float* out, uint i [[thread_position_in_grid]]) {{ {snippet} }}"
    with pytest.raises(executor.UnsupportedMetalError, match=r"unsupported Metal construct '" + construct.replace(
            "(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        executor.compile_shader(source)


def test_unsupported_attribute_is_a_compile_error_naming_it(executor):
    source = "kernel void k(device float* out, threadgroup float* s [[threadgroup(0)]]) { out[0] = s[0]; }"
    with pytest.raises(executor.UnsupportedMetalError, match=r"\[\[threadgroup\(0\)\]\]"):
        executor.compile_shader(source)


def test_compile_error_reports_the_shader_line(executor):
    source = "kernel void k(device float* out) {\n  out[0] = undefined_thing;\n}\n"
    with pytest.raises(executor.MetalCompileError, match=r"shader.metal:2.*undefined_thing"):
        executor.compile_shader(source)
