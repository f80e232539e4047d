// Runs the dpface .cu sources on the CPU with CUDA semantics, for tests: g++ compiles the
// *same* files (`g++ -x c++ -include kernels/emu/cuda_emu.h ...`, the toolkit's headers
// for dim3, cudaError_t, __nv_bfloat16) and every launch executes here.
//
//   * every CUDA thread of a block is a fiber on one OS thread; blocks run on a
//     small pool of OS threads, in an order that DPFACE_EMU_SEED shuffles, and the fibers of
//     a block are resumed in a (seeded) shuffled order at every barrier;
//   * __syncthreads is a block barrier; warp shuffles and votes, __syncwarp and the WMMA
//     calls are warp barriers. A barrier reached from two different source lines, a warp
//     operation whose mask names an exited thread, and a deadlock are reported and abort;
//   * __shared__ variables are `static thread_local`: one copy per OS thread, hence per
//     running block, left as the previous block on that thread wrote them (like hardware,
//     nothing clears shared memory between blocks);
//   * WMMA fragments hold the lane's share of the tile (element e = i * 32 + lane);
//     mma_sync exchanges the operands through the warp like the tensor core does, with
//     products and sums in fp32. load/store check the 256-bit pointer and ldm alignment;
//   * launches check the configuration as CUDA does (cudaErrorInvalidConfiguration).
//
// What it covers and what not: kernels/emu/README.md.
#pragma once

#if defined(__CUDACC__)
#error "cuda_emu.h is for host compilers; nvcc builds the kernels natively"
#endif

#define DPFACE_CUDA_EMU 1

// Before the toolkit's headers, which keep these if already defined.
#define __shared__ static thread_local
#define __launch_bounds__(...)

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <math.h>  // CUDA's float overloads (sqrt(float), ...) in the global namespace

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

namespace dpface_emu {

// The executing fiber's built-in variables.
struct Builtins {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};
extern thread_local Builtins* current;

void syncthreads(const char* file, int line);
// All lanes in `mask` meet here; returns the lane's own index.
void warp_barrier(unsigned mask, const char* file, int line);
// One 64-bit slot per lane, shared by the warp, double-buffered by barrier generation.
uint64_t* warp_slots_write();
const uint64_t* warp_slots_read();
// Scratch shared by the warp (the WMMA operand exchange).
void* warp_scratch(size_t bytes);
int lane();
// The optional trailing argument of __syncwarp and the shuffles (mask / width).
constexpr unsigned opt(unsigned dflt) { return dflt; }
constexpr unsigned opt(unsigned, unsigned given) { return given; }
[[noreturn]] void fail(const char* file, int line, const char* what);

using Body = void (*)(void*);
void launch(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Body body, void* ctx, const char* name);

template <class... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  const char* name;
  template <class... A>
  void operator()(A&&... a) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel argument count");
    struct Ctx {
      void (*kernel)(P...);
      std::tuple<P...> args;
    } c{kernel, std::tuple<P...>(static_cast<P>(std::forward<A>(a))...)};
    launch(grid, block, smem, stream, [](void* p) {
      Ctx* c = static_cast<Ctx*>(p);
      std::tuple<P...> copy = c->args;  // kernel parameters are per-thread copies
      std::apply(c->kernel, copy);
    }, &c, name);
  }
};

template <class... P>
Launch<P...> make_launch(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, void (*kernel)(P...),
                         const char* name) {
  return Launch<P...>{kernel, grid, block, smem, stream, name};
}

template <class T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a type wider than 64 bits");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <class T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

// The value of lane src_lane(lane) after every lane of the mask has published its own.
template <class T, class F>
T shuffle(unsigned mask, T v, F src_lane, const char* file, int line) {
  const int me = lane();
  warp_slots_write()[me] = to_bits(v);
  warp_barrier(mask, file, line);
  const int src = src_lane(me);
  if (src < 0 || src > 31 || !((mask >> src) & 1u)) return v;  // CUDA: own value outside the segment
  return from_bits<T>(warp_slots_read()[src]);
}

}  // namespace dpface_emu

// The device integer min/max of CUDA's math API (host code has only std::min).
#define DPFACE_EMU_MINMAX(T)                              \
  inline T min(T a, T b) { return b < a ? b : a; }       \
  inline T max(T a, T b) { return a < b ? b : a; }
DPFACE_EMU_MINMAX(int)
DPFACE_EMU_MINMAX(unsigned)
DPFACE_EMU_MINMAX(long long)
DPFACE_EMU_MINMAX(unsigned long long)
#undef DPFACE_EMU_MINMAX

#define threadIdx (::dpface_emu::current->thread_idx)
#define blockIdx (::dpface_emu::current->block_idx)
#define blockDim (::dpface_emu::current->block_dim)
#define gridDim (::dpface_emu::current->grid_dim)
#define warpSize 32

#define __syncthreads() ::dpface_emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::dpface_emu::warp_barrier(::dpface_emu::opt(0xffffffffu, ##__VA_ARGS__), __FILE__, __LINE__)

// Segment-relative lane arithmetic as in the CUDA programming guide (width a power of 2).
#define __shfl_sync(mask, v, src, ...) \
  ::dpface_emu::shuffle(mask, v, [&](int me) { const int w_ = int(::dpface_emu::opt(32u, ##__VA_ARGS__)); \
    return (me & ~(w_ - 1)) + (int(src) & (w_ - 1)); }, __FILE__, __LINE__)
#define __shfl_xor_sync(mask, v, lm, ...) \
  ::dpface_emu::shuffle(mask, v, [&](int me) { const int w_ = int(::dpface_emu::opt(32u, ##__VA_ARGS__)); \
    const int s_ = me ^ int(lm); return (s_ & ~(w_ - 1)) == (me & ~(w_ - 1)) ? s_ : me; }, __FILE__, __LINE__)
#define __shfl_down_sync(mask, v, d, ...) \
  ::dpface_emu::shuffle(mask, v, [&](int me) { const int w_ = int(::dpface_emu::opt(32u, ##__VA_ARGS__)); \
    return (me & (w_ - 1)) + int(d) < w_ ? me + int(d) : me; }, __FILE__, __LINE__)
#define __shfl_up_sync(mask, v, d, ...) \
  ::dpface_emu::shuffle(mask, v, [&](int me) { const int w_ = int(::dpface_emu::opt(32u, ##__VA_ARGS__)); \
    return (me & (w_ - 1)) >= int(d) ? me - int(d) : me; }, __FILE__, __LINE__)

namespace dpface_emu {
inline unsigned ballot(unsigned mask, int pred, const char* file, int line) {
  const int me = lane();
  warp_slots_write()[me] = pred ? 1u : 0u;
  warp_barrier(mask, file, line);
  unsigned out = 0;
  for (int l = 0; l < 32; ++l)
    if (((mask >> l) & 1u) && warp_slots_read()[l]) out |= 1u << l;
  return out;
}
}  // namespace dpface_emu
#define __ballot_sync(mask, pred) ::dpface_emu::ballot(mask, pred, __FILE__, __LINE__)
#define __any_sync(mask, pred) (::dpface_emu::ballot(mask, pred, __FILE__, __LINE__) != 0u)
#define __all_sync(mask, pred) (::dpface_emu::ballot(mask, pred, __FILE__, __LINE__) == (mask))

// The launch: nvcc builds DPFACE_LAUNCH as kernel<<<grid, block, smem, stream>>>
// (kernels/csrc/cuda/launch.h).
#define DPFACE_LAUNCH(grid, block, smem, stream, ...) \
  ::dpface_emu::make_launch(grid, block, smem, stream, __VA_ARGS__, #__VA_ARGS__)

// ---- WMMA (mma.h): the fragment API on 16x16x16 tiles ----------------------------------
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K> struct Shape;
template <int M, int N, int K> struct Shape<matrix_a, M, N, K> { static constexpr int R = M, C = K; };
template <int M, int N, int K> struct Shape<matrix_b, M, N, K> { static constexpr int R = K, C = N; };
template <int M, int N, int K> struct Shape<accumulator, M, N, K> { static constexpr int R = M, C = N; };

// A lane holds elements e = i * 32 + lane (i < num_elements) of the row-major tile.
template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulator has the 16x16x16 shape only");
  static constexpr int R = Shape<Use, M, N, K>::R, C = Shape<Use, M, N, K>::C;
  static constexpr int num_elements = R * C / 32;
  using element_type = T;
  T x[num_elements];
};

inline void check_ptr(const void* p, unsigned ldm, size_t elem, const char* file, int line) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) ::dpface_emu::fail(file, line, "WMMA pointer not 256-bit aligned");
  if ((ldm * elem) % 16 != 0) ::dpface_emu::fail(file, line, "WMMA ldm not a multiple of 16 bytes");
}

template <class Use, int M, int N, int K, class T, class L>
void fill_fragment_(fragment<Use, M, N, K, T, L>& f, T v) {
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = v;
}

template <class Use, int M, int N, int K, class T, class L>
void load_(fragment<Use, M, N, K, T, L>& f, const T* p, unsigned ldm, bool col, const char* file, int line) {
  ::dpface_emu::warp_barrier(0xffffffffu, file, line);
  check_ptr(p, ldm, sizeof(T), file, line);
  const int me = ::dpface_emu::lane();
  constexpr int Cc = fragment<Use, M, N, K, T, L>::C;
  for (int i = 0; i < f.num_elements; ++i) {
    const int e = i * 32 + me, r = e / Cc, c = e % Cc;
    f.x[i] = col ? p[size_t(c) * ldm + r] : p[size_t(r) * ldm + c];
  }
}

template <class Use, int M, int N, int K, class T, class L>
void load_matrix_sync_(fragment<Use, M, N, K, T, L>& f, const T* p, unsigned ldm, const char* file, int line) {
  static_assert(!std::is_same<Use, accumulator>::value, "an accumulator load needs a layout");
  load_(f, p, ldm, std::is_same<L, col_major>::value, file, line);
}
template <int M, int N, int K, class T>
void load_matrix_sync_(fragment<accumulator, M, N, K, T>& f, const T* p, unsigned ldm, layout_t lay,
                       const char* file, int line) {
  load_(f, p, ldm, lay == mem_col_major, file, line);
}

template <int M, int N, int K, class T>
void store_matrix_sync_(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t lay,
                        const char* file, int line) {
  ::dpface_emu::warp_barrier(0xffffffffu, file, line);
  check_ptr(p, ldm, sizeof(T), file, line);
  const int me = ::dpface_emu::lane();
  for (int i = 0; i < f.num_elements; ++i) {
    const int e = i * 32 + me, r = e / N, c = e % N;
    if (lay == mem_col_major) p[size_t(c) * ldm + r] = f.x[i];
    else p[size_t(r) * ldm + c] = f.x[i];
  }
  ::dpface_emu::warp_barrier(0xffffffffu, file, line);
}

inline float as_float(float v) { return v; }
inline float as_float(__nv_bfloat16 v) { return __bfloat162float(v); }
inline float as_float(__half v) { return __half2float(v); }

// d = a * b + c: every lane publishes its share of a, b and c, reads the whole operands
// back and computes its own share of d (fp32 products and sums, k in order).
template <int M, int N, int K, class TA, class LA, class TB, class LB>
void mma_sync_(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
               const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, float>& c,
               const char* file, int line) {
  struct Tiles { float a[M * K], b[K * N], c[M * N]; };
  ::dpface_emu::warp_barrier(0xffffffffu, file, line);
  Tiles* t = static_cast<Tiles*>(::dpface_emu::warp_scratch(sizeof(Tiles)));
  const int me = ::dpface_emu::lane();
  for (int i = 0; i < a.num_elements; ++i) t->a[i * 32 + me] = as_float(a.x[i]);
  for (int i = 0; i < b.num_elements; ++i) t->b[i * 32 + me] = as_float(b.x[i]);
  for (int i = 0; i < c.num_elements; ++i) t->c[i * 32 + me] = c.x[i];
  ::dpface_emu::warp_barrier(0xffffffffu, file, line);
  float out[d.num_elements];
  for (int i = 0; i < d.num_elements; ++i) {
    const int e = i * 32 + me, r = e / N, n = e % N;
    float s = t->c[e];
    for (int k = 0; k < K; ++k) s += t->a[r * K + k] * t->b[k * N + n];
    out[i] = s;
  }
  ::dpface_emu::warp_barrier(0xffffffffu, file, line);  // the scratch is free again
  for (int i = 0; i < d.num_elements; ++i) d.x[i] = out[i];
}

}  // namespace wmma
}  // namespace nvcuda

#define fill_fragment(f, v) fill_fragment_(f, v)
#define load_matrix_sync(...) load_matrix_sync_(__VA_ARGS__, __FILE__, __LINE__)
#define store_matrix_sync(...) store_matrix_sync_(__VA_ARGS__, __FILE__, __LINE__)
#define mma_sync(...) mma_sync_(__VA_ARGS__, __FILE__, __LINE__)
