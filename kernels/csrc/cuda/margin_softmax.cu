// Fused margin-softmax forward / backward (contract: kernels/OPS.md).
//
// Plain CUDA C++, no cuBLAS: every GEMM here has a fused prologue (rows of w gathered
// through idx, fp32 -> bf16 rounding) or epilogue (norm folding, margin, online
// log-sum-exp, softmax gradient), which a library GEMM would force through a [B, tile]
// round trip in global memory anyway. All GEMMs share one block-tile routine
// (tile_product): a 64x64 output tile, k-steps of 32 staged in shared memory, computed
// by SIMT fp32 FMAs (fp32 path) or by WMMA bf16 tensor cores with fp32 accumulators
// (bf16 path). The result tile lands in shared memory, where each kernel's epilogue
// reads it.
//
// Determinism: no atomics. Every reduction has a fixed order that depends on the shapes
// only (not on the device or on scheduling): the forward's per-row (max, sum) partials
// are combined over a fixed number of column blocks in order, the backward's sums run
// inside one block over the reduction dimension, and grad_x accumulates column chunks
// in sequence.
#include "dpface_cuda.h"
#include "launch.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <climits>
#include <cstdint>
#include <type_traits>

#include "../margin_math.h"
#include "common.cuh"

namespace {

using dpface::Margin;
using namespace dpface_cuda;
using bf16_t = __nv_bfloat16;

constexpr int BM = 64;   // output tile rows
constexpr int BN = 64;   // output tile columns
constexpr int BK = 32;   // reduction step staged in shared memory
constexpr int NT = 128;  // threads per GEMM block (4 warps)
// Shared-memory padding: keeps WMMA ldm a multiple of 16 bytes and rows 32-byte aligned,
// and breaks the power-of-two row stride for the transposed tile stores.
constexpr int PAD_F = 4, PAD_H = 8, PAD_C = 4;
constexpr int LDC = BN + PAD_C;

// Forward: target number of (row block, column block) pairs. A function of the shapes
// only, so the combine order (and hence the bits) is the same on every device.
// The tests' CPU emulation builds this file with smaller values (tests/integration/cuda_emu.py) so that
// tiny problems take the paths of large ones; the defaults are the production values.
#ifndef DPFACE_FWD_TARGET_BLOCKS
#define DPFACE_FWD_TARGET_BLOCKS 1024
#endif
#ifndef DPFACE_BWD_CHUNK_ELEMS
#define DPFACE_BWD_CHUNK_ELEMS (int64_t(1) << 24)
#endif
#ifndef DPFACE_X_TARGET_BLOCKS
#define DPFACE_X_TARGET_BLOCKS 512
#endif
#ifndef DPFACE_X_MIN_SPAN
#define DPFACE_X_MIN_SPAN 256
#endif
constexpr int kFwdTargetBlocks = DPFACE_FWD_TARGET_BLOCKS;
// Backward: column chunk size bound, in elements of the [B, chunk] / [chunk, D] scratch.
constexpr int64_t kBwdChunkElems = DPFACE_BWD_CHUNK_ELEMS;
constexpr int64_t kBwdMaxChunk = int64_t(1) << 20;

template <bool kWmma> struct Smem;
template <> struct Smem<false> { using T = float; static constexpr int LD = BM + PAD_F; };
template <> struct Smem<true> { using T = bf16_t; static constexpr int LD = BM + PAD_H; };

// A/B k-slices and the fp32 result tile share the storage (they are never live together).
template <bool kWmma>
struct TileSmem {
  using T = typename Smem<kWmma>::T;
  static constexpr int LD = Smem<kWmma>::LD;
  union {
    struct {
      T a[BK * LD];  // a[k * LD + m]
      T b[BK * LD];  // b[k * LD + n]
    } ab;
    float c[BM * LDC];  // c[m * LDC + n]
  };
};

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(bf16_t v) { return __bfloat162float(v); }
template <class T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ bf16_t from_f<bf16_t>(float v) { return __float2bfloat16_rn(v); }

// Operand views: element (m, k) of a logical [rows, kdim] operand, 0 outside.
// RowsK: k is the contiguous index (p[map(m) * ld + k]); ColsK: m is (p[map(k) * ld + m]).
// map(r) = idx ? idx[off + r] : off + r gathers rows of w without a copy.
template <class T>
struct RowsK {
  static constexpr bool kContigK = true;
  const T* p; const int64_t* idx; int64_t off; int64_t ld; int rows; int kdim;
  __device__ __forceinline__ float get(int m, int k) const {
    if (m >= rows || k >= kdim) return 0.f;
    const int64_t r = idx ? idx[off + m] : off + m;
    return to_f(p[r * ld + k]);
  }
};
template <class T>
struct ColsK {
  static constexpr bool kContigK = false;
  const T* p; const int64_t* idx; int64_t off; int64_t ld; int rows; int kdim;
  __device__ __forceinline__ float get(int m, int k) const {
    if (m >= rows || k >= kdim) return 0.f;
    const int64_t r = idx ? idx[off + k] : off + k;
    return to_f(p[r * ld + m]);
  }
};

// Stage the [BK, 64] k-slice starting at (m0, k0) as dst[k * LD + m]; consecutive
// threads read consecutive addresses of the source's contiguous dimension.
template <bool kWmma, class S>
__device__ __forceinline__ void load_slice(typename Smem<kWmma>::T* dst, const S& s, int m0, int k0) {
  constexpr int LD = Smem<kWmma>::LD;
#pragma unroll 4
  for (int e = threadIdx.x; e < BM * BK; e += NT) {
    int m, k;
    if (S::kContigK) { k = e % BK; m = e / BK; } else { m = e % BM; k = e / BM; }
    dst[k * LD + m] = from_f<typename Smem<kWmma>::T>(s.get(m0 + m, k0 + k));
  }
}

// C[m, n] = sum_k A(m0 + m, k) * B(n0 + n, k) for the 64x64 tile, into sm.c.
// Must be called by all threads of the block (it synchronises).
template <bool kWmma, class SA, class SB>
__device__ void tile_product(TileSmem<kWmma>& sm, const SA& sa, const SB& sb, int m0, int n0, int kdim) {
  constexpr int LD = Smem<kWmma>::LD;
  if constexpr (!kWmma) {
    // 16 x 8 threads, each an 8 (m) x 4 (n) micro-tile read as float4s from shared memory.
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    float acc[8][4];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
    for (int k0 = 0; k0 < kdim; k0 += BK) {
      load_slice<false>(sm.ab.a, sa, m0, k0);
      load_slice<false>(sm.ab.b, sb, n0, k0);
      __syncthreads();
#pragma unroll 8
      for (int kk = 0; kk < BK; ++kk) {
        const float4 a0 = *reinterpret_cast<const float4*>(&sm.ab.a[kk * LD + ty * 8]);
        const float4 a1 = *reinterpret_cast<const float4*>(&sm.ab.a[kk * LD + ty * 8 + 4]);
        const float4 b0 = *reinterpret_cast<const float4*>(&sm.ab.b[kk * LD + tx * 4]);
        const float av[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
        const float bv[4] = {b0.x, b0.y, b0.z, b0.w};
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 8; ++i)
      *reinterpret_cast<float4*>(&sm.c[(ty * 8 + i) * LDC + tx * 4]) =
          make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
  } else {
    // Warp (wm, wn) owns the 32x32 quarter (wm, wn): 2x2 fragments of 16x16x16.
    using namespace nvcuda;
    const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
    for (int k0 = 0; k0 < kdim; k0 += BK) {
      load_slice<true>(sm.ab.a, sa, m0, k0);
      load_slice<true>(sm.ab.b, sb, n0, k0);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < BK; kk += 16) {
        // a[k * LD + m] is A (m x k) column-major; b[k * LD + n] is B (k x n) row-major.
        wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16_t, wmma::col_major> fa[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16_t, wmma::row_major> fb[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &sm.ab.a[kk * LD + wm * 32 + i * 16], LD);
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &sm.ab.b[kk * LD + wn * 32 + j * 16], LD);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(&sm.c[(wm * 32 + i * 16) * LDC + wn * 32 + j * 16], acc[i][j], LDC,
                                wmma::mem_row_major);
  }
  __syncthreads();
}

// ---------------------------------------------------------------------------------------
// Shared kernels

// inv_norm[j] = 1 / max(||w_cj||, 1e-12) of the un-rounded row (ones without normalize).
// One warp per column.
template <class T>
__global__ void inv_norm_kernel(const T* w, const int64_t* idx, int K, int D, int normalize, float* inv) {
  const int lane = threadIdx.x % 32;
  const int j = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (j >= K) return;
  if (!normalize) { if (lane == 0) inv[j] = 1.f; return; }
  const T* row = w + (idx ? idx[j] : j) * int64_t(D);
  float ss = 0.f;
  for (int d = lane; d < D; d += 32) { const float v = to_f(row[d]); ss = fmaf(v, v, ss); }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if (lane == 0) inv[j] = 1.f / fmaxf(sqrtf(ss), 1e-12f);
}

// ---------------------------------------------------------------------------------------
// Forward

template <class T>
struct FwdArgs {
  const T* x; const T* w; const int64_t* idx; const int64_t* target; const float* bias;
  const float* inv;
  int B, K, D, n_keep, normalize;
  float* target_logit; float* target_score; float* saved;
  float* part_m; float* part_s; float* part_max;  // [num_col_blocks, B] partials
};

// Block (bx, by): rows [64 bx, 64 bx + 64), column tiles by, by + gridDim.y, ...
// Thread (r, h) owns row r of the block and the tile columns of parity h, keeping an
// online (max, sum of exp) over all of them; the two halves merge through a shuffle.
template <bool kWmma, class T>
__global__ void __launch_bounds__(NT) fwd_tiles_kernel(FwdArgs<T> a, Margin<float> g, dpface::SampleParams<float> sp) {
  __shared__ __align__(128) TileSmem<kWmma> sm;
  const int m0 = blockIdx.x * BM;
  const int r = threadIdx.x >> 1, h = threadIdx.x & 1;
  const int i = m0 + r;
  const bool row_ok = i < a.B;
  const Margin<float> gi = row_ok ? dpface::row_margin(g, sp, i) : g;
  const int64_t ti = row_ok ? a.target[i] : -1;
  float run_m = -INFINITY, run_s = 0.f, run_max = -INFINITY;
  const RowsK<T> sx{a.x, nullptr, 0, a.D, a.B, a.D};
  const RowsK<T> sw{a.w, a.idx, 0, a.D, a.K, a.D};
  const int ntiles = (a.K + BN - 1) / BN;
  for (int tile = blockIdx.y; tile < ntiles; tile += gridDim.y) {
    const int n0 = tile * BN;
    tile_product<kWmma>(sm, sx, sw, m0, n0, a.D);
    if (row_ok) {
      for (int q = 0; q < BN / 2; ++q) {
        const int jj = h + 2 * q, j = n0 + jj;
        if (j >= a.K) break;
        const float dot = sm.c[r * LDC + jj];
        float score;
        if (a.normalize) score = dot * a.inv[j];
        else score = a.bias ? dot + a.bias[a.idx ? a.idx[j] : j] : dot;
        const float z = column_logit(gi, sp, i, score, j == ti, &a.target_logit[i], &a.target_score[i]);
        run_max = nanmax(run_max, score);
        lse_push(run_m, run_s, z);
        if (j < a.n_keep) a.saved[int64_t(i) * a.n_keep + j] = score;
      }
    }
    __syncthreads();  // sm.c is overwritten by the next tile's k-slices
  }
  const float om = __shfl_xor_sync(0xffffffffu, run_m, 1);
  const float os = __shfl_xor_sync(0xffffffffu, run_s, 1);
  const float ox = __shfl_xor_sync(0xffffffffu, run_max, 1);
  if (row_ok && h == 0) {
    const float m = fmaxf(run_m, om);
    const float s = m == -INFINITY ? 0.f : run_s * expf(run_m - m) + os * expf(om - m);
    const int64_t o = int64_t(blockIdx.y) * a.B + i;
    a.part_m[o] = m;
    a.part_s[o] = s;
    a.part_max[o] = nanmax(run_max, ox);
  }
}

// lse and max_score of each row from the column blocks' partials, in block order.
__global__ void fwd_combine_kernel(const float* part_m, const float* part_s, const float* part_max,
                                   int B, int nblocks, float* lse, float* max_score) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= B) return;
  float m = -INFINITY, mx = -INFINITY;
  for (int b = 0; b < nblocks; ++b) {
    m = fmaxf(m, part_m[int64_t(b) * B + i]);
    mx = nanmax(mx, part_max[int64_t(b) * B + i]);
  }
  float s = 0.f;
  if (m != -INFINITY)
    for (int b = 0; b < nblocks; ++b) {
      const int64_t o = int64_t(b) * B + i;
      s += part_s[o] * expf(part_m[o] - m);
    }
  lse[i] = m == -INFINITY ? -INFINITY : m + logf(s);
  max_score[i] = mx;
}

// ---------------------------------------------------------------------------------------
// Backward

template <class T>
struct BwdArgs {
  const float* grad_lse; const float* grad_target; const float* lse;
  const T* x; const T* w; const int64_t* idx; const int64_t* target; const float* bias;
  const float* inv; const float* saved;
  int B, K, D, n_keep, normalize;
};

// da[i, j - k0] for the chunk's columns: grid (column tiles of the chunk, row blocks).
// Tiles entirely inside `saved` skip the GEMM.
template <bool kWmma, class T>
__global__ void __launch_bounds__(NT) bwd_da_kernel(BwdArgs<T> a, Margin<float> g, dpface::SampleParams<float> sp, int k0,
                                                    float* da, int ld_da) {
  __shared__ __align__(128) TileSmem<kWmma> sm;
  const int n0 = k0 + blockIdx.x * BN;
  const int m0 = blockIdx.y * BM;
  const int n_end = min(n0 + BN, a.K);
  if (n_end > a.n_keep) {
    const RowsK<T> sx{a.x, nullptr, 0, a.D, a.B, a.D};
    const RowsK<T> sw{a.w, a.idx, 0, a.D, a.K, a.D};
    tile_product<kWmma>(sm, sx, sw, m0, n0, a.D);
  }
  for (int e = threadIdx.x; e < BM * BN; e += NT) {
    const int r = e / BN, jj = e % BN;
    const int i = m0 + r, j = n0 + jj;
    if (i >= a.B || j >= n_end) continue;
    const int64_t t = a.target[i];
    const bool is_t = j == t;
    float score;
    if (j < a.n_keep) {
      score = a.saved[int64_t(i) * a.n_keep + j];  // the forward's score, bit for bit
    } else {
      const float dot = sm.c[r * LDC + jj];
      if (a.normalize) score = dot * a.inv[j];
      else score = a.bias ? dot + a.bias[a.idx ? a.idx[j] : j] : dot;
    }
    const float z = column_logit_at(g, sp, i, score, is_t);
    float G = a.grad_lse[i] * expf(z - a.lse[i]);
    if (is_t) G += a.grad_target[i];
    const float dscore = column_slope(g, sp, i, score, is_t) * G;
    da[int64_t(i) * ld_da + (j - k0)] = a.normalize ? dscore * a.inv[j] : dscore;
  }
}

// M[jl, d] = sum_i da[i, jl] x[i, d] for the chunk (jl < kc): grid (kc tiles, D tiles).
template <bool kWmma, class T>
__global__ void __launch_bounds__(NT) bwd_rows_gemm_kernel(const float* da, int ld_da, int kc, const T* x,
                                                           int B, int D, float* M) {
  __shared__ __align__(128) TileSmem<kWmma> sm;
  const int j0 = blockIdx.x * BM, d0 = blockIdx.y * BN;
  const ColsK<float> sa{da, nullptr, 0, ld_da, kc, B};  // A(m = jl, k = i) = da[i, jl]
  const ColsK<T> sb{x, nullptr, 0, D, D, B};            // B(n = d, k = i) = x[i, d]
  tile_product<kWmma>(sm, sa, sb, j0, d0, B);
  for (int e = threadIdx.x; e < BM * BN; e += NT) {
    const int r = e / BN, cc = e % BN;
    if (j0 + r < kc && d0 + cc < D) M[int64_t(j0 + r) * D + d0 + cc] = sm.c[r * LDC + cc];
  }
}

// grad_rows_j = M_j - (w_cj . M_j) inv_j^2 w_cj (normalize) or M_j, in w's dtype.
// One warp per row. M may alias grad_rows (fp32): each element is read, then written,
// by the same thread.
template <class T>
__global__ void bwd_project_kernel(const float* M, const T* w, const int64_t* idx, const float* inv, int k0,
                                   int kc, int D, int normalize, T* grad_rows) {
  const int lane = threadIdx.x % 32;
  const int jl = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (jl >= kc) return;
  const int j = k0 + jl;
  const float* mr = M + int64_t(jl) * D;
  const T* wr = w + (idx ? idx[j] : j) * int64_t(D);
  T* out = grad_rows + int64_t(j) * D;
  float coef = 0.f;
  if (normalize) {
    float dot = 0.f;
    for (int d = lane; d < D; d += 32) dot = fmaf(to_f(wr[d]), mr[d], dot);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    coef = dot * inv[j] * inv[j];
  }
  for (int d = lane; d < D; d += 32) out[d] = from_f<T>(mr[d] - coef * to_f(wr[d]));
}

// grad_bias[k0 + jl] = sum_i da[i, jl] (da = dscore without normalize), in row order.
__global__ void bwd_bias_kernel(const float* da, int ld_da, int kc, int k0, int B, float* grad_bias) {
  const int jl = blockIdx.x * blockDim.x + threadIdx.x;
  if (jl >= kc) return;
  float s = 0.f;
  for (int i = 0; i < B; ++i) s += da[int64_t(i) * ld_da + jl];
  grad_bias[k0 + jl] = s;
}

// gx[i, d] += sum_jl da[i, jl] w[c_(k0 + jl), d]: grid (B tiles, D tiles, splits).
// B x D alone is often too few tiles to fill the GPU (the reduction runs over the whole
// chunk), so the chunk's columns are split in gridDim.z contiguous ranges; each split
// writes its own partial (part[z]) and bwd_x_reduce_kernel adds them in split order,
// which keeps the sum deterministic. With one split the tile is added to gx directly.
template <bool kWmma, class T>
__global__ void __launch_bounds__(NT) bwd_x_gemm_kernel(const float* da, int ld_da, int kc, int k0, const T* w,
                                                        const int64_t* idx, int B, int D, int span, float* gx,
                                                        float* part) {
  __shared__ __align__(128) TileSmem<kWmma> sm;
  const int i0 = blockIdx.x * BM, d0 = blockIdx.y * BN;
  const int c0 = blockIdx.z * span;
  const int len = min(span, kc - c0);
  const RowsK<float> sa{da + c0, nullptr, 0, ld_da, B, len};  // A(m = i, k = jl) = da[i, c0 + jl]
  const ColsK<T> sb{w, idx, int64_t(k0) + c0, D, D, len};     // B(n = d, k = jl) = w[c_(k0+c0+jl), d]
  tile_product<kWmma>(sm, sa, sb, i0, d0, len);
  float* out = gridDim.z == 1 ? gx : part + int64_t(blockIdx.z) * B * D;
  for (int e = threadIdx.x; e < BM * BN; e += NT) {
    const int r = e / BN, cc = e % BN;
    if (i0 + r < B && d0 + cc < D) {
      const int64_t o = int64_t(i0 + r) * D + d0 + cc;
      if (gridDim.z == 1) out[o] += sm.c[r * LDC + cc];
      else out[o] = sm.c[r * LDC + cc];
    }
  }
}

__global__ void bwd_x_reduce_kernel(const float* part, int splits, int64_t n, float* gx) {
  const int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (e >= n) return;
  float s = gx[e];
  for (int z = 0; z < splits; ++z) s += part[int64_t(z) * n + e];
  gx[e] = s;
}

__global__ void to_bf16_kernel(const float* src, bf16_t* dst, int64_t n) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i < n) dst[i] = __float2bfloat16_rn(src[i]);
}

// ---------------------------------------------------------------------------------------
// Host side

int last_launch() { return cuda_code(cudaGetLastError()); }

bool size_ok(int64_t v) { return v >= 0 && v <= INT_MAX; }
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
size_t align_up(size_t v) { return (v + 255) & ~size_t(255); }

int fwd_col_blocks(int64_t B, int64_t K) {
  const int64_t tiles = ceil_div(K, BN);
  const int64_t row_blocks = ceil_div(B, BM) > 0 ? ceil_div(B, BM) : 1;
  int64_t nb = kFwdTargetBlocks / row_blocks;
  if (nb < 1) nb = 1;
  if (nb > tiles) nb = tiles;
  return int(nb);
}

// Backward column chunk: as many columns as keep both [B, chunk] and [chunk, D] scratch
// under kBwdChunkElems, a multiple of the tile width.
int64_t bwd_chunk(int64_t B, int64_t K, int64_t D) {
  int64_t big = B > D ? B : D;
  if (big < 1) big = 1;
  int64_t kc = kBwdChunkElems / big / BN * BN;
  if (kc < BN) kc = BN;
  if (kc > kBwdMaxChunk) kc = kBwdMaxChunk;
  const int64_t kmax = ceil_div(K > 0 ? K : 1, BN) * BN;
  return kc < kmax ? kc : kmax;
}

// Split count of the grad_x GEMM: enough (B tile, D tile, split) blocks to fill a large
// GPU, each split at least 256 columns deep, and the partials within the chunk budget.
constexpr int kXTargetBlocks = DPFACE_X_TARGET_BLOCKS, kXMaxSplits = 16, kXMinSpan = DPFACE_X_MIN_SPAN;
int x_splits(int64_t B, int64_t D, int64_t kc) {
  const int64_t tiles = ceil_div(B, BM) * ceil_div(D, BN);
  if (tiles <= 0) return 1;
  int64_t z = kXTargetBlocks / tiles;
  if (z > kXMaxSplits) z = kXMaxSplits;
  if (z > kc / kXMinSpan) z = kc / kXMinSpan;
  if (z > 1 && z * B * D > kBwdChunkElems) z = kBwdChunkElems / (B * D);
  return z < 1 ? 1 : int(z);
}
// Columns per split: a multiple of the k-slice, the same for every chunk.
int x_span(int64_t kc, int splits) { return int(ceil_div(ceil_div(kc, splits), BK) * BK); }

struct BwdLayout {
  size_t da, mbuf, gx, xpart, total;
  int splits;
};
BwdLayout bwd_layout(int64_t B, int64_t K, int64_t D, bool io_bf16) {
  const int64_t kc = bwd_chunk(B, K, D);
  BwdLayout l;
  l.splits = x_splits(B, D, kc);
  l.da = 0;
  l.mbuf = l.da + align_up(sizeof(float) * size_t(B) * size_t(kc));
  l.gx = l.mbuf + (io_bf16 ? align_up(sizeof(float) * size_t(kc) * size_t(D)) : 0);
  l.xpart = l.gx + (io_bf16 ? align_up(sizeof(float) * size_t(B) * size_t(D)) : 0);
  l.total = l.xpart + (l.splits > 1 ? align_up(sizeof(float) * size_t(l.splits) * size_t(B) * size_t(D)) : 0);
  return l;
}


template <bool kWmma, class T>
int fwd_impl(const T* x, const T* w, const int64_t* idx, const int64_t* target, const float* bias, int64_t B,
             int64_t K, int64_t D, int64_t n_keep, const dpface_margin_params* p, float* lse, float* target_logit,
             float* target_score, float* max_score, float* inv_norm, float* saved, void* workspace,
             size_t workspace_bytes, cudaStream_t stream) {
  if (!p || !size_ok(B) || !size_ok(K) || !size_ok(D) || n_keep < 0 || n_keep > K) return DPFACE_CUDA_EINVAL;
  if (B > 0 && (!target || !lse || !target_logit || !target_score || !max_score)) return DPFACE_CUDA_EINVAL;
  if (K > 0 && !inv_norm) return DPFACE_CUDA_EINVAL;
  if ((B * D > 0 && !x) || (K * D > 0 && !w)) return DPFACE_CUDA_EINVAL;
  if (B > 0 && n_keep > 0 && !saved) return DPFACE_CUDA_EINVAL;
  size_t need = 0;
  dpface_margin_softmax_fwd_workspace(B, K, D, &need);
  if (workspace_bytes < need || (need > 0 && !workspace)) return DPFACE_CUDA_EWORKSPACE;
  const Margin<float> g = margin_of(p);
  const int normalize = p->normalize != 0;

  if (K > 0) {
    DPFACE_LAUNCH(unsigned(ceil_div(K, 8)), 256, 0, stream, inv_norm_kernel<T>)(w, idx, int(K), int(D), normalize,
                                                                             inv_norm);
    if (int rc = last_launch()) return rc;
  }
  if (B == 0) return DPFACE_CUDA_OK;
  // Rows whose target is elsewhere (-1) keep these zeros; the one block that owns a
  // target column writes it.
  if (int rc = cuda_code(cudaMemsetAsync(target_logit, 0, sizeof(float) * size_t(B), stream))) return rc;
  if (int rc = cuda_code(cudaMemsetAsync(target_score, 0, sizeof(float) * size_t(B), stream))) return rc;
  const int nb = fwd_col_blocks(B, K);
  float* part = static_cast<float*>(workspace);
  const size_t stride = align_up(sizeof(float) * size_t(nb) * size_t(B)) / sizeof(float);
  if (nb > 0) {
    FwdArgs<T> a{x, w, idx, target, bias, inv_norm, int(B), int(K), int(D), int(n_keep), normalize,
                 target_logit, target_score, saved, part, part + stride, part + 2 * stride};
    const dim3 grid(unsigned(ceil_div(B, BM)), unsigned(nb));
    DPFACE_LAUNCH(grid, NT, 0, stream, fwd_tiles_kernel<kWmma, T>)(a, g, samples_of(p));
    if (int rc = last_launch()) return rc;
  }
  DPFACE_LAUNCH(unsigned(ceil_div(B, 256)), 256, 0, stream, fwd_combine_kernel)(
      part, part + stride, part + 2 * stride, int(B), nb, lse, max_score);
  return last_launch();
}

template <bool kWmma, class T>
int bwd_impl(const float* grad_lse, const float* grad_target, const float* lse, const T* x, const T* w,
             const int64_t* idx, const int64_t* target, const float* bias, const float* inv_norm, const float* saved,
             int64_t B, int64_t K, int64_t D, int64_t n_keep, const dpface_margin_params* p, T* grad_x,
             T* grad_rows, float* grad_bias, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  constexpr bool io_bf16 = !std::is_same<T, float>::value;
  if (!p || !size_ok(B) || !size_ok(K) || !size_ok(D) || n_keep < 0 || n_keep > K) return DPFACE_CUDA_EINVAL;
  if (B > 0 && K > 0 && (!grad_lse || !grad_target || !lse || !target || !inv_norm)) return DPFACE_CUDA_EINVAL;
  if ((B * D > 0 && !x) || (K * D > 0 && !w)) return DPFACE_CUDA_EINVAL;
  if ((B * D > 0 && !grad_x) || (K * D > 0 && !grad_rows)) return DPFACE_CUDA_EINVAL;
  if (B > 0 && n_keep > 0 && !saved) return DPFACE_CUDA_EINVAL;
  const BwdLayout L = bwd_layout(B, K, D, io_bf16);
  if (workspace_bytes < L.total || (L.total > 0 && !workspace)) return DPFACE_CUDA_EWORKSPACE;
  const Margin<float> g = margin_of(p);
  const int normalize = p->normalize != 0;
  char* ws = static_cast<char*>(workspace);
  float* da = reinterpret_cast<float*>(ws + L.da);
  // fp32 inputs accumulate straight into the outputs; bf16 ones go through fp32 scratch.
  float* gx = io_bf16 ? reinterpret_cast<float*>(ws + L.gx) : reinterpret_cast<float*>(grad_x);
  const int64_t kc_max = bwd_chunk(B, K, D);

  if (B * D > 0)
    if (int rc = cuda_code(cudaMemsetAsync(gx, 0, sizeof(float) * size_t(B * D), stream))) return rc;
  if (K > 0 && B == 0) {  // nothing flows: zero row / bias gradients
    if (K * D > 0)
      if (int rc = cuda_code(cudaMemsetAsync(grad_rows, 0, sizeof(T) * size_t(K * D), stream))) return rc;
    if (grad_bias)
      if (int rc = cuda_code(cudaMemsetAsync(grad_bias, 0, sizeof(float) * size_t(K), stream))) return rc;
  }
  if (B > 0 && K > 0) {
    const BwdArgs<T> a{grad_lse, grad_target, lse, x, w, idx, target, bias, inv_norm, saved,
                       int(B), int(K), int(D), int(n_keep), normalize};
    const int ld_da = int(kc_max);
    for (int64_t k0 = 0; k0 < K; k0 += kc_max) {
      const int kc = int(K - k0 < kc_max ? K - k0 : kc_max);
      const dim3 da_grid(unsigned(ceil_div(kc, BN)), unsigned(ceil_div(B, BM)));
      DPFACE_LAUNCH(da_grid, NT, 0, stream, bwd_da_kernel<kWmma, T>)(a, g, samples_of(p), int(k0), da, ld_da);
      if (int rc = last_launch()) return rc;
      if (D == 0) {  // only the bias gradient is non-empty
        if (grad_bias) {
          DPFACE_LAUNCH(unsigned(ceil_div(kc, 256)), 256, 0, stream, bwd_bias_kernel)(da, ld_da, kc, int(k0), int(B),
                                                                                      grad_bias);
          if (int rc = last_launch()) return rc;
        }
        continue;
      }
      float* M = io_bf16 ? reinterpret_cast<float*>(ws + L.mbuf) : reinterpret_cast<float*>(grad_rows) + k0 * D;
      const dim3 rows_grid(unsigned(ceil_div(kc, BM)), unsigned(ceil_div(D, BN)));
      DPFACE_LAUNCH(rows_grid, NT, 0, stream, bwd_rows_gemm_kernel<kWmma, T>)(da, ld_da, kc, x, int(B), int(D), M);
      if (int rc = last_launch()) return rc;
      DPFACE_LAUNCH(unsigned(ceil_div(kc, 8)), 256, 0, stream, bwd_project_kernel<T>)(
          M, w, idx, inv_norm, int(k0), kc, int(D), normalize, grad_rows);
      if (int rc = last_launch()) return rc;
      if (grad_bias) {
        DPFACE_LAUNCH(unsigned(ceil_div(kc, 256)), 256, 0, stream, bwd_bias_kernel)(da, ld_da, kc, int(k0), int(B),
                                                                                    grad_bias);
        if (int rc = last_launch()) return rc;
      }
      // Splits past the chunk's end (a short last chunk) would be empty: drop them.
      const int span = x_span(kc_max, L.splits);
      const int splits = int(ceil_div(kc, span));
      float* xpart = reinterpret_cast<float*>(ws + L.xpart);
      const dim3 x_grid(unsigned(ceil_div(B, BM)), unsigned(ceil_div(D, BN)), unsigned(splits));
      DPFACE_LAUNCH(x_grid, NT, 0, stream, bwd_x_gemm_kernel<kWmma, T>)(da, ld_da, kc, int(k0), w, idx, int(B), int(D),
                                                                        span, gx, xpart);
      if (int rc = last_launch()) return rc;
      if (splits > 1) {
        DPFACE_LAUNCH(unsigned(ceil_div(B * D, 256)), 256, 0, stream, bwd_x_reduce_kernel)(xpart, splits, B * D, gx);
        if (int rc = last_launch()) return rc;
      }
    }
  }
  if (io_bf16 && B * D > 0) {
    DPFACE_LAUNCH(unsigned(ceil_div(B * D, 256)), 256, 0, stream, to_bf16_kernel)(
        gx, reinterpret_cast<bf16_t*>(grad_x), B * D);
    if (int rc = last_launch()) return rc;
  }
  return DPFACE_CUDA_OK;
}

}  // namespace

extern "C" {

const char* dpface_cuda_error_string(int code) {
  switch (code) {
    case DPFACE_CUDA_OK: return "ok";
    case DPFACE_CUDA_EINVAL: return "dpface CUDA: invalid argument (negative or > INT32_MAX size, or a null pointer)";
    case DPFACE_CUDA_EWORKSPACE: return "dpface CUDA: workspace smaller than the *_workspace query";
    default: break;
  }
  if (code > DPFACE_CUDA_ECUDA_BASE) return cudaGetErrorString(static_cast<cudaError_t>(code - DPFACE_CUDA_ECUDA_BASE));
  return "dpface CUDA: unknown error code";
}

int dpface_margin_softmax_fwd_workspace(int64_t B, int64_t K, int64_t D, size_t* bytes) {
  if (!bytes || !size_ok(B) || !size_ok(K) || !size_ok(D)) return DPFACE_CUDA_EINVAL;
  *bytes = B > 0 ? 3 * align_up(sizeof(float) * size_t(fwd_col_blocks(B, K)) * size_t(B)) : 0;
  return DPFACE_CUDA_OK;
}

int dpface_margin_softmax_bwd_workspace(int64_t B, int64_t K, int64_t D, int io_bf16, size_t* bytes) {
  if (!bytes || !size_ok(B) || !size_ok(K) || !size_ok(D)) return DPFACE_CUDA_EINVAL;
  *bytes = bwd_layout(B, K, D, io_bf16 != 0).total;
  return DPFACE_CUDA_OK;
}

int dpface_margin_softmax_fwd_f32(const float* x, const float* w, const int64_t* idx, const int64_t* target,
                                  const float* bias, int64_t B, int64_t K, int64_t D, int64_t n_keep,
                                  const dpface_margin_params* p, float* lse, float* target_logit,
                                  float* target_score, float* max_score, float* inv_norm, float* saved,
                                  void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (p && p->bf16)
    return fwd_impl<true, float>(x, w, idx, target, bias, B, K, D, n_keep, p, lse, target_logit, target_score,
                                 max_score, inv_norm, saved, workspace, workspace_bytes, stream);
  return fwd_impl<false, float>(x, w, idx, target, bias, B, K, D, n_keep, p, lse, target_logit, target_score,
                                max_score, inv_norm, saved, workspace, workspace_bytes, stream);
}

int dpface_margin_softmax_fwd_bf16(const uint16_t* x, const uint16_t* w, const int64_t* idx, const int64_t* target,
                                   const float* bias, int64_t B, int64_t K, int64_t D, int64_t n_keep,
                                   const dpface_margin_params* p, float* lse, float* target_logit,
                                   float* target_score, float* max_score, float* inv_norm, float* saved,
                                   void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  return fwd_impl<true, bf16_t>(reinterpret_cast<const bf16_t*>(x), reinterpret_cast<const bf16_t*>(w), idx, target,
                                bias, B, K, D, n_keep, p, lse, target_logit, target_score, max_score, inv_norm, saved,
                                workspace, workspace_bytes, stream);
}

int dpface_margin_softmax_bwd_f32(const float* grad_lse, const float* grad_target, const float* lse, const float* x,
                                  const float* w, const int64_t* idx, const int64_t* target, const float* bias,
                                  const float* inv_norm, const float* saved, int64_t B, int64_t K, int64_t D,
                                  int64_t n_keep, const dpface_margin_params* p, float* grad_x, float* grad_rows,
                                  float* grad_bias, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (p && p->bf16)
    return bwd_impl<true, float>(grad_lse, grad_target, lse, x, w, idx, target, bias, inv_norm, saved, B, K, D,
                                 n_keep, p, grad_x, grad_rows, grad_bias, workspace, workspace_bytes, stream);
  return bwd_impl<false, float>(grad_lse, grad_target, lse, x, w, idx, target, bias, inv_norm, saved, B, K, D,
                                n_keep, p, grad_x, grad_rows, grad_bias, workspace, workspace_bytes, stream);
}

int dpface_margin_softmax_bwd_bf16(const float* grad_lse, const float* grad_target, const float* lse,
                                   const uint16_t* x, const uint16_t* w, const int64_t* idx, const int64_t* target,
                                   const float* bias, const float* inv_norm, const float* saved, int64_t B,
                                   int64_t K, int64_t D, int64_t n_keep, const dpface_margin_params* p,
                                   uint16_t* grad_x, uint16_t* grad_rows, float* grad_bias, void* workspace,
                                   size_t workspace_bytes, cudaStream_t stream) {
  return bwd_impl<true, bf16_t>(grad_lse, grad_target, lse, reinterpret_cast<const bf16_t*>(x),
                                reinterpret_cast<const bf16_t*>(w), idx, target, bias, inv_norm, saved, B, K, D,
                                n_keep, p, reinterpret_cast<bf16_t*>(grad_x), reinterpret_cast<bf16_t*>(grad_rows),
                                grad_bias, workspace, workspace_bytes, stream);
}

}  // extern "C"
