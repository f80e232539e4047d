// Fused margin softmax on the CPU: ATen GEMMs on column tiles of the shard, fused
// element-wise loops over rows, never the [B, K] logits (contract: kernels/OPS.md). With
// bf16, where the CPU multiplies bf16 natively, the GEMMs run in bf16 (oneDNN; outputs
// rounded to bf16) and the target's score is recomputed exactly from the same operands.
//
// A tile is TILE_ELEMS / B columns wide, so its [B, n] scores stay in the L2/L3 cache
// between the GEMM that writes them and the loops that read them; ATen's exp (vectorised,
// dispatched to the CPU's widest ISA at run time) is the only transcendental pass.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif

#include "../margin_math.h"
#include "../ops.h"
#include "simd.h"

namespace dpface {

// Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16). There the bf16
// path runs oneDNN's bf16 GEMMs (2.7x the fp32 rate on AMD Zen 5); elsewhere a bf16 GEMM is no
// faster than the fp32 one on operands rounded to bf16. DPFACE_CPU_BF16_GEMM=1 / 0 forces
// either (tests run both paths on any CPU).
bool cpu_has_bf16() {
#if defined(__x86_64__) && defined(__GNUC__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  const bool avx512_bf16 = __get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 5) & 1u);
  const bool amx_bf16 = __get_cpuid_count(7, 0, &a, &b, &c, &d) && ((d >> 22) & 1u);
  return avx512_bf16 || amx_bf16;
#else
  return false;
#endif
}

namespace {

constexpr int64_t TILE_ELEMS = 1 << 18;  // 1 MiB of fp32 scores per tile
constexpr int64_t MIN_TILE = 64, MAX_TILE = 4096;

int64_t tile_width(int64_t B) {
  return std::clamp<int64_t>(TILE_ELEMS / std::max<int64_t>(B, 1), MIN_TILE, MAX_TILE);
}

bool use_bf16_gemm() {
  static const bool native = cpu_has_bf16();
  const char* force = std::getenv("DPFACE_CPU_BF16_GEMM");
  if (force != nullptr && (force[0] == '0' || force[0] == '1') && force[1] == '\0') return force[0] == '1';
  return native;
}

// What every tile needs: the gathered rows (accumulation dtype), their inverse norms and
// the GEMM operand (the rows rounded to bf16 when asked; with bf16 GEMMs also as bf16).
struct Tile {
  at::Tensor rows, gemm_rows, inv, gemm_rows_b;
};

struct Ctx {
  const at::Tensor& w;
  const std::optional<at::Tensor>& idx;
  at::ScalarType acc;
  bool bf16, normalize;
  at::Tensor gather_buf;
  bool native = false;  // bf16 GEMMs (bf16 products, fp32 sums, outputs rounded to bf16)

  at::Tensor round(const at::Tensor& t) const {
    return bf16 ? t.to(at::kBFloat16).to(acc) : t;
  }

  Tile load(int64_t t0, int64_t n, bool with_norms = true) {
    Tile t;
    at::Tensor raw;
    if (idx.has_value()) {
      // Gather this tile's rows into a reused buffer: no [K, D] copy of the sample.
      raw = gather_buf.narrow(0, 0, n);
      at::index_select_out(raw, w, 0, idx->narrow(0, t0, n));
    } else {
      raw = w.narrow(0, t0, n);
    }
    t.rows = raw.scalar_type() == acc ? raw : raw.to(acc);
    if (normalize && with_norms)
      t.inv = at::linalg_vector_norm(t.rows, 2, {1}).clamp_min_(1e-12).reciprocal_();
    if (native) t.gemm_rows_b = t.rows.to(at::kBFloat16);  // (gemm_rows not needed)
    else t.gemm_rows = round(t.rows);
    return t;
  }

  // a = x . rows^T for the tile: fp32 (or f64) GEMM, or bf16 GEMM through a bf16 buffer.
  void scores(at::Tensor& a, const at::Tensor& xg, const at::Tensor& xb, const Tile& t,
              at::Tensor& bbuf) const {
    if (!native) {
      at::mm_out(a, xg, t.gemm_rows.t());
      return;
    }
    at::Tensor ab = bbuf.narrow(0, 0, a.numel()).view(a.sizes());
    at::mm_out(ab, xb, t.gemm_rows_b.t());
    a.copy_(ab);
  }
};

// row = row * inv (or + bias, or as is); returns the row's max.
template <typename T>
DPFACE_SIMD_CLONES T fold_cols_max(T* row, const T* inv, const T* bias, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
  if (inv != nullptr) {
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < n; ++j) {
      const T v = row[j] * inv[j];
      row[j] = v;
      m = v > m ? v : m;
    }
  } else if (bias != nullptr) {
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < n; ++j) {
      const T v = row[j] + bias[j];
      row[j] = v;
      m = v > m ? v : m;
    }
  } else {
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < n; ++j) m = row[j] > m ? row[j] : m;
  }
  return m;
}

template <typename T>
DPFACE_SIMD_CLONES T scale_max(T* row, T s, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) {
    const T v = row[j] * s;
    row[j] = v;
    m = v > m ? v : m;
  }
  return m;
}

template <typename T>
DPFACE_SIMD_CLONES T row_max(const T* row, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = row[j] > m ? row[j] : m;
  return m;
}

template <typename T>
DPFACE_SIMD_CLONES T row_sum(const T* row, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += row[j];
  return s;
}

template <typename T>
DPFACE_SIMD_CLONES void add_scalar(T* row, T c, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) row[j] += c;
}

// dst = (src * inv) * s + shift  (inv == nullptr: (src + bias) * s + shift, bias optional)
template <typename T>
DPFACE_SIMD_CLONES void affine_cols(T* dst, const T* src, const T* inv, const T* bias, T s,
                                    T shift, int64_t n) {
  if (inv != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) dst[j] = src[j] * inv[j] * s + shift;
  } else if (bias != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) dst[j] = (src[j] + bias[j]) * s + shift;
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) dst[j] = src[j] * s + shift;
  }
}

// row *= c * inv (inv == nullptr: row *= c)
template <typename T>
DPFACE_SIMD_CLONES void scale_cols(T* row, const T* inv, T c, int64_t n) {
  if (inv != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) row[j] *= c * inv[j];
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) row[j] *= c;
  }
}

template <typename T>
DPFACE_SIMD_CLONES T dot(const T* a, const T* b, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) s += a[k] * b[k];
  return s;
}

template <typename T>
DPFACE_SIMD_CLONES void axpy(T* y, T a, const T* x, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) y[k] += a * x[k];
}

at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// x . row of the GEMM's bf16 operands: products exact in fp32, fp32 sums.
template <typename T>
DPFACE_SIMD_CLONES T dot_bf16(const T* x, const at::BFloat16* r, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) s += x[k] * static_cast<T>(static_cast<float>(r[k]));
  return s;
}

// Row i's scaled logits in place: z_j = s_i * negative(c_j) (CurricularFace's hard
// negatives; plain s_i * c_j otherwise); returns their max.
template <typename T>
DPFACE_SIMD_CLONES T logits_max(T* row, T s, const SampleParams<T>& sp, int64_t i, int64_t n) {
  if (sp.hard == nullptr) return scale_max(row, s, n);
  const T thr = sp.hard[i], t = sp.t;
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) {
    const T c = row[j];
    const T v = (c > thr ? c * (t + c) : c) * s;
    row[j] = v;
    m = v > m ? v : m;
  }
  return m;
}

// exact_x / exact_rows (bf16 GEMMs, whose outputs are rounded to bf16): the target's
// dot product is recomputed from the same bf16 operands with fp32 sums, as the GPU does.
template <typename T>
void forward_tile(const Margin<T>& g, const SampleParams<T>& sp, bool normalize, int64_t B, int64_t n,
                  int64_t t0, T* a, const T* inv, const T* bias, const int64_t* target, T* run_max,
                  T* run_sum, T* tlogit, T* tscore, T* mscore, T* saved, int64_t n_keep,
                  at::Tensor& tile_buf, const T* exact_x, const at::BFloat16* exact_rows, int64_t D) {
  const int64_t keep = std::clamp<int64_t>(n_keep - t0, 0, n);
  // Pass 1: scores -> logits in place, per-row statistics, margin on the target.
  at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i) {
      T* row = a + i * n;
      const int64_t tj = target[i] - t0;
      const bool has = tj >= 0 && tj < n;
      if (has && exact_rows != nullptr) row[tj] = dot_bf16(exact_x + i * D, exact_rows + tj * D, D);
      mscore[i] = std::max(mscore[i], fold_cols_max(row, normalize ? inv : nullptr, bias, n));
      if (keep > 0) std::copy(row, row + keep, saved + i * n_keep + t0);  // scores: backward's input
      const T ts = has ? row[tj] : T(0);
      T zmax = logits_max(row, row_scale(g, sp, i), sp, i, n);
      if (has) {
        const Margin<T> gi = row_margin(g, sp, i);
        const T zt = gi.s * psi(gi, ts);
        // The margin lowers the target's logit: if it held the max, find the new one
        // (a stale, larger max could underflow every exp of the row).
        const bool was_max = row[tj] >= zmax;
        row[tj] = zt;
        if (was_max) zmax = row_max(row, n);
        tscore[i] = ts;
        tlogit[i] = zt;
      }
      const T m_new = std::max(run_max[i], zmax);
      run_sum[i] = run_max[i] == -std::numeric_limits<T>::infinity()
                       ? T(0) : run_sum[i] * std::exp(run_max[i] - m_new);
      run_max[i] = m_new;
      add_scalar(row, -m_new, n);
    }
  });
  tile_buf.exp_();  // the one transcendental pass, vectorised by ATen
  at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i) {
      run_sum[i] += row_sum(a + i * n, n);
    }
  });
}

template <typename T>
SampleParams<T> sample_params(const MarginArgs& m) {
  SampleParams<T> sp;
  sp.scale = m.scale.has_value() ? m.scale->data_ptr<T>() : nullptr;
  sp.margin = m.margin.has_value() ? m.margin->data_ptr<T>() : nullptr;
  sp.hard = m.hard.has_value() ? m.hard->data_ptr<T>() : nullptr;
  sp.t = (T)m.t;
  return sp;
}

MarginParams margin_params(const MarginArgs& m) {
  MarginParams p;
  p.s = m.s; p.m1 = m.m1; p.m2 = m.m2; p.m3 = m.m3;
  p.easy_margin = m.easy; p.normalize = m.normalize; p.clip = m.clip;
  return p;
}

}  // namespace

Tensors6 margin_softmax_fwd_cpu(const at::Tensor& x, const at::Tensor& w,
                                const std::optional<at::Tensor>& idx, const at::Tensor& target,
                                const std::optional<at::Tensor>& bias, const MarginArgs& m, bool bf16,
                                int64_t keep_cols) {
  const bool normalize = m.normalize;
  const auto acc = acc_type(x);
  const bool round_bf16 = bf16 || x.scalar_type() == at::kBFloat16;
  const int64_t B = x.size(0), D = x.size(1);
  const int64_t K = idx.has_value() ? idx->numel() : w.size(0);
  const int64_t n_keep = std::min<int64_t>(K, keep_cols);
  auto opts = x.options().dtype(acc);
  at::Tensor run_max = at::full({B}, -std::numeric_limits<double>::infinity(), opts);
  at::Tensor run_sum = at::zeros({B}, opts);
  at::Tensor tlogit = at::zeros({B}, opts), tscore = at::zeros({B}, opts);
  at::Tensor mscore = at::full({B}, -std::numeric_limits<double>::infinity(), opts);
  at::Tensor inv_norm = at::ones({K}, opts);
  at::Tensor saved = at::empty({B, n_keep}, opts);
  const int64_t T = tile_width(B);
  at::Tensor xg = x.to(acc);
  if (round_bf16) xg = xg.to(at::kBFloat16).to(acc);
  const int64_t buf_elems = B * std::min(T, std::max<int64_t>(K, 1));
  at::Tensor buf = at::empty({buf_elems}, opts);
  Ctx ctx{w, idx, acc, round_bf16, normalize,
          idx.has_value() ? at::empty({std::min(T, K), D}, w.options()) : at::Tensor()};
  ctx.native = round_bf16 && acc == at::kFloat && use_bf16_gemm();
  at::Tensor xb = ctx.native ? x.to(at::kBFloat16) : at::Tensor();
  at::Tensor bbuf = ctx.native ? at::empty({buf_elems}, x.options().dtype(at::kBFloat16)) : at::Tensor();
  at::Tensor bias_acc;
  if (bias.has_value()) {
    bias_acc = idx.has_value() ? bias->index_select(0, *idx).to(acc) : bias->to(acc);
  }
  const int64_t* tgt = target.data_ptr<int64_t>();
  const MarginParams p = margin_params(m);

  AT_DISPATCH_FLOATING_TYPES(acc, "margin_softmax_fwd_cpu", [&] {
    const Margin<scalar_t> g = make_margin<scalar_t>(p);
    const SampleParams<scalar_t> sp = sample_params<scalar_t>(m);
    for (int64_t t0 = 0; t0 < K; t0 += T) {
      const int64_t n = std::min(T, K - t0);
      Tile tile = ctx.load(t0, n);
      at::Tensor a = buf.narrow(0, 0, B * n).view({B, n});
      ctx.scores(a, xg, xb, tile, bbuf);
      if (normalize) inv_norm.narrow(0, t0, n).copy_(tile.inv);
      forward_tile<scalar_t>(
          g, sp, normalize, B, n, t0, a.data_ptr<scalar_t>(),
          normalize ? tile.inv.data_ptr<scalar_t>() : nullptr,
          bias_acc.defined() ? bias_acc.data_ptr<scalar_t>() + t0 : nullptr, tgt,
          run_max.data_ptr<scalar_t>(), run_sum.data_ptr<scalar_t>(),
          tlogit.data_ptr<scalar_t>(), tscore.data_ptr<scalar_t>(),
          mscore.data_ptr<scalar_t>(), saved.data_ptr<scalar_t>(), n_keep, a,
          ctx.native ? xg.data_ptr<scalar_t>() : nullptr,
          ctx.native ? tile.gemm_rows_b.data_ptr<at::BFloat16>() : nullptr, D);
    }
  });
  at::Tensor lse = run_max + run_sum.log();
  return {lse, tlogit, tscore, mscore, inv_norm, saved};
}

Tensors3 margin_softmax_bwd_cpu(const at::Tensor& grad_lse, const at::Tensor& grad_target,
                                const at::Tensor& lse, const at::Tensor& x, const at::Tensor& w,
                                const std::optional<at::Tensor>& idx, const at::Tensor& target,
                                const std::optional<at::Tensor>& bias, const at::Tensor& inv_norm,
                                const at::Tensor& saved, const MarginArgs& m, bool bf16) {
  const bool normalize = m.normalize;
  const auto acc = acc_type(x);
  const bool round_bf16 = bf16 || x.scalar_type() == at::kBFloat16;
  const int64_t B = x.size(0), D = x.size(1);
  const int64_t K = idx.has_value() ? idx->numel() : w.size(0);
  const int64_t n_keep = saved.size(1);
  auto opts = x.options().dtype(acc);
  at::Tensor xg = x.to(acc);
  if (round_bf16) xg = xg.to(at::kBFloat16).to(acc);
  at::Tensor grad_x = at::zeros({B, D}, opts);
  at::Tensor grad_rows = at::empty({K, D}, w.options().dtype(acc));
  at::Tensor grad_bias = bias.has_value() ? at::empty({K}, opts) : at::empty({0}, opts);
  at::Tensor bias_acc;
  if (bias.has_value())
    bias_acc = idx.has_value() ? bias->index_select(0, *idx).to(acc) : bias->to(acc);
  const int64_t T = tile_width(B);
  const int64_t buf_elems = B * std::min(T, std::max<int64_t>(K, 1));
  at::Tensor buf = at::empty({buf_elems}, opts);
  Ctx ctx{w, idx, acc, round_bf16, normalize,
          idx.has_value() ? at::empty({std::min(T, K), D}, w.options()) : at::Tensor()};
  ctx.native = round_bf16 && acc == at::kFloat && use_bf16_gemm();
  at::Tensor xb = ctx.native ? x.to(at::kBFloat16) : at::Tensor();
  at::Tensor bbuf = ctx.native ? at::empty({buf_elems}, x.options().dtype(at::kBFloat16)) : at::Tensor();
  at::Tensor g_lse = grad_lse.to(acc).contiguous(), g_t = grad_target.to(acc).contiguous();
  at::Tensor lse_c = lse.to(acc).contiguous();
  const int64_t* tgt = target.data_ptr<int64_t>();
  const MarginParams p = margin_params(m);
  // CurricularFace: d logit / d score differs per column (kept in `fac` between the passes).
  at::Tensor fac = m.hard.has_value() ? at::empty({buf_elems}, opts) : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES(acc, "margin_softmax_bwd_cpu", [&] {
    const Margin<scalar_t> g = make_margin<scalar_t>(p);
    const SampleParams<scalar_t> sp = sample_params<scalar_t>(m);
    const scalar_t* gl = g_lse.data_ptr<scalar_t>();
    const scalar_t* gt = g_t.data_ptr<scalar_t>();
    const scalar_t* ls = lse_c.data_ptr<scalar_t>();
    const scalar_t* xp = xg.data_ptr<scalar_t>();
    at::Tensor tsc = at::empty({B}, opts);
    scalar_t* tsp = tsc.data_ptr<scalar_t>();
    // Tiles never straddle n_keep: each is read from `saved` or recomputed whole.
    for (int64_t t0 = 0; t0 < K;) {
      const int64_t end = t0 < n_keep ? n_keep : K;
      const int64_t n = std::min(T, end - t0);
      Tile tile = ctx.load(t0, n, /*with_norms=*/false);  // forward's inv_norm is reused
      const scalar_t* inv = normalize ? inv_norm.data_ptr<scalar_t>() + t0 : nullptr;
      const scalar_t* bp = bias_acc.defined() ? bias_acc.data_ptr<scalar_t>() + t0 : nullptr;
      at::Tensor e = buf.narrow(0, 0, B * n).view({B, n});
      const bool from_saved = t0 < n_keep;
      if (!from_saved) ctx.scores(e, xg, xb, tile, bbuf);
      scalar_t* ep = e.data_ptr<scalar_t>();
      scalar_t* fp = fac.defined() ? fac.data_ptr<scalar_t>() : nullptr;
      const scalar_t* sv = saved.data_ptr<scalar_t>();
      const scalar_t* rp = ctx.native ? nullptr : tile.gemm_rows.data_ptr<scalar_t>();
      const at::BFloat16* rb = ctx.native ? tile.gemm_rows_b.data_ptr<at::BFloat16>() : nullptr;
      // z - lse from the scores (kept by the forward, or recomputed), with the target's
      // score kept aside in tsp for dpsi (recomputed as one dot product from the same
      // operands as the GEMM; read only where written).
      at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
        for (int64_t i = b0; i < b1; ++i) {
          scalar_t* row = ep + i * n;
          const int64_t tj = tgt[i] - t0;
          const scalar_t si = row_scale(g, sp, i);
          if (tj >= 0 && tj < n) {
            const scalar_t d = rb ? dot_bf16(xp + i * D, rb + tj * D, D) : dot(xp + i * D, rp + tj * D, D);
            tsp[i] = normalize ? d * inv[tj] : d + (bp ? bp[tj] : scalar_t(0));
          }
          const scalar_t* src = from_saved ? sv + i * n_keep + t0 : row;
          if (fp == nullptr) {  // z - lse = s_i * score - lse in one pass
            affine_cols<scalar_t>(row, src, from_saved ? nullptr : inv, from_saved ? nullptr : bp, si, -ls[i], n);
          } else {
            affine_cols<scalar_t>(row, src, from_saved ? nullptr : inv, from_saved ? nullptr : bp, 1, 0, n);
            scalar_t* f = fp + i * n;
            for (int64_t j = 0; j < n; ++j) {
              f[j] = dnegative(sp, i, row[j]);
              row[j] = negative(sp, i, row[j]) * si - ls[i];
            }
          }
          if (tj >= 0 && tj < n) {
            const Margin<scalar_t> gi = row_margin(g, sp, i);
            row[tj] = gi.s * psi(gi, tsp[i]) - ls[i];
          }
        }
      });
      e.exp_();
      // G = grad_lse * p + grad_target * onehot; dscore = s * G (* dpsi at the target,
      // * d negative / d score elsewhere); da = dscore * inv (normalised scores).
      at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
        for (int64_t i = b0; i < b1; ++i) {
          scalar_t* row = ep + i * n;
          const int64_t tj = tgt[i] - t0;
          const bool has = tj >= 0 && tj < n;
          const scalar_t pt = has ? row[tj] : scalar_t(0);
          const scalar_t si = row_scale(g, sp, i);
          if (fp != nullptr) {
            const scalar_t* f = fp + i * n;
            for (int64_t j = 0; j < n; ++j) row[j] *= f[j];
          }
          scale_cols(row, inv, gl[i] * si, n);
          if (has) {
            const Margin<scalar_t> gi = row_margin(g, sp, i);
            row[tj] = (pt * gl[i] + gt[i]) * si * dpsi(gi, tsp[i]);
            if (normalize) row[tj] *= inv[tj];
          }
        }
      });
      if (bias.has_value()) grad_bias.narrow(0, t0, n).copy_(e.sum(0));
      at::Tensor gr = grad_rows.narrow(0, t0, n);
      if (ctx.native) {  // bf16 GEMMs: each tile's products rounded to bf16, summed in fp32
        at::Tensor eb = bbuf.narrow(0, 0, B * n).view({B, n});
        eb.copy_(e);
        grad_x.add_(at::mm(eb, tile.gemm_rows_b));
        gr.copy_(at::mm(eb.t(), xb));
      } else {
        at::Tensor eg = ctx.round(e);
        grad_x.addmm_(eg, tile.gemm_rows);
        at::mm_out(gr, eg.t(), xg);
      }
      if (normalize) {
        // Tangential part: grad_j = M_j - (w_j . M_j) inv_j^2 w_j.
        const scalar_t* wr = tile.rows.data_ptr<scalar_t>();
        scalar_t* mp = gr.data_ptr<scalar_t>();
        at::parallel_for(0, n, 16, [&](int64_t j0, int64_t j1) {
          for (int64_t j = j0; j < j1; ++j) {
            const scalar_t f = dot(wr + j * D, mp + j * D, D) * inv[j] * inv[j];
            axpy(mp + j * D, -f, wr + j * D, D);
          }
        });
      }
      t0 += n;
    }
  });
  return {grad_x.to(x.scalar_type()), grad_rows.to(w.scalar_type()),
          bias.has_value() ? grad_bias.to(bias->scalar_type()) : grad_bias};
}

}  // namespace dpface
