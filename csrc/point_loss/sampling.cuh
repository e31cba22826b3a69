// Bilinear point sampling on the device, shared by the point-loss kernels
// (point_loss_kernel.cu; device code only, include from .cu files).
//
// Sampling mirrors grid_sample(align_corners=False, padding_mode="zeros") tap for tap: same
// pixel formula, same corner weights, same nw, ne, sw, se summation order, in fp32
// whatever the map dtype. Maps are read through element offsets and strides; a map's
// dtype is a template parameter (TypedMap) or a runtime tag (AnyMap, for targets).
// Everything here is inlined into its kernels, in the including file's anonymous namespace.
#pragma once

#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace m2f_kernels {
namespace {

// dtype of a map read through a runtime tag (targets): bool is read as its bytes.
enum class MapType : int { kByte = 0, kHalf = 1, kBFloat16 = 2, kFloat = 3, kDouble = 4 };

__device__ __forceinline__ float load_map(const void* p, int64_t i, MapType t) {
  switch (t) {
    case MapType::kByte:
      return static_cast<float>(static_cast<const uint8_t*>(p)[i]);
    case MapType::kHalf:
      return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
    case MapType::kBFloat16:
      return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
    case MapType::kDouble:
      return static_cast<float>(static_cast<const double*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

// A map of a compile-time dtype (input / logits / pred).
template <typename T>
struct TypedMap {
  const T* p;
  __device__ __forceinline__ float operator()(int64_t i) const { return static_cast<float>(p[i]); }
};

// A map of a runtime dtype (target).
struct AnyMap {
  const void* p;
  MapType t;
  __device__ __forceinline__ float operator()(int64_t i) const { return load_map(p, i, t); }
};

// The four bilinear taps of one point: k = 0..3 is nw, ne, sw, se at
// (x0 + (k & 1), y0 + (k >> 1)); taps outside the map are invalid (zero padding).
struct Taps {
  int64_t x0, y0;
  float w[4];
  bool valid[4];
  float nan_if_nonfinite;  // 0, or NaN for a non-finite point (whose taps are all invalid)
};

// 0 for a finite x, NaN for a NaN or infinite one: what 0 * x gives, from the bits, so
// fast-math flags cannot fold it away.
__device__ __forceinline__ float zero_times(float x) {
  return (__float_as_uint(x) & 0x7f800000u) == 0x7f800000u ? __uint_as_float(0x7fc00000u) : 0.0f;
}

__device__ __forceinline__ Taps make_taps(float cx, float cy, int64_t H, int64_t W) {
  const float wf = static_cast<float>(W);
  const float hf = static_cast<float>(H);
  // grid_sample's arithmetic: grid = 2c - 1, pixel = ((grid + 1) * size - 1) / 2 (= c * size - 0.5).
  const float ix = (((2.0f * cx - 1.0f) + 1.0f) * wf - 1.0f) * 0.5f;
  const float iy = (((2.0f * cy - 1.0f) + 1.0f) * hf - 1.0f) * 0.5f;
  const float fx0 = floorf(ix);
  const float fy0 = floorf(iy);
  const float fx1 = fx0 + 1.0f;
  const float fy1 = fy0 + 1.0f;
  Taps t;
  // The weights come from the pixel coordinates themselves, so a NaN or infinite one makes
  // them NaN (inf - inf), as in grid_sample (docs/ops.md, "Non-finite values").
  t.w[0] = (fx1 - ix) * (fy1 - iy);  // nw
  t.w[1] = (ix - fx0) * (fy1 - iy);  // ne
  t.w[2] = (fx1 - ix) * (iy - fy0);  // sw
  t.w[3] = (ix - fx0) * (iy - fy0);  // se
  t.nan_if_nonfinite = zero_times(t.w[0]);
  // The tap indices come from the floors clamped to [-2, size + 1] (fmaxf maps NaN to -2):
  // a far-away or non-finite point converts without overflow and all its taps lie outside.
  t.x0 = static_cast<int64_t>(fminf(fmaxf(fx0, -2.0f), wf + 1.0f));
  t.y0 = static_cast<int64_t>(fminf(fmaxf(fy0, -2.0f), hf + 1.0f));
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int64_t x = t.x0 + (k & 1);
    const int64_t y = t.y0 + (k >> 1);
    t.valid[k] = x >= 0 && x < W && y >= 0 && y < H;
  }
  return t;
}

// Bilinear value of the map at element offset `base` with row / column strides sh, sw. A tap
// outside the map reads 0: it adds 0 * weight, which is 0 except for a non-finite point
// (NaN weights), which samples NaN.
template <typename Map>
__device__ __forceinline__ float sample(const Map& m, int64_t base, int64_t sh, int64_t sw, const Taps& t) {
  float v = t.nan_if_nonfinite;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if (t.valid[k]) v += m(base + (t.y0 + (k >> 1)) * sh + (t.x0 + (k & 1)) * sw) * t.w[k];
  }
  return v;
}

// Adds g * weight of each valid tap into the contiguous fp32 W-wide map at dst (none for a
// non-finite point: all its taps are invalid).
__device__ __forceinline__ void scatter(float* dst, int64_t W, float g, const Taps& t) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if (t.valid[k]) atomicAdd(dst + (t.y0 + (k >> 1)) * W + (t.x0 + (k & 1)), g * t.w[k]);
  }
}

__device__ __forceinline__ float sigmoid(float x) {
  const float e = expf(-fabsf(x));  // in (0, 1]: no overflow
  const float r = 1.0f / (1.0f + e);
  return x >= 0.0f ? r : e * r;
}

__device__ __forceinline__ float softplus(float x) { return fmaxf(x, 0.0f) + log1pf(expf(-fabsf(x))); }

}  // namespace
}  // namespace m2f_kernels
