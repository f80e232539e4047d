// Lazy SGD on a step's sampled rows (``head.update: sampled``) in one pass per row:
//   d = g + wd * p[r];  buf[r] = mu * buf[r] + d;  p[r] -= lr * buf[r]
// torch SGD's arithmetic (momentum, dampening 0, L2 decay) on the K rows only. Done with
// index_select / index_copy_ / index_add_ it reads and writes every [K, D] array several
// times; here each row is read once and written once (contract: kernels/OPS.md).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "../ops.h"
#include "simd.h"

namespace dpface {
namespace {

template <typename T>
DPFACE_SIMD_CLONES void sgd_row(T* p, T* b, const T* g, T lr, T mu, T wd, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    const T d = g[k] + wd * p[k];
    const T v = mu * b[k] + d;
    b[k] = v;
    p[k] -= lr * v;
  }
}

}  // namespace

void sgd_rows_cpu(at::Tensor& param, at::Tensor& buf, const at::Tensor& idx,
                  const at::Tensor& grad, double lr, double momentum, double weight_decay) {
  const int64_t K = idx.numel(), D = param.size(1);
  const int64_t* ip = idx.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "sgd_rows_cpu", [&] {
    scalar_t* p = param.data_ptr<scalar_t>();
    scalar_t* b = buf.data_ptr<scalar_t>();
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const scalar_t lr_ = lr, mu = momentum, wd = weight_decay;
    at::parallel_for(0, K, 64, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j)
        sgd_row(p + ip[j] * D, b + ip[j] * D, g + j * D, lr_, mu, wd, D);
    });
  });
}

}  // namespace dpface
