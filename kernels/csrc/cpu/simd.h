// Row kernels are written as OpenMP SIMD loops (reductions need no -ffast-math) and, on
// x86-64 with GCC, compiled twice: an AVX2 clone picked at load time next to the baseline
// one. AVX2 without FMA means no contraction, so both clones round alike.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define DPFACE_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#define DPFACE_CPU_ISA "x86-64, row loops also for AVX2"
#else
#define DPFACE_SIMD_CLONES
#define DPFACE_CPU_ISA "portable C++"
#endif
