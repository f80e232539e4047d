// The C++ signatures of the dpface ops; the CPU backend implements them in cpu/, the CUDA
// backend in cuda_ops.cpp (built only where torch has CUDA). Contract: kernels/OPS.md.
#pragma once

#include <ATen/ATen.h>
#include <optional>
#include <tuple>

namespace dpface {

using Tensors6 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Tensors3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// The margin of the fused op (kernels/OPS.md): the scalars, and the optional per-sample
// tensors (accumulation dtype, x's device): scale [B], margin [B, 3] = (m1, m2, m3),
// hard [B] (CurricularFace's thresholds, with t).
struct MarginArgs {
  std::optional<at::Tensor> scale, margin, hard;
  double s = 1, m1 = 1, m2 = 0, m3 = 0, t = 0;
  bool easy = false, clip = false, normalize = true;
};

#define DPFACE_DECLARE_OPS(SUFFIX)                                                              \
  Tensors6 margin_softmax_fwd_##SUFFIX(                                                         \
      const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& idx,           \
      const at::Tensor& target, const std::optional<at::Tensor>& bias, const MarginArgs& m,     \
      bool bf16, int64_t keep_cols);                                                            \
  Tensors3 margin_softmax_bwd_##SUFFIX(                                                         \
      const at::Tensor& grad_lse, const at::Tensor& grad_target, const at::Tensor& lse,         \
      const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& idx,           \
      const at::Tensor& target, const std::optional<at::Tensor>& bias,                          \
      const at::Tensor& inv_norm, const at::Tensor& saved, const MarginArgs& m, bool bf16);     \
  std::tuple<at::Tensor, at::Tensor> range_loss_fwd_##SUFFIX(                                   \
      const at::Tensor& x, const at::Tensor& labels, int64_t k, double margin);                 \
  at::Tensor range_loss_bwd_##SUFFIX(const at::Tensor& grad_intra, const at::Tensor& grad_inter, \
                                     const at::Tensor& x, const at::Tensor& labels, int64_t k,  \
                                     double margin);

DPFACE_DECLARE_OPS(cpu)
#ifdef DPFACE_WITH_CUDA
DPFACE_DECLARE_OPS(cuda)
#endif

#ifdef DPFACE_WITH_CUDA
// The chunked path's epilogues (cuda/chunk_epilogue.cu); the GEMMs around them are torch's.
void chunk_fwd_epilogue_cuda(const at::Tensor& scores, const std::optional<at::Tensor>& inv,
                             const std::optional<at::Tensor>& bias, const at::Tensor& target, int64_t c0,
                             const MarginArgs& m, at::Tensor& saved, at::Tensor& run_max, at::Tensor& run_sum,
                             at::Tensor& max_score, at::Tensor& target_logit, at::Tensor& target_score);
void chunk_bwd_epilogue_cuda(const at::Tensor& src, bool from_saved, const std::optional<at::Tensor>& inv,
                             const std::optional<at::Tensor>& bias, const at::Tensor& target,
                             const at::Tensor& target_score, const at::Tensor& lse, const at::Tensor& grad_lse,
                             const at::Tensor& grad_target, int64_t c0, const MarginArgs& m, at::Tensor& da);
#endif

// Lazy SGD on sampled rows (CPU only; on GPUs torch's own ops are bandwidth-bound anyway).
void sgd_rows_cpu(at::Tensor& param, at::Tensor& buf, const at::Tensor& idx,
                  const at::Tensor& grad, double lr, double momentum, double weight_decay);

// Whether the CPU multiplies bf16 natively (AVX512-BF16 / AMX-BF16): the CPU op's bf16
// path then runs bf16 GEMMs (cpu/margin_softmax.cpp).
bool cpu_has_bf16();

// Argument checks shared by every backend (binding.cpp): each names the argument.
void check_margin_inputs(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& idx,
                         const at::Tensor& target, const std::optional<at::Tensor>& bias, const MarginArgs& m,
                         int64_t keep_cols, bool check_values = true);
void check_range_inputs(const at::Tensor& x, const at::Tensor& labels, int64_t k, double margin);

}  // namespace dpface
