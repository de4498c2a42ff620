// The executor runtime: runs a compiled kernel over a grid of threadgroups on the CPU.
//
// Each threadgroup runs on one OS thread; each of its threads is a fiber (its own stack, switched
// by a few instructions of assembly), so that all threads of a group are live at once and a barrier
// or a SIMD-group function can park a thread until its peers arrive. Threadgroups are spread over a
// small pool of OS threads. Scheduling per threadgroup:
//
//   1. run every runnable fiber until it blocks (barrier, SIMD-group function) or finishes;
//   2. if some SIMD-group lanes wait in a SIMD-group function, resolve those rendezvous: the lanes of
//      one SIMD-group waiting at the same call site exchange values; finished lanes, lanes of a
//      partial SIMD-group that do not exist, and lanes elsewhere are inactive;
//   3. otherwise every unfinished thread waits at a threadgroup barrier: release them (all must
//      wait at the same barrier: one in divergent control flow is reported, not executed).
//
// Errors (out-of-bounds access, threadgroup-memory limit, divergent barrier) stop the launch; the
// failing fiber's stack is abandoned, and the message is returned to Python. A fault inside a fiber
// (a stack overflow into the guard page below its stack, a wild pointer in unchecked mode) is caught
// by a SIGSEGV/SIGBUS handler running on an alternate signal stack and reported the same way, so a
// shader bug fails a launch, not the process. A launch runs on its own threads while the caller
// waits in slices: it can be cancelled (Ctrl-C, time limit), and every loop of the shader polls for
// that (MTL_POLL in metal_stdlib.h).
#include "metal_rt_abi.h"

#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) && defined(__ELF__)
#define MTL_RT_ASM_SWITCH 1
asm(R"(
  .pushsection .text
  .globl mtl_rt_switch
  .hidden mtl_rt_switch
  .type mtl_rt_switch,@function
mtl_rt_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size mtl_rt_switch, .-mtl_rt_switch
  .popsection
)");
#elif defined(__aarch64__) && defined(__ELF__)
#define MTL_RT_ASM_SWITCH 1
asm(R"(
  .pushsection .text
  .globl mtl_rt_switch
  .hidden mtl_rt_switch
  .type mtl_rt_switch,%function
mtl_rt_switch:
  sub sp, sp, #176
  stp x19, x20, [sp, #0]
  stp x21, x22, [sp, #16]
  stp x23, x24, [sp, #32]
  stp x25, x26, [sp, #48]
  stp x27, x28, [sp, #64]
  stp x29, x30, [sp, #80]
  stp d8, d9, [sp, #96]
  stp d10, d11, [sp, #112]
  stp d12, d13, [sp, #128]
  stp d14, d15, [sp, #144]
  mov x2, sp
  str x2, [x0]
  mov sp, x1
  ldp x19, x20, [sp, #0]
  ldp x21, x22, [sp, #16]
  ldp x23, x24, [sp, #32]
  ldp x25, x26, [sp, #48]
  ldp x27, x28, [sp, #64]
  ldp x29, x30, [sp, #80]
  ldp d8, d9, [sp, #96]
  ldp d10, d11, [sp, #112]
  ldp d12, d13, [sp, #128]
  ldp d14, d15, [sp, #144]
  add sp, sp, #176
  ret
  .size mtl_rt_switch, .-mtl_rt_switch
  .popsection
)");
#else
#include <ucontext.h>
#endif

#ifdef MTL_RT_ASM_SWITCH
extern "C" void mtl_rt_switch(void** save_sp, void* to_sp);
#endif

using namespace mtl_rt;

namespace {

enum State : uint8_t { kRunnable, kAtBarrier, kAtSimd, kDone, kFailed };

struct Fiber {
#ifdef MTL_RT_ASM_SWITCH
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  char* stack_lo = nullptr;
  State state = kDone;
  uint32_t line = 0, col = 0, size = 0;
  alignas(16) unsigned char slot[kSlotBytes];
  Collect res;
  ThreadIds ids;
};

struct Launch {
  EntryFn entry;
  const LaunchArgs* args;
  uint32_t threads[3], group[3], ngroups[3];
  uint64_t total_groups, group_threads, stack_bytes;
  std::atomic<uint64_t> next{0};
  std::atomic<bool> failed{false};
  std::atomic<int> cancel{0};  // 1: interrupted, 2: timed out
  std::mutex mu;
  std::condition_variable done_cv;
  uint32_t running = 0;
  std::string error;

  void set_error(const std::string& msg) {
    std::lock_guard<std::mutex> lock(mu);
    if (error.empty()) error = msg;
    failed = true;
  }
};

size_t page_size() {
  static size_t p = size_t(sysconf(_SC_PAGESIZE));
  return p;
}

constexpr size_t kAltStackBytes = 64 << 10;  // the fault handler's stack (a fiber's may be exhausted)

struct Worker {
  std::vector<Fiber> fibers;
  char* stacks = nullptr;
  size_t nstacks = 0, stack_bytes = 0, slot = 0, mapped = 0;
#ifdef MTL_RT_ASM_SWITCH
  void* sched_sp = nullptr;
#else
  ucontext_t sched_ctx;
#endif
  Fiber* current = nullptr;
  volatile sig_atomic_t in_fiber = 0;
  sigjmp_buf recover;  // where the fault handler returns to (run_group)
  void* fault_addr = nullptr;
  int fault_sig = 0;
  Launch* launch = nullptr;
  std::vector<unsigned char> snap;  // per SIMD-group: kSimdWidth slots
  std::vector<char> altstack;
  alignas(64) unsigned char arena[kThreadgroupMemoryLimit];
  uint64_t arena_used = 0, arena_high = kThreadgroupMemoryLimit;
  const void* tg_keys[kMaxThreadgroupArrays];
  Region tg_regions[kMaxThreadgroupArrays];
  uint32_t ntg = 0;

  Worker(size_t n, size_t stack) : fibers(n), nstacks(n), stack_bytes(stack), altstack(kAltStackBytes) {
    slot = stack + page_size();
    mapped = slot * n;
    // MAP_NORESERVE: stacks sized for the worst case are address space; only touched pages cost memory.
    void* p = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      stacks = nullptr;
      return;
    }
    stacks = static_cast<char*>(p);
    for (size_t i = 0; i < n; ++i) {
      char* lo = stacks + i * slot;
      mprotect(lo, page_size(), PROT_NONE);  // guard page
      fibers[i].stack_lo = lo + page_size();
    }
  }
  ~Worker() {
    if (stacks) munmap(stacks, mapped);
  }
  bool in_guard_page(const void* addr) const {
    const char* a = static_cast<const char*>(addr);
    return stacks && a >= stacks && a < stacks + mapped && size_t(a - stacks) % slot < page_size();
  }
};

std::mutex g_pool_mu;
std::vector<Worker*> g_pool;
thread_local Worker* tl_worker = nullptr;

Worker* acquire_worker(size_t nthreads, size_t stack) {
  {
    std::lock_guard<std::mutex> lock(g_pool_mu);
    for (size_t i = 0; i < g_pool.size(); ++i) {
      if (g_pool[i]->nstacks >= nthreads && g_pool[i]->stack_bytes == stack) {
        Worker* w = g_pool[i];
        g_pool.erase(g_pool.begin() + long(i));
        return w;
      }
    }
  }
  // Round up so that a later, larger launch can reuse this worker.
  size_t n = 32;
  while (n < nthreads) n *= 2;
  Worker* w = new Worker(n, stack);
  if (w->stacks == nullptr) {
    delete w;
    return nullptr;
  }
  return w;
}

void release_worker(Worker* w) {
  std::lock_guard<std::mutex> lock(g_pool_mu);
  g_pool.push_back(w);
}

[[noreturn]] void fiber_main();

#ifndef MTL_RT_ASM_SWITCH
void fiber_main_ucontext() { fiber_main(); }
#endif

void fiber_init(Worker& w, Fiber& f) {
  char* top = f.stack_lo + w.stack_bytes;
#ifdef MTL_RT_ASM_SWITCH
#if defined(__x86_64__)
  void** s = reinterpret_cast<void**>(top);
  *--s = nullptr;                                     // fake return address of fiber_main
  *--s = reinterpret_cast<void*>(&fiber_main);        // popped by `ret`
  for (int i = 0; i < 6; ++i) *--s = nullptr;         // rbp rbx r12-r15
  f.sp = s;
#else
  void** s = reinterpret_cast<void**>(top - 176);
  memset(s, 0, 176);
  s[11] = reinterpret_cast<void*>(&fiber_main);       // x30 (lr) at offset 88
  f.sp = s;
#endif
  (void)w;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack_lo;
  f.ctx.uc_stack.ss_size = w.stack_bytes;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, fiber_main_ucontext, 0);
  (void)w;
#endif
}

inline void switch_to_fiber(Worker& w, Fiber& f) {
  w.current = &f;
  w.in_fiber = 1;
#ifdef MTL_RT_ASM_SWITCH
  mtl_rt_switch(&w.sched_sp, f.sp);
#else
  swapcontext(&w.sched_ctx, &f.ctx);
#endif
  w.in_fiber = 0;
}

inline void switch_to_scheduler(Worker& w, Fiber& f) {
#ifdef MTL_RT_ASM_SWITCH
  mtl_rt_switch(&f.sp, w.sched_sp);
#else
  swapcontext(&f.ctx, &w.sched_ctx);
#endif
}

[[noreturn]] void fiber_main() {
  Worker* w = tl_worker;
  Fiber* f = w->current;
  w->launch->entry(&f->ids, w->launch->args);
  f->state = kDone;
  switch_to_scheduler(*w, *f);
  __builtin_unreachable();
}

std::string format(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  return buf;
}

std::string where(const Fiber& f) {
  return format("thread_position_in_grid=(%u, %u, %u), threadgroup_position_in_grid=(%u, %u, %u)",
                f.ids.grid[0], f.ids.grid[1], f.ids.grid[2], f.ids.tgpos[0], f.ids.tgpos[1], f.ids.tgpos[2]);
}

// SIGSEGV/SIGBUS inside a fiber of this library: back to the scheduler (run_group), which reports it.
// Any other fault goes to the handler that was there before (Python's faulthandler, or the default).
struct sigaction g_old_segv, g_old_bus;

void fault_handler(int sig, siginfo_t* info, void* uctx) {
  Worker* w = tl_worker;
  if (w != nullptr && w->in_fiber) {
    w->in_fiber = 0;
    w->fault_sig = sig;
    w->fault_addr = info->si_addr;
    siglongjmp(w->recover, 1);
  }
  struct sigaction* old = sig == SIGSEGV ? &g_old_segv : &g_old_bus;
  if ((old->sa_flags & SA_SIGINFO) && old->sa_sigaction != nullptr) {
    old->sa_sigaction(sig, info, uctx);
  } else if (old->sa_handler != SIG_DFL && old->sa_handler != SIG_IGN) {
    old->sa_handler(sig);
  } else {
    signal(sig, SIG_DFL);  // returning re-executes the faulting instruction: the default action
  }
}

void install_fault_handler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = fault_handler;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_old_segv);
    sigaction(SIGBUS, &sa, &g_old_bus);
  });
}

std::string fault_message(const Worker& w, const Launch& L) {
  const Fiber& f = *w.current;
  if (w.in_guard_page(w.fault_addr))
    return format("[error] kernel '%s' overflowed its %zu KiB stack (a thread's stack is sized from the "
                  "shader's frames; deep or unbounded recursion, which Metal does not allow, exhausts it); %s",
                  L.args->kernel, w.stack_bytes >> 10, where(f).c_str());
  return format("[error] kernel '%s' crashed: %s at address %p (in unchecked mode, or through a pointer the "
                "executor cannot check); %s",
                L.args->kernel, w.fault_sig == SIGBUS ? "bus error" : "segmentation fault", w.fault_addr,
                where(f).c_str());
}

// Returns false when the launch failed.
bool run_group(Worker& w, Launch& L, uint64_t g) {
  if (sigsetjmp(w.recover, 1)) {
    L.set_error(fault_message(w, L));
    return false;
  }
  uint32_t gpos[3], dims[3];
  gpos[0] = uint32_t(g % L.ngroups[0]);
  gpos[1] = uint32_t((g / L.ngroups[0]) % L.ngroups[1]);
  gpos[2] = uint32_t(g / (uint64_t(L.ngroups[0]) * L.ngroups[1]));
  for (int d = 0; d < 3; ++d) dims[d] = std::min(L.group[d], L.threads[d] - gpos[d] * L.group[d]);
  const uint32_t n = dims[0] * dims[1] * dims[2];
  const uint32_t nsimd = (n + kSimdWidth - 1) / kSimdWidth;
  w.snap.resize(size_t(nsimd) * kSimdWidth * kSlotBytes);
  // Threadgroup memory starts poisoned (0xFF bytes: NaN floats, -1 integers) in every group, so a
  // kernel that reads threadgroup memory it never wrote sees garbage here too, as on a GPU.
  memset(w.arena, 0xFF, size_t(w.arena_high));
  w.arena_used = 0;
  w.arena_high = 0;
  w.ntg = 0;

  for (uint32_t i = 0; i < n; ++i) {
    Fiber& f = w.fibers[i];
    ThreadIds& t = f.ids;
    const uint32_t tx = i % dims[0], ty = (i / dims[0]) % dims[1], tz = i / (dims[0] * dims[1]);
    const uint32_t tpos[3] = {tx, ty, tz};
    for (int d = 0; d < 3; ++d) {
      t.tg[d] = tpos[d];
      t.tgpos[d] = gpos[d];
      t.grid[d] = gpos[d] * L.group[d] + tpos[d];
      t.tptg[d] = dims[d];
      t.tpgrid[d] = L.threads[d];
      t.tgpergrid[d] = L.ngroups[d];
      t.dtptg[d] = L.group[d];
    }
    t.index_in_tg = i;
    t.lane = i % kSimdWidth;
    t.simd_id = i / kSimdWidth;
    t.simds_per_tg = nsimd;
    f.state = kRunnable;
    fiber_init(w, f);
  }

  for (;;) {
    for (uint32_t i = 0; i < n; ++i) {
      if (w.fibers[i].state != kRunnable) continue;
      switch_to_fiber(w, w.fibers[i]);
      if (w.fibers[i].state == kFailed) return false;
    }
    if (L.failed || L.cancel) return false;

    bool any_simd = false;
    for (uint32_t s = 0; s < nsimd; ++s) {
      const uint32_t lo = s * kSimdWidth, hi = std::min(n, lo + kSimdWidth);
      unsigned char* snap = w.snap.data() + size_t(s) * kSimdWidth * kSlotBytes;
      uint64_t pending = 0;
      for (uint32_t i = lo; i < hi; ++i)
        if (w.fibers[i].state == kAtSimd) pending |= uint64_t(1) << (i - lo);
      while (pending) {
        const uint32_t first = lo + uint32_t(__builtin_ctzll(pending));
        const Fiber& leader = w.fibers[first];
        uint64_t mask = 0;
        for (uint32_t i = lo; i < hi; ++i) {
          const Fiber& f = w.fibers[i];
          if (f.state == kAtSimd && f.line == leader.line && f.col == leader.col) {
            if (f.size != leader.size) {
              L.set_error(format("[error] kernel '%s': SIMD-group lanes called the SIMD-group function at line "
                                 "%u with values of different sizes (%u and %u bytes); %s",
                                 L.args->kernel, f.line, f.size, leader.size, where(f).c_str()));
              return false;
            }
            mask |= uint64_t(1) << (i - lo);
          }
        }
        for (uint32_t i = lo; i < hi; ++i) {
          if (!(mask >> (i - lo) & 1)) continue;
          Fiber& f = w.fibers[i];
          memcpy(snap + size_t(i - lo) * kSlotBytes, f.slot, f.size);
          f.res.snap = snap;
          f.res.mask = mask;
          f.res.lane = i - lo;
          f.state = kRunnable;
        }
        pending &= ~mask;
        any_simd = true;
      }
    }
    if (any_simd) continue;

    const Fiber* first = nullptr;
    for (uint32_t i = 0; i < n; ++i) {
      Fiber& f = w.fibers[i];
      if (f.state != kAtBarrier) continue;
      if (first == nullptr) {
        first = &f;
      } else if (f.line != first->line || f.col != first->col) {
        L.set_error(format("[error] kernel '%s': threads of one threadgroup wait at different "
                           "threadgroup_barrier calls (line %u col %u and line %u col %u): a barrier in "
                           "divergent control flow; %s",
                           L.args->kernel, first->line, first->col, f.line, f.col, where(f).c_str()));
        return false;
      }
      f.state = kRunnable;
    }
    if (first == nullptr) return true;  // every thread finished
  }
}

}  // namespace

extern "C" {

// float -> bfloat conversion, round to nearest even (NaN stays NaN). Clang emits calls to this
// compiler-rt builtin; libgcc before GCC 13 does not have it.
__attribute__((weak, visibility("hidden"))) __bf16 __truncsfbf2(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  uint16_t r;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    r = uint16_t((u >> 16) | 0x40u);
  } else {
    u += 0x7fffu + ((u >> 16) & 1u);
    r = uint16_t(u >> 16);
  }
  __bf16 out;
  memcpy(&out, &r, sizeof out);
  return out;
}
__attribute__((weak, visibility("hidden"))) __bf16 __truncdfbf2(double d) { return __truncsfbf2(float(d)); }

const Collect* mtl_rt_collect(const void* data, uint32_t size, uint32_t line, uint32_t col) {
  Worker* w = tl_worker;
  Fiber* f = w->current;
  if (size > kSlotBytes) mtl_rt_fail("[error]", "SIMD-group function on a value larger than 16 bytes");
  memcpy(f->slot, data, size);
  f->size = size;
  f->line = line;
  f->col = col;
  f->state = kAtSimd;
  switch_to_scheduler(*w, *f);
  return &f->res;
}

void mtl_rt_barrier(uint32_t line, uint32_t col) {
  Worker* w = tl_worker;
  Fiber* f = w->current;
  f->line = line;
  f->col = col;
  f->state = kAtBarrier;
  switch_to_scheduler(*w, *f);
}

int mtl_rt_stop_requests = 0;

bool mtl_rt_poll() {
  Worker* w = tl_worker;
  const int reason = w->launch->cancel.load();
  if (reason == 1) mtl_rt_fail("[interrupted]", "interrupted");
  if (reason == 2) mtl_rt_fail("[timeout]", "timed out");
  return true;
}

const Region* mtl_rt_tg_alloc(const void* key, uint64_t size, uint64_t align, const char* name) {
  Worker* w = tl_worker;
  for (uint32_t i = 0; i < w->ntg; ++i)
    if (w->tg_keys[i] == key) return &w->tg_regions[i];
  if (w->ntg == kMaxThreadgroupArrays)
    mtl_rt_fail("[limit]", format("kernel '%s' declares more than %u threadgroup arrays", w->launch->args->kernel,
                                  kMaxThreadgroupArrays).c_str());
  align = std::max<uint64_t>(align, 16);
  const uint64_t offset = (w->arena_used + align - 1) / align * align;
  if (offset + size > kThreadgroupMemoryLimit) {
    std::string msg = format("kernel '%s' uses more than the 32 KiB (%llu bytes) of threadgroup memory Apple "
                             "GPUs allow: its threadgroup declarations need at least %llu bytes",
                             w->launch->args->kernel, (unsigned long long)kThreadgroupMemoryLimit,
                             (unsigned long long)(offset + size));
    mtl_rt_fail("[limit]", msg.c_str());
  }
  w->tg_keys[w->ntg] = key;
  w->tg_regions[w->ntg] = Region{reinterpret_cast<char*>(w->arena + offset), size, -1, -1, name};
  w->arena_used = offset + size;
  w->arena_high = std::max(w->arena_high, w->arena_used);
  return &w->tg_regions[w->ntg++];
}

void mtl_rt_fail(const char* category, const char* msg) {
  Worker* w = tl_worker;
  if (w == nullptr || w->current == nullptr) {
    fprintf(stderr, "metalcore executor: %s %s (outside a kernel thread)\n", category, msg);
    abort();
  }
  Fiber* f = w->current;
  w->launch->set_error(std::string(category) + " " + msg + "; " + where(*f));
  f->state = kFailed;
  switch_to_scheduler(*w, *f);
  __builtin_unreachable();
}

void mtl_rt_oob(const Region* r, const void* addr, uint64_t access_size) {
  Worker* w = tl_worker;
  const long long offset = static_cast<const char*>(addr) - r->base;
  if (r->buffer < 0) {
    mtl_rt_fail("[oob]", format("out-of-bounds threadgroup access in kernel '%s': threadgroup array '%s', byte "
                                "offset %lld, access of %llu bytes, array size %llu bytes",
                                w->launch->args->kernel, r->name, offset, (unsigned long long)access_size,
                                (unsigned long long)r->size).c_str());
  }
  std::string elem = r->element >= 0 ? format(" (tensor %d of the list)", r->element) : std::string();
  std::string msg = format("out-of-bounds device access in kernel '%s': buffer %d ('%s')%s, byte offset %lld, "
                           "access of %llu bytes, buffer size %llu bytes",
                           w->launch->args->kernel, r->buffer, r->name, elem.c_str(), offset,
                           (unsigned long long)access_size, (unsigned long long)r->size);
  mtl_rt_fail("[oob]", msg.c_str());
}

const Region* mtl_rt_region_of(const void* addr) {
  const Worker* w = tl_worker;
  const LaunchArgs* a = w->launch->args;
  const char* p = static_cast<const char*>(addr);
  for (uint32_t i = 0; i < a->nlookup; ++i) {
    const Region& r = a->lookup[i];
    if (p >= r.base && p < r.base + r.size) return &r;
  }
  for (uint32_t i = 0; i < w->ntg; ++i) {
    const Region& r = w->tg_regions[i];
    if (p >= r.base && p < r.base + r.size) return &r;
  }
  return nullptr;
}

}  // extern "C"

namespace {

void run_worker(Launch& L) {
  Worker* w = acquire_worker(L.group_threads, L.stack_bytes);
  if (w == nullptr) {
    L.set_error(format("[limit] kernel '%s': cannot map %llu threads' stacks of %llu KiB", L.args->kernel,
                       (unsigned long long)L.group_threads, (unsigned long long)(L.stack_bytes >> 10)));
  } else {
    stack_t alt, old_alt;
    alt.ss_sp = w->altstack.data();
    alt.ss_size = w->altstack.size();
    alt.ss_flags = 0;
    sigaltstack(&alt, &old_alt);
    tl_worker = w;
    w->launch = &L;
    while (!L.failed && !L.cancel) {
      const uint64_t g = L.next.fetch_add(1);
      if (g >= L.total_groups) break;
      if (!run_group(*w, L, g)) break;
    }
    w->launch = nullptr;
    w->current = nullptr;
    tl_worker = nullptr;
    sigaltstack(&old_alt, nullptr);
    release_worker(w);
  }
  std::lock_guard<std::mutex> lock(L.mu);
  if (--L.running == 0) L.done_cv.notify_all();
}

// OS threads that run launches' workers, kept between launches (creating two or more threads per
// launch doubled the cost of a small launch). A thread waits for a job, runs one worker of a launch,
// and waits again (ending after 10 s without one); a job finding no waiting thread starts a new one, so
// a launch stuck after a cancel never holds up later launches. Never destroyed: threads may still wait
// on it at exit.
struct ThreadPool {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<Launch*> jobs;
  size_t waiting = 0;
};

ThreadPool& thread_pool() {
  static ThreadPool* p = new ThreadPool;
  return *p;
}

void pool_thread() {
  ThreadPool& p = thread_pool();
  std::unique_lock<std::mutex> lock(p.mu);
  for (;;) {
    ++p.waiting;
    const bool job = p.cv.wait_for(lock, std::chrono::seconds(10), [&p] { return !p.jobs.empty(); });
    --p.waiting;
    if (!job) return;  // idle for 10 s: each shader library keeps threads only while it is in use
    Launch* L = p.jobs.back();
    p.jobs.pop_back();
    lock.unlock();
    run_worker(*L);
    lock.lock();
  }
}

void submit(Launch* L) {
  ThreadPool& p = thread_pool();
  std::lock_guard<std::mutex> lock(p.mu);
  p.jobs.push_back(L);
  if (p.waiting >= p.jobs.size()) {
    p.cv.notify_one();
  } else {
    std::thread(pool_thread).detach();
  }
}

}  // namespace

extern "C" {

void* mtl_launch_start(EntryFn entry, const LaunchArgs* args, const uint32_t* threads, const uint32_t* group,
                       uint32_t nworkers, uint64_t stack_bytes) {
  install_fault_handler();
  Launch* L = new Launch;
  L->entry = entry;
  L->args = args;
  L->stack_bytes = stack_bytes;
  L->total_groups = 1;
  L->group_threads = 1;
  for (int d = 0; d < 3; ++d) {
    L->threads[d] = threads[d];
    L->group[d] = group[d];
    L->ngroups[d] = group[d] ? (threads[d] + group[d] - 1) / group[d] : 0;
    L->total_groups *= L->ngroups[d];
    L->group_threads *= group[d];
  }
  const uint64_t nw = std::min<uint64_t>(std::max<uint32_t>(nworkers, 1), L->total_groups);
  L->running = uint32_t(nw);
  for (uint64_t i = 0; i < nw; ++i) submit(L);
  return L;
}

int mtl_launch_wait(void* launch, uint32_t timeout_ms) {
  Launch* L = static_cast<Launch*>(launch);
  std::unique_lock<std::mutex> lock(L->mu);
  return L->done_cv.wait_for(lock, std::chrono::milliseconds(timeout_ms), [L] { return L->running == 0; });
}

void mtl_launch_cancel(void* launch, int reason) {
  Launch* L = static_cast<Launch*>(launch);
  int expected = 0;
  if (L->cancel.compare_exchange_strong(expected, reason)) __atomic_fetch_add(&mtl_rt_stop_requests, 1, __ATOMIC_RELAXED);
}

int mtl_launch_finish(void* launch, char* err, uint64_t errlen) {
  Launch* L = static_cast<Launch*>(launch);
  {
    std::unique_lock<std::mutex> lock(L->mu);
    L->done_cv.wait(lock, [L] { return L->running == 0; });
  }
  if (L->cancel) __atomic_fetch_sub(&mtl_rt_stop_requests, 1, __ATOMIC_RELAXED);
  const int rc = L->failed ? 1 : 0;
  if (rc) snprintf(err, size_t(errlen), "%s", L->error.c_str());
  delete L;
  return rc;
}

}  // extern "C"
