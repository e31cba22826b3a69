// Multi-scale deformable attention (MSDeformAttn) CUDA kernels, forward and backward.
//
// One warp owns one (batch, query, head) row; its lanes split the head's D channels,
// VEC consecutive channels per lane (16-byte loads where D and the pointers allow), so
// each bilinear corner is one coalesced read of the head's channel vector. The location
// and weight gradients need <grad_out, value> at every corner, a reduction over D: each
// lane sums its channels, then the warp reduces with shuffles, no shared memory.
//
// Sampling follows grid_sample(align_corners=False) with zero padding:
// pixel = loc * size - 0.5. Everything accumulates in fp32.
//
// grad_value is a scatter. The default path adds into an fp32 buffer with float atomics
// (summation order varies run to run). The deterministic path adds int64 fixed-point
// numbers instead (the scheme of the Triton backend): integer addition is associative,
// so the result is bitwise repeatable whatever order the atomics land in.
#include "ms_deform_attn/ms_deform_attn.h"

#include <climits>
#include <cstdint>
#include <type_traits>
#include <utility>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common/dispatch.h"
#include "common/warp.cuh"

namespace m2f_kernels {
namespace {

constexpr int kWarpsPerBlock = 8;
// |grad_value sum| * scale stays below 2**kFixedPointBits < 2**63; the margin covers log2 rounding.
constexpr double kFixedPointBits = 60.0;

// dtype of the locations / weights, read per element (a warp-uniform branch) so they
// need no template parameter of their own.
enum class AuxType : int { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

__device__ __forceinline__ float load_aux(const void* p, int64_t i, AuxType t) {
  switch (t) {
    case AuxType::kHalf:
      return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
    case AuxType::kBFloat16:
      return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename scalar_t, int VEC>
__device__ __forceinline__ void load_vec(const scalar_t* p, float (&out)[VEC]) {
  const Pack<scalar_t, VEC> pk = *reinterpret_cast<const Pack<scalar_t, VEC>*>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = static_cast<float>(pk.v[i]);
}

template <typename scalar_t, int VEC>
__device__ __forceinline__ void store_vec(scalar_t* p, const float (&in)[VEC]) {
  Pack<scalar_t, VEC> pk;
#pragma unroll
  for (int i = 0; i < VEC; ++i) pk.v[i] = static_cast<scalar_t>(in[i]);
  *reinterpret_cast<Pack<scalar_t, VEC>*>(p) = pk;
}

// The four corners of one bilinear sample: (x0, y0), (x0+1, y0), (x0, y0+1), (x0+1, y0+1).
struct Bilinear {
  int64_t idx[4];  // pixel index along S
  float coef[4];   // bilinear weight
  bool valid[4];   // inside the map (zero padding outside)
  float fx, fy;    // fractional offsets
};

// 0 for a finite x, NaN for a NaN or infinite one: what 0 * x gives, from the bits, so
// fast-math flags cannot fold it away.
__device__ __forceinline__ float zero_times(float x) {
  return (__float_as_uint(x) & 0x7f800000u) == 0x7f800000u ? __uint_as_float(0x7fc00000u) : 0.0f;
}

__device__ __forceinline__ Bilinear bilinear(float lx, float ly, int64_t hl, int64_t wl, int64_t start) {
  const float wf = static_cast<float>(wl);
  const float hf = static_cast<float>(hl);
  const float x = lx * wf - 0.5f;
  const float y = ly * hf - 0.5f;
  const float x0f = floorf(x);
  const float y0f = floorf(y);
  // Far-away points would overflow the int conversion; from the floors clamped to
  // [-2, size + 1] (fmaxf maps NaN to -2) all their corners stay outside.
  const int64_t x0 = static_cast<int64_t>(fminf(fmaxf(x0f, -2.0f), wf + 1.0f));
  const int64_t y0 = static_cast<int64_t>(fminf(fmaxf(y0f, -2.0f), hf + 1.0f));
  Bilinear b;
  // From the unclamped coordinates: NaN for a NaN or infinite location, as in grid_sample.
  b.fx = x - x0f;
  b.fy = y - y0f;
  const float gx = 1.0f - b.fx;
  const float gy = 1.0f - b.fy;
  const float coef[4] = {gx * gy, b.fx * gy, gx * b.fy, b.fx * b.fy};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int64_t cx = x0 + (k & 1);
    const int64_t cy = y0 + (k >> 1);
    b.valid[k] = cx >= 0 && cx < wl && cy >= 0 && cy < hl;
    b.idx[k] = start + cy * wl + cx;
    b.coef[k] = coef[k];
  }
  return b;
}

// The corners of sampling point j, at (x, y) = (loc[2j], loc[2j + 1]), on a level of hl x wl
// pixels that starts at pixel `start` along S.
__device__ __forceinline__ Bilinear point_bilinear(const void* loc, AuxType loc_t, int64_t j, int64_t hl, int64_t wl,
                                                   int64_t start) {
  return bilinear(load_aux(loc, 2 * j, loc_t), load_aux(loc, 2 * j + 1, loc_t), hl, wl, start);
}

struct SoftmaxStats {
  float max;
  float inv_sum;
};

// max and 1/sum(exp(x - max)) of the n logits at w[base:base+n], all lanes together.
__device__ __forceinline__ SoftmaxStats softmax_stats(const void* w, AuxType t, int64_t base, int n, int lane) {
  float m = -INFINITY;
  for (int j = lane; j < n; j += kWarp) m = fmaxf(m, load_aux(w, base + j, t));
  m = warp_max(m);
  float s = 0.0f;
  for (int j = lane; j < n; j += kWarp) s += expf(load_aux(w, base + j, t) - m);
  return {m, 1.0f / warp_sum(s)};
}

__device__ __forceinline__ float attention_weight(const void* w, AuxType t, int64_t j, bool softmax,
                                                  const SoftmaxStats& st) {
  const float x = load_aux(w, j, t);
  return softmax ? expf(x - st.max) * st.inv_sum : x;
}

// Tensor layouts (all contiguous): value [B, S, H, D]; loc [rows, L*P, 2]; attw [rows, L*P];
// out / grad_out [rows, D] with rows = B * Lq * H in (b, q, h) order.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock)
    ms_deform_attn_fwd_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                              const int64_t* __restrict__ starts, const void* __restrict__ loc, AuxType loc_t,
                              const void* __restrict__ attw, AuxType w_t, scalar_t* __restrict__ out,
                              int64_t rows, int64_t Lq, int64_t S, int H, int D, int L, int P, bool softmax) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (row >= rows) return;  // whole warps leave together, so the shuffles below stay full-warp
  const int lane = threadIdx.x % kWarp;
  const int64_t h = row % H;
  const int64_t b = row / H / Lq;
  const int LP = L * P;
  const int64_t aux0 = row * LP;
  const SoftmaxStats st = softmax ? softmax_stats(attw, w_t, aux0, LP, lane) : SoftmaxStats{0.0f, 1.0f};
  const int64_t s_stride = static_cast<int64_t>(H) * D;
  const scalar_t* v_bh = value + b * S * s_stride + h * D;  // pixel s at v_bh + s * s_stride

  for (int c0 = lane * VEC; c0 < D; c0 += kWarp * VEC) {
    float acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = 0.0f;
    float outside = 0.0f;  // what the corners outside the maps add: 0 * (w * coef), 0 or NaN
    for (int l = 0; l < L; ++l) {
      const int64_t hl = shapes[2 * l];
      const int64_t wl = shapes[2 * l + 1];
      const int64_t start = starts[l];
      for (int p = 0; p < P; ++p) {
        const int64_t j = aux0 + l * P + p;
        const float w = attention_weight(attw, w_t, j, softmax, st);
        const Bilinear bl = point_bilinear(loc, loc_t, j, hl, wl, start);
        // A corner outside reads 0; 0 * (w * coef) is NaN for a non-finite location (NaN
        // coefs, all corners outside) or weight, and then so for every corner.
        if (!(bl.valid[0] && bl.valid[1] && bl.valid[2] && bl.valid[3])) outside += zero_times(w * bl.coef[0]);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (!bl.valid[k]) continue;
          float v[VEC];
          load_vec<scalar_t, VEC>(v_bh + bl.idx[k] * s_stride + c0, v);
          const float cw = w * bl.coef[k];
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[i] += cw * v[i];
        }
      }
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] += outside;
    store_vec<scalar_t, VEC>(out + row * D + c0, acc);
  }
}

// grad_value goes to exactly one of grad_value_f32 (float atomics) or grad_value_fixed
// (int64 fixed point, scaled by *fixed_scale); the other is null. grad_loc [rows, L*P, 2]
// and grad_w [rows, L*P] are fp32 and every entry is written (grad_w first holds
// d loss / d weight, then, with softmax, d loss / d logit).
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock)
    ms_deform_attn_bwd_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ value,
                              const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                              const void* __restrict__ loc, AuxType loc_t, const void* __restrict__ attw,
                              AuxType w_t, float* grad_value_f32, unsigned long long* grad_value_fixed,
                              const float* __restrict__ fixed_scale, float* __restrict__ grad_loc, float* grad_w,
                              int64_t rows, int64_t Lq, int64_t S, int H, int D, int L, int P, bool softmax) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (row >= rows) return;  // whole warps leave together
  const int lane = threadIdx.x % kWarp;
  const int64_t h = row % H;
  const int64_t b = row / H / Lq;
  const int LP = L * P;
  const int64_t aux0 = row * LP;
  const SoftmaxStats st = softmax ? softmax_stats(attw, w_t, aux0, LP, lane) : SoftmaxStats{0.0f, 1.0f};
  const bool fixed = grad_value_fixed != nullptr;
  const float scale = fixed ? *fixed_scale : 1.0f;
  const int64_t s_stride = static_cast<int64_t>(H) * D;
  const int64_t bh_offset = b * S * s_stride + h * D;  // pixel s of value / grad_value at +s*s_stride
  const scalar_t* g_row = grad_out + row * D;

  for (int l = 0; l < L; ++l) {
    const int64_t hl = shapes[2 * l];
    const int64_t wl = shapes[2 * l + 1];
    const int64_t start = starts[l];
    for (int p = 0; p < P; ++p) {
      const int64_t j = aux0 + l * P + p;
      const float w = attention_weight(attw, w_t, j, softmax, st);
      const Bilinear bl = point_bilinear(loc, loc_t, j, hl, wl, start);
      float dot[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // this lane's part of <grad_out, value at corner k>
      const bool inside = bl.valid[0] && bl.valid[1] && bl.valid[2] && bl.valid[3];
      for (int c0 = lane * VEC; c0 < D; c0 += kWarp * VEC) {
        float g[VEC];
        load_vec<scalar_t, VEC>(g_row + c0, g);
        if (!inside) {  // a corner outside reads 0: <g, 0>, NaN where grad_out is not finite
          float g_zero = 0.0f;
#pragma unroll
          for (int i = 0; i < VEC; ++i) g_zero += zero_times(g[i]);
#pragma unroll
          for (int k = 0; k < 4; ++k) dot[k] += bl.valid[k] ? 0.0f : g_zero;
        }
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (!bl.valid[k]) continue;
          const int64_t off = bh_offset + bl.idx[k] * s_stride + c0;
          float v[VEC];
          load_vec<scalar_t, VEC>(value + off, v);
          const float cw = w * bl.coef[k];
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            dot[k] += g[i] * v[i];
            const float contrib = cw * g[i];
            if (fixed) {
              atomicAdd(grad_value_fixed + off + i,
                        static_cast<unsigned long long>(__float2ll_rz(contrib * scale)));
            } else {
              atomicAdd(grad_value_f32 + off + i, contrib);
            }
          }
        }
      }
#pragma unroll
      for (int k = 0; k < 4; ++k) dot[k] = warp_sum(dot[k]);
      if (lane == 0) {
        const float gx = 1.0f - bl.fx;
        const float gy = 1.0f - bl.fy;
        const float dx = gy * (dot[1] - dot[0]) + bl.fy * (dot[3] - dot[2]);  // d<g, sample>/d x_pixel
        const float dy = gx * (dot[2] - dot[0]) + bl.fx * (dot[3] - dot[1]);
        grad_loc[2 * j] = w * dx * static_cast<float>(wl);
        grad_loc[2 * j + 1] = w * dy * static_cast<float>(hl);
        grad_w[j] = bl.coef[0] * dot[0] + bl.coef[1] * dot[1] + bl.coef[2] * dot[2] + bl.coef[3] * dot[3];
      }
    }
  }

  if (softmax) {
    __syncwarp();  // lane 0's grad_w stores above become visible to the whole warp
    // softmax backward over the L*P logits: w * (gw - <gw, w>)
    float part = 0.0f;
    for (int jj = lane; jj < LP; jj += kWarp) part += grad_w[aux0 + jj] * attention_weight(attw, w_t, aux0 + jj, true, st);
    const float gw_dot_w = warp_sum(part);
    for (int jj = lane; jj < LP; jj += kWarp) {
      const float wj = attention_weight(attw, w_t, aux0 + jj, true, st);
      grad_w[aux0 + jj] = wj * (grad_w[aux0 + jj] - gw_dot_w);
    }
  }
}

// ----------------------------------------------------------------------------- host side
AuxType aux_type(const at::Tensor& t, const at::Tensor& value, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == value.scalar_type(), "ms_deform_attn: ", name,
              " must be float32 or value's dtype ", value.scalar_type(), ", got ", st);
  switch (st) {
    case at::kHalf:
      return AuxType::kHalf;
    case at::kBFloat16:
      return AuxType::kBFloat16;
    default:
      return AuxType::kFloat;
  }
}

void check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                  const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  TORCH_CHECK(value.is_cuda(), "ms_deform_attn: value must be a CUDA tensor");
  const auto st = value.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "ms_deform_attn: value must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be [B, S, H, D]");
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "ms_deform_attn: sampling_locations must be [B, Lq, H, L, P, 2]");
  TORCH_CHECK(attention_weights.dim() == 5, "ms_deform_attn: attention_weights must be [B, Lq, H, L, P]");
  const int64_t L = sampling_locations.size(3);
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == L && spatial_shapes.size(1) == 2 &&
                  spatial_shapes.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes must be int64 [L, 2]");
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == L &&
                  level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: level_start_index must be int64 [L]");
  TORCH_CHECK(sampling_locations.size(0) == value.size(0) && sampling_locations.size(2) == value.size(2),
              "ms_deform_attn: sampling_locations batch / heads do not match value");
  TORCH_CHECK(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
              "ms_deform_attn: attention_weights must be [B, Lq, H, L, P] like sampling_locations");
  for (const at::Tensor* t : {&value, &spatial_shapes, &level_start_index, &sampling_locations, &attention_weights}) {
    TORCH_CHECK(t->device() == value.device(), "ms_deform_attn: all tensors must be on ", value.device());
    TORCH_CHECK(t->is_contiguous(), "ms_deform_attn: inputs must be contiguous (the Python side makes them so)");
  }
  TORCH_CHECK(value.size(2) <= INT_MAX && value.size(3) <= INT_MAX && L * sampling_locations.size(4) <= INT_MAX,
              "ms_deform_attn: H, D or L*P too large");
}

// Channels per lane: the widest 16-byte-or-narrower vector that divides D, keeps all 32
// lanes busy (D / VEC >= 32) and matches the pointers' alignment; else 1.
int pick_vec(int64_t D, size_t elem_size, std::initializer_list<const void*> ptrs) {
  for (int vec = 8; vec > 1; vec /= 2) {
    if (vec * elem_size > 16 || D % vec != 0 || D / vec < kWarp) continue;
    bool aligned = true;
    for (const void* p : ptrs) aligned = aligned && reinterpret_cast<uintptr_t>(p) % (vec * elem_size) == 0;
    if (aligned) return vec;
  }
  return 1;
}

template <typename scalar_t, typename F>
void dispatch_vec(int vec, F&& f) {
  constexpr int kMaxVec = static_cast<int>(16 / sizeof(scalar_t));
  if constexpr (kMaxVec >= 8) {
    if (vec == 8) return f(std::integral_constant<int, 8>{});
  }
  if (vec == 4) return f(std::integral_constant<int, 4>{});
  if (vec == 2) return f(std::integral_constant<int, 2>{});
  f(std::integral_constant<int, 1>{});
}

unsigned int num_blocks(int64_t rows) {
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  TORCH_CHECK(blocks <= INT_MAX, "ms_deform_attn: too many (batch, query, head) rows: ", rows);
  return static_cast<unsigned int>(blocks);
}

// (scale, 1/scale): 0-dim fp32 powers of two computed on the device (no host sync).
// Every value pixel's gradient is a sum of w * bilinear_weight * grad_out terms, so
// |grad_value| <= Lq * max over rows of sum |w| * max |grad_out| (sum w = 1 with the
// softmax). Non-finite inputs make the bound NaN or inf; the gradient then comes out NaN
// instead of silently wrapping.
std::pair<at::Tensor, at::Tensor> fixed_point_scales(const at::Tensor& grad_out, const at::Tensor& attention_weights,
                                                     bool softmax) {
  const at::Tensor g_max = at::linalg_vector_norm(grad_out, INFINITY, c10::nullopt, false, at::kFloat);
  at::Tensor w_bound;
  if (softmax) {
    w_bound = attention_weights.amax().to(at::kFloat).mul(0.0).add(1.0);  // 1, or NaN for a NaN / +inf logit
  } else {
    w_bound = at::linalg_vector_norm(attention_weights, 1, at::IntArrayRef{-2, -1}, false, at::kFloat).amax();
  }
  const at::Tensor bound = g_max * w_bound * static_cast<double>(grad_out.size(1));
  const at::Tensor exponent = at::floor(kFixedPointBits - at::log2(bound)).clamp_max(100.0);  // bound 0 -> 2**100
  return {at::exp2(exponent), at::exp2(-exponent)};
}

}  // namespace

at::Tensor ms_deform_attn_fwd(const at::Tensor& value, const at::Tensor& spatial_shapes,
                              const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                              const at::Tensor& attention_weights, bool softmax) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard guard(value.device());
  const int64_t B = value.size(0), S = value.size(1), H = value.size(2), D = value.size(3);
  const int64_t Lq = sampling_locations.size(1), L = sampling_locations.size(3), P = sampling_locations.size(4);
  const AuxType loc_t = aux_type(sampling_locations, value, "sampling_locations");
  const AuxType w_t = aux_type(attention_weights, value, "attention_weights");
  at::Tensor out = at::empty({B, Lq, H * D}, value.options());
  const int64_t rows = B * Lq * H;
  if (rows == 0 || D == 0) return out.zero_();
  const auto stream = c10::cuda::getCurrentCUDAStream();

  M2F_DISPATCH_FLOAT_HALF_BF16(value.scalar_type(), "ms_deform_attn_fwd", [&] {
    const int vec = pick_vec(D, sizeof(scalar_t), {value.data_ptr(), out.data_ptr()});
    dispatch_vec<scalar_t>(vec, [&](auto vec_c) {
      constexpr int VEC = decltype(vec_c)::value;
      ms_deform_attn_fwd_kernel<scalar_t, VEC><<<num_blocks(rows), kWarp * kWarpsPerBlock, 0, stream>>>(
          value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
          sampling_locations.data_ptr(), loc_t, attention_weights.data_ptr(), w_t, out.data_ptr<scalar_t>(), rows,
          Lq, S, static_cast<int>(H), static_cast<int>(D), static_cast<int>(L), static_cast<int>(P), softmax);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_bwd(
    const at::Tensor& grad_out, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights, bool softmax, bool deterministic) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const int64_t B = value.size(0), S = value.size(1), H = value.size(2), D = value.size(3);
  const int64_t Lq = sampling_locations.size(1), L = sampling_locations.size(3), P = sampling_locations.size(4);
  TORCH_CHECK(grad_out.device() == value.device() && grad_out.scalar_type() == value.scalar_type() &&
                  grad_out.is_contiguous() && grad_out.dim() == 3 && grad_out.size(0) == B &&
                  grad_out.size(1) == Lq && grad_out.size(2) == H * D,
              "ms_deform_attn: grad_out must be contiguous [B, Lq, H*D] in value's dtype on value's device");
  const c10::cuda::CUDAGuard guard(value.device());
  const AuxType loc_t = aux_type(sampling_locations, value, "sampling_locations");
  const AuxType w_t = aux_type(attention_weights, value, "attention_weights");
  const auto f32 = value.options().dtype(at::kFloat);
  at::Tensor grad_loc = at::empty(sampling_locations.sizes(), f32);
  at::Tensor grad_w = at::empty(attention_weights.sizes(), f32);
  at::Tensor acc = at::zeros(value.sizes(), value.options().dtype(deterministic ? at::kLong : at::kFloat));
  const int64_t rows = B * Lq * H;
  if (rows == 0 || D == 0) {
    return {at::zeros_like(value), grad_loc.zero_().to(sampling_locations.scalar_type()),
            grad_w.zero_().to(attention_weights.scalar_type())};
  }
  at::Tensor scale, inv_scale;
  if (deterministic) std::tie(scale, inv_scale) = fixed_point_scales(grad_out, attention_weights, softmax);
  const auto stream = c10::cuda::getCurrentCUDAStream();

  M2F_DISPATCH_FLOAT_HALF_BF16(value.scalar_type(), "ms_deform_attn_bwd", [&] {
    const int vec = pick_vec(D, sizeof(scalar_t), {value.data_ptr(), grad_out.data_ptr()});
    dispatch_vec<scalar_t>(vec, [&](auto vec_c) {
      constexpr int VEC = decltype(vec_c)::value;
      ms_deform_attn_bwd_kernel<scalar_t, VEC><<<num_blocks(rows), kWarp * kWarpsPerBlock, 0, stream>>>(
          grad_out.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
          level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr(), loc_t,
          attention_weights.data_ptr(), w_t, deterministic ? nullptr : acc.data_ptr<float>(),
          deterministic ? reinterpret_cast<unsigned long long*>(acc.data_ptr<int64_t>()) : nullptr,
          deterministic ? scale.data_ptr<float>() : nullptr, grad_loc.data_ptr<float>(), grad_w.data_ptr<float>(),
          rows, Lq, S, static_cast<int>(H), static_cast<int>(D), static_cast<int>(L), static_cast<int>(P),
          softmax);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });

  at::Tensor grad_value = deterministic ? acc.to(at::kFloat).mul_(inv_scale).to(value.scalar_type())
                                        : acc.to(value.scalar_type());  // no copy for fp32
  return {grad_value, grad_loc.to(sampling_locations.scalar_type()), grad_w.to(attention_weights.scalar_type())};
}

std::string compiled_archs() {
#ifdef __CUDA_ARCH_LIST__
#define M2F_STRINGIFY_(...) #__VA_ARGS__
#define M2F_STRINGIFY(...) M2F_STRINGIFY_(__VA_ARGS__)
  // e.g. "800,900" -> "sm_80,sm_90"
  const std::string list = M2F_STRINGIFY(__CUDA_ARCH_LIST__);
  std::string result, number;
  for (size_t i = 0; i <= list.size(); ++i) {
    if (i == list.size() || list[i] == ',') {
      if (!number.empty()) {
        if (!result.empty()) result += ",";
        result += "sm_" + std::to_string(std::stoi(number) / 10);
      }
      number.clear();
    } else if (list[i] != ' ') {
      number += list[i];
    }
  }
  return result;
#else
  return "unknown";
#endif
}

}  // namespace m2f_kernels
