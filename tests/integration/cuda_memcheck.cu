// Every entry point of dpface_cuda.h on ragged shapes, with device buffers of exactly the
// size the contract names, for a memory checker: compute-sanitizer --tool memcheck on a GPU
// (benchmarks/device_check.sh), AddressSanitizer under the CPU emulator in CI
// (tests/integration/test_kernels_emu.py). Values are not checked here (the tests against float64 do
// that); an out-of-bounds access, a failed launch or a non-zero return code fails it.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "dpface_cuda.h"

namespace {

int failures = 0;

void expect_ok(int rc, const char* what) {
  if (rc != DPFACE_CUDA_OK) {
    std::fprintf(stderr, "FAIL %s: %s\n", what, dpface_cuda_error_string(rc));
    ++failures;
  }
}

// A device buffer of exactly n elements, filled from host values.
template <class T>
T* dev(const std::vector<T>& host) {
  void* p = nullptr;
  if (host.empty()) return nullptr;
  if (cudaMalloc(&p, host.size() * sizeof(T)) != cudaSuccess) {
    std::fprintf(stderr, "cudaMalloc failed\n");
    std::exit(2);
  }
  cudaMemcpy(p, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
  return static_cast<T*>(p);
}

template <class T>
T* scratch(size_t n) {
  return dev(std::vector<T>(n, T(0)));
}

void* bytes(size_t n) { return n ? static_cast<void*>(scratch<unsigned char>(n)) : nullptr; }

uint32_t lcg = 12345u;
float rnd() {
  lcg = lcg * 1664525u + 1013904223u;
  return float(lcg >> 8) / float(1u << 24) - 0.5f;
}

uint16_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

void margin(int64_t B, int64_t C, int64_t K, int64_t D, int64_t n_keep, bool sampled, bool bias, int mode,
            bool per_sample = false) {
  // mode 0: fp32 SIMT, 1: fp32 inputs with bf16 tensor cores, 2: bf16 inputs; per_sample:
  // per-row scale and margins, AdaFace's clipped angle, CurricularFace's hard negatives
  std::vector<float> x(static_cast<size_t>(B * D)), w(static_cast<size_t>(C * D)), b(static_cast<size_t>(C));
  for (auto& v : x) v = rnd();
  for (auto& v : w) v = rnd();
  for (auto& v : b) v = rnd() * 0.1f;
  std::vector<int64_t> idx, target(static_cast<size_t>(B));
  for (int64_t j = 0; j < K; ++j) idx.push_back(sampled ? (j * C) / K : j);
  for (int64_t i = 0; i < B; ++i) target[size_t(i)] = K ? ((i % 5 == 4) ? -1 : (i * 7) % K) : -1;
  dpface_margin_params p{};
  p.s = bias ? 1.0 : 64.0;
  p.m1 = 1.0;
  p.m2 = bias ? 0.0 : 0.5;
  p.normalize = bias ? 0 : 1;
  p.bf16 = mode == 1;
  if (per_sample && !bias) {
    std::vector<float> scale, m3, hard;
    for (int64_t i = 0; i < B; ++i) {
      scale.push_back(32.f + 32.f * rnd());
      m3.insert(m3.end(), {1.f, 0.8f * rnd(), 0.2f + 0.2f * rnd()});
      hard.push_back(rnd());
    }
    p.sample_scale = dev(scale);
    p.sample_margin = dev(m3);
    p.hard_threshold = dev(hard);
    p.t = 0.4;
    p.angle_clip = 1;
  }
  std::vector<uint16_t> xb, wb;
  for (float v : x) xb.push_back(bf16_bits(v));
  for (float v : w) wb.push_back(bf16_bits(v));
  float* dx = dev(x);
  float* dw = dev(w);
  uint16_t* dxb = dev(xb);
  uint16_t* dwb = dev(wb);
  const int64_t* di = sampled ? dev(idx) : nullptr;
  const int64_t* dt = dev(target);
  const float* db = bias ? dev(b) : nullptr;
  float *lse = scratch<float>(B), *tl = scratch<float>(B), *ts = scratch<float>(B), *ms = scratch<float>(B);
  float* inv = scratch<float>(K);
  float* saved = scratch<float>(size_t(B * n_keep));
  size_t nb = 0;
  expect_ok(dpface_margin_softmax_fwd_workspace(B, K, D, &nb), "fwd workspace");
  void* ws = bytes(nb);
  const int rc = mode == 2 ? dpface_margin_softmax_fwd_bf16(dxb, dwb, di, dt, db, B, K, D, n_keep, &p, lse, tl, ts,
                                                             ms, inv, saved, ws, nb, nullptr)
                           : dpface_margin_softmax_fwd_f32(dx, dw, di, dt, db, B, K, D, n_keep, &p, lse, tl, ts, ms,
                                                            inv, saved, ws, nb, nullptr);
  expect_ok(rc, "margin forward");
  std::vector<float> g(static_cast<size_t>(B), 0.5f);
  float *gl = dev(g), *gt = dev(g);
  expect_ok(dpface_margin_softmax_bwd_workspace(B, K, D, mode == 2, &nb), "bwd workspace");
  void* wsb = bytes(nb);
  float* gb = bias ? scratch<float>(K) : nullptr;
  if (mode == 2) {
    uint16_t *gx = scratch<uint16_t>(size_t(B * D)), *gr = scratch<uint16_t>(size_t(K * D));
    expect_ok(dpface_margin_softmax_bwd_bf16(gl, gt, lse, dxb, dwb, di, dt, db, inv, saved, B, K, D, n_keep, &p,
                                             gx, gr, gb, wsb, nb, nullptr), "margin backward (bf16)");
  } else {
    float *gx = scratch<float>(size_t(B * D)), *gr = scratch<float>(size_t(K * D));
    expect_ok(dpface_margin_softmax_bwd_f32(gl, gt, lse, dx, dw, di, dt, db, inv, saved, B, K, D, n_keep, &p, gx,
                                            gr, gb, wsb, nb, nullptr), "margin backward");
    // the chunked path's epilogues on the same problem, two chunks
    std::vector<float> minus_inf(static_cast<size_t>(B), -1e30f);
    float *rm = dev(minus_inf), *rs = scratch<float>(B), *mx = dev(minus_inf);
    for (int64_t c0 = 0; c0 < K; c0 += (K + 1) / 2) {
      const int64_t n = std::min<int64_t>((K + 1) / 2, K - c0);
      float* scores = scratch<float>(size_t(B * n));
      const float* ci = p.normalize ? inv + c0 : nullptr;
      expect_ok(dpface_chunk_fwd_epilogue(scores, B, n, c0, ci, bias ? db : nullptr, dt, &p, saved, n_keep, rm, rs,
                                          mx, tl, ts, nullptr), "chunk forward epilogue");
      float* da = scratch<float>(size_t(B * n));
      expect_ok(dpface_chunk_bwd_epilogue(scores, n, 0, B, n, c0, ci, bias ? db : nullptr, dt, ts, lse, gl, gt, &p, da,
                                          nullptr), "chunk backward epilogue");
    }
  }
  expect_ok(cudaDeviceSynchronize() == cudaSuccess ? DPFACE_CUDA_OK : DPFACE_CUDA_ECUDA_BASE, "synchronize");
}

template <class T>
void range(int64_t N, int64_t D, int64_t k, int ids) {
  std::vector<T> x(static_cast<size_t>(N * D));
  for (auto& v : x) v = T(rnd());
  std::vector<int64_t> labels(static_cast<size_t>(N));
  for (int64_t i = 0; i < N; ++i) labels[size_t(i)] = (i * 3) % ids + 10;
  T* dx = dev(x);
  int64_t* dl = dev(labels);
  T *intra = scratch<T>(1), *inter = scratch<T>(1), *gx = scratch<T>(size_t(N * D));
  std::vector<T> one(1, T(1));
  T *gi = dev(one), *ge = dev(one);
  size_t nb = 0;
  const bool f64 = sizeof(T) == 8;
  expect_ok(dpface_range_loss_workspace(N, D, k, f64, &nb), "range workspace");
  void* ws = bytes(nb);
  if constexpr (sizeof(T) == 8) {
    expect_ok(dpface_range_loss_fwd_f64(dx, dl, N, D, k, 2.0, intra, inter, ws, nb, nullptr), "range forward f64");
    expect_ok(dpface_range_loss_bwd_f64(gi, ge, dx, dl, N, D, k, 2.0, gx, ws, nb, nullptr), "range backward f64");
  } else {
    expect_ok(dpface_range_loss_fwd_f32(dx, dl, N, D, k, 2.0, intra, inter, ws, nb, nullptr), "range forward f32");
    expect_ok(dpface_range_loss_bwd_f32(gi, ge, dx, dl, N, D, k, 2.0, gx, ws, nb, nullptr), "range backward f32");
  }
  expect_ok(cudaDeviceSynchronize() == cudaSuccess ? DPFACE_CUDA_OK : DPFACE_CUDA_ECUDA_BASE, "synchronize");
}

}  // namespace

int main() {
  for (int mode = 0; mode < 3; ++mode) {
    margin(70, 150, 150, 40, 0, false, false, mode);  // ragged everywhere
    margin(33, 300, 97, 24, 40, true, false, mode);   // sampled rows, part kept
    margin(65, 129, 129, 33, 129, false, true, mode);  // raw scores + bias, all kept
    margin(9, 11, 0, 16, 0, false, false, mode);       // K = 0
    margin(33, 300, 97, 24, 40, true, false, mode, true);  // per-sample margins, hard negatives
  }
  margin(64, 700, 600, 64, 0, false, false, 0);  // split grad_x reduction
  range<float>(24, 6, 2, 5);
  range<double>(13, 5, 50, 3);
  if (failures) {
    std::fprintf(stderr, "%d failures\n", failures);
    return 1;
  }
  std::printf("cuda_memcheck: every entry point ran\n");
  return 0;
}
