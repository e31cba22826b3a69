// Point-sampled mask loss CUDA kernels: point_sample (fwd/bwd), the importance-sampling
// uncertainty, the criterion's BCE + dice loss on points (fwd/bwd) and the matcher's
// pairwise costs.
//
// Simple by design: one thread per (mask, point) sample. Sampling (point_loss/sampling.cuh)
// mirrors grid_sample(align_corners=False, padding_mode="zeros") tap for tap (same pixel
// formula, same corner weights, same nw, ne, sw, se summation order), in fp32 whatever the
// map dtype.
// Maps are read through their strides (no copies); targets may be bool/uint8 (bytes) or
// floating, read through a runtime type tag.
//
// Reductions are deterministic: every block reduces in a fixed order (warp butterflies,
// then a fixed-order sum of the warp results), per-block partials are summed by one
// thread per mask in block order, and the loss is finished by one block. The only float
// atomics are the gradient scatters (point_sample_bwd, point_mask_loss_bwd), into fp32
// buffers that are cast once at the end.
//
// The matcher cost samples every pred and target mask at the shared points into fp32
// [Q, P] / [T, P] buffers, takes row sums, and forms x @ t.T and sigmoid(x) @ t.T with a
// shared-memory tiled fp32 kernel (no tf32, whatever torch's matmul precision setting).
#include "point_loss/point_loss.h"

#include <algorithm>
#include <climits>
#include <cstdint>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common/warp.cuh"
#include "point_loss/sampling.cuh"

namespace m2f_kernels {
namespace {

constexpr int kThreads = 256;  // threads per block of every 1-D kernel here
constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride loops cover the rest
constexpr int kTile = 16;                // pairwise cost tile: 16 x 16 outputs, 16 points per step

// ----------------------------------------------------------------------------- device helpers

// Sum over a kThreads block in a fixed order; every thread gets the result. Every thread
// of the block must call it (it synchronises); smem holds kThreads / kWarp floats.
__device__ __forceinline__ float block_sum(float v, float* smem) {
  v = warp_sum(v);
  if (threadIdx.x % kWarp == 0) smem[threadIdx.x / kWarp] = v;
  __syncthreads();
  float r = 0.0f;
#pragma unroll
  for (int i = 0; i < kThreads / kWarp; ++i) r += smem[i];
  __syncthreads();  // smem may be reused by the next call
  return r;
}

// ----------------------------------------------------------------------------- sampling kernels

// out [rows, P] fp32 contiguous, rows = N * C: row (n, c) = (row / C, row % C) is the map at
// element offset n * s_n + c * s_c, sampled at the points coords + n * cs_n ([P, 2] fp32
// contiguous; cs_n = 0 shares one point set between all rows). neg_abs stores -|value|.
template <typename Map>
__global__ void __launch_bounds__(kThreads)
    sample_rows_kernel(Map map, int64_t C, int64_t H, int64_t W, int64_t s_n, int64_t s_c, int64_t s_h,
                       int64_t s_w, const float* __restrict__ coords, int64_t cs_n, int64_t P, int64_t total,
                       bool neg_abs, float* __restrict__ out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / P;
    const int64_t p = i - row * P;
    const int64_t n = row / C;
    const int64_t c = row - n * C;
    const float* cp = coords + n * cs_n + 2 * p;
    const Taps t = make_taps(cp[0], cp[1], H, W);
    const float v = sample(map, n * s_n + c * s_c, s_h, s_w, t);
    out[i] = neg_abs ? -fabsf(v) : v;
  }
}

// grad_in [N, C, H, W] fp32 contiguous (zeroed) += the scatter of grad_out [N * C, P] fp32
// contiguous at coords [N, P, 2] fp32 contiguous.
__global__ void __launch_bounds__(kThreads)
    scatter_rows_kernel(const float* __restrict__ grad_out, const float* __restrict__ coords, int64_t C, int64_t H,
                        int64_t W, int64_t P, int64_t total, float* grad_in) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / P;
    const int64_t p = i - row * P;
    const int64_t n = row / C;
    const float* cp = coords + (n * P + p) * 2;
    const Taps t = make_taps(cp[0], cp[1], H, W);
    scatter(grad_in + row * H * W, W, grad_out[i], t);
  }
}

// ----------------------------------------------------------------------------- mask loss kernels

// Where the masks of one loss call live. Mask n of pred is at element offset
// bidx[n] * s_b + qidx[n] * s_q (indexed [B, Q, Hp, Wp] pred) or n * s_q (plain [N, Hp, Wp]
// pred, bidx null); target mask n at n * s_tn; coords [N, P, 2] fp32 contiguous.
struct LossGeom {
  const int64_t* bidx;
  const int64_t* qidx;
  int64_t s_b, s_q, s_ph, s_pw, Hp, Wp;
  const void* target;
  MapType target_t;
  int64_t s_tn, s_th, s_tw, Ht, Wt;
  const float* coords;
  int64_t N, P;
};

__device__ __forceinline__ int64_t mask_offset(const LossGeom& g, int64_t n, int64_t s_b, int64_t s_q) {
  return g.bidx != nullptr ? g.bidx[n] * s_b + g.qidx[n] * s_q : n * s_q;
}

// The pred logit x and target value t of point p of mask n; tp gets pred's taps.
template <typename scalar_t>
__device__ __forceinline__ void point_values(const scalar_t* pred, const LossGeom& g, int64_t n, int64_t p,
                                             float& x, float& t, Taps& tp) {
  const float* cp = g.coords + (n * g.P + p) * 2;
  const float cx = cp[0];
  const float cy = cp[1];
  tp = make_taps(cx, cy, g.Hp, g.Wp);
  x = sample(TypedMap<scalar_t>{pred}, mask_offset(g, n, g.s_b, g.s_q), g.s_ph, g.s_pw, tp);
  const Taps tt = make_taps(cx, cy, g.Ht, g.Wt);
  t = sample(AnyMap{g.target, g.target_t}, n * g.s_tn, g.s_th, g.s_tw, tt);
}

// Grid N * nblk blocks: block (n, blk) covers points [blk * kThreads, +kThreads) of mask n
// and writes its sums of bce, s * t, s, t to partial [4, N, nblk] (s = sigmoid(x)).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    mask_loss_stats_kernel(const scalar_t* __restrict__ pred, LossGeom g, int64_t nblk, float* __restrict__ partial) {
  __shared__ float smem[kThreads / kWarp];
  const int64_t n = static_cast<int64_t>(blockIdx.x) / nblk;
  const int64_t blk = static_cast<int64_t>(blockIdx.x) - n * nblk;
  const int64_t p = blk * kThreads + threadIdx.x;
  float bce = 0.0f, st = 0.0f, ss = 0.0f, tt = 0.0f;
  if (p < g.P) {
    float x, t;
    Taps tp;
    point_values(pred, g, n, p, x, t, tp);
    const float s = sigmoid(x);
    bce = fmaxf(x, 0.0f) - x * t + log1pf(expf(-fabsf(x)));  // BCE with logits, stable
    st = s * t;
    ss = s;
    tt = t;
  }
  bce = block_sum(bce, smem);
  st = block_sum(st, smem);
  ss = block_sum(ss, smem);
  tt = block_sum(tt, smem);
  if (threadIdx.x == 0) {
    const int64_t stride = g.N * nblk;
    const int64_t o = n * nblk + blk;
    partial[o] = bce;
    partial[stride + o] = st;
    partial[2 * stride + o] = ss;
    partial[3 * stride + o] = tt;
  }
}

// sums [4, N] = partial [4, N, nblk] summed over blocks in block order (one thread per entry).
__global__ void __launch_bounds__(kThreads)
    mask_sums_kernel(const float* __restrict__ partial, int64_t entries, int64_t nblk, float* __restrict__ sums) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < entries;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float* src = partial + e * nblk;
    float acc = 0.0f;
    for (int64_t b = 0; b < nblk; ++b) acc += src[b];
    sums[e] = acc;
  }
}

// One block: the two loss scalars (fp32) from the per-mask sums [4, N]; weight [N] (null:
// ones) multiplies each mask's two terms.
__global__ void __launch_bounds__(kThreads)
    mask_loss_finish_kernel(const float* __restrict__ sums, const float* __restrict__ weight, int64_t N,
                            float p_count, float num_masks, float* __restrict__ out_bce,
                            float* __restrict__ out_dice) {
  __shared__ float smem[kThreads / kWarp];
  float bce = 0.0f, dice = 0.0f;
  for (int64_t m = threadIdx.x; m < N; m += kThreads) {
    const float w = weight ? weight[m] : 1.0f;
    bce += w * (sums[m] / p_count);
    dice += w * (1.0f - (2.0f * sums[N + m] + 1.0f) / (sums[2 * N + m] + sums[3 * N + m] + 1.0f));
  }
  bce = block_sum(bce, smem);
  dice = block_sum(dice, smem);
  if (threadIdx.x == 0) {
    *out_bce = bce / num_masks;
    *out_dice = dice / num_masks;
  }
}

// One thread per (mask, point): d loss / d logit, scattered into grad (fp32, contiguous,
// shaped like pred; mask n at mask_offset(g, n, gs_b, gs_q)); weight [N] as the forward's.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    mask_loss_grad_kernel(const scalar_t* __restrict__ pred, LossGeom g, const float* __restrict__ sums,
                          const float* __restrict__ weight, const float* __restrict__ grad_bce,
                          const float* __restrict__ grad_dice, float num_masks, int64_t gs_b, int64_t gs_q,
                          float* grad) {
  const float gb = *grad_bce;
  const float gd = *grad_dice;
  const float p_count = static_cast<float>(g.P);
  const int64_t total = g.N * g.P;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / g.P;
    const int64_t p = i - n * g.P;
    float x, t;
    Taps tp;
    point_values(pred, g, n, p, x, t, tp);
    const float s = sigmoid(x);
    const float num = 2.0f * sums[g.N + n] + 1.0f;
    const float den = sums[2 * g.N + n] + sums[3 * g.N + n] + 1.0f;
    const float d_bce = (s - t) / p_count;
    const float d_dice = -(2.0f * t * den - num) / (den * den) * s * (1.0f - s);
    float gx = (gb * d_bce + gd * d_dice) / num_masks;
    if (weight) gx *= weight[n];
    scatter(grad + mask_offset(g, n, gs_b, gs_q), g.Wp, gx, tp);
  }
}

// ----------------------------------------------------------------------------- pairwise kernels

// One block per row of m [rows, P] fp32: logits -> a = sum softplus, b = sum sigmoid;
// otherwise a = sum of the values (b unused, may be null).
__global__ void __launch_bounds__(kThreads)
    row_stats_kernel(const float* __restrict__ m, int64_t P, bool logits, float* __restrict__ a, float* __restrict__ b) {
  __shared__ float smem[kThreads / kWarp];
  const float* row = m + static_cast<int64_t>(blockIdx.x) * P;
  float sa = 0.0f, sb = 0.0f;
  for (int64_t p = threadIdx.x; p < P; p += kThreads) {
    const float v = row[p];
    if (logits) {
      sa += softplus(v);
      sb += sigmoid(v);
    } else {
      sa += v;
    }
  }
  sa = block_sum(sa, smem);
  sb = block_sum(sb, smem);
  if (threadIdx.x == 0) {
    a[blockIdx.x] = sa;
    if (logits) b[blockIdx.x] = sb;
  }
}

// Block (kTile, kTile) computes the costs of queries [by * kTile, +kTile) x targets
// [bx * kTile, +kTile): x @ t.T and sigmoid(x) @ t.T over P in fp32 through shared memory,
// then cost_bce = (sum softplus(x) - x.t) / P (= the matcher's pos @ t.T + neg @ (1 - t).T,
// over P) and cost_dice = 1 - (2 s.t + 1) / (sum s + sum t + 1).
__global__ void __launch_bounds__(kTile* kTile)
    pairwise_cost_kernel(const float* __restrict__ x, const float* __restrict__ t, const float* __restrict__ sp_sum,
                         const float* __restrict__ s_sum, const float* __restrict__ t_sum, int64_t Q, int64_t T,
                         int64_t P, float* __restrict__ cost_bce, float* __restrict__ cost_dice) {
  __shared__ float xs[kTile][kTile + 1];
  __shared__ float ss[kTile][kTile + 1];
  __shared__ float ts[kTile][kTile + 1];
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int64_t q0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kTile;
  float acc_xt = 0.0f, acc_st = 0.0f;
  for (int64_t p0 = 0; p0 < P; p0 += kTile) {
    const int64_t p = p0 + tx;
    const int64_t qr = q0 + ty;
    const int64_t tr = t0 + ty;
    float xv = 0.0f, sv = 0.0f, tv = 0.0f;
    if (qr < Q && p < P) {
      xv = x[qr * P + p];
      sv = sigmoid(xv);
    }
    if (tr < T && p < P) tv = t[tr * P + p];
    xs[ty][tx] = xv;
    ss[ty][tx] = sv;
    ts[ty][tx] = tv;
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kTile; ++k) {
      acc_xt += xs[ty][k] * ts[tx][k];
      acc_st += ss[ty][k] * ts[tx][k];
    }
    __syncthreads();
  }
  const int64_t q = q0 + ty;
  const int64_t tt = t0 + tx;
  if (q < Q && tt < T) {
    const int64_t o = q * T + tt;
    cost_bce[o] = (sp_sum[q] - acc_xt) / static_cast<float>(P);
    cost_dice[o] = 1.0f - (2.0f * acc_st + 1.0f) / (s_sum[q] + t_sum[tt] + 1.0f);
  }
}

// ----------------------------------------------------------------------------- host helpers

unsigned int grid_for(int64_t total) {
  return static_cast<unsigned int>(std::min<int64_t>((total + kThreads - 1) / kThreads, kMaxBlocks));
}

MapType map_type(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kBool:
    case at::kByte:
      return MapType::kByte;
    case at::kHalf:
      return MapType::kHalf;
    case at::kBFloat16:
      return MapType::kBFloat16;
    case at::kFloat:
      return MapType::kFloat;
    case at::kDouble:
      return MapType::kDouble;
    default:
      TORCH_CHECK(false, name, " must be bool, uint8 or floating, got ", t.scalar_type());
  }
  return MapType::kFloat;  // unreachable
}

void check_cuda(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), op, ": ", name, " must be a CUDA tensor on ",
              like.device(), ", got ", t.device());
}

void check_pred_dtype(const at::Tensor& t, const char* op, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, op, ": ", name,
              " must be float32, float16 or bfloat16, got ", st);
}

// coords as the kernels read them: fp32, contiguous.
at::Tensor coords_f32(const at::Tensor& coords) { return coords.to(at::kFloat).contiguous(); }

// Everything one loss call's kernels need; holds the index tensors and coords alive.
struct LossSetup {
  at::Tensor bidx, qidx, coords;
  LossGeom g;
  bool indexed;
};

LossSetup loss_setup(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& coords,
                     const std::optional<at::Tensor>& batch_index, const std::optional<at::Tensor>& query_index,
                     const char* op) {
  check_cuda(pred, pred, op, "pred");
  check_cuda(target, pred, op, "target");
  check_cuda(coords, pred, op, "coords");
  check_pred_dtype(pred, op, "pred");
  LossSetup s;
  s.indexed = batch_index.has_value() && batch_index->defined();
  const bool q_given = query_index.has_value() && query_index->defined();
  TORCH_CHECK(s.indexed == q_given, op, ": batch_index and query_index must be given together");
  TORCH_CHECK(target.dim() == 3, op, ": target must be [N, Ht, Wt]");
  TORCH_CHECK(coords.dim() == 3 && coords.size(2) == 2, op, ": coords must be [N, P, 2]");
  const int64_t N = coords.size(0);
  TORCH_CHECK(target.size(0) == N, op, ": target and coords must have the same N");
  LossGeom& g = s.g;
  if (s.indexed) {
    TORCH_CHECK(pred.dim() == 4, op, ": pred must be [B, Q, Hp, Wp] with batch_index / query_index");
    check_cuda(*batch_index, pred, op, "batch_index");
    check_cuda(*query_index, pred, op, "query_index");
    s.bidx = batch_index->to(at::kLong).contiguous();
    s.qidx = query_index->to(at::kLong).contiguous();
    TORCH_CHECK(s.bidx.dim() == 1 && s.bidx.size(0) == N && s.qidx.dim() == 1 && s.qidx.size(0) == N, op,
                ": batch_index and query_index must be [N]");
    g.bidx = s.bidx.data_ptr<int64_t>();
    g.qidx = s.qidx.data_ptr<int64_t>();
    g.s_b = pred.stride(0);
    g.s_q = pred.stride(1);
    g.s_ph = pred.stride(2);
    g.s_pw = pred.stride(3);
  } else {
    TORCH_CHECK(pred.dim() == 3 && pred.size(0) == N, op, ": pred must be [N, Hp, Wp] (N of coords)");
    g.bidx = nullptr;
    g.qidx = nullptr;
    g.s_b = 0;
    g.s_q = pred.stride(0);
    g.s_ph = pred.stride(1);
    g.s_pw = pred.stride(2);
  }
  g.Hp = pred.size(-2);
  g.Wp = pred.size(-1);
  g.target = target.data_ptr();
  g.target_t = map_type(target, "target");
  g.s_tn = target.stride(0);
  g.s_th = target.stride(1);
  g.s_tw = target.stride(2);
  g.Ht = target.size(1);
  g.Wt = target.size(2);
  s.coords = coords_f32(coords);
  g.coords = s.coords.data_ptr<float>();
  g.N = N;
  g.P = coords.size(1);
  return s;
}

// The per-mask weights as the kernels read them: null, or weight [N] float32 contiguous.
const float* weight_data(const std::optional<at::Tensor>& weight, const at::Tensor& pred, int64_t N, const char* op) {
  if (!weight.has_value() || !weight->defined()) return nullptr;
  check_cuda(*weight, pred, op, "weight");
  TORCH_CHECK(weight->scalar_type() == at::kFloat && weight->dim() == 1 && weight->size(0) == N &&
                  weight->is_contiguous(),
              op, ": weight must be contiguous float32 [N] (N of coords)");
  return weight->data_ptr<float>();
}

// Per-mask sums [4, N] fp32 (bce, s*t, s, t over the points), deterministic.
at::Tensor loss_sums(const at::Tensor& pred, const LossSetup& s, cudaStream_t stream) {
  const LossGeom& g = s.g;
  const auto f32 = pred.options().dtype(at::kFloat);
  at::Tensor sums = at::zeros({4, g.N}, f32);
  if (g.N == 0 || g.P == 0) return sums;
  const int64_t nblk = (g.P + kThreads - 1) / kThreads;
  TORCH_CHECK(g.N * nblk <= INT_MAX, "point_mask_loss: too many (mask, point block) pairs: ", g.N * nblk);
  at::Tensor partial = at::empty({4, g.N, nblk}, f32);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "point_mask_loss_stats", [&] {
    mask_loss_stats_kernel<scalar_t><<<static_cast<unsigned int>(g.N * nblk), kThreads, 0, stream>>>(
        pred.data_ptr<scalar_t>(), g, nblk, partial.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const int64_t entries = 4 * g.N;
  mask_sums_kernel<<<grid_for(entries), kThreads, 0, stream>>>(partial.data_ptr<float>(), entries, nblk,
                                                                 sums.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return sums;
}

}  // namespace

// ----------------------------------------------------------------------------- entry points

at::Tensor point_sample_fwd(const at::Tensor& input, const at::Tensor& coords) {
  const char* op = "point_sample_fwd";
  check_cuda(input, input, op, "input");
  check_cuda(coords, input, op, "coords");
  const bool bytes = input.scalar_type() == at::kBool || input.scalar_type() == at::kByte;
  if (!bytes) check_pred_dtype(input, op, "input");
  TORCH_CHECK(input.dim() == 4, op, ": input must be [N, C, H, W]");
  TORCH_CHECK(coords.dim() == 3 && coords.size(2) == 2 && coords.size(0) == input.size(0), op,
              ": coords must be [N, P, 2] with input's N");
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t P = coords.size(1);
  const at::Tensor cf = coords_f32(coords);
  at::Tensor out = at::zeros({N, C, P}, input.options().dtype(at::kFloat));
  const int64_t total = N * C * P;
  if (total > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    if (bytes) {  // 0/1 maps read as bytes, never converted
      sample_rows_kernel<AnyMap><<<grid_for(total), kThreads, 0, stream>>>(
          AnyMap{input.data_ptr(), MapType::kByte}, C, H, W, input.stride(0), input.stride(1), input.stride(2),
          input.stride(3), cf.data_ptr<float>(), 2 * P, P, total, false, out.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "point_sample_fwd", [&] {
        sample_rows_kernel<TypedMap<scalar_t>><<<grid_for(total), kThreads, 0, stream>>>(
            TypedMap<scalar_t>{input.data_ptr<scalar_t>()}, C, H, W, input.stride(0), input.stride(1),
            input.stride(2), input.stride(3), cf.data_ptr<float>(), 2 * P, P, total, false, out.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
  }
  return bytes ? out : out.to(input.scalar_type());  // float32 for bytes; no copy for fp32
}

at::Tensor point_sample_bwd(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& coords) {
  const char* op = "point_sample_bwd";
  check_cuda(input, input, op, "input");
  check_cuda(coords, input, op, "coords");
  check_cuda(grad_out, input, op, "grad_out");
  TORCH_CHECK(input.dim() == 4, op, ": input must be [N, C, H, W]");
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  TORCH_CHECK(coords.dim() == 3 && coords.size(2) == 2 && coords.size(0) == N, op,
              ": coords must be [N, P, 2] with input's N");
  const int64_t P = coords.size(1);
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == N && grad_out.size(1) == C && grad_out.size(2) == P, op,
              ": grad_out must be [N, C, P]");
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor cf = coords_f32(coords);
  const at::Tensor g = grad_out.to(at::kFloat).contiguous();
  at::Tensor grad = at::zeros({N, C, H, W}, input.options().dtype(at::kFloat));
  const int64_t total = N * C * P;
  if (total > 0 && H * W > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    scatter_rows_kernel<<<grid_for(total), kThreads, 0, stream>>>(g.data_ptr<float>(), cf.data_ptr<float>(), C, H, W,
                                                                   P, total, grad.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return grad.to(input.scalar_type());
}

at::Tensor uncertain_point_coords(const at::Tensor& logits, const at::Tensor& candidates, const at::Tensor& random,
                                  int64_t num_uncertain) {
  const char* op = "uncertain_point_coords";
  check_cuda(logits, logits, op, "logits");
  check_cuda(candidates, logits, op, "candidates");
  check_cuda(random, logits, op, "random");
  check_pred_dtype(logits, op, "logits");
  TORCH_CHECK(logits.dim() == 3, op, ": logits must be [N, H, W]");
  const int64_t N = logits.size(0), H = logits.size(1), W = logits.size(2);
  TORCH_CHECK(candidates.dim() == 3 && candidates.size(0) == N && candidates.size(2) == 2, op,
              ": candidates must be [N, S, 2]");
  TORCH_CHECK(random.dim() == 3 && random.size(0) == N && random.size(2) == 2, op, ": random must be [N, R, 2]");
  const int64_t S = candidates.size(1);
  TORCH_CHECK(num_uncertain >= 0 && num_uncertain <= S, op, ": num_uncertain must be in [0, S = ", S, "], got ",
              num_uncertain);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor cf = coords_f32(candidates);
  at::Tensor uncertainty = at::zeros({N, S}, logits.options().dtype(at::kFloat));
  const int64_t total = N * S;
  if (total > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "uncertain_point_coords", [&] {
      sample_rows_kernel<TypedMap<scalar_t>><<<grid_for(total), kThreads, 0, stream>>>(
          TypedMap<scalar_t>{logits.data_ptr<scalar_t>()}, 1, H, W, logits.stride(0), 0, logits.stride(1),
          logits.stride(2), cf.data_ptr<float>(), 2 * S, S, total, true, uncertainty.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  // The reference: topk(-|logit|, k, dim=1) (largest, sorted), gather, then the random points.
  const at::Tensor idx = std::get<1>(at::topk(uncertainty, num_uncertain, 1, true, true));
  const at::Tensor chosen = candidates.gather(1, idx.unsqueeze(-1).expand({N, num_uncertain, 2}));
  return at::cat({chosen, random.to(candidates.scalar_type())}, 1).contiguous();
}

std::tuple<at::Tensor, at::Tensor> point_mask_loss_fwd(const at::Tensor& pred, const at::Tensor& target,
                                                       const at::Tensor& coords, double num_masks,
                                                       const std::optional<at::Tensor>& batch_index,
                                                       const std::optional<at::Tensor>& query_index,
                                                       const std::optional<at::Tensor>& weight) {
  const c10::cuda::CUDAGuard guard(pred.device());
  const LossSetup s = loss_setup(pred, target, coords, batch_index, query_index, "point_mask_loss_fwd");
  const float* w = weight_data(weight, pred, s.g.N, "point_mask_loss_fwd");
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor sums = loss_sums(pred, s, stream);
  const auto f32 = pred.options().dtype(at::kFloat);
  at::Tensor out_bce = at::empty({}, f32);
  at::Tensor out_dice = at::empty({}, f32);
  mask_loss_finish_kernel<<<1, kThreads, 0, stream>>>(sums.data_ptr<float>(), w, s.g.N, static_cast<float>(s.g.P),
                                                       static_cast<float>(num_masks), out_bce.data_ptr<float>(),
                                                       out_dice.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out_bce, out_dice};  // fp32 whatever pred's dtype (the op's contract)
}

at::Tensor point_mask_loss_bwd(const at::Tensor& grad_bce, const at::Tensor& grad_dice, const at::Tensor& pred,
                               const at::Tensor& target, const at::Tensor& coords, double num_masks,
                               const std::optional<at::Tensor>& batch_index,
                               const std::optional<at::Tensor>& query_index,
                               const std::optional<at::Tensor>& weight) {
  const char* op = "point_mask_loss_bwd";
  TORCH_CHECK(grad_bce.numel() == 1 && grad_dice.numel() == 1, op, ": grad_bce and grad_dice must be scalars");
  const c10::cuda::CUDAGuard guard(pred.device());
  const LossSetup s = loss_setup(pred, target, coords, batch_index, query_index, op);
  const float* w = weight_data(weight, pred, s.g.N, op);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor sums = loss_sums(pred, s, stream);
  const at::Tensor gb = grad_bce.to(pred.device(), at::kFloat).reshape({1}).contiguous();
  const at::Tensor gd = grad_dice.to(pred.device(), at::kFloat).reshape({1}).contiguous();
  at::Tensor grad = at::zeros(pred.sizes(), pred.options().dtype(at::kFloat));  // contiguous
  const int64_t gs_b = s.indexed ? grad.stride(0) : 0;
  const int64_t gs_q = s.indexed ? grad.stride(1) : grad.stride(0);
  const int64_t total = s.g.N * s.g.P;
  if (total > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "point_mask_loss_bwd", [&] {
      mask_loss_grad_kernel<scalar_t><<<grid_for(total), kThreads, 0, stream>>>(
          pred.data_ptr<scalar_t>(), s.g, sums.data_ptr<float>(), w, gb.data_ptr<float>(), gd.data_ptr<float>(),
          static_cast<float>(num_masks), gs_b, gs_q, grad.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return grad.to(pred.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> pairwise_mask_cost(const at::Tensor& pred, const at::Tensor& target,
                                                      const at::Tensor& coords) {
  const char* op = "pairwise_mask_cost";
  check_cuda(pred, pred, op, "pred");
  check_cuda(target, pred, op, "target");
  check_cuda(coords, pred, op, "coords");
  check_pred_dtype(pred, op, "pred");
  TORCH_CHECK(pred.dim() == 3, op, ": pred must be [Q, Hp, Wp]");
  TORCH_CHECK(target.dim() == 3, op, ": target must be [T, Ht, Wt]");
  TORCH_CHECK(coords.dim() == 2 && coords.size(1) == 2, op, ": coords must be [P, 2]");
  const MapType target_t = map_type(target, "target");
  const c10::cuda::CUDAGuard guard(pred.device());
  const int64_t Q = pred.size(0), T = target.size(0), P = coords.size(0);
  const auto f32 = pred.options().dtype(at::kFloat);
  at::Tensor cost_bce = at::zeros({Q, T}, f32);
  at::Tensor cost_dice = at::zeros({Q, T}, f32);
  if (Q == 0 || T == 0) return {cost_bce, cost_dice};
  TORCH_CHECK((Q + kTile - 1) / kTile <= 65535, op, ": too many queries: ", Q);
  TORCH_CHECK((T + kTile - 1) / kTile <= INT_MAX, op, ": too many targets: ", T);
  const at::Tensor cf = coords_f32(coords);
  at::Tensor x = at::zeros({Q, P}, f32);
  at::Tensor t = at::zeros({T, P}, f32);
  at::Tensor sp_sum = at::zeros({Q}, f32);
  at::Tensor s_sum = at::zeros({Q}, f32);
  at::Tensor t_sum = at::zeros({T}, f32);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (P > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "pairwise_mask_cost", [&] {
      sample_rows_kernel<TypedMap<scalar_t>><<<grid_for(Q * P), kThreads, 0, stream>>>(
          TypedMap<scalar_t>{pred.data_ptr<scalar_t>()}, 1, pred.size(1), pred.size(2), pred.stride(0), 0,
          pred.stride(1), pred.stride(2), cf.data_ptr<float>(), 0, P, Q * P, false, x.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    sample_rows_kernel<AnyMap><<<grid_for(T * P), kThreads, 0, stream>>>(
        AnyMap{target.data_ptr(), target_t}, 1, target.size(1), target.size(2), target.stride(0), 0,
        target.stride(1), target.stride(2), cf.data_ptr<float>(), 0, P, T * P, false, t.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    TORCH_CHECK(Q <= INT_MAX && T <= INT_MAX, op, ": too many masks");
    row_stats_kernel<<<static_cast<unsigned int>(Q), kThreads, 0, stream>>>(x.data_ptr<float>(), P, true,
                                                                             sp_sum.data_ptr<float>(),
                                                                             s_sum.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    row_stats_kernel<<<static_cast<unsigned int>(T), kThreads, 0, stream>>>(t.data_ptr<float>(), P, false,
                                                                             t_sum.data_ptr<float>(), nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const dim3 grid(static_cast<unsigned int>((T + kTile - 1) / kTile), static_cast<unsigned int>((Q + kTile - 1) / kTile));
  const dim3 block(kTile, kTile);
  pairwise_cost_kernel<<<grid, block, 0, stream>>>(x.data_ptr<float>(), t.data_ptr<float>(), sp_sum.data_ptr<float>(),
                                                   s_sum.data_ptr<float>(), t_sum.data_ptr<float>(), Q, T, P,
                                                   cost_bce.data_ptr<float>(), cost_dice.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {cost_bce, cost_dice};
}

}  // namespace m2f_kernels
