// The margin transforms of the fused op, shared by the CPU (C++) and CUDA kernels.
// Plain C++ (no torch headers) so nvcc compiles it on machines without a CUDA torch.
//
// psi(c): the target score's transform, cos(m1*theta + m2) - m3 with cos theta clamped to
// [-1+eps, 1-eps] first (d acos/dc is unbounded at +-1). Past theta* = (pi - m2)/m1 the
// curve turns back up; there the monotone fallback (ArcFace's), or with `clip` (AdaFace's
// form) the angle m1*theta + m2 clamped to [eps, pi - eps] instead. dpsi(c): its exact
// derivative with respect to the unclamped c (0 where a clamp cuts). Both follow
// dpface.ops.reference.psi_reference op for op.
//
// Per-sample parameters (any pointer may be null): scale [B] replaces s, margin [B, 3]
// replaces (m1, m2, m3) of row i (AdaFace, MagFace, ElasticFace); hard [B] with t is
// CurricularFace's modulation of the negatives: a score above hard[i] becomes c (t + c).
#pragma once

#include <math.h>

#include <cmath>
#include <cstdint>

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
  bool clip = false;      // AdaFace: clamp the angle instead of the theta* fallback
};

// Precomputed, in the accumulation type T (float or double).
template <typename T>
struct Margin {
  T s, m1, m2, m3, cos_m2, sin_m2, m2_sin_m2, cos_theta_star, eps;
  bool easy, clip, plain;  // plain: m1 == 1 and m2 == 0, no clip: c - m3, no clamp
};

// In double whatever T (the per-sample rows too: on a GPU only where a row's target is).
template <typename T>
DPFACE_HD Margin<T> make_margin(double s, double m1, double m2, double m3, bool easy, bool clip) {
  Margin<T> g;
  const double pi = 3.14159265358979323846;
  double theta_star = (pi - m2) / m1;
  if (theta_star > pi) theta_star = pi;
  g.s = (T)s; g.m1 = (T)m1; g.m2 = (T)m2; g.m3 = (T)m3;
  g.cos_m2 = (T)::cos(m2); g.sin_m2 = (T)::sin(m2);
  g.m2_sin_m2 = (T)(m2 * ::sin(m2));
  g.cos_theta_star = (T)::cos(theta_star);
  g.eps = (T)1e-7;
  g.easy = easy;
  g.clip = clip;
  g.plain = !clip && m1 == 1.0 && m2 == 0.0;
  return g;
}

template <typename T>
inline Margin<T> make_margin(const MarginParams& p) {
  return make_margin<T>(p.s, p.m1, p.m2, p.m3, p.easy_margin, p.clip);
}

template <typename T>
struct SampleParams {
  const T* scale = nullptr;   // [B] or null
  const T* margin = nullptr;  // [B, 3] (m1, m2, m3) or null
  const T* hard = nullptr;    // [B] or null: CurricularFace's thresholds
  T t = 0;
};

template <typename T>
DPFACE_HD T row_scale(const Margin<T>& g, const SampleParams<T>& sp, int64_t i) {
  return sp.scale ? sp.scale[i] : g.s;
}

// Row i's margin (g itself without per-sample parameters).
template <typename T>
DPFACE_HD Margin<T> row_margin(const Margin<T>& g, const SampleParams<T>& sp, int64_t i) {
  if (!sp.scale && !sp.margin) return g;
  const T* m = sp.margin ? sp.margin + 3 * i : nullptr;
  return make_margin<T>((double)row_scale(g, sp, i), m ? (double)m[0] : (double)g.m1,
                        m ? (double)m[1] : (double)g.m2, m ? (double)m[2] : (double)g.m3, g.easy, g.clip);
}

// A negative's unscaled logit and its derivative (CurricularFace; identity without `hard`).
template <typename T>
DPFACE_HD T negative(const SampleParams<T>& sp, int64_t i, T c) {
  return sp.hard && c > sp.hard[i] ? c * (sp.t + c) : c;
}
template <typename T>
DPFACE_HD T dnegative(const SampleParams<T>& sp, int64_t i, T c) {
  return sp.hard && c > sp.hard[i] ? sp.t + c + c : (T)1;
}

template <typename T>
DPFACE_HD T psi(const Margin<T>& g, T c) {
  if (g.plain) return c - g.m3;
  T lo = (T)-1 + g.eps, hi = (T)1 - g.eps;
  T cc = c < lo ? lo : (c > hi ? hi : c);
  T out;
  if (g.clip) {
    const T pi = (T)3.14159265358979323846;
    T a = g.m1 * acos(cc) + g.m2;
    a = a < g.eps ? g.eps : (a > pi - g.eps ? pi - g.eps : a);
    out = cos(a);
  } else if (g.m1 == (T)1) {
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
  T sin_t = sqrt((T)1 - cc * cc);
  if (g.clip) {
    const T pi = (T)3.14159265358979323846;
    const T a = g.m1 * acos(cc) + g.m2;
    if (a < g.eps || a > pi - g.eps) return (T)0;
    return inside * g.m1 * sin(a) / sin_t;
  }
  if (!(cc > g.cos_theta_star)) return inside;  // fallback: slope 1 in cc
  if (g.m1 == (T)1) return inside * (g.cos_m2 + cc * g.sin_m2 / sin_t);
  return inside * g.m1 * sin(g.m1 * acos(cc) + g.m2) / sin_t;
}

}  // namespace dpface
