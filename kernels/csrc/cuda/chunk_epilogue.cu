// The chunked margin softmax's own kernels (head.kernel=chunked, contract: kernels/OPS.md).
//
// The chunked path leaves every GEMM to the vendor library (cuBLAS through torch) and
// walks the shard's columns in chunks of a few thousand; per chunk only the epilogues
// run here: the forward's margin, online log-sum-exp and kept logits, and the backward's
// softmax gradient. Memory is O(B x chunk). Deterministic: no atomics; each row's
// reduction has a fixed tree order and the chunks are combined in sequence.
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>

#include "../margin_math.h"
#include "dpface_cuda.h"
#include "common.cuh"
#include "launch.h"

namespace {

using dpface::Margin;
using namespace dpface_cuda;

constexpr int kRowThreads = 256;  // forward: one block per row
constexpr int kEltThreads = 256;  // backward: one thread per element


// (m, s) of an online log-sum-exp: the max logit and sum exp(z - m); m = -inf: empty.
__device__ __forceinline__ void lse_merge(float& m, float& s, float om, float os) {
  const float M = fmaxf(m, om);
  if (M == -INFINITY) return;
  s = (m == -INFINITY ? 0.f : s * expf(m - M)) + (om == -INFINITY ? 0.f : os * expf(om - M));
  m = M;
}

struct FwdArgs {
  const float* scores; int64_t B, n, c0, n_keep;
  const float* inv; const float* bias; const int64_t* target;
  float* saved; float* run_max; float* run_sum; float* max_score; float* target_logit; float* target_score;
};

__global__ void __launch_bounds__(kRowThreads) chunk_fwd_kernel(FwdArgs a, Margin<float> g, dpface::SampleParams<float> sp,
                                                                int normalize) {
  __shared__ float sm[kRowThreads], ss[kRowThreads], sx[kRowThreads];
  const int64_t i = blockIdx.x;
  const Margin<float> gi = dpface::row_margin(g, sp, i);
  const int64_t t = a.target[i];
  const float* row = a.scores + i * a.n;
  float m = -INFINITY, s = 0.f, mx = -INFINITY;
  for (int64_t j = threadIdx.x; j < a.n; j += blockDim.x) {
    float score = row[j];
    if (normalize) score *= a.inv[j];
    else if (a.bias) score += a.bias[j];
    const int64_t jg = a.c0 + j;
    const float z = column_logit(gi, sp, i, score, jg == t, &a.target_logit[i], &a.target_score[i]);
    mx = nanmax(mx, score);
    lse_push(m, s, z);
    if (jg < a.n_keep) a.saved[i * a.n_keep + jg] = score;
  }
  sm[threadIdx.x] = m;
  ss[threadIdx.x] = s;
  sx[threadIdx.x] = mx;
  __syncthreads();
  for (int o = blockDim.x / 2; o > 0; o >>= 1) {
    if (threadIdx.x < o) {
      lse_merge(sm[threadIdx.x], ss[threadIdx.x], sm[threadIdx.x + o], ss[threadIdx.x + o]);
      sx[threadIdx.x] = nanmax(sx[threadIdx.x], sx[threadIdx.x + o]);
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {  // the chunks of a row are combined in order
    lse_merge(a.run_max[i], a.run_sum[i], sm[0], ss[0]);
    a.max_score[i] = nanmax(a.max_score[i], sx[0]);
  }
}

struct BwdArgs {
  const float* src; int64_t ld_src; int from_saved; int64_t B, n, c0;
  const float* inv; const float* bias; const int64_t* target; const float* target_score;
  const float* lse; const float* grad_lse; const float* grad_target; float* da;
};

// da[i, j] = d loss / d (x_i . row_j): G = grad_lse p + grad_target [j = t], times the
// logit's slope in the score (s, the margin's derivative at the target from the forward's
// target score, CurricularFace's at a hard negative), and inv_j.
__global__ void __launch_bounds__(kEltThreads) chunk_bwd_kernel(BwdArgs a, Margin<float> g, dpface::SampleParams<float> sp,
                                                                int normalize) {
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= a.B * a.n) return;
  const int64_t i = e / a.n, j = e % a.n;
  const bool is_t = a.c0 + j == a.target[i];
  const float v = a.src[i * a.ld_src + j];
  float score;
  if (is_t) score = a.target_score[i];
  else if (a.from_saved) score = v;  // the kept score (inv / bias folded in)
  else score = normalize ? v * a.inv[j] : (a.bias ? v + a.bias[j] : v);
  const float z = column_logit_at(g, sp, i, score, is_t);
  float G = a.grad_lse[i] * expf(z - a.lse[i]);
  if (is_t) G += a.grad_target[i];
  const float dscore = column_slope(g, sp, i, score, is_t) * G;
  a.da[i * a.n + j] = normalize ? dscore * a.inv[j] : dscore;
}

bool sizes_ok(int64_t B, int64_t n, int64_t c0) {
  return B >= 0 && B <= INT_MAX && n >= 0 && n <= INT_MAX && c0 >= 0;
}

}  // namespace

extern "C" {

int dpface_chunk_fwd_epilogue(const float* scores, int64_t B, int64_t n, int64_t c0, const float* inv,
                              const float* bias, const int64_t* target, const dpface_margin_params* p, float* saved,
                              int64_t n_keep, float* run_max, float* run_sum, float* max_score, float* target_logit,
                              float* target_score, cudaStream_t stream) {
  if (!p || !sizes_ok(B, n, c0) || n_keep < 0) return DPFACE_CUDA_EINVAL;
  if (B == 0 || n == 0) return DPFACE_CUDA_OK;
  if (!scores || !target || !run_max || !run_sum || !max_score || !target_logit || !target_score ||
      (p->normalize && !inv) || (n_keep > c0 && !saved))
    return DPFACE_CUDA_EINVAL;
  const FwdArgs a{scores, B, n, c0, n_keep, inv, bias, target, saved, run_max, run_sum, max_score, target_logit,
                  target_score};
  DPFACE_LAUNCH(unsigned(B), kRowThreads, 0, stream, chunk_fwd_kernel)(a, margin_of(p), samples_of(p), p->normalize != 0);
  return cuda_code(cudaGetLastError());
}

int dpface_chunk_bwd_epilogue(const float* src, int64_t ld_src, int from_saved, int64_t B, int64_t n, int64_t c0,
                              const float* inv, const float* bias, const int64_t* target, const float* target_score,
                              const float* lse, const float* grad_lse, const float* grad_target,
                              const dpface_margin_params* p, float* da, cudaStream_t stream) {
  if (!p || !sizes_ok(B, n, c0) || ld_src < n) return DPFACE_CUDA_EINVAL;
  if (B == 0 || n == 0) return DPFACE_CUDA_OK;
  if (!src || !target || !target_score || !lse || !grad_lse || !grad_target || !da || (p->normalize && !inv))
    return DPFACE_CUDA_EINVAL;
  const BwdArgs a{src, ld_src, from_saved, B, n, c0, inv, bias, target, target_score, lse, grad_lse, grad_target, da};
  const int64_t blocks = (B * n + kEltThreads - 1) / kEltThreads;
  if (blocks > INT_MAX) return DPFACE_CUDA_EINVAL;
  DPFACE_LAUNCH(unsigned(blocks), kEltThreads, 0, stream, chunk_bwd_kernel)(a, margin_of(p), samples_of(p), p->normalize != 0);
  return cuda_code(cudaGetLastError());
}

}  // extern "C"
