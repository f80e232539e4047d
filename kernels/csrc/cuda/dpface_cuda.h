// C interface of the dpface CUDA kernels (margin_softmax.cu, range_loss.cu, chunk_epilogue.cu).
//
// No torch headers: nvcc builds the kernels on machines without a CUDA torch, and the
// torch glue (cuda_ops.cpp) is the only caller that knows about tensors. Every pointer
// is a device pointer to a contiguous (row-major) array; every function only enqueues
// work on `stream` (no synchronisation, no allocation: scratch comes from the caller,
// sized by the *_workspace query) and returns DPFACE_CUDA_OK or an error code that
// dpface_cuda_error_string() explains. Semantics: kernels/OPS.md.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

enum {
  DPFACE_CUDA_OK = 0,
  DPFACE_CUDA_EINVAL = 1,          // negative / too large size (> INT32_MAX) or a missing pointer
  DPFACE_CUDA_EWORKSPACE = 2,      // workspace smaller than the *_workspace query asked for
  DPFACE_CUDA_ECUDA_BASE = 1000,   // 1000 + cudaError_t of a failed launch / memset
};

// Human-readable text of a return code (static storage; never null).
const char* dpface_cuda_error_string(int code);

// Margin parameters (see margin_math.h). bf16: round the fp32 GEMM operands to
// bfloat16 (tensor cores, fp32 accumulation); implied for the *_bf16 entry points.
// Per-sample arrays (device pointers, float32, or NULL): sample_scale [B] replaces s,
// sample_margin [B, 3] replaces (m1, m2, m3) of each row; hard_threshold [B] with t turns a
// negative score c above the row's threshold into c (t + c) (CurricularFace).
typedef struct {
  double s, m1, m2, m3, t;
  int easy_margin;
  int angle_clip;
  int normalize;
  int bf16;
  const float* sample_scale;
  const float* sample_margin;
  const float* hard_threshold;
} dpface_margin_params;

// ---- margin softmax ------------------------------------------------------------------
// Shapes: x [B, D], w [C, D] (C is not needed: idx entries are trusted to be < C),
// idx [K] int64 or NULL (column j is row j), target [B] int64 in [-1, K),
// bias [C] fp32 or NULL (normalize == 0 only). bf16 tensors are passed as raw uint16_t
// bits. All outputs are fp32: lse, target_logit, target_score, max_score [B],
// inv_norm [K], saved [B, n_keep] (n_keep <= K; may be NULL when n_keep == 0): the scores of the
// first n_keep columns, which backward reads instead of recomputing them.

// Bytes of scratch the forward needs for (B, K, D); the same for fp32 and bf16.
int dpface_margin_softmax_fwd_workspace(int64_t B, int64_t K, int64_t D, size_t* bytes);

int dpface_margin_softmax_fwd_f32(const float* x, const float* w, const int64_t* idx,
                                  const int64_t* target, const float* bias, int64_t B,
                                  int64_t K, int64_t D, int64_t n_keep,
                                  const dpface_margin_params* p, float* lse,
                                  float* target_logit, float* target_score, float* max_score,
                                  float* inv_norm, float* saved, void* workspace,
                                  size_t workspace_bytes, cudaStream_t stream);

int dpface_margin_softmax_fwd_bf16(const uint16_t* x, const uint16_t* w, const int64_t* idx,
                                   const int64_t* target, const float* bias, int64_t B,
                                   int64_t K, int64_t D, int64_t n_keep,
                                   const dpface_margin_params* p, float* lse,
                                   float* target_logit, float* target_score, float* max_score,
                                   float* inv_norm, float* saved, void* workspace,
                                   size_t workspace_bytes, cudaStream_t stream);

// Backward. grad_lse, grad_target, lse [B], inv_norm [K], saved [B, n_keep] are fp32.
// Outputs: grad_x [B, D] and grad_rows [K, D] in the input dtype, grad_bias [K] fp32
// (NULL when there is no bias). Every output element is written (no pre-zeroing needed).
// io_bf16: whether x/w are bf16 (the workspace holds fp32 accumulators for them).
int dpface_margin_softmax_bwd_workspace(int64_t B, int64_t K, int64_t D, int io_bf16,
                                        size_t* bytes);

int dpface_margin_softmax_bwd_f32(const float* grad_lse, const float* grad_target,
                                  const float* lse, const float* x, const float* w,
                                  const int64_t* idx, const int64_t* target, const float* bias,
                                  const float* inv_norm, const float* saved, int64_t B,
                                  int64_t K, int64_t D, int64_t n_keep,
                                  const dpface_margin_params* p, float* grad_x,
                                  float* grad_rows, float* grad_bias, void* workspace,
                                  size_t workspace_bytes, cudaStream_t stream);

int dpface_margin_softmax_bwd_bf16(const float* grad_lse, const float* grad_target,
                                   const float* lse, const uint16_t* x, const uint16_t* w,
                                   const int64_t* idx, const int64_t* target, const float* bias,
                                   const float* inv_norm, const float* saved, int64_t B,
                                   int64_t K, int64_t D, int64_t n_keep,
                                   const dpface_margin_params* p, uint16_t* grad_x,
                                   uint16_t* grad_rows, float* grad_bias, void* workspace,
                                   size_t workspace_bytes, cudaStream_t stream);

// ---- range loss ----------------------------------------------------------------------
// x [N, D], labels [N] int64; intra, inter, grad_intra, grad_inter are device scalars
// (0-dim tensors) in x's dtype; grad_x [N, D]. double_precision: 1 for the f64 entry
// points (the workspace holds values of that width).
int dpface_range_loss_workspace(int64_t N, int64_t D, int64_t k, int double_precision,
                                size_t* bytes);

int dpface_range_loss_fwd_f32(const float* x, const int64_t* labels, int64_t N, int64_t D,
                              int64_t k, double margin, float* intra, float* inter,
                              void* workspace, size_t workspace_bytes, cudaStream_t stream);
int dpface_range_loss_fwd_f64(const double* x, const int64_t* labels, int64_t N, int64_t D,
                              int64_t k, double margin, double* intra, double* inter,
                              void* workspace, size_t workspace_bytes, cudaStream_t stream);

int dpface_range_loss_bwd_f32(const float* grad_intra, const float* grad_inter, const float* x,
                              const int64_t* labels, int64_t N, int64_t D, int64_t k,
                              double margin, float* grad_x, void* workspace,
                              size_t workspace_bytes, cudaStream_t stream);
int dpface_range_loss_bwd_f64(const double* grad_intra, const double* grad_inter,
                              const double* x, const int64_t* labels, int64_t N, int64_t D,
                              int64_t k, double margin, double* grad_x, void* workspace,
                              size_t workspace_bytes, cudaStream_t stream);

// ---- chunked margin softmax: the epilogues around library GEMMs (chunk_epilogue.cu) -----
// One column chunk [c0, c0 + n) of the K columns. Forward: scores [B, n] fp32 are the raw
// dot products x . row (read only); inv [n] (normalize) or bias [n] (optional) of the
// chunk; target [B] in [-1, K). Updates, per row, run_max / run_sum (the online
// log-sum-exp of the logits: start at -inf / 0), max_score (start at -inf), and where the
// target is in the chunk target_logit / target_score; writes the chunk's scores of
// columns < n_keep into saved [B, n_keep].
int dpface_chunk_fwd_epilogue(const float* scores, int64_t B, int64_t n, int64_t c0, const float* inv,
                              const float* bias, const int64_t* target, const dpface_margin_params* p,
                              float* saved, int64_t n_keep, float* run_max, float* run_sum,
                              float* max_score, float* target_logit, float* target_score,
                              cudaStream_t stream);

// Backward: src [B, ld_src] holds the chunk's raw dot products (from_saved = 0) or its kept
// scores (from_saved = 1: saved + c0, ld_src = n_keep); writes da [B, n] = d loss /
// d (x . row) (may alias src when ld_src == n). target_score [B] is the forward's (dpsi),
// lse, grad_lse, grad_target [B].
int dpface_chunk_bwd_epilogue(const float* src, int64_t ld_src, int from_saved, int64_t B, int64_t n,
                              int64_t c0, const float* inv, const float* bias, const int64_t* target,
                              const float* target_score, const float* lse, const float* grad_lse,
                              const float* grad_target, const dpface_margin_params* p, float* da,
                              cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif
