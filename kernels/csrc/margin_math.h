// Margin transform of the target score, shared by the CPU (C++) and CUDA kernels.
// Plain C++ (no torch headers) so nvcc compiles it on machines without a CUDA torch.
//
// psi(c): the combined margin cos(m1*theta + m2) - m3 applied to the target score c, with
// cos theta clamped to [-1+eps, 1-eps] first (d acos/dc is unbounded at +-1) and the
// monotone fallback past theta* = (pi - m2)/m1 (where cos(m1*theta + m2) turns back up).
// dpsi(c): its exact derivative with respect to the unclamped c (0 where the clamp cuts).
// Both follow dpface.losses.margin.CombinedMargin.target_logit op for op.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define DPFACE_HD __host__ __device__ __forceinline__
#else
#define DPFACE_HD inline
#endif

namespace dpface {

struct MarginParams {
  double s = 1.0, m1 = 1.0, m2 = 0.0, m3 = 0.0;
  bool easy_margin = false;
  bool normalize = true;  // cosine scores (row norms folded in) vs raw x.w + b
};

// Precomputed, in the accumulation type T (float or double).
template <typename T>
struct Margin {
  T s, m1, m2, m3, cos_m2, sin_m2, m2_sin_m2, cos_theta_star, eps;
  bool easy, plain;  // plain: m1 == 1 and m2 == 0 (NormFace / CosFace / softmax): c - m3, no clamp
};

template <typename T>
inline Margin<T> make_margin(const MarginParams& p) {
  Margin<T> g;
  const double pi = 3.14159265358979323846;
  double theta_star = (pi - p.m2) / p.m1;
  if (theta_star > pi) theta_star = pi;
  g.s = (T)p.s; g.m1 = (T)p.m1; g.m2 = (T)p.m2; g.m3 = (T)p.m3;
  g.cos_m2 = (T)std::cos(p.m2); g.sin_m2 = (T)std::sin(p.m2);
  g.m2_sin_m2 = (T)(p.m2 * std::sin(p.m2));
  g.cos_theta_star = (T)std::cos(theta_star);
  g.eps = (T)1e-7;
  g.easy = p.easy_margin;
  g.plain = (p.m1 == 1.0 && p.m2 == 0.0);
  return g;
}

template <typename T>
DPFACE_HD T psi(const Margin<T>& g, T c) {
  if (g.plain) return c - g.m3;
  T lo = (T)-1 + g.eps, hi = (T)1 - g.eps;
  T cc = c < lo ? lo : (c > hi ? hi : c);
  T out;
  if (g.m1 == (T)1) {
    out = cc > g.cos_theta_star ? cc * g.cos_m2 - sqrt((T)1 - cc * cc) * g.sin_m2
                                : cc - g.m2_sin_m2;
  } else {
    out = cc > g.cos_theta_star ? cos(g.m1 * acos(cc) + g.m2) : cc - (g.cos_theta_star + (T)1);
  }
  out -= g.m3;
  if (g.easy && !(cc > (T)0)) out = c;
  return out;
}

template <typename T>
DPFACE_HD T dpsi(const Margin<T>& g, T c) {
  if (g.plain) return (T)1;
  T lo = (T)-1 + g.eps, hi = (T)1 - g.eps;
  T cc = c < lo ? lo : (c > hi ? hi : c);
  if (g.easy && !(cc > (T)0)) return (T)1;
  T inside = (c >= lo && c <= hi) ? (T)1 : (T)0;  // torch.clamp passes the gradient on [lo, hi]
  if (!(cc > g.cos_theta_star)) return inside;      // fallback: slope 1 in cc
  T sin_t = sqrt((T)1 - cc * cc);
  if (g.m1 == (T)1) return inside * (g.cos_m2 + cc * g.sin_m2 / sin_t);
  return inside * g.m1 * sin(g.m1 * acos(cc) + g.m2) / sin_t;
}

}  // namespace dpface
