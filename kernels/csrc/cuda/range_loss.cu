// Range loss forward / backward on one batch (contract: kernels/OPS.md, semantics of
// dpface.losses.range_loss.RangeLoss.terms).
//
// N is a mini-batch (at most a few thousand), so this favours simple, deterministic
// O(N^2) kernels over sorting libraries, and everything stays on the device (no host
// sync; the identity count is only known there):
//   1. group: each sample's position in the label-sorted order (ties by index) and its
//      identity's rank among the distinct labels (torch.unique's order);
//   2. centres: per-identity means, summed in member order;
//   3. min centre distance: grid-strided over identity pairs, per-block (min, argmin)
//      partials reduced in block order;
//   4. intra: one block per identity selects its k largest pair distances by k block-wide
//      argmax rounds over a strict total order (distance desc, pair index asc), so no
//      per-pair storage is needed; the backward re-runs the same selection (same bits) and
//      applies each selected pair's gradient in sequence (each thread owns columns d).
// No atomics anywhere, so results are bitwise reproducible.
#include "common.cuh"
#include "dpface_cuda.h"
#include "launch.h"

#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>

namespace {

constexpr int kThreads = 256;
constexpr int kMinBlocks = 256;  // partials of the min-centre-distance search

template <class T> struct Eps { static constexpr T value = T(1e-12); };  // DIST_EPS

struct Groups {
  int* pos;       // [N] position of sample i in the label-sorted order
  int* members;   // [N] sample at each sorted position
  int* count_of;  // [N] size of sample i's identity
  int* id_start;  // [N] first sorted position of identity g (rank order)
  int* id_count;  // [N] size of identity g; 0 for g >= num_ids
  int* num_ids;   // [1]
};

// pos[i] = #{labels < l_i} + #{j < i : l_j == l_i}; members is its inverse.
__global__ void group_pos_kernel(const int64_t* labels, int N, Groups G) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= N) return;
  const int64_t li = labels[i];
  int less = 0, before = 0, same = 0;
  for (int j = 0; j < N; ++j) {
    const int64_t lj = labels[j];
    less += lj < li;
    same += lj == li;
    before += (lj == li) & (j < i);
  }
  const int p = less + before;
  G.pos[i] = p;
  G.members[p] = i;
  G.count_of[i] = same;
}

// Rank of the identity at sorted position p = number of label changes up to p.
__global__ void group_rank_kernel(const int64_t* labels, int N, Groups G) {
  const int p = blockIdx.x * blockDim.x + threadIdx.x;
  if (p >= N) return;
  int rank = 0;
  for (int q = 1; q <= p; ++q) rank += labels[G.members[q]] != labels[G.members[q - 1]];
  const int i = G.members[p];
  if (p == 0 || labels[i] != labels[G.members[p - 1]]) {
    G.id_start[rank] = p;
    G.id_count[rank] = G.count_of[i];
  }
  if (p == N - 1) *G.num_ids = rank + 1;
}

// centres[g, d] = mean of identity g's rows, in member order.
template <class T>
__global__ void centres_kernel(const T* x, int D, Groups G, T* centres) {
  const int g = blockIdx.x;
  if (g >= *G.num_ids) return;
  const int start = G.id_start[g], n = G.id_count[g];
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    T s = 0;
    for (int q = 0; q < n; ++q) s += x[int64_t(G.members[start + q]) * D + d];
    centres[int64_t(g) * D + d] = s / T(n);
  }
}

template <class T>
__device__ __forceinline__ bool min_better(T v, int64_t key, T bv, int64_t bkey) {
  return v < bv || (v == bv && key < bkey);
}

// Per-block min over identity pairs Q < R of ||c_Q - c_R||^2 (ties: smallest key Q*n+R).
template <class T>
__global__ void min_pair_kernel(const T* centres, int D, Groups G, T* part_v, int64_t* part_key) {
  __shared__ T sv[kThreads];
  __shared__ int64_t sk[kThreads];
  const int64_t nid = *G.num_ids;
  T bv = T(INFINITY);
  int64_t bk = LLONG_MAX;
  for (int64_t key = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; key < nid * nid;
       key += int64_t(gridDim.x) * blockDim.x) {
    const int64_t q = key / nid, r = key % nid;
    if (q >= r) continue;
    const T* cq = centres + q * D;
    const T* cr = centres + r * D;
    T s = 0;
    for (int d = 0; d < D; ++d) { const T t = cq[d] - cr[d]; s += t * t; }
    if (min_better(s, key, bv, bk)) { bv = s; bk = key; }
  }
  sv[threadIdx.x] = bv;
  sk[threadIdx.x] = bk;
  __syncthreads();
  for (int o = blockDim.x / 2; o > 0; o >>= 1) {
    if (threadIdx.x < o && min_better(sv[threadIdx.x + o], sk[threadIdx.x + o], sv[threadIdx.x], sk[threadIdx.x])) {
      sv[threadIdx.x] = sv[threadIdx.x + o];
      sk[threadIdx.x] = sk[threadIdx.x + o];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) { part_v[blockIdx.x] = sv[0]; part_key[blockIdx.x] = sk[0]; }
}

template <class T>
struct InterInfo {
  T value;      // inter
  T d_min;      // d inter / d (min centre distance): -1 where the hinge is active, else 0
  int64_t q, r; // identities of the minimising pair (-1 when < 2 identities)
};

// One thread: combine the min partials in block order; forward also sums intra parts.
template <class T>
__global__ void finish_kernel(const T* part_v, const int64_t* part_key, int nparts, Groups G, T margin,
                              const T* intra_part, T* intra, T* inter, InterInfo<T>* info) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  const int64_t nid = *G.num_ids;
  T bv = T(INFINITY);
  int64_t bk = LLONG_MAX;
  for (int b = 0; b < nparts; ++b)
    if (min_better(part_v[b], part_key[b], bv, bk)) { bv = part_v[b]; bk = part_key[b]; }
  InterInfo<T> in{T(0), T(0), -1, -1};
  if (nid >= 2 && bk != LLONG_MAX) {
    const T h = margin - bv;
    in.value = h > T(0) ? h : T(0);
    in.d_min = h >= T(0) ? T(-1) : T(0);  // clamp_min passes the gradient where h >= 0
    in.q = bk / nid;
    in.r = bk % nid;
  }
  if (inter) *inter = in.value;
  if (info) *info = in;
  if (intra) {
    T s = 0;
    for (int64_t g = 0; g < nid; ++g) s += intra_part[g];
    *intra = s;
  }
}

template <class T>
__device__ __forceinline__ bool sel_better(T v, int64_t p, T bv, int64_t bp) {
  return v > bv || (v == bv && p < bp);
}

// Selects identity g's k' largest pair distances (by v = max(||x_a - x_b||^2, eps)),
// writing the pair keys (a * n + b, local member indices a < b) and v in selection order
// to sel_key / sel_v; returns sum 1/D and k' (valid in every thread).
template <class T>
__device__ void select_pairs(const T* x, int D, const int* mem, int n, int64_t k, int64_t* sel_key, T* sel_v,
                             T* sum_inv, int64_t* kp_out) {
  __shared__ T sv[kThreads];
  __shared__ int64_t sk[kThreads];
  __shared__ T s_sum;
  const int64_t pairs = int64_t(n) * (n - 1) / 2;
  const int64_t kp = k < pairs ? k : pairs;
  T prev_v = T(INFINITY);
  int64_t prev_p = -1;
  if (threadIdx.x == 0) s_sum = T(0);
  for (int64_t it = 0; it < kp; ++it) {
    T bv = T(-1);
    int64_t bp = LLONG_MAX;
    for (int64_t p = threadIdx.x; p < int64_t(n) * n; p += blockDim.x) {
      const int a = int(p / n), b = int(p % n);
      if (a >= b) continue;
      const T* xa = x + int64_t(mem[a]) * D;
      const T* xb = x + int64_t(mem[b]) * D;
      T s = 0;
      for (int d = 0; d < D; ++d) { const T t = xa[d] - xb[d]; s += t * t; }
      const T v = s < Eps<T>::value ? Eps<T>::value : s;  // clamp_min (NaN stays NaN)
      // Only pairs after the previous pick in the total order are still candidates.
      if (sel_better(prev_v, prev_p, v, p) && sel_better(v, p, bv, bp)) { bv = v; bp = p; }
    }
    sv[threadIdx.x] = bv;
    sk[threadIdx.x] = bp;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
      if (threadIdx.x < o && sel_better(sv[threadIdx.x + o], sk[threadIdx.x + o], sv[threadIdx.x], sk[threadIdx.x])) {
        sv[threadIdx.x] = sv[threadIdx.x + o];
        sk[threadIdx.x] = sk[threadIdx.x + o];
      }
      __syncthreads();
    }
    prev_v = sv[0];
    prev_p = sk[0];
    if (threadIdx.x == 0) {
      sel_key[it] = prev_p;
      sel_v[it] = prev_v;
      s_sum += T(1) / sqrt(prev_v);
    }
    __syncthreads();  // sv / sk are reused by the next round
  }
  __syncthreads();
  *sum_inv = s_sum;
  *kp_out = kp;
}

// Forward: intra_part[g] = k' / sum 1/D for identity g (0 below 2 samples).
template <class T>
__global__ void __launch_bounds__(kThreads) intra_fwd_kernel(const T* x, int D, int64_t k, int64_t kcap, Groups G,
                                                             int64_t* sel_key, T* sel_v, T* intra_part) {
  const int g = blockIdx.x;
  if (g >= *G.num_ids) return;
  const int start = G.id_start[g], n = G.id_count[g];
  if (n < 2) { if (threadIdx.x == 0) intra_part[g] = T(0); return; }
  T sum_inv;
  int64_t kp;
  select_pairs(x, D, G.members + start, n, k, sel_key + start * kcap, sel_v + start * kcap, &sum_inv, &kp);
  if (threadIdx.x == 0) intra_part[g] = T(kp) / sum_inv;
}

// Backward, one block per identity: writes the rows of g's samples (every row belongs to
// exactly one identity, so grad_x needs no zeroing and no atomics).
template <class T>
__global__ void __launch_bounds__(kThreads) range_bwd_kernel(const T* grad_intra, const T* x, const T* centres,
                                                             int D, int64_t k, int64_t kcap, Groups G,
                                                             const InterInfo<T>* info, const T* grad_inter,
                                                             int64_t* sel_key, T* sel_v, T* grad_x) {
  const int g = blockIdx.x;
  if (g >= *G.num_ids) return;
  const int start = G.id_start[g], n = G.id_count[g];
  const int* mem = G.members + start;
  for (int q = 0; q < n; ++q)
    for (int d = threadIdx.x; d < D; d += blockDim.x) grad_x[int64_t(mem[q]) * D + d] = T(0);
  if (n >= 2) {
    T sum_inv;
    int64_t kp;
    int64_t* keys = sel_key + start * kcap;
    T* vals = sel_v + start * kcap;
    select_pairs(x, D, mem, n, k, keys, vals, &sum_inv, &kp);
    // d intra / d D_j = k' / (S^2 D_j^2); d D / d x_a = (x_a - x_b) / D where unclamped.
    const T base = *grad_intra * T(kp) / (sum_inv * sum_inv);
    for (int64_t it = 0; it < kp; ++it) {
      const int64_t p = keys[it];
      if (p == LLONG_MAX) break;  // no candidate left (NaN distances)
      const T v = vals[it];
      const T Dj = sqrt(v);
      // v > eps: unclamped (v == eps is ambiguous only when ||.||^2 is exactly eps).
      const T c = v > Eps<T>::value ? base / (Dj * Dj * Dj) : T(0);
      const int64_t a = mem[p / n], b = mem[p % n];
      for (int d = threadIdx.x; d < D; d += blockDim.x) {
        const T t = c * (x[a * D + d] - x[b * D + d]);
        grad_x[a * D + d] += t;
        grad_x[b * D + d] -= t;
      }
    }
  }
  const InterInfo<T> in = *info;
  if ((g == in.q || g == in.r) && in.d_min != T(0)) {
    // d ||c_Q - c_R||^2 / d c_Q = 2 (c_Q - c_R) = - d / d c_R; d c_g / d x_a = 1 / n.
    const T sign = g == in.q ? T(1) : T(-1);
    const T c = *grad_inter * in.d_min * T(2) * sign / T(n);
    const T* cq = centres + in.q * D;
    const T* cr = centres + in.r * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
      const T t = c * (cq[d] - cr[d]);
      for (int q = 0; q < n; ++q) grad_x[int64_t(mem[q]) * D + d] += t;
    }
  }
}

// ---------------------------------------------------------------------------------------
// Host side

using dpface_cuda::cuda_code;
int last_launch() { return cuda_code(cudaGetLastError()); }
size_t align_up(size_t v) { return (v + 255) & ~size_t(255); }

struct Layout {
  size_t ints, centres, part_v, part_key, intra_part, sel_key, sel_v, info, total;
  int64_t kcap;
};

// kcap: selection slots per member; identity g owns n_g * kcap >= min(k, n_g (n_g-1) / 2).
Layout layout(int64_t N, int64_t D, int64_t k, size_t tsize) {
  Layout l;
  l.kcap = k < N ? k : N;
  size_t o = 0;
  l.ints = o;       o += align_up(sizeof(int) * (5 * size_t(N) + 1));
  l.centres = o;    o += align_up(tsize * size_t(N) * size_t(D));
  l.part_v = o;     o += align_up(tsize * kMinBlocks);
  l.part_key = o;   o += align_up(sizeof(int64_t) * kMinBlocks);
  l.intra_part = o; o += align_up(tsize * size_t(N));
  l.sel_key = o;    o += align_up(sizeof(int64_t) * size_t(N) * size_t(l.kcap));
  l.sel_v = o;      o += align_up(tsize * size_t(N) * size_t(l.kcap));
  l.info = o;       o += align_up(sizeof(InterInfo<double>));
  l.total = o;
  return l;
}

bool args_ok(int64_t N, int64_t D, int64_t k) {
  return N >= 0 && N <= (int64_t(1) << 24) && D >= 0 && D <= INT_MAX && k >= 1;
}

Groups groups_at(char* ws, const Layout& l, int64_t N) {
  int* p = reinterpret_cast<int*>(ws + l.ints);
  return Groups{p, p + N, p + 2 * N, p + 3 * N, p + 4 * N, p + 5 * N};
}

// Steps 1-3 and the min reduction; returns the layout's pieces through ws.
template <class T>
int common(const T* x, const int64_t* labels, int64_t N, int64_t D, const Layout& l, char* ws, cudaStream_t stream) {
  const Groups G = groups_at(ws, l, N);
  // id_count (zeros past num_ids) and num_ids start at 0.
  if (int rc = cuda_code(cudaMemsetAsync(G.id_count, 0, sizeof(int) * (size_t(N) + 1), stream))) return rc;
  const unsigned nb = unsigned((N + kThreads - 1) / kThreads);
  DPFACE_LAUNCH(nb, kThreads, 0, stream, group_pos_kernel)(labels, int(N), G);
  if (int rc = last_launch()) return rc;
  DPFACE_LAUNCH(nb, kThreads, 0, stream, group_rank_kernel)(labels, int(N), G);
  if (int rc = last_launch()) return rc;
  T* centres = reinterpret_cast<T*>(ws + l.centres);
  DPFACE_LAUNCH(unsigned(N), 128, 0, stream, centres_kernel<T>)(x, int(D), G, centres);
  if (int rc = last_launch()) return rc;
  DPFACE_LAUNCH(kMinBlocks, kThreads, 0, stream, min_pair_kernel<T>)(
      centres, int(D), G, reinterpret_cast<T*>(ws + l.part_v), reinterpret_cast<int64_t*>(ws + l.part_key));
  return last_launch();
}

template <class T>
int fwd_impl(const T* x, const int64_t* labels, int64_t N, int64_t D, int64_t k, double margin, T* intra, T* inter,
             void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (!args_ok(N, D, k) || !intra || !inter || (N > 0 && (!labels || (D > 0 && !x)))) return DPFACE_CUDA_EINVAL;
  const Layout l = layout(N, D, k, sizeof(T));
  if (workspace_bytes < l.total || !workspace) return DPFACE_CUDA_EWORKSPACE;
  if (N == 0) {
    if (int rc = cuda_code(cudaMemsetAsync(intra, 0, sizeof(T), stream))) return rc;
    return cuda_code(cudaMemsetAsync(inter, 0, sizeof(T), stream));
  }
  char* ws = static_cast<char*>(workspace);
  if (int rc = common(x, labels, N, D, l, ws, stream)) return rc;
  const Groups G = groups_at(ws, l, N);
  T* intra_part = reinterpret_cast<T*>(ws + l.intra_part);
  DPFACE_LAUNCH(unsigned(N), kThreads, 0, stream, intra_fwd_kernel<T>)(
      x, int(D), k, l.kcap, G, reinterpret_cast<int64_t*>(ws + l.sel_key), reinterpret_cast<T*>(ws + l.sel_v),
      intra_part);
  if (int rc = last_launch()) return rc;
  DPFACE_LAUNCH(1, 1, 0, stream, finish_kernel<T>)(reinterpret_cast<T*>(ws + l.part_v),
                                                   reinterpret_cast<int64_t*>(ws + l.part_key), kMinBlocks, G,
                                                   T(margin), intra_part, intra, inter, nullptr);
  return last_launch();
}

template <class T>
int bwd_impl(const T* grad_intra, const T* grad_inter, const T* x, const int64_t* labels, int64_t N, int64_t D,
             int64_t k, double margin, T* grad_x, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (!args_ok(N, D, k) || !grad_intra || !grad_inter || (N > 0 && (!labels || (D > 0 && (!x || !grad_x)))))
    return DPFACE_CUDA_EINVAL;
  const Layout l = layout(N, D, k, sizeof(T));
  if (workspace_bytes < l.total || !workspace) return DPFACE_CUDA_EWORKSPACE;
  if (N == 0 || D == 0) return DPFACE_CUDA_OK;  // grad_x is empty
  char* ws = static_cast<char*>(workspace);
  if (int rc = common(x, labels, N, D, l, ws, stream)) return rc;
  const Groups G = groups_at(ws, l, N);
  InterInfo<T>* info = reinterpret_cast<InterInfo<T>*>(ws + l.info);
  DPFACE_LAUNCH(1, 1, 0, stream, finish_kernel<T>)(reinterpret_cast<T*>(ws + l.part_v),
                                                   reinterpret_cast<int64_t*>(ws + l.part_key), kMinBlocks, G,
                                                   T(margin), nullptr, nullptr, nullptr, info);
  if (int rc = last_launch()) return rc;
  DPFACE_LAUNCH(unsigned(N), kThreads, 0, stream, range_bwd_kernel<T>)(
      grad_intra, x, reinterpret_cast<T*>(ws + l.centres), int(D), k, l.kcap, G, info, grad_inter,
      reinterpret_cast<int64_t*>(ws + l.sel_key), reinterpret_cast<T*>(ws + l.sel_v), grad_x);
  return last_launch();
}

}  // namespace

extern "C" {

int dpface_range_loss_workspace(int64_t N, int64_t D, int64_t k, int double_precision, size_t* bytes) {
  if (!bytes || !args_ok(N, D, k)) return DPFACE_CUDA_EINVAL;
  *bytes = layout(N, D, k, double_precision ? sizeof(double) : sizeof(float)).total;
  return DPFACE_CUDA_OK;
}

int dpface_range_loss_fwd_f32(const float* x, const int64_t* labels, int64_t N, int64_t D, int64_t k, double margin,
                              float* intra, float* inter, void* workspace, size_t workspace_bytes,
                              cudaStream_t stream) {
  return fwd_impl<float>(x, labels, N, D, k, margin, intra, inter, workspace, workspace_bytes, stream);
}

int dpface_range_loss_fwd_f64(const double* x, const int64_t* labels, int64_t N, int64_t D, int64_t k,
                              double margin, double* intra, double* inter, void* workspace,
                              size_t workspace_bytes, cudaStream_t stream) {
  return fwd_impl<double>(x, labels, N, D, k, margin, intra, inter, workspace, workspace_bytes, stream);
}

int dpface_range_loss_bwd_f32(const float* grad_intra, const float* grad_inter, const float* x,
                              const int64_t* labels, int64_t N, int64_t D, int64_t k, double margin,
                              float* grad_x, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  return bwd_impl<float>(grad_intra, grad_inter, x, labels, N, D, k, margin, grad_x, workspace, workspace_bytes,
                         stream);
}

int dpface_range_loss_bwd_f64(const double* grad_intra, const double* grad_inter, const double* x,
                              const int64_t* labels, int64_t N, int64_t D, int64_t k, double margin,
                              double* grad_x, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  return bwd_impl<double>(grad_intra, grad_inter, x, labels, N, D, k, margin, grad_x, workspace, workspace_bytes,
                          stream);
}

}  // extern "C"
