// Shared by every shader and by the host code: metalcore/_metal.py reads the integer #defines
// below (one `#define NAME <int>` per line), so block sizes and thresholds live in one place.
#include <metal_stdlib>
using namespace metal;

#define METALCORE_SIMD_WIDTH 32
#define METALCORE_MAX_THREADS 1024
#define METALCORE_MAX_SIMDGROUPS 32
// Row kernels (one threadgroup per row) use a power of two of threads, from one SIMD-group up to
// METALCORE_MAX_THREADS, about this many elements each.
#define METALCORE_ELEMS_PER_THREAD 4
// RMSNorm's weight gradient: each thread sums this many rows of one column; the host adds the chunks.
#define METALCORE_RMS_DW_ROWS_PER_THREAD 64
// Elementwise kernels: threads per threadgroup.
#define METALCORE_ELEMENTWISE_GROUP 256

// Sum of v over the threadgroup, returned to every thread. `scratch` holds one float per
// SIMD-group; nsg = simdgroups_per_threadgroup. Two barriers: partials visible, then scratch free.
inline float threadgroup_sum(float v, threadgroup float* scratch, uint lane, uint sg, uint nsg) {
    v = simd_sum(v);
    if (lane == 0) {
        scratch[sg] = v;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float total = lane < nsg ? scratch[lane] : 0.0f;
    total = simd_sum(total);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    return total;
}

// AdamW: elements per threadgroup (METALCORE_ADAMW_THREADS threads, 4 elements each), and tensors
// per dispatch (tensor lists travel as setBytes data, which Metal limits to 4 KiB: 256 pointers = 2 KiB).
#define METALCORE_ADAMW_THREADS 256
#define METALCORE_ADAMW_BLOCK 1024
#define METALCORE_ADAMW_MAX_TENSORS 256

// Small-matrix linear algebra (shaders/linalg.metal): one threadgroup per matrix, held whole in
// threadgroup memory. A 64x64 float32 tile is 16 KiB of Apple's 32 KiB, which leaves room for the
// pivot bookkeeping of LU; a 90x90 tile would fit alone (31.6 KiB) but nothing beside it. Larger
// matrices (and float64, which Metal lacks) go to the reference through each op's `supports`.
#define METALCORE_LINALG_MAX_N 64
// Threads of a factorization threadgroup: one per element of the trailing update up to this many
// (a 64x64 update is 16 elements a thread); small matrices use one SIMD-group.
#define METALCORE_LINALG_THREADS 256
