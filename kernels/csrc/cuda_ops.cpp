// Torch-side glue of the CUDA backend: device / dtype checks, output and workspace
// allocation (through the caching allocator, on the inputs' device), the current stream,
// and the calls into the C interface of cuda/*.cu. Built only where torch has CUDA
// (DPFACE_WITH_CUDA); binding.cpp runs the shared argument checks before these.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

#include "cuda/dpface_cuda.h"
#include "ops.h"

namespace dpface {
namespace {

void check_cuda(const char* op, const char* name, const at::Tensor& t, const at::Device& dev) {
  TORCH_CHECK(t.is_cuda(), "dpface::", op, ": argument '", name, "' must be a CUDA tensor, got ",
              t.device());
  TORCH_CHECK(t.device() == dev, "dpface::", op, ": argument '", name, "' is on ", t.device(),
              " but x is on ", dev);
}

void check_rc(const char* op, int rc) {
  TORCH_CHECK(rc == DPFACE_CUDA_OK, "dpface::", op, " (CUDA): ", dpface_cuda_error_string(rc));
}

void check_margin_dtype(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() != at::kDouble, "dpface::", op,
              ": float64 is CPU-only (the CUDA kernels accumulate in float32); use float32 or "
              "bfloat16 on CUDA, or run the float64 op on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "dpface::", op,
              ": CUDA inputs must be float32 or bfloat16, got ", x.scalar_type());
}

// The kernels read contiguous arrays; binding.cpp already insists on contiguous x / w /
// idx / target, so these are no-ops there and a safety net for anything else.
at::Tensor contig(const at::Tensor& t, at::ScalarType dt) { return t.to(dt).contiguous(); }

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

template <class T>
T* ptr(const at::Tensor& t) { return t.defined() ? static_cast<T*>(t.data_ptr()) : nullptr; }

// The C interface's margin: scalars and the per-sample arrays (binding.cpp checked them:
// float32, [B] / [B, 3], contiguous, on x's device).
dpface_margin_params params(const MarginArgs& m, bool bf16) {
  dpface_margin_params p;
  p.s = m.s; p.m1 = m.m1; p.m2 = m.m2; p.m3 = m.m3; p.t = m.t;
  p.easy_margin = m.easy ? 1 : 0;
  p.angle_clip = m.clip ? 1 : 0;
  p.normalize = m.normalize ? 1 : 0;
  p.bf16 = bf16 ? 1 : 0;
  p.sample_scale = m.scale.has_value() ? static_cast<const float*>(m.scale->data_ptr()) : nullptr;
  p.sample_margin = m.margin.has_value() ? static_cast<const float*>(m.margin->data_ptr()) : nullptr;
  p.hard_threshold = m.hard.has_value() ? static_cast<const float*>(m.hard->data_ptr()) : nullptr;
  return p;
}

}  // namespace

Tensors6 margin_softmax_fwd_cuda(const at::Tensor& x, const at::Tensor& w,
                                 const std::optional<at::Tensor>& idx, const at::Tensor& target,
                                 const std::optional<at::Tensor>& bias, const MarginArgs& m, bool bf16,
                                 int64_t keep_cols) {
  const char* op = "margin_softmax_fwd";
  const at::Device dev = x.device();
  check_cuda(op, "x", x, dev);
  check_cuda(op, "w", w, dev);
  check_cuda(op, "target", target, dev);
  if (idx.has_value()) check_cuda(op, "idx", *idx, dev);
  if (bias.has_value()) check_cuda(op, "bias", *bias, dev);
  check_margin_dtype(op, x);
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "dpface::", op, ": x and w dtypes differ");
  const c10::cuda::CUDAGuard guard(dev);

  const auto io = x.scalar_type();
  const at::Tensor xc = contig(x, io), wc = contig(w, io), tc = contig(target, at::kLong);
  const at::Tensor ic = idx.has_value() ? contig(*idx, at::kLong) : at::Tensor();
  // Bias values enter the fp32 epilogue; a [C] fp32 copy only for bf16 biases.
  const at::Tensor bc = bias.has_value() ? contig(*bias, at::kFloat) : at::Tensor();
  const int64_t B = xc.size(0), D = xc.size(1);
  const int64_t K = idx.has_value() ? ic.numel() : wc.size(0);
  const int64_t n_keep = std::min<int64_t>(K, std::max<int64_t>(keep_cols, 0));

  const auto fopts = xc.options().dtype(at::kFloat);
  at::Tensor lse = at::empty({B}, fopts), tlogit = at::empty({B}, fopts);
  at::Tensor tscore = at::empty({B}, fopts), mscore = at::empty({B}, fopts);
  at::Tensor inv_norm = at::empty({K}, fopts), saved = at::empty({B, n_keep}, fopts);

  size_t bytes = 0;
  check_rc(op, dpface_margin_softmax_fwd_workspace(B, K, D, &bytes));
  at::Tensor ws = workspace(bytes, xc);
  const dpface_margin_params p = params(m, bf16);
  int rc;
  if (io == at::kFloat) {
    rc = dpface_margin_softmax_fwd_f32(ptr<const float>(xc), ptr<const float>(wc), ptr<const int64_t>(ic),
                                       ptr<const int64_t>(tc), ptr<const float>(bc), B, K, D, n_keep, &p,
                                       ptr<float>(lse), ptr<float>(tlogit), ptr<float>(tscore),
                                       ptr<float>(mscore), ptr<float>(inv_norm), ptr<float>(saved),
                                       ws.data_ptr(), bytes, current_stream());
  } else {
    rc = dpface_margin_softmax_fwd_bf16(ptr<const uint16_t>(xc), ptr<const uint16_t>(wc), ptr<const int64_t>(ic),
                                        ptr<const int64_t>(tc), ptr<const float>(bc), B, K, D, n_keep, &p,
                                        ptr<float>(lse), ptr<float>(tlogit), ptr<float>(tscore),
                                        ptr<float>(mscore), ptr<float>(inv_norm), ptr<float>(saved),
                                        ws.data_ptr(), bytes, current_stream());
  }
  check_rc(op, rc);
  return {lse, tlogit, tscore, mscore, inv_norm, saved};
}

Tensors3 margin_softmax_bwd_cuda(const at::Tensor& grad_lse, const at::Tensor& grad_target,
                                 const at::Tensor& lse, const at::Tensor& x, const at::Tensor& w,
                                 const std::optional<at::Tensor>& idx, const at::Tensor& target,
                                 const std::optional<at::Tensor>& bias,
                                 const at::Tensor& inv_norm, const at::Tensor& saved, const MarginArgs& m,
                                 bool bf16) {
  const char* op = "margin_softmax_bwd";
  const at::Device dev = x.device();
  check_cuda(op, "grad_lse", grad_lse, dev);
  check_cuda(op, "grad_target", grad_target, dev);
  check_cuda(op, "lse", lse, dev);
  check_cuda(op, "x", x, dev);
  check_cuda(op, "w", w, dev);
  check_cuda(op, "target", target, dev);
  check_cuda(op, "inv_norm", inv_norm, dev);
  check_cuda(op, "saved", saved, dev);
  if (idx.has_value()) check_cuda(op, "idx", *idx, dev);
  if (bias.has_value()) check_cuda(op, "bias", *bias, dev);
  check_margin_dtype(op, x);
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "dpface::", op, ": x and w dtypes differ");
  const c10::cuda::CUDAGuard guard(dev);

  const auto io = x.scalar_type();
  const at::Tensor xc = contig(x, io), wc = contig(w, io), tc = contig(target, at::kLong);
  const at::Tensor ic = idx.has_value() ? contig(*idx, at::kLong) : at::Tensor();
  const at::Tensor bc = bias.has_value() ? contig(*bias, at::kFloat) : at::Tensor();
  const at::Tensor gl = contig(grad_lse, at::kFloat), gt = contig(grad_target, at::kFloat);
  const at::Tensor lc = contig(lse, at::kFloat), inv = contig(inv_norm, at::kFloat);
  const at::Tensor sv = contig(saved, at::kFloat);
  const int64_t B = xc.size(0), D = xc.size(1);
  const int64_t K = idx.has_value() ? ic.numel() : wc.size(0);
  const int64_t n_keep = sv.size(1);
  TORCH_CHECK(n_keep <= K && (n_keep == 0 || sv.size(0) == B), "dpface::", op,
              ": 'saved' must be [B, <= K]");

  at::Tensor grad_x = at::empty({B, D}, xc.options());
  at::Tensor grad_rows = at::empty({K, D}, wc.options());
  const auto fopts = xc.options().dtype(at::kFloat);
  at::Tensor grad_bias = at::empty({bias.has_value() ? K : 0}, fopts);

  size_t bytes = 0;
  check_rc(op, dpface_margin_softmax_bwd_workspace(B, K, D, io == at::kBFloat16 ? 1 : 0, &bytes));
  at::Tensor ws = workspace(bytes, xc);
  const dpface_margin_params p = params(m, bf16);
  float* gb = bias.has_value() ? ptr<float>(grad_bias) : nullptr;
  int rc;
  if (io == at::kFloat) {
    rc = dpface_margin_softmax_bwd_f32(ptr<const float>(gl), ptr<const float>(gt), ptr<const float>(lc),
                                       ptr<const float>(xc), ptr<const float>(wc), ptr<const int64_t>(ic),
                                       ptr<const int64_t>(tc), ptr<const float>(bc), ptr<const float>(inv),
                                       ptr<const float>(sv), B, K, D, n_keep, &p, ptr<float>(grad_x),
                                       ptr<float>(grad_rows), gb, ws.data_ptr(), bytes, current_stream());
  } else {
    rc = dpface_margin_softmax_bwd_bf16(ptr<const float>(gl), ptr<const float>(gt), ptr<const float>(lc),
                                        ptr<const uint16_t>(xc), ptr<const uint16_t>(wc), ptr<const int64_t>(ic),
                                        ptr<const int64_t>(tc), ptr<const float>(bc), ptr<const float>(inv),
                                        ptr<const float>(sv), B, K, D, n_keep, &p, ptr<uint16_t>(grad_x),
                                        ptr<uint16_t>(grad_rows), gb, ws.data_ptr(), bytes, current_stream());
  }
  check_rc(op, rc);
  if (bias.has_value() && bias->scalar_type() != at::kFloat) grad_bias = grad_bias.to(bias->scalar_type());
  return {grad_x, grad_rows, grad_bias};
}

std::tuple<at::Tensor, at::Tensor> range_loss_fwd_cuda(const at::Tensor& x, const at::Tensor& labels,
                                                       int64_t k, double margin) {
  const char* op = "range_loss_fwd";
  const at::Device dev = x.device();
  check_cuda(op, "x", x, dev);
  check_cuda(op, "labels", labels, dev);
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "dpface::", op, ": x must be float32 or float64, got ", dt);
  const c10::cuda::CUDAGuard guard(dev);
  const at::Tensor xc = x.contiguous(), lc = contig(labels, at::kLong);
  const int64_t N = xc.size(0), D = xc.size(1);
  at::Tensor intra = at::empty({}, xc.options()), inter = at::empty({}, xc.options());
  size_t bytes = 0;
  check_rc(op, dpface_range_loss_workspace(N, D, k, dt == at::kDouble ? 1 : 0, &bytes));
  at::Tensor ws = workspace(bytes, xc);
  int rc;
  if (dt == at::kFloat)
    rc = dpface_range_loss_fwd_f32(ptr<const float>(xc), ptr<const int64_t>(lc), N, D, k, margin,
                                   ptr<float>(intra), ptr<float>(inter), ws.data_ptr(), bytes, current_stream());
  else
    rc = dpface_range_loss_fwd_f64(ptr<const double>(xc), ptr<const int64_t>(lc), N, D, k, margin,
                                   ptr<double>(intra), ptr<double>(inter), ws.data_ptr(), bytes, current_stream());
  check_rc(op, rc);
  return {intra, inter};
}

at::Tensor range_loss_bwd_cuda(const at::Tensor& grad_intra, const at::Tensor& grad_inter,
                               const at::Tensor& x, const at::Tensor& labels, int64_t k, double margin) {
  const char* op = "range_loss_bwd";
  const at::Device dev = x.device();
  check_cuda(op, "x", x, dev);
  check_cuda(op, "labels", labels, dev);
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "dpface::", op, ": x must be float32 or float64, got ", dt);
  const c10::cuda::CUDAGuard guard(dev);
  const at::Tensor xc = x.contiguous(), lc = contig(labels, at::kLong);
  // The incoming scalars may be CPU tensors or another dtype: one device scalar each.
  const at::Tensor gi = grad_intra.to(xc.options()).reshape({}).contiguous();
  const at::Tensor ge = grad_inter.to(xc.options()).reshape({}).contiguous();
  const int64_t N = xc.size(0), D = xc.size(1);
  at::Tensor grad_x = at::empty({N, D}, xc.options());
  size_t bytes = 0;
  check_rc(op, dpface_range_loss_workspace(N, D, k, dt == at::kDouble ? 1 : 0, &bytes));
  at::Tensor ws = workspace(bytes, xc);
  int rc;
  if (dt == at::kFloat)
    rc = dpface_range_loss_bwd_f32(ptr<const float>(gi), ptr<const float>(ge), ptr<const float>(xc),
                                   ptr<const int64_t>(lc), N, D, k, margin, ptr<float>(grad_x), ws.data_ptr(),
                                   bytes, current_stream());
  else
    rc = dpface_range_loss_bwd_f64(ptr<const double>(gi), ptr<const double>(ge), ptr<const double>(xc),
                                   ptr<const int64_t>(lc), N, D, k, margin, ptr<double>(grad_x), ws.data_ptr(),
                                   bytes, current_stream());
  check_rc(op, rc);
  return grad_x;
}

// ---- chunked path: the epilogues (the GEMMs are torch's) ----------------------------------

namespace {
at::Tensor f32_vec(const char* op, const char* name, const at::Tensor& t, const at::Device& dev, int64_t n) {
  check_cuda(op, name, t, dev);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "dpface::", op, ": argument '", name, "' must be [", n, "], got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous(), "dpface::", op, ": argument '", name,
              "' must be a contiguous float32 tensor");
  return t;
}

void check_rows(const char* op, const char* name, const at::Tensor& t, const at::Device& dev, int64_t B) {
  check_cuda(op, name, t, dev);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.scalar_type() == at::kFloat && t.stride(1) == 1 &&
                  t.stride(0) >= t.size(1),
              "dpface::", op, ": argument '", name, "' must be a float32 [", B, ", n] tensor with unit column stride");
}
}  // namespace

void chunk_fwd_epilogue_cuda(const at::Tensor& scores, const std::optional<at::Tensor>& inv,
                             const std::optional<at::Tensor>& bias, const at::Tensor& target, int64_t c0,
                             const MarginArgs& m, at::Tensor& saved,
                             at::Tensor& run_max, at::Tensor& run_sum, at::Tensor& max_score,
                             at::Tensor& target_logit, at::Tensor& target_score) {
  const char* op = "chunk_fwd_epilogue_";
  const at::Device dev = scores.device();
  const int64_t B = scores.size(0), n = scores.dim() == 2 ? scores.size(1) : 0;
  check_rows(op, "scores", scores, dev, B);
  TORCH_CHECK(scores.is_contiguous(), "dpface::", op, ": argument 'scores' must be contiguous");
  TORCH_CHECK(target.scalar_type() == at::kLong && target.is_contiguous() && target.numel() == B, "dpface::", op,
              ": argument 'target' must be a contiguous int64 [", B, "] tensor");
  check_cuda(op, "target", target, dev);
  if (inv.has_value()) f32_vec(op, "inv", *inv, dev, n);
  if (bias.has_value()) f32_vec(op, "bias", *bias, dev, n);
  for (auto* t : {&run_max, &run_sum, &max_score, &target_logit, &target_score}) f32_vec(op, "row statistics", *t, dev, B);
  check_cuda(op, "saved", saved, dev);
  TORCH_CHECK(saved.scalar_type() == at::kFloat && saved.is_contiguous() && saved.dim() == 2 && saved.size(0) == B,
              "dpface::", op, ": argument 'saved' must be a contiguous float32 [", B, ", n_keep] tensor");
  const c10::cuda::CUDAGuard guard(dev);
  const dpface_margin_params p = params(m, false);
  check_rc(op, dpface_chunk_fwd_epilogue(ptr<const float>(scores), B, n, c0, inv ? ptr<const float>(*inv) : nullptr,
                                         bias ? ptr<const float>(*bias) : nullptr, ptr<const int64_t>(target), &p,
                                         ptr<float>(saved), saved.size(1), ptr<float>(run_max), ptr<float>(run_sum),
                                         ptr<float>(max_score), ptr<float>(target_logit), ptr<float>(target_score),
                                         current_stream()));
}

void chunk_bwd_epilogue_cuda(const at::Tensor& src, bool from_saved, const std::optional<at::Tensor>& inv,
                             const std::optional<at::Tensor>& bias, const at::Tensor& target,
                             const at::Tensor& target_score, const at::Tensor& lse, const at::Tensor& grad_lse,
                             const at::Tensor& grad_target, int64_t c0, const MarginArgs& m, at::Tensor& da) {
  const char* op = "chunk_bwd_epilogue_";
  const at::Device dev = src.device();
  const int64_t B = src.size(0), n = src.dim() == 2 ? src.size(1) : 0;
  check_rows(op, "src", src, dev, B);
  check_rows(op, "da", da, dev, B);
  TORCH_CHECK(da.is_contiguous() && da.size(1) == n, "dpface::", op, ": argument 'da' must be contiguous [", B, ", ",
              n, "]");
  TORCH_CHECK(target.scalar_type() == at::kLong && target.is_contiguous() && target.numel() == B, "dpface::", op,
              ": argument 'target' must be a contiguous int64 [", B, "] tensor");
  check_cuda(op, "target", target, dev);
  if (inv.has_value()) f32_vec(op, "inv", *inv, dev, n);
  if (bias.has_value()) f32_vec(op, "bias", *bias, dev, n);
  for (auto* t : {&target_score, &lse, &grad_lse, &grad_target}) f32_vec(op, "row vectors", *t, dev, B);
  const c10::cuda::CUDAGuard guard(dev);
  const dpface_margin_params p = params(m, false);
  check_rc(op, dpface_chunk_bwd_epilogue(ptr<const float>(src), src.stride(0), from_saved ? 1 : 0, B, n, c0,
                                         inv ? ptr<const float>(*inv) : nullptr,
                                         bias ? ptr<const float>(*bias) : nullptr, ptr<const int64_t>(target),
                                         ptr<const float>(target_score), ptr<const float>(lse),
                                         ptr<const float>(grad_lse), ptr<const float>(grad_target), &p,
                                         ptr<float>(da), current_stream()));
}

}  // namespace dpface
