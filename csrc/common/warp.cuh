// Warp-level helpers shared by the CUDA kernels (device code only; include from .cu files).
//
// Butterfly reductions over the 32 lanes of a full warp: every lane must take part (the
// callers' warps are whole, they leave together), and every lane gets the result. The
// order of the additions is fixed, so results are bitwise repeatable.
#pragma once

namespace m2f_kernels {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) x += __shfl_xor_sync(kFullMask, x, o);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, o));
  return x;
}

}  // namespace m2f_kernels
