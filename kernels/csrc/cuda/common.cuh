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

// The logit of one column's score: s·psi(score) on the target column (recording its logit
// and score, the margin in fp32 on that column only), s·score elsewhere.
__device__ __forceinline__ float column_logit(const dpface::Margin<float>& g, float score, bool is_target,
                                              float* target_logit, float* target_score) {
  if (!is_target) return g.s * score;
  const float z = g.s * dpface::psi(g, score);
  *target_logit = z;
  *target_score = score;
  return z;
}

inline dpface::Margin<float> margin_of(const dpface_margin_params* p) {
  dpface::MarginParams mp;
  mp.s = p->s; mp.m1 = p->m1; mp.m2 = p->m2; mp.m3 = p->m3;
  mp.easy_margin = p->easy_margin != 0;
  mp.normalize = p->normalize != 0;
  return dpface::make_margin<float>(mp);
}

inline int cuda_code(cudaError_t e) { return e == cudaSuccess ? DPFACE_CUDA_OK : DPFACE_CUDA_ECUDA_BASE + int(e); }

}  // namespace dpface_cuda
