// The emulator's runtime (see cuda_emu.h): fibers, barriers, launches and the handful of
// CUDA runtime calls the kernels' host code makes (memset, last error), plus the
// allocation and copy calls a test driver uses. Built with the kernels into one shared
// library, usually under -fsanitize=address,undefined.
#include "cuda_emu.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define DPFACE_EMU_ASAN 1
#else
#define DPFACE_EMU_ASAN 0
#endif

// ---- context switch --------------------------------------------------------------------
// x86-64: callee-saved registers, MXCSR and the x87 control word on the stack, then the
// stack pointer swapped (no signal-mask syscall, unlike swapcontext). Elsewhere: ucontext.
#if defined(__x86_64__)
extern "C" void dpface_emu_switch(void** save_sp, void* next_sp);
asm(R"(
  .text
  .globl dpface_emu_switch
  .type dpface_emu_switch, @function
dpface_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size dpface_emu_switch, .-dpface_emu_switch
)");
#endif

namespace dpface_emu {

thread_local Builtins* current = nullptr;

namespace {

#if defined(__x86_64__)
struct Context {
  void* sp = nullptr;
};
inline void switch_to(Context& save, Context& next) { dpface_emu_switch(&save.sp, next.sp); }
// A fresh stack whose first switch "returns" into entry(), 16-byte aligned as after a call.
inline void make_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
  uint64_t* top = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(stack + bytes)) & ~uintptr_t(15));
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  *--top = 0;                                  // entry's return address: never used
  *--top = reinterpret_cast<uint64_t>(entry);  // popped by the switch's ret
  for (int r = 0; r < 6; ++r) *--top = 0;      // rbp rbx r12 r13 r14 r15
  *--top = uint64_t(mxcsr) | (uint64_t(fpucw) << 32);
  c.sp = top;
}
#else
struct Context {
  ucontext_t uc;
};
inline void switch_to(Context& save, Context& next) { swapcontext(&save.uc, &next.uc); }
inline void make_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

}  // namespace

namespace {

constexpr size_t kStackBytes = size_t(256) << 10;  // per fiber; ASan frames are large
constexpr size_t kEntryFrameBytes = size_t(16) << 10;
constexpr int kMaxThreads = 1024;

enum class St { Ready, AtBlockBarrier, AtWarpBarrier, Done };

struct Barrier {
  int arrived = 0;
  unsigned gen = 0;
  unsigned mask = 0;
  const char* file = nullptr;
  int line = 0;
};

struct Warp {
  Barrier bar;
  uint64_t slots[2][32];
  alignas(64) unsigned char scratch[4096];
};

struct Fiber {
  Context ctx;
  char* stack = nullptr;
  St st = St::Ready;
  unsigned wait_gen = 0;
  int linear = 0;
  Builtins b;
  void* fake_stack = nullptr;
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  Barrier bar;
  int live = 0;
  Context sched;
  Body body = nullptr;
  void* ctx = nullptr;
  const char* kernel = "";
  const void* sched_bottom = nullptr;
  size_t sched_size = 0;
};

// One per OS thread: the fiber stacks (reused from block to block) and the running block.
struct Worker {
  std::vector<char*> stacks;
  Block block;
  Fiber* fiber = nullptr;
  ~Worker() {
    for (char* s : stacks) munmap(s, kStackBytes);
  }
  char* stack(int i) {
    while (int(stacks.size()) <= i) {
      void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) {
        std::fprintf(stderr, "dpface cuda emu: cannot map a fiber stack\n");
        std::abort();
      }
      stacks.push_back(static_cast<char*>(p));
    }
    return stacks[i];
  }
};

thread_local Worker* worker = nullptr;
thread_local cudaError_t last_error = cudaSuccess;

struct Config {
  uint64_t seed = 0;  // 0: blocks and fibers in index order
  int threads = 0;    // 0: hardware concurrency
};
Config config;

uint64_t mix(uint64_t x) {  // splitmix64
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

void shuffle_order(std::vector<int>& v, uint64_t key) {
  for (int i = int(v.size()) - 1; i > 0; --i) {
    key = mix(key);
    std::swap(v[i], v[int(key % uint64_t(i + 1))]);
  }
}

std::string where() {
  char buf[160];
  if (worker && worker->fiber) {
    const Builtins& b = worker->fiber->b;
    std::snprintf(buf, sizeof buf, " [kernel %s, block (%u,%u,%u), thread (%u,%u,%u)]", worker->block.kernel,
                  b.block_idx.x, b.block_idx.y, b.block_idx.z, b.thread_idx.x, b.thread_idx.y, b.thread_idx.z);
    return buf;
  }
  return "";
}

void yield_to_scheduler() {
  Worker& w = *worker;
  Fiber* me = w.fiber;
#if DPFACE_EMU_ASAN
  __sanitizer_start_switch_fiber(&me->fake_stack, w.block.sched_bottom, w.block.sched_size);
#endif
  switch_to(me->ctx, w.block.sched);
#if DPFACE_EMU_ASAN
  __sanitizer_finish_switch_fiber(me->fake_stack, nullptr, nullptr);
#endif
}

void fiber_entry() {
  Worker& w = *worker;
#if DPFACE_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &w.block.sched_bottom, &w.block.sched_size);
#endif
  w.block.body(w.block.ctx);
  Fiber* me = w.fiber;
  me->st = St::Done;
  Block& B = w.block;
  --B.live;
  // Exited threads no longer count at __syncthreads (as on sm_70 and later) ...
  if (B.bar.arrived > 0 && B.bar.arrived == B.live) {
    B.bar.arrived = 0;
    ++B.bar.gen;
  }
  // ... but a warp operation waiting for this lane can never complete.
  const Warp& wp = B.warps[me->linear / 32];
  if (wp.bar.arrived > 0 && ((wp.bar.mask >> (me->linear % 32)) & 1u))
    fail(wp.bar.file, wp.bar.line, "a lane named in a warp operation's mask exited while the others wait");
#if DPFACE_EMU_ASAN
  __sanitizer_start_switch_fiber(nullptr, B.sched_bottom, B.sched_size);
#endif
  switch_to(me->ctx, B.sched);  // never resumed
  std::abort();
}

bool ready(const Block& B, const Fiber& f) {
  switch (f.st) {
    case St::Ready: return true;
    case St::AtBlockBarrier: return B.bar.gen != f.wait_gen;
    case St::AtWarpBarrier: return B.warps[f.linear / 32].bar.gen != f.wait_gen;
    case St::Done: return false;
  }
  return false;
}

void run_block(Worker& w, dim3 grid, dim3 block, uint3 bid, Body body, void* ctx, const char* name) {
  const int n = int(block.x * block.y * block.z);
  Block& B = w.block;
  B.fibers.assign(size_t(n), Fiber{});
  B.warps.assign(size_t((n + 31) / 32), Warp{});
  B.bar = Barrier{};
  B.live = n;
  B.body = body;
  B.ctx = ctx;
  B.kernel = name;
  for (int t = 0; t < n; ++t) {
    Fiber& f = B.fibers[size_t(t)];
    f.linear = t;
    const unsigned u = unsigned(t);
    f.b.thread_idx = make_uint3(u % block.x, (u / block.x) % block.y, u / (block.x * block.y));
    f.b.block_idx = bid;
    f.b.block_dim = block;
    f.b.grid_dim = grid;
    f.stack = w.stack(t);
#if DPFACE_EMU_ASAN
    // The previous fiber left this stack by a switch, not a return: its entry frame's
    // redzones are still poisoned (deeper frames returned and cleaned up after themselves).
    __asan_unpoison_memory_region(f.stack + kStackBytes - kEntryFrameBytes, kEntryFrameBytes);
#endif
    make_context(f.ctx, f.stack, kStackBytes, fiber_entry);
  }
  std::vector<int> order(static_cast<size_t>(n));
  for (int t = 0; t < n; ++t) order[size_t(t)] = t;
  uint64_t key = mix(config.seed ^ (uint64_t(bid.x) << 32) ^ (uint64_t(bid.y) << 16) ^ bid.z);
  while (B.live > 0) {
    if (config.seed) shuffle_order(order, key = mix(key));
    bool progressed = false;
    for (int t : order) {
      Fiber& f = B.fibers[size_t(t)];
      if (!ready(B, f)) continue;
      f.st = St::Ready;
      w.fiber = &f;
      current = &f.b;
#if DPFACE_EMU_ASAN
      void* fake = nullptr;
      __sanitizer_start_switch_fiber(&fake, f.stack, kStackBytes);
#endif
      switch_to(B.sched, f.ctx);
#if DPFACE_EMU_ASAN
      __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
      progressed = true;
    }
    if (!progressed) {
      w.fiber = nullptr;
      std::string what = "deadlock: no thread can proceed; waiting:";
      for (const Fiber& f : B.fibers) {
        if (f.st == St::Done) continue;
        char buf[96];
        const Barrier& b = f.st == St::AtBlockBarrier ? B.bar : B.warps[size_t(f.linear / 32)].bar;
        std::snprintf(buf, sizeof buf, " thread %d at %s:%d;", f.linear, b.file ? b.file : "?", b.line);
        what += buf;
        if (what.size() > 600) break;
      }
      char head[120];
      std::snprintf(head, sizeof head, "kernel %s, block (%u,%u,%u)", name, bid.x, bid.y, bid.z);
      fail(head, 0, what.c_str());
    }
  }
  w.fiber = nullptr;
  current = nullptr;
}

bool config_ok(dim3 g, dim3 b, size_t smem) {
  const uint64_t nt = uint64_t(b.x) * b.y * b.z;
  return g.x >= 1 && g.x <= 0x7fffffffu && g.y >= 1 && g.y <= 65535 && g.z >= 1 && g.z <= 65535 && b.x >= 1 &&
         b.y >= 1 && b.z >= 1 && b.x <= 1024 && b.y <= 1024 && b.z <= 64 && nt <= uint64_t(kMaxThreads) &&
         smem <= 48 * 1024;
}

}  // namespace

[[noreturn]] void fail(const char* file, int line, const char* what) {
  std::fprintf(stderr, "dpface cuda emu: %s:%d: %s%s\n", file, line, what, where().c_str());
  std::fflush(stderr);
  std::abort();
}

int lane() { return worker->fiber->linear % 32; }

void syncthreads(const char* file, int line) {
  Worker& w = *worker;
  Block& B = w.block;
  Barrier& b = B.bar;
  if (b.arrived == 0) {
    b.file = file;
    b.line = line;
  } else if (b.line != line || std::strcmp(b.file, file) != 0) {
    char msg[256];
    std::snprintf(msg, sizeof msg, "barrier divergence: __syncthreads here while other threads wait at %s:%d",
                  b.file, b.line);
    fail(file, line, msg);
  }
  if (++b.arrived == B.live) {
    b.arrived = 0;
    ++b.gen;
    return;
  }
  w.fiber->st = St::AtBlockBarrier;
  w.fiber->wait_gen = b.gen;
  yield_to_scheduler();
}

void warp_barrier(unsigned mask, const char* file, int line) {
  Worker& w = *worker;
  Block& B = w.block;
  Fiber& me = *w.fiber;
  const int wi = me.linear / 32, l = me.linear % 32;
  if (!((mask >> l) & 1u)) fail(file, line, "warp operation by a lane that is not in its mask");
  const int n = int(B.fibers.size());
  for (int k = 0; k < 32; ++k) {
    if (!((mask >> k) & 1u)) continue;
    const int t = wi * 32 + k;
    if (t >= n || B.fibers[size_t(t)].st == St::Done)
      fail(file, line, "warp operation whose mask names an exited or non-existent lane");
  }
  Barrier& b = B.warps[size_t(wi)].bar;
  if (b.arrived == 0) {
    b.file = file;
    b.line = line;
    b.mask = mask;
  } else if (b.line != line || b.mask != mask || std::strcmp(b.file, file) != 0) {
    char msg[256];
    std::snprintf(msg, sizeof msg, "warp divergence: lanes meet at %s:%d (mask %08x) and here (mask %08x)", b.file,
                  b.line, b.mask, mask);
    fail(file, line, msg);
  }
  if (++b.arrived == __builtin_popcount(mask)) {
    b.arrived = 0;
    ++b.gen;
    return;
  }
  me.st = St::AtWarpBarrier;
  me.wait_gen = b.gen;
  yield_to_scheduler();
}

uint64_t* warp_slots_write() {
  Warp& wp = worker->block.warps[size_t(worker->fiber->linear / 32)];
  return wp.slots[wp.bar.gen & 1u];
}

const uint64_t* warp_slots_read() {  // after the barrier: the generation that just closed
  Warp& wp = worker->block.warps[size_t(worker->fiber->linear / 32)];
  return wp.slots[(wp.bar.gen - 1u) & 1u];
}

void* warp_scratch(size_t bytes) {
  if (bytes > sizeof(Warp::scratch)) fail(__FILE__, __LINE__, "warp scratch too small");
  return worker->block.warps[size_t(worker->fiber->linear / 32)].scratch;
}

void launch(dim3 grid, dim3 block, size_t smem, cudaStream_t, Body body, void* ctx, const char* name) {
  if (!config_ok(grid, block, smem)) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  const uint64_t nb = uint64_t(grid.x) * grid.y * grid.z;
  std::vector<uint3> ids;
  ids.reserve(size_t(nb));
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) ids.push_back(make_uint3(x, y, z));
  if (config.seed) {
    std::vector<int> order(ids.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = int(i);
    shuffle_order(order, mix(config.seed ^ 0x5bd1e995u));
    std::vector<uint3> shuffled;
    shuffled.reserve(ids.size());
    for (int i : order) shuffled.push_back(ids[size_t(i)]);
    ids.swap(shuffled);
  }
  int nthreads = config.threads > 0 ? config.threads : int(std::max(1u, std::thread::hardware_concurrency()));
  nthreads = int(std::min<uint64_t>(uint64_t(nthreads), nb));
  std::atomic<size_t> next{0};
  auto work = [&] {
    Worker w;
    worker = &w;
    for (size_t i; (i = next.fetch_add(1)) < ids.size();) run_block(w, grid, block, ids[i], body, ctx, name);
    worker = nullptr;
  };
  if (nthreads <= 1) {
    work();
    return;
  }
  std::vector<std::thread> pool;
  for (int t = 0; t < nthreads; ++t) pool.emplace_back(work);
  for (auto& t : pool) t.join();
}

}  // namespace dpface_emu

// ---- the CUDA runtime calls: a device pointer is a host pointer, the stream is in order ----
extern "C" {

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = dpface_emu::last_error;
  dpface_emu::last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError(void) { return dpface_emu::last_error; }

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    default: return "unknown error (emulator)";
  }
}

cudaError_t cudaMalloc(void** p, size_t n) {
  if (!p) return cudaErrorInvalidValue;
  *p = n ? std::malloc(n) : nullptr;  // exact size: ASan's redzone starts at the last byte
  return n && !*p ? cudaErrorMemoryAllocation : cudaSuccess;
}
cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t n, cudaMemcpyKind) {
  if (n) std::memcpy(dst, src, n);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind k, cudaStream_t) {
  return cudaMemcpy(dst, src, n, k);
}
cudaError_t cudaMemset(void* p, int v, size_t n) {
  if (n) std::memset(p, v, n);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) { return cudaMemset(p, v, n); }
cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

// seed 0: blocks and threads in index order; otherwise a seeded shuffle of the block order
// and of the order fibers resume after every barrier. threads 0: one OS thread per core.
void dpface_emu_configure(unsigned long long seed, int threads) {
  dpface_emu::config.seed = seed;
  dpface_emu::config.threads = threads;
}

}  // extern "C"
