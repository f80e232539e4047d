// What the .cu files share: one column's logit, the online log-sum-exp and the
// NaN-propagating max (the fused kernels and the chunked path's epilogues), the host-side
// margin and the error code of a CUDA call. Plain CUDA C++ (nvcc, or g++ with
// kernels/emu/cuda_emu.h).
#pragma once

#include <cuda_runtime.h>

#include <cmath>

#include "../margin_math.h"
#include "dpface_cuda.h"

namespace dpface_cuda {

// NaN-propagating max (torch.max propagates NaN; fmaxf drops it).
__device__ __forceinline__ float nanmax(float a, float b) { return (a > b || a != a) ? a : b; }

// Adds logit z to an online log-sum-exp (m: the max so far, s: sum of exp(z - m)).
__device__ __forceinline__ void lse_push(float& m, float& s, float z) {
  if (z > m) {
    s = s * expf(m - z) + 1.f;
    m = z;
  } else {
    s += expf(z - m);
  }
}

// The logit of one column's score in row i, gi = the row's margin (row_margin): s_i·psi(score)
// on the target column (recording its logit and score, the margin in fp32 on that column
// only), s_i·negative(score) elsewhere (CurricularFace's hard negatives, else the score).
__device__ __forceinline__ float column_logit(const dpface::Margin<float>& gi, const dpface::SampleParams<float>& sp,
                                              int64_t i, float score, bool is_target, float* target_logit,
                                              float* target_score) {
  if (!is_target) return gi.s * dpface::negative(sp, i, score);
  const float z = gi.s * dpface::psi(gi, score);
  *target_logit = z;
  *target_score = score;
  return z;
}

// d logit / d score of one column in row i (the softmax gradient's factor before inv_j).
__device__ __forceinline__ float column_slope(const dpface::Margin<float>& g, const dpface::SampleParams<float>& sp,
                                              int64_t i, float score, bool is_target) {
  if (!is_target) return dpface::row_scale(g, sp, i) * dpface::dnegative(sp, i, score);
  const dpface::Margin<float> gi = dpface::row_margin(g, sp, i);
  return gi.s * dpface::dpsi(gi, score);
}

// The logit of one column for backward (the target's margin built only where it is).
__device__ __forceinline__ float column_logit_at(const dpface::Margin<float>& g, const dpface::SampleParams<float>& sp,
                                                 int64_t i, float score, bool is_target) {
  if (!is_target) return dpface::row_scale(g, sp, i) * dpface::negative(sp, i, score);
  const dpface::Margin<float> gi = dpface::row_margin(g, sp, i);
  return gi.s * dpface::psi(gi, score);
}

inline dpface::Margin<float> margin_of(const dpface_margin_params* p) {
  return dpface::make_margin<float>(p->s, p->m1, p->m2, p->m3, p->easy_margin != 0, p->angle_clip != 0);
}

inline dpface::SampleParams<float> samples_of(const dpface_margin_params* p) {
  dpface::SampleParams<float> sp;
  sp.scale = p->sample_scale;
  sp.margin = p->sample_margin;
  sp.hard = p->hard_threshold;
  sp.t = float(p->t);
  return sp;
}

inline int cuda_code(cudaError_t e) { return e == cudaSuccess ? DPFACE_CUDA_OK : DPFACE_CUDA_ECUDA_BASE + int(e); }

}  // namespace dpface_cuda
