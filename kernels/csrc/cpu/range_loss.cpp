// Range loss (Zhang et al. 2017) forward and backward on the CPU, exactly
// dpface.losses.range_loss.RangeLoss.terms (contract: kernels/OPS.md). A batch holds at
// most a few thousand samples, so plain loops over each identity's pairs suffice; the
// backward recomputes the selection (the k largest ranges, the closest centre pair).
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <vector>

#include "../ops.h"

namespace dpface {
namespace {

constexpr double DIST_EPS = 1e-12;

template <typename T>
struct Selection {
  std::vector<std::vector<int64_t>> members;  // per identity (sorted label order), sample rows
  // per identity: the selected pairs (a, b) and their distances
  std::vector<std::vector<std::pair<int64_t, int64_t>>> pairs;
  std::vector<std::vector<T>> dists;
  std::vector<T> centres;  // [G, D]
  int64_t q = -1, r = -1;  // closest centre pair
  T d_centre = 0;
};

template <typename T>
T sq_dist(const T* a, const T* b, int64_t D) {
  T s = 0;
  for (int64_t k = 0; k < D; ++k) {
    const T d = a[k] - b[k];
    s += d * d;
  }
  return s;
}

template <typename T>
Selection<T> select(const T* x, const int64_t* labels, int64_t N, int64_t D, int64_t k) {
  Selection<T> sel;
  std::map<int64_t, int64_t> group_of;
  for (int64_t i = 0; i < N; ++i) group_of.emplace(labels[i], 0);
  int64_t g = 0;
  for (auto& kv : group_of) kv.second = g++;
  sel.members.resize(g);
  for (int64_t i = 0; i < N; ++i) sel.members[group_of[labels[i]]].push_back(i);
  sel.pairs.resize(g);
  sel.dists.resize(g);
  for (int64_t q = 0; q < g; ++q) {
    const auto& m = sel.members[q];
    if (m.size() < 2) continue;
    std::vector<std::pair<T, std::pair<int64_t, int64_t>>> all;
    for (size_t a = 0; a < m.size(); ++a)
      for (size_t b = a + 1; b < m.size(); ++b) {
        const T d2 = std::max<T>(sq_dist(x + m[a] * D, x + m[b] * D, D), T(DIST_EPS));
        all.push_back({std::sqrt(d2), {m[a], m[b]}});
      }
    const size_t kk = std::min<size_t>(k, all.size());
    std::partial_sort(all.begin(), all.begin() + kk, all.end(),
                      [](const auto& u, const auto& v) { return u.first > v.first; });
    for (size_t j = 0; j < kk; ++j) {
      sel.pairs[q].push_back(all[j].second);
      sel.dists[q].push_back(all[j].first);
    }
  }
  sel.centres.assign(g * D, T(0));
  for (int64_t q = 0; q < g; ++q) {
    T* c = sel.centres.data() + q * D;
    for (int64_t i : sel.members[q])
      for (int64_t d = 0; d < D; ++d) c[d] += x[i * D + d];
    const T inv = T(1) / T(sel.members[q].size());
    for (int64_t d = 0; d < D; ++d) c[d] *= inv;
  }
  for (int64_t q = 0; q < g; ++q)
    for (int64_t r = q + 1; r < g; ++r) {
      const T d2 = sq_dist(sel.centres.data() + q * D, sel.centres.data() + r * D, D);
      if (sel.q < 0 || d2 < sel.d_centre) {
        sel.q = q;
        sel.r = r;
        sel.d_centre = d2;
      }
    }
  return sel;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> range_loss_fwd_cpu(const at::Tensor& x, const at::Tensor& labels,
                                                      int64_t k, double margin) {
  at::Tensor intra = at::zeros({}, x.options()), inter = at::zeros({}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "range_loss_fwd_cpu", [&] {
    const auto sel = select<scalar_t>(x.data_ptr<scalar_t>(), labels.data_ptr<int64_t>(),
                                      x.size(0), x.size(1), k);
    scalar_t total = 0;
    for (const auto& d : sel.dists) {
      if (d.empty()) continue;
      scalar_t rsum = 0;
      for (scalar_t v : d) rsum += scalar_t(1) / v;
      total += scalar_t(d.size()) / rsum;
    }
    intra.fill_(total);
    if (sel.q >= 0) inter.fill_(std::max<scalar_t>(scalar_t(margin) - sel.d_centre, 0));
  });
  return {intra, inter};
}

at::Tensor range_loss_bwd_cpu(const at::Tensor& grad_intra, const at::Tensor& grad_inter,
                              const at::Tensor& x, const at::Tensor& labels, int64_t k,
                              double margin) {
  at::Tensor grad = at::zeros_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "range_loss_bwd_cpu", [&] {
    const int64_t D = x.size(1);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* gp = grad.data_ptr<scalar_t>();
    const auto sel = select<scalar_t>(xp, labels.data_ptr<int64_t>(), x.size(0), D, k);
    const scalar_t gi = grad_intra.item<scalar_t>(), ge = grad_inter.item<scalar_t>();
    for (size_t q = 0; q < sel.dists.size(); ++q) {
      const auto& d = sel.dists[q];
      if (d.empty()) continue;
      scalar_t rsum = 0;
      for (scalar_t v : d) rsum += scalar_t(1) / v;
      // h = k'/sum(1/D_j): dh/dD_j = k' / (sum 1/D)^2 / D_j^2.
      const scalar_t kp = scalar_t(d.size());
      for (size_t j = 0; j < d.size(); ++j) {
        const auto [a, b] = sel.pairs[q][j];
        const scalar_t d2 = sq_dist(xp + a * D, xp + b * D, D);
        if (d2 < scalar_t(DIST_EPS)) continue;  // the clamp passes no gradient
        // dD/dx_a = (x_a - x_b) / D
        const scalar_t f = gi * kp / (rsum * rsum) / (d[j] * d[j]) / d[j];
        for (int64_t c = 0; c < D; ++c) {
          const scalar_t diff = xp[a * D + c] - xp[b * D + c];
          gp[a * D + c] += f * diff;
          gp[b * D + c] -= f * diff;
        }
      }
    }
    if (sel.q >= 0 && scalar_t(margin) - sel.d_centre >= 0) {
      // inter = m - |c_Q - c_R|^2: d/dc_Q = -2 (c_Q - c_R); c_Q is the mean of its members.
      const scalar_t* cq = sel.centres.data() + sel.q * D;
      const scalar_t* cr = sel.centres.data() + sel.r * D;
      const auto& mq = sel.members[sel.q];
      const auto& mr = sel.members[sel.r];
      for (int64_t c = 0; c < D; ++c) {
        const scalar_t diff = -2 * ge * (cq[c] - cr[c]);
        for (int64_t i : mq) gp[i * D + c] += diff / scalar_t(mq.size());
        for (int64_t i : mr) gp[i * D + c] -= diff / scalar_t(mr.size());
      }
    }
  });
  return grad;
}

}  // namespace dpface
