// The narrow interface between a compiled shader (metal_stdlib.h + generated wrappers) and the
// executor runtime (metal_runtime.cpp). Plain structs and extern "C" functions only: the shader
// translation unit must not see the C++ standard library's global names (abs, exp, ...), which
// would clash with Metal's overloads, so the runtime lives in its own translation unit.
//
// The Python front end (metal_executor.py) fills these structs through ctypes: keep the layouts in
// step with the ctypes declarations there.
#pragma once
#include <cstdint>

namespace mtl_rt {

// One memory range a kernel may touch: a tensor argument, a scalar argument's bytes, one tensor of a
// tensor-list argument (element >= 0), or a threadgroup array (buffer -1). Bounds-checked pointers
// carry the region they came from.
struct Region {
  char* base;
  uint64_t size;
  int32_t buffer;    // [[buffer(n)]] index of the argument, or -1 for threadgroup memory
  int32_t element;   // index inside a tensor-list argument, or -1
  const char* name;  // the kernel parameter's (or threadgroup array's) name
};

struct Buffer {
  char* ptr;
  uint64_t size;
  const Region* region;
};

constexpr int kMaxBuffers = 31;  // Apple's limit on buffer arguments per kernel

struct LaunchArgs {
  Buffer bufs[kMaxBuffers];
  uint32_t nbufs;
  // Where a raw address (a pointer loaded from a tensor list, &buf[i]) finds its bounds again:
  // the arguments' regions with overlapping ones merged, so that two views of one tensor do not
  // confine each other's pointers.
  uint32_t nlookup;
  const Region* lookup;
  const char* kernel;
};

// Values of the kernel's [[attribute]] parameters for one thread.
struct ThreadIds {
  uint32_t grid[3];       // thread_position_in_grid
  uint32_t tg[3];         // thread_position_in_threadgroup
  uint32_t tgpos[3];      // threadgroup_position_in_grid
  uint32_t tptg[3];       // threads_per_threadgroup (actual size: smaller at the grid's edge)
  uint32_t tpgrid[3];     // threads_per_grid
  uint32_t tgpergrid[3];  // threadgroups_per_grid
  uint32_t dtptg[3];      // dispatch_threads_per_threadgroup (the requested group size)
  uint32_t index_in_tg;   // thread_index_in_threadgroup
  uint32_t lane;          // thread_index_in_simdgroup
  uint32_t simd_id;       // simdgroup_index_in_threadgroup
  uint32_t simds_per_tg;  // simdgroups_per_threadgroup
};

constexpr uint32_t kSimdWidth = 32;
constexpr uint32_t kSlotBytes = 16;  // largest value a SIMD-group function exchanges (float4)
constexpr uint64_t kThreadgroupMemoryLimit = 32768;
constexpr uint32_t kMaxThreadgroupArrays = 64;

// Result of a SIMD-group rendezvous: every participating lane's value (lane i at snap + i*kSlotBytes)
// and the mask of participating (active) lanes.
struct Collect {
  const unsigned char* snap;
  uint64_t mask;
  uint32_t lane;
};

typedef void (*EntryFn)(const ThreadIds*, const LaunchArgs*);

}  // namespace mtl_rt

extern "C" {
// Blocks the calling thread until every active lane of its SIMD-group reached a SIMD-group function;
// lanes are grouped by call site (line, col) so divergent branches form separate groups.
const mtl_rt::Collect* mtl_rt_collect(const void* data, uint32_t size, uint32_t line, uint32_t col);
// threadgroup_barrier: blocks until every unfinished thread of the threadgroup reached it.
void mtl_rt_barrier(uint32_t line, uint32_t col);
// Storage of one `threadgroup T name[...]` declaration, shared by the threadgroup, as a region.
const mtl_rt::Region* mtl_rt_tg_alloc(const void* key, uint64_t size, uint64_t align, const char* name);
// Non-zero while some launch of this library is being cancelled (interrupt or timeout): every loop
// condition reads it (MTL_POLL), and calls mtl_rt_poll when it is set.
extern int mtl_rt_stop_requests;
// Stops the calling kernel thread if its launch was cancelled; returns true otherwise.
bool mtl_rt_poll();
// Stops the launch with an error (the message is raised in Python).
[[noreturn]] void mtl_rt_fail(const char* category, const char* msg);
[[noreturn]] void mtl_rt_oob(const mtl_rt::Region* region, const void* addr, uint64_t access_size);
// The region containing addr (for pointers loaded from tensor-list arguments), or null.
const mtl_rt::Region* mtl_rt_region_of(const void* addr);
// A launch runs on its own threads: start it, wait for it in slices (so that the caller can react
// to Ctrl-C and to its deadline), cancel it if need be, and finish it (joins, reports, frees).
void* mtl_launch_start(mtl_rt::EntryFn entry, const mtl_rt::LaunchArgs* args, const uint32_t* threads,
                       const uint32_t* group, uint32_t nworkers, uint64_t stack_bytes);
int mtl_launch_wait(void* launch, uint32_t timeout_ms);  // 1 when every thread has finished
void mtl_launch_cancel(void* launch, int reason);        // reason: 1 interrupted, 2 timed out
int mtl_launch_finish(void* launch, char* err, uint64_t errlen);  // 0, or 1 with the error in err
}
