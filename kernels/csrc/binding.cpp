// The one binding file: the dpface op schemas, the argument checks every backend shares,
// and the CPU (always) and CUDA (DPFACE_WITH_CUDA) registrations. Contract: kernels/OPS.md.
// Fake (meta) implementations and autograd are registered from Python (dpface/ops/).
#include <Python.h>
#include <torch/library.h>

#include <cmath>

#include "ops.h"
#include "cpu/simd.h"

namespace dpface {
namespace {

#define DPFACE_CHECK(cond, op, ...) TORCH_CHECK(cond, "dpface::", op, ": ", __VA_ARGS__)

void check_matrix(const char* op, const char* name, const at::Tensor& t) {
  DPFACE_CHECK(t.dim() == 2, op, "argument '", name, "' must be 2-D, got shape ", t.sizes());
  const auto dt = t.scalar_type();
  DPFACE_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16, op, "argument '",
               name, "' must be float32, float64 or bfloat16, got ", dt);
  DPFACE_CHECK(t.is_contiguous(), op, "argument '", name,
               "' must be contiguous (call .contiguous() first)");
}

void check_index(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like,
                 int64_t size) {
  DPFACE_CHECK(t.dim() == 1, op, "argument '", name, "' must be 1-D, got shape ", t.sizes());
  DPFACE_CHECK(t.scalar_type() == at::kLong, op, "argument '", name, "' must be int64, got ",
               t.scalar_type());
  DPFACE_CHECK(t.is_contiguous(), op, "argument '", name, "' must be contiguous");
  DPFACE_CHECK(t.device() == like.device(), op, "argument '", name, "' is on ", t.device(),
               " but x is on ", like.device());
  if (size >= 0)
    DPFACE_CHECK(t.numel() == size, op, "argument '", name, "' must have ", size,
                 " entries, got ", t.numel());
}

}  // namespace

void check_margin_inputs(const at::Tensor& x, const at::Tensor& w,
                         const std::optional<at::Tensor>& idx, const at::Tensor& target,
                         const std::optional<at::Tensor>& bias, const MarginArgs& m,
                         int64_t keep_cols, bool check_values) {
  const char* op = "margin_softmax";
  check_matrix(op, "x", x);
  check_matrix(op, "w", w);
  DPFACE_CHECK(w.device() == x.device(), op, "argument 'w' is on ", w.device(),
               " but x is on ", x.device());
  DPFACE_CHECK(w.scalar_type() == x.scalar_type(), op, "arguments 'x' (", x.scalar_type(),
               ") and 'w' (", w.scalar_type(), ") must have the same dtype");
  DPFACE_CHECK(w.size(1) == x.size(1), op, "embedding size mismatch: 'x' has ", x.size(1),
               " columns, 'w' has ", w.size(1));
  const int64_t C = w.size(0);
  int64_t K = C;
  if (idx.has_value()) {
    check_index(op, "idx", *idx, x, -1);
    K = idx->numel();
    if (K > 0 && check_values) {
      const int64_t lo = idx->min().item<int64_t>(), hi = idx->max().item<int64_t>();
      DPFACE_CHECK(lo >= 0 && hi < C, op, "argument 'idx' holds rows outside [0, ", C,
                   "): min ", lo, ", max ", hi);
    }
  }
  check_index(op, "target", target, x, x.size(0));
  if (target.numel() > 0 && check_values) {
    const int64_t lo = target.min().item<int64_t>(), hi = target.max().item<int64_t>();
    DPFACE_CHECK(lo >= -1 && hi < K, op, "argument 'target' holds columns outside [-1, ", K,
                 "): min ", lo, ", max ", hi);
  }
  if (bias.has_value()) {
    DPFACE_CHECK(!m.normalize, op, "a 'bias' needs normalize=false (cosine scores have no bias)");
    DPFACE_CHECK(bias->dim() == 1 && bias->size(0) == C, op, "argument 'bias' must be [", C,
                 "], got shape ", bias->sizes());
    DPFACE_CHECK(bias->scalar_type() == w.scalar_type() && bias->device() == w.device() &&
                     bias->is_contiguous(),
                 op, "argument 'bias' must be a contiguous ", w.scalar_type(), " tensor on ",
                 w.device());
  }
  DPFACE_CHECK(std::isfinite(m.s) && m.s > 0, op, "scale 's' must be > 0, got ", m.s);
  DPFACE_CHECK(m.m1 >= 1, op, "'m1' must be >= 1, got ", m.m1);
  DPFACE_CHECK(m.m2 >= 0 && m.m2 < M_PI, op, "'m2' must be in [0, pi), got ", m.m2);
  DPFACE_CHECK(m.m3 >= 0, op, "'m3' must be >= 0, got ", m.m3);
  DPFACE_CHECK(std::isfinite(m.t), op, "'t' must be finite, got ", m.t);
  const bool per_sample = m.scale.has_value() || m.margin.has_value() || m.hard.has_value();
  DPFACE_CHECK(m.normalize || (m.s == 1 && m.m1 == 1 && m.m2 == 0 && m.m3 == 0 && !m.clip && !per_sample), op,
               "raw scores (normalize=false) take no scale or margin: need s=1, m1=1, m2=m3=0 and no "
               "per-sample parameters");
  // Per-sample parameters: the accumulation dtype, one row per sample.
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const auto& [name, t, cols] :
       {std::tuple<const char*, const std::optional<at::Tensor>&, int64_t>{"sample_scale", m.scale, 0},
        {"sample_margin", m.margin, 3}, {"hard_threshold", m.hard, 0}}) {
    if (!t.has_value()) continue;
    const bool shape_ok = cols ? (t->dim() == 2 && t->size(0) == x.size(0) && t->size(1) == cols)
                               : (t->dim() == 1 && t->size(0) == x.size(0));
    DPFACE_CHECK(shape_ok, op, "argument '", name, "' must be [", x.size(0), cols ? ", 3" : "", "], got shape ",
                 t->sizes());
    DPFACE_CHECK(t->scalar_type() == acc && t->device() == x.device() && t->is_contiguous(), op, "argument '",
                 name, "' must be a contiguous ", acc, " tensor on ", x.device(), " (the accumulation dtype)");
  }
  DPFACE_CHECK(keep_cols >= 0, op, "'keep_cols' must be >= 0, got ", keep_cols);
}

static MarginArgs margin_args(const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& margin,
                       const std::optional<at::Tensor>& hard, double s, double m1, double m2, double m3, double t,
                       bool easy, bool clip, bool normalize) {
  MarginArgs m;
  m.scale = scale; m.margin = margin; m.hard = hard;
  m.s = s; m.m1 = m1; m.m2 = m2; m.m3 = m3; m.t = t;
  m.easy = easy; m.clip = clip; m.normalize = normalize;
  return m;
}

void check_range_inputs(const at::Tensor& x, const at::Tensor& labels, int64_t k, double margin) {
  const char* op = "range_loss";
  check_matrix(op, "x", x);
  DPFACE_CHECK(x.scalar_type() != at::kBFloat16, op, "argument 'x' must be float32 or float64");
  check_index(op, "labels", labels, x, x.size(0));
  DPFACE_CHECK(k >= 1, op, "'k' must be >= 1, got ", k);
  DPFACE_CHECK(std::isfinite(margin) && margin >= 0, op, "'margin' must be >= 0, got ", margin);
}

namespace {

void check_backward(const char* op, const at::Tensor& grad, const at::Tensor& x, const char* name) {
  DPFACE_CHECK(grad.dim() == 1 && grad.size(0) == x.size(0), op, "argument '", name,
               "' must be [", x.size(0), "], got shape ", grad.sizes());
}

// Each backend's entry points get the shared checks first.
#define DPFACE_MARGIN_ARGS                                                                     \
  const std::optional<at::Tensor>&scale, const std::optional<at::Tensor>&margin,               \
      const std::optional<at::Tensor>&hard, double s, double m1, double m2, double m3, double t, \
      bool easy, bool clip, bool normalize
#define DPFACE_CHECKED_OPS(SUFFIX)                                                             \
  Tensors6 margin_fwd_##SUFFIX(const at::Tensor& x, const at::Tensor& w,                       \
                               const std::optional<at::Tensor>& idx, const at::Tensor& target, \
                               const std::optional<at::Tensor>& bias,                          \
                               const std::optional<at::Tensor>& /*w_rows_sink*/,               \
                               const std::optional<at::Tensor>& /*bias_rows_sink*/,            \
                               DPFACE_MARGIN_ARGS, bool bf16, int64_t keep) {                  \
    const MarginArgs m = margin_args(scale, margin, hard, s, m1, m2, m3, t, easy, clip, normalize); \
    check_margin_inputs(x, w, idx, target, bias, m, keep);                                     \
    return margin_softmax_fwd_##SUFFIX(x, w, idx, target, bias, m, bf16, keep);                \
  }                                                                                            \
  Tensors3 margin_bwd_##SUFFIX(const at::Tensor& g_lse, const at::Tensor& g_t,                 \
                               const at::Tensor& lse, const at::Tensor& x, const at::Tensor& w, \
                               const std::optional<at::Tensor>& idx, const at::Tensor& target, \
                               const std::optional<at::Tensor>& bias, const at::Tensor& inv,   \
                               const at::Tensor& saved, DPFACE_MARGIN_ARGS, bool bf16) {       \
    const MarginArgs m = margin_args(scale, margin, hard, s, m1, m2, m3, t, easy, clip, normalize); \
    /* index values were checked by the forward: each min/max is a device sync */            \
    check_margin_inputs(x, w, idx, target, bias, m, saved.size(1), false);                     \
    check_backward("margin_softmax_bwd", g_lse, x, "grad_lse");                                \
    check_backward("margin_softmax_bwd", g_t, x, "grad_target");                               \
    check_backward("margin_softmax_bwd", lse, x, "lse");                                       \
    const int64_t K = idx.has_value() ? idx->numel() : w.size(0);                              \
    DPFACE_CHECK(inv.dim() == 1 && inv.size(0) == K, "margin_softmax_bwd",                     \
                 "argument 'inv_norm' must be [", K, "]");                                     \
    DPFACE_CHECK(saved.dim() == 2 && saved.size(0) == x.size(0) && saved.size(1) <= K &&       \
                     saved.is_contiguous(),                                                    \
                 "margin_softmax_bwd", "argument 'saved' must be a contiguous [", x.size(0),   \
                 ", <=", K, "] tensor, got shape ", saved.sizes());                            \
    return margin_softmax_bwd_##SUFFIX(g_lse, g_t, lse, x, w, idx, target, bias, inv, saved, m, bf16); \
  }                                                                                            \
  std::tuple<at::Tensor, at::Tensor> range_fwd_##SUFFIX(const at::Tensor& x,                   \
                                                        const at::Tensor& labels, int64_t k,   \
                                                        double margin) {                       \
    check_range_inputs(x, labels, k, margin);                                                  \
    return range_loss_fwd_##SUFFIX(x, labels, k, margin);                                      \
  }                                                                                            \
  at::Tensor range_bwd_##SUFFIX(const at::Tensor& gi, const at::Tensor& ge, const at::Tensor& x, \
                                const at::Tensor& labels, int64_t k, double margin) {          \
    check_range_inputs(x, labels, k, margin);                                                  \
    DPFACE_CHECK(gi.dim() == 0 && ge.dim() == 0, "range_loss_bwd",                             \
                 "grad_intra and grad_inter must be scalars");                                 \
    return range_loss_bwd_##SUFFIX(gi, ge, x, labels, k, margin);                              \
  }

void sgd_rows_checked(at::Tensor& param, at::Tensor& buf, const at::Tensor& idx,
                      const at::Tensor& grad, double lr, double momentum, double weight_decay) {
  const char* op = "sgd_rows_";
  check_matrix(op, "param", param);
  DPFACE_CHECK(param.scalar_type() != at::kBFloat16, op, "argument 'param' must be float32 or float64");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"momentum_buf", buf},
                                {"grad", grad}}) {
    DPFACE_CHECK(t.scalar_type() == param.scalar_type() && t.is_contiguous() && t.dim() == 2 &&
                     t.size(1) == param.size(1),
                 op, "argument '", name, "' must be a contiguous ", param.scalar_type(),
                 " [*, ", param.size(1), "] tensor, got ", t.scalar_type(), " ", t.sizes());
  }
  DPFACE_CHECK(buf.sizes() == param.sizes(), op, "argument 'momentum_buf' must have param's shape ",
               param.sizes(), ", got ", buf.sizes());
  check_index(op, "idx", idx, param, grad.size(0));
  if (idx.numel() > 0) {
    const int64_t lo = idx.min().item<int64_t>(), hi = idx.max().item<int64_t>();
    DPFACE_CHECK(lo >= 0 && hi < param.size(0), op, "argument 'idx' holds rows outside [0, ",
                 param.size(0), "): min ", lo, ", max ", hi);
  }
  DPFACE_CHECK(lr >= 0 && momentum >= 0 && weight_decay >= 0, op,
               "lr, momentum and weight_decay must be >= 0");
  sgd_rows_cpu(param, buf, idx, grad, lr, momentum, weight_decay);
}

// The fused op's argument checks alone, for the chunked path (dpface/ops/chunked.py): the
// same inputs are refused with the same messages.
void margin_check(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& idx,
                  const at::Tensor& target, const std::optional<at::Tensor>& bias, DPFACE_MARGIN_ARGS,
                  int64_t keep_cols) {
  check_margin_inputs(x, w, idx, target, bias, margin_args(scale, margin, hard, s, m1, m2, m3, t, easy, clip, normalize),
                      keep_cols);
}

#ifdef DPFACE_WITH_CUDA
void chunk_fwd_checked(const at::Tensor& scores, const std::optional<at::Tensor>& inv,
                       const std::optional<at::Tensor>& bias, const at::Tensor& target, int64_t c0,
                       DPFACE_MARGIN_ARGS, at::Tensor& saved, at::Tensor& run_max, at::Tensor& run_sum,
                       at::Tensor& max_score, at::Tensor& target_logit, at::Tensor& target_score) {
  chunk_fwd_epilogue_cuda(scores, inv, bias, target, c0,
                          margin_args(scale, margin, hard, s, m1, m2, m3, t, easy, clip, normalize), saved,
                          run_max, run_sum, max_score, target_logit, target_score);
}
void chunk_bwd_checked(const at::Tensor& src, bool from_saved, const std::optional<at::Tensor>& inv,
                       const std::optional<at::Tensor>& bias, const at::Tensor& target,
                       const at::Tensor& target_score, const at::Tensor& lse, const at::Tensor& grad_lse,
                       const at::Tensor& grad_target, int64_t c0, DPFACE_MARGIN_ARGS, at::Tensor& da) {
  chunk_bwd_epilogue_cuda(src, from_saved, inv, bias, target, target_score, lse, grad_lse, grad_target, c0,
                          margin_args(scale, margin, hard, s, m1, m2, m3, t, easy, clip, normalize), da);
}
#endif

DPFACE_CHECKED_OPS(cpu)
#ifdef DPFACE_WITH_CUDA
DPFACE_CHECKED_OPS(cuda)
#endif

}  // namespace
}  // namespace dpface

// The margin's arguments, in every margin op: kernels/OPS.md.
#define MARGIN "Tensor? sample_scale, Tensor? sample_margin, Tensor? hard_threshold, float s, float m1, float m2, float m3, float t, bool easy_margin, bool angle_clip, bool normalize"

TORCH_LIBRARY(dpface, m) {
  m.def("margin_softmax_fwd(Tensor x, Tensor w, Tensor? idx, Tensor target, Tensor? bias, "
        "Tensor? w_rows_sink, Tensor? bias_rows_sink, " MARGIN ", bool bf16, int keep_cols) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("margin_softmax_bwd(Tensor grad_lse, Tensor grad_target, Tensor lse, Tensor x, "
        "Tensor w, Tensor? idx, Tensor target, Tensor? bias, Tensor inv_norm, Tensor saved, "
        MARGIN ", bool bf16) -> (Tensor, Tensor, Tensor)");
  m.def("range_loss_fwd(Tensor x, Tensor labels, int k, float margin) -> (Tensor, Tensor)");
  m.def("sgd_rows_(Tensor(a!) param, Tensor(b!) momentum_buf, Tensor idx, Tensor grad, float lr, "
        "float momentum, float weight_decay) -> ()");
  m.def("range_loss_bwd(Tensor grad_intra, Tensor grad_inter, Tensor x, Tensor labels, int k, "
        "float margin) -> Tensor");
  m.def("margin_softmax_check(Tensor x, Tensor w, Tensor? idx, Tensor target, Tensor? bias, " MARGIN
        ", int keep_cols) -> ()");
  // The chunked path's CUDA epilogues (registered only where the CUDA kernels are built).
  m.def("chunk_fwd_epilogue_(Tensor scores, Tensor? inv, Tensor? bias, Tensor target, int c0, " MARGIN
        ", Tensor(a!) saved, Tensor(b!) run_max, Tensor(c!) run_sum, Tensor(d!) max_score, "
        "Tensor(e!) target_logit, Tensor(f!) target_score) -> ()");
  m.def("chunk_bwd_epilogue_(Tensor src, bool from_saved, Tensor? inv, Tensor? bias, Tensor target, "
        "Tensor target_score, Tensor lse, Tensor grad_lse, Tensor grad_target, int c0, " MARGIN
        ", Tensor(a!) da) -> ()");
}

TORCH_LIBRARY_IMPL(dpface, CompositeExplicitAutograd, m) {
  m.impl("margin_softmax_check", &dpface::margin_check);
}

TORCH_LIBRARY_IMPL(dpface, CPU, m) {
  m.impl("margin_softmax_fwd", &dpface::margin_fwd_cpu);
  m.impl("margin_softmax_bwd", &dpface::margin_bwd_cpu);
  m.impl("range_loss_fwd", &dpface::range_fwd_cpu);
  m.impl("range_loss_bwd", &dpface::range_bwd_cpu);
  m.impl("sgd_rows_", &dpface::sgd_rows_checked);
}

#ifdef DPFACE_WITH_CUDA
TORCH_LIBRARY_IMPL(dpface, CUDA, m) {
  m.impl("margin_softmax_fwd", &dpface::margin_fwd_cuda);
  m.impl("margin_softmax_bwd", &dpface::margin_bwd_cuda);
  m.impl("range_loss_fwd", &dpface::range_fwd_cuda);
  m.impl("range_loss_bwd", &dpface::range_bwd_cuda);
  m.impl("chunk_fwd_epilogue_", &dpface::chunk_fwd_checked);
  m.impl("chunk_bwd_epilogue_", &dpface::chunk_bwd_checked);
}
#endif

// `import dpface._kernels` loads the library (registering the ops); the module itself is
// empty apart from what it was built with.
static PyModuleDef dpface_kernels_module = {PyModuleDef_HEAD_INIT, "_kernels",
                                            "dpface compiled ops (torch.ops.dpface)", -1,
                                            nullptr};

PyMODINIT_FUNC PyInit__kernels(void) {
  PyObject* m = PyModule_Create(&dpface_kernels_module);
  if (m == nullptr) return nullptr;
#ifdef DPFACE_WITH_CUDA
  PyModule_AddIntConstant(m, "WITH_CUDA", 1);
#ifndef DPFACE_CUDA_ARCHS
#define DPFACE_CUDA_ARCHS unknown
#endif
#define DPFACE_STR_(x) #x
#define DPFACE_STR(x) DPFACE_STR_(x)
  PyModule_AddStringConstant(m, "CUDA_ARCHS", DPFACE_STR(DPFACE_CUDA_ARCHS));  // "sm_80+sm_90"
#else
  PyModule_AddIntConstant(m, "WITH_CUDA", 0);
  PyModule_AddStringConstant(m, "CUDA_ARCHS", "");
#endif
  PyModule_AddStringConstant(m, "CPU_ISA", DPFACE_CPU_ISA);
  PyModule_AddIntConstant(m, "CPU_BF16", dpface::cpu_has_bf16() ? 1 : 0);
  return m;
}
