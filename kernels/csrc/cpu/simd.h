// Row kernels are written as OpenMP SIMD loops (reductions need no -ffast-math) and, on
// x86-64 with GCC, compiled twice: an AVX2 clone picked at load time next to the baseline
// one. AVX2 without FMA means no contraction, so both clones round alike.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define DPFACE_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define DPFACE_SIMD_CLONES
#endif
