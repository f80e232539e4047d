// The one way the .cu files launch a kernel: DPFACE_LAUNCH(grid, block, smem, stream, kernel)(args...).
// nvcc builds it as kernel<<<grid, block, smem, stream>>>(args...); the CPU emulator used by
// the tests (kernels/emu/cuda_emu.h, force-included by g++) defines it as a call that runs
// every block and thread of the grid on the CPU.
#pragma once

#if defined(__CUDACC__)
#define DPFACE_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#elif !defined(DPFACE_LAUNCH)
#error "build the .cu files with nvcc, or with a host compiler and -include kernels/emu/cuda_emu.h"
#endif
