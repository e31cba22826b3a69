// Masked cross-attention CUDA kernels, forward and backward (simple, fp32 accumulation).
//
// Row flags: a prologue kernel (one warp per mask row [b, hm, q]) writes 1 where the row
// has a visible key, 0 where every key is blocked; such a row then uses ALL keys (the
// empty-row rule). The flags are [B, Hm, Q] int32 with Hm = 1 for a shared mask.
//
// Forward: one block per (tile of kRows query rows, head, batch), one warp per query row.
// The block stages key / value tiles of kTile = 32 keys in shared memory (fp32, rows
// padded by one float against bank conflicts); lane j scores key j of the tile, the warp
// runs an online softmax (max / sum by shuffles) and each lane accumulates the output
// channels lane, lane + 32, ... Writes out = acc / l and lse = m + log(l).
//
// Backward: a prologue writes the row flags and delta = rowsum(dO * O) (fp32). dK / dV:
// one block per (key tile, head, batch) walks all queries in chunks of kRows, recomputes
// P = exp(s * scale - lse) for the (query, key) pairs of the chunk (warp = query, lane =
// key), dS = P * (dP - delta) * scale, and accumulates dV += P^T dO and dK += dS^T q in
// registers (each thread owns fixed (key, channel) elements). dQ: like the forward, one
// warp per query row, dq = sum_j dS_j k_j. No atomics: the result is bitwise repeatable.
//
// No tensor of size B*H*Q*N exists; the mask is read in place with its strides.
#include "masked_attention/masked_attention.h"

#include <climits>
#include <cstdint>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common/dispatch.h"
#include "common/warp.cuh"

namespace m2f_kernels {
namespace {

constexpr int kTile = 32;     // keys per shared-memory tile (= lanes of a warp)
constexpr int kRows = 8;      // query rows per block (one per warp)
constexpr int kThreads = kWarp * kRows;
constexpr int kMaxDim = 128;  // D and Dv limit: per-lane register arrays below
constexpr int kMaxChunks = kMaxDim / kWarp;                 // output channels per lane
constexpr int kMaxOwned = kTile * kMaxDim / kThreads;       // dk / dv elements per thread
constexpr int kFlagWarpsPerBlock = 8;

// How the mask's elements are stored (read per element; a uniform branch).
enum class MaskType : int { kByte = 0, kFloat = 1, kHalf = 2, kBFloat16 = 3, kDouble = 4 };

__device__ __forceinline__ bool key_blocked(const void* m, int64_t i, MaskType t) {
  switch (t) {
    case MaskType::kByte:
      return static_cast<const uint8_t*>(m)[i] != 0;
    case MaskType::kHalf:
      return static_cast<float>(static_cast<const c10::Half*>(m)[i]) < 0.0f;
    case MaskType::kBFloat16:
      return static_cast<float>(static_cast<const c10::BFloat16*>(m)[i]) < 0.0f;
    case MaskType::kDouble:
      return static_cast<const double*>(m)[i] < 0.0;
    default:
      return static_cast<const float*>(m)[i] < 0.0f;  // NaN counts as visible, as `mask < 0`
  }
}

struct MaskArgs {
  const void* ptr;
  MaskType type;
  int64_t sb, sh, sq, sn;  // element strides; sh = 0 for a [B, Q, N] mask
  int64_t heads;           // Hm: 1 for a shared mask, else H
};

// Index of row (b, h, qi) in the [B, Hm, Q] flags.
__device__ __forceinline__ int64_t flag_index(const MaskArgs& m, int64_t b, int64_t h, int64_t qi, int64_t Q) {
  return (b * m.heads + (m.heads > 1 ? h : 0)) * Q + qi;
}

// Loads rows [n0, n0 + kTile) of a contiguous [N, dim] slice into dst[kTile][dim + 1] as
// fp32, zeros past N. All threads of the block take part.
template <typename scalar_t>
__device__ __forceinline__ void load_tile(const scalar_t* __restrict__ src, int64_t n0, int64_t N, int dim,
                                          float* dst) {
  const int stride = dim + 1;
  for (int e = threadIdx.x; e < kTile * dim; e += blockDim.x) {
    const int j = e / dim;
    const int d = e - j * dim;
    const int64_t n = n0 + j;
    dst[j * stride + d] = n < N ? static_cast<float>(src[n * dim + d]) : 0.0f;
  }
}

// Stages keys / values [n0, n0 + kTile) in Ks / Vs between two barriers (every thread of
// the block takes part), for the forward and dQ kernels' key loop.
template <typename scalar_t>
__device__ __forceinline__ void stage_kv_tile(const scalar_t* kbh, const scalar_t* vbh, int64_t n0, int64_t N, int D,
                                              int Dv, float* Ks, float* Vs) {
  __syncthreads();  // the previous tile is no longer read (and the query rows are written, first time)
  load_tile(kbh, n0, N, D, Ks);
  load_tile(vbh, n0, N, Dv, Vs);
  __syncthreads();
}

// acc[c] += w_j * row_j[lane + c * kWarp] over the kTile rows row_j = rows + j * (dim + 1)
// of a staged tile, w_j = lane j's w (a broadcast: rows with w_j = 0 are skipped, warp-uniformly).
__device__ __forceinline__ void accumulate_rows(float (&acc)[kMaxChunks], float w, const float* rows, int dim,
                                                int lane) {
  for (int j = 0; j < kTile; ++j) {
    const float wj = __shfl_sync(kFullMask, w, j);
    if (wj == 0.0f) continue;  // warp-uniform: a broadcast value
    const float* row = rows + j * (dim + 1);
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) {
      const int d = lane + c * kWarp;
      if (d < dim) acc[c] += wj * row[d];
    }
  }
}

// ----------------------------------------------------------------------------- row flags
// flags[b, hm, q] = 1 if the mask row has a visible key, else 0. One warp per row.
__global__ void __launch_bounds__(kWarp* kFlagWarpsPerBlock)
    row_flags_kernel(MaskArgs m, int* __restrict__ flags, int64_t rows, int64_t Q, int64_t N) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kFlagWarpsPerBlock + threadIdx.x / kWarp;
  if (row >= rows) return;  // whole warps leave together
  const int lane = threadIdx.x % kWarp;
  const int64_t qi = row % Q;
  const int64_t hm = (row / Q) % m.heads;
  const int64_t b = row / Q / m.heads;
  const int64_t base = b * m.sb + hm * m.sh + qi * m.sq;
  int found = 0;
  for (int64_t n0 = 0; n0 < N; n0 += kWarp) {  // the same trip count for every lane
    const int64_t n = n0 + lane;
    const bool vis = n < N && !key_blocked(m.ptr, base + n * m.sn, m.type);
    if (__any_sync(kFullMask, vis)) {
      found = 1;
      break;
    }
  }
  if (lane == 0) flags[row] = found;
}

// delta[row] = sum_d dO[row, d] * O[row, d] in fp32, rows = B*H*Q. One warp per row.
template <typename scalar_t>
__global__ void __launch_bounds__(kWarp* kFlagWarpsPerBlock)
    delta_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ out,
                 float* __restrict__ delta, int64_t rows, int Dv) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kFlagWarpsPerBlock + threadIdx.x / kWarp;
  if (row >= rows) return;
  const int lane = threadIdx.x % kWarp;
  float s = 0.0f;
  for (int d = lane; d < Dv; d += kWarp) {
    s += static_cast<float>(grad_out[row * Dv + d]) * static_cast<float>(out[row * Dv + d]);
  }
  s = warp_sum(s);
  if (lane == 0) delta[row] = s;
}

// ----------------------------------------------------------------------------- forward
// Shared memory: K tile [kTile][D+1], V tile [kTile][Dv+1], q rows [kRows][D], fp32.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    ma_fwd_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                  MaskArgs m, const int* __restrict__ flags, scalar_t* __restrict__ out, float* __restrict__ lse,
                  int64_t H, int64_t Q, int64_t N, int D, int Dv, float scale) {
  extern __shared__ float smem[];
  float* Ks = smem;
  float* Vs = Ks + kTile * (D + 1);
  float* qs = Vs + kTile * (Dv + 1);

  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int64_t b = blockIdx.z;
  const int64_t h = blockIdx.y;
  const int64_t bh = b * H + h;
  const int64_t qi = static_cast<int64_t>(blockIdx.x) * kRows + warp;
  const bool row_ok = qi < Q;  // warp-uniform

  float* qrow = qs + warp * D;
  for (int d = lane; d < D; d += kWarp) qrow[d] = row_ok ? static_cast<float>(q[(bh * Q + qi) * D + d]) : 0.0f;
  const bool use_all = row_ok ? flags[flag_index(m, b, h, qi, Q)] == 0 : true;
  const int64_t mbase = b * m.sb + h * m.sh + (row_ok ? qi : 0) * m.sq;

  const scalar_t* kbh = k + bh * N * D;
  const scalar_t* vbh = v + bh * N * Dv;
  float m_i = -INFINITY;
  float l_i = 0.0f;
  float acc[kMaxChunks];
#pragma unroll
  for (int c = 0; c < kMaxChunks; ++c) acc[c] = 0.0f;

  for (int64_t n0 = 0; n0 < N; n0 += kTile) {
    stage_kv_tile(kbh, vbh, n0, N, D, Dv, Ks, Vs);
    if (!row_ok) continue;
    const int64_t n = n0 + lane;
    const bool used = n < N && (use_all || !key_blocked(m.ptr, mbase + n * m.sn, m.type));
    float s = -INFINITY;
    if (used) {
      const float* krow = Ks + lane * (D + 1);
      float dot = 0.0f;
      for (int d = 0; d < D; ++d) dot += qrow[d] * krow[d];
      s = dot * scale;
    }
    const float tile_max = warp_max(s);
    if (tile_max == -INFINITY) continue;  // no used key in this tile (warp-uniform)
    const float m_new = fmaxf(m_i, tile_max);
    const float alpha = m_i == -INFINITY ? 0.0f : expf(m_i - m_new);
    const float p = used ? expf(s - m_new) : 0.0f;
    l_i = l_i * alpha + warp_sum(p);
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) acc[c] *= alpha;
    accumulate_rows(acc, p, Vs, Dv, lane);
    m_i = m_new;
  }
  if (!row_ok) return;
  // Every row uses at least one key (N >= 1), so l_i > 0.
  const float inv_l = 1.0f / l_i;
#pragma unroll
  for (int c = 0; c < kMaxChunks; ++c) {
    const int d = lane + c * kWarp;
    if (d < Dv) out[(bh * Q + qi) * Dv + d] = static_cast<scalar_t>(acc[c] * inv_l);
  }
  if (lane == 0) lse[bh * Q + qi] = m_i + logf(l_i);
}

// ----------------------------------------------------------------------------- backward
// dK, dV of one key tile. Shared memory: K tile [kTile][D+1], V tile [kTile][Dv+1],
// q chunk [kRows][D], dO chunk [kRows][Dv], P and dS [kRows][kTile], and per chunk row
// lse, delta, use-all flag.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    ma_bwd_dkdv_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                       const scalar_t* __restrict__ v, const scalar_t* __restrict__ grad_out, MaskArgs m,
                       const int* __restrict__ flags, const float* __restrict__ lse,
                       const float* __restrict__ delta, scalar_t* __restrict__ dk, scalar_t* __restrict__ dv,
                       int64_t H, int64_t Q, int64_t N, int D, int Dv, float scale) {
  extern __shared__ float smem[];
  float* Ks = smem;
  float* Vs = Ks + kTile * (D + 1);
  float* qc = Vs + kTile * (Dv + 1);
  float* gc = qc + kRows * D;
  float* Ps = gc + kRows * Dv;
  float* dSs = Ps + kRows * kTile;
  float* lse_s = dSs + kRows * kTile;
  float* delta_s = lse_s + kRows;
  int* all_s = reinterpret_cast<int*>(delta_s + kRows);

  const int tid = threadIdx.x;
  const int lane = tid % kWarp;
  const int warp = tid / kWarp;
  const int64_t b = blockIdx.z;
  const int64_t h = blockIdx.y;
  const int64_t bh = b * H + h;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t n = n0 + lane;  // this thread's key in the score phase

  load_tile(k + bh * N * D, n0, N, D, Ks);
  load_tile(v + bh * N * Dv, n0, N, Dv, Vs);

  float acc_k[kMaxOwned];
  float acc_v[kMaxOwned];
#pragma unroll
  for (int r = 0; r < kMaxOwned; ++r) {
    acc_k[r] = 0.0f;
    acc_v[r] = 0.0f;
  }

  const scalar_t* qbh = q + bh * Q * D;
  const scalar_t* gbh = grad_out + bh * Q * Dv;
  for (int64_t i0 = 0; i0 < Q; i0 += kRows) {
    __syncthreads();  // the previous chunk is no longer read
    for (int e = tid; e < kRows * D; e += kThreads) {
      const int i = e / D;
      const int d = e - i * D;
      qc[e] = i0 + i < Q ? static_cast<float>(qbh[(i0 + i) * D + d]) : 0.0f;
    }
    for (int e = tid; e < kRows * Dv; e += kThreads) {
      const int i = e / Dv;
      const int d = e - i * Dv;
      gc[e] = i0 + i < Q ? static_cast<float>(gbh[(i0 + i) * Dv + d]) : 0.0f;
    }
    if (tid < kRows) {
      const int64_t qi = i0 + tid;
      const bool ok = qi < Q;
      lse_s[tid] = ok ? lse[bh * Q + qi] : 0.0f;
      delta_s[tid] = ok ? delta[bh * Q + qi] : 0.0f;
      all_s[tid] = ok ? (flags[flag_index(m, b, h, qi, Q)] == 0 ? 1 : 0) : 0;
    }
    __syncthreads();

    // scores: warp = query row of the chunk, lane = key of the tile
    const int64_t qi = i0 + warp;
    float p = 0.0f;
    float ds = 0.0f;
    if (qi < Q && n < N) {
      const bool used = all_s[warp] != 0 || !key_blocked(m.ptr, b * m.sb + h * m.sh + qi * m.sq + n * m.sn, m.type);
      if (used) {
        const float* qrow = qc + warp * D;
        const float* grow = gc + warp * Dv;
        const float* krow = Ks + lane * (D + 1);
        const float* vrow = Vs + lane * (Dv + 1);
        float s = 0.0f;
        for (int d = 0; d < D; ++d) s += qrow[d] * krow[d];
        float dp = 0.0f;
        for (int d = 0; d < Dv; ++d) dp += grow[d] * vrow[d];
        p = expf(s * scale - lse_s[warp]);
        ds = p * (dp - delta_s[warp]) * scale;
      }
    }
    Ps[warp * kTile + lane] = p;
    dSs[warp * kTile + lane] = ds;
    __syncthreads();

    // accumulate: this thread's elements e = tid + r * kThreads of the [kTile, D] / [kTile, Dv] tiles
#pragma unroll
    for (int r = 0; r < kMaxOwned; ++r) {
      const int e = tid + r * kThreads;
      if (e < kTile * D) {
        const int j = e / D;
        const int d = e - j * D;
        float a = 0.0f;
#pragma unroll
        for (int i = 0; i < kRows; ++i) a += dSs[i * kTile + j] * qc[i * D + d];
        acc_k[r] += a;
      }
      if (e < kTile * Dv) {
        const int j = e / Dv;
        const int d = e - j * Dv;
        float a = 0.0f;
#pragma unroll
        for (int i = 0; i < kRows; ++i) a += Ps[i * kTile + j] * gc[i * Dv + d];
        acc_v[r] += a;
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kMaxOwned; ++r) {
    const int e = tid + r * kThreads;
    if (e < kTile * D) {
      const int j = e / D;
      const int d = e - j * D;
      if (n0 + j < N) dk[(bh * N + n0 + j) * D + d] = static_cast<scalar_t>(acc_k[r]);
    }
    if (e < kTile * Dv) {
      const int j = e / Dv;
      const int d = e - j * Dv;
      if (n0 + j < N) dv[(bh * N + n0 + j) * Dv + d] = static_cast<scalar_t>(acc_v[r]);
    }
  }
}

// dQ of kRows query rows, one warp per row. Shared memory: K tile [kTile][D+1], V tile
// [kTile][Dv+1], q rows [kRows][D], dO rows [kRows][Dv].
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    ma_bwd_dq_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                     const scalar_t* __restrict__ v, const scalar_t* __restrict__ grad_out, MaskArgs m,
                     const int* __restrict__ flags, const float* __restrict__ lse,
                     const float* __restrict__ delta, scalar_t* __restrict__ dq, int64_t H, int64_t Q,
                     int64_t N, int D, int Dv, float scale) {
  extern __shared__ float smem[];
  float* Ks = smem;
  float* Vs = Ks + kTile * (D + 1);
  float* qs = Vs + kTile * (Dv + 1);
  float* gs = qs + kRows * D;

  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int64_t b = blockIdx.z;
  const int64_t h = blockIdx.y;
  const int64_t bh = b * H + h;
  const int64_t qi = static_cast<int64_t>(blockIdx.x) * kRows + warp;
  const bool row_ok = qi < Q;  // warp-uniform

  float* qrow = qs + warp * D;
  float* grow = gs + warp * Dv;
  for (int d = lane; d < D; d += kWarp) qrow[d] = row_ok ? static_cast<float>(q[(bh * Q + qi) * D + d]) : 0.0f;
  for (int d = lane; d < Dv; d += kWarp) {
    grow[d] = row_ok ? static_cast<float>(grad_out[(bh * Q + qi) * Dv + d]) : 0.0f;
  }
  const bool use_all = row_ok ? flags[flag_index(m, b, h, qi, Q)] == 0 : true;
  const float lse_i = row_ok ? lse[bh * Q + qi] : 0.0f;
  const float delta_i = row_ok ? delta[bh * Q + qi] : 0.0f;
  const int64_t mbase = b * m.sb + h * m.sh + (row_ok ? qi : 0) * m.sq;

  const scalar_t* kbh = k + bh * N * D;
  const scalar_t* vbh = v + bh * N * Dv;
  float acc[kMaxChunks];
#pragma unroll
  for (int c = 0; c < kMaxChunks; ++c) acc[c] = 0.0f;

  for (int64_t n0 = 0; n0 < N; n0 += kTile) {
    stage_kv_tile(kbh, vbh, n0, N, D, Dv, Ks, Vs);
    if (!row_ok) continue;
    const int64_t n = n0 + lane;
    const bool used = n < N && (use_all || !key_blocked(m.ptr, mbase + n * m.sn, m.type));
    float ds = 0.0f;
    if (used) {
      const float* krow = Ks + lane * (D + 1);
      const float* vrow = Vs + lane * (Dv + 1);
      float s = 0.0f;
      for (int d = 0; d < D; ++d) s += qrow[d] * krow[d];
      float dp = 0.0f;
      for (int d = 0; d < Dv; ++d) dp += grow[d] * vrow[d];
      const float p = expf(s * scale - lse_i);
      ds = p * (dp - delta_i) * scale;
    }
    if (!__any_sync(kFullMask, used)) continue;
    accumulate_rows(acc, ds, Ks, D, lane);
  }
  if (!row_ok) return;
#pragma unroll
  for (int c = 0; c < kMaxChunks; ++c) {
    const int d = lane + c * kWarp;
    if (d < D) dq[(bh * Q + qi) * D + d] = static_cast<scalar_t>(acc[c]);
  }
}

// ----------------------------------------------------------------------------- host side

size_t fwd_smem(int64_t D, int64_t Dv) {
  return sizeof(float) * static_cast<size_t>(kTile * (D + 1) + kTile * (Dv + 1) + kRows * D);
}

size_t dq_smem(int64_t D, int64_t Dv) {
  return sizeof(float) * static_cast<size_t>(kTile * (D + 1) + kTile * (Dv + 1) + kRows * D + kRows * Dv);
}

size_t dkdv_smem(int64_t D, int64_t Dv) {
  return sizeof(float) * static_cast<size_t>(kTile * (D + 1) + kTile * (Dv + 1) + kRows * D + kRows * Dv +
                                             2 * kRows * kTile + 3 * kRows);
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask) {
  TORCH_CHECK(q.is_cuda(), "masked_attention: q must be a CUDA tensor");
  const auto st = q.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "masked_attention: q must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "masked_attention: q, k, v must be [B, H, Q, D], [B, H, N, D], [B, H, N, Dv]");
  TORCH_CHECK(k.scalar_type() == st && v.scalar_type() == st, "masked_attention: q, k, v must share one dtype");
  const int64_t B = q.size(0), H = q.size(1), Q = q.size(2), D = q.size(3);
  const int64_t N = k.size(2), Dv = v.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == D, "masked_attention: k must be [B, H, N, D]");
  TORCH_CHECK(v.size(0) == B && v.size(1) == H && v.size(2) == N, "masked_attention: v must be [B, H, N, Dv]");
  TORCH_CHECK(D >= 1 && D <= kMaxDim && Dv >= 1 && Dv <= kMaxDim,
              "masked_attention (cuda backend): head dims D and Dv must be in [1, ", kMaxDim, "], got D = ", D,
              ", Dv = ", Dv);
  if (mask.dim() == 3) {
    TORCH_CHECK(mask.size(0) == B && mask.size(1) == Q && mask.size(2) == N,
                "masked_attention: mask must be [B, Q, N] or [B, H, Q, N]");
  } else {
    TORCH_CHECK(mask.dim() == 4 && mask.size(0) == B && mask.size(1) == H && mask.size(2) == Q &&
                    mask.size(3) == N,
                "masked_attention: mask must be [B, Q, N] or [B, H, Q, N]");
  }
  for (const at::Tensor* t : {&q, &k, &v, &mask}) {
    TORCH_CHECK(t->device() == q.device(), "masked_attention: all tensors must be on ", q.device());
  }
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->is_contiguous(), "masked_attention: q, k, v must be contiguous (the Python side makes them so)");
  }
  TORCH_CHECK(B <= 65535 && H <= 65535, "masked_attention: B and H must be <= 65535 (grid limits)");
  TORCH_CHECK((Q + kRows - 1) / kRows <= INT_MAX && (N + kTile - 1) / kTile <= INT_MAX,
              "masked_attention: Q or N too large");
}

MaskArgs mask_args(const at::Tensor& mask, int64_t H) {
  MaskArgs m;
  m.ptr = mask.data_ptr();
  switch (mask.scalar_type()) {
    case at::kBool:
    case at::kByte:
      m.type = MaskType::kByte;
      break;
    case at::kFloat:
      m.type = MaskType::kFloat;
      break;
    case at::kHalf:
      m.type = MaskType::kHalf;
      break;
    case at::kBFloat16:
      m.type = MaskType::kBFloat16;
      break;
    case at::kDouble:
      m.type = MaskType::kDouble;
      break;
    default:
      TORCH_CHECK(false, "masked_attention: mask must be bool / uint8 or floating logits, got ",
                  mask.scalar_type());
  }
  if (mask.dim() == 3) {
    m.sb = mask.stride(0);
    m.sh = 0;
    m.sq = mask.stride(1);
    m.sn = mask.stride(2);
    m.heads = 1;
  } else {
    m.sb = mask.stride(0);
    m.sh = mask.stride(1);
    m.sq = mask.stride(2);
    m.sn = mask.stride(3);
    m.heads = H;
  }
  return m;
}

unsigned int warp_row_blocks(int64_t rows) {
  const int64_t blocks = (rows + kFlagWarpsPerBlock - 1) / kFlagWarpsPerBlock;
  TORCH_CHECK(blocks <= INT_MAX, "masked_attention: too many rows: ", rows);
  return static_cast<unsigned int>(blocks);
}

// [B, Hm, Q] int32: 1 where the mask row has a visible key.
at::Tensor row_flags(const MaskArgs& m, int64_t B, int64_t Q, int64_t N, const at::TensorOptions& opts,
                     cudaStream_t stream) {
  const int64_t rows = B * m.heads * Q;
  at::Tensor flags = at::empty({rows}, opts.dtype(at::kInt));
  row_flags_kernel<<<warp_row_blocks(rows), kWarp * kFlagWarpsPerBlock, 0, stream>>>(
      m, flags.data_ptr<int>(), rows, Q, N);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return flags;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> masked_attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& v, const at::Tensor& mask,
                                                        double scale) {
  check_qkv(q, k, v, mask);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), Q = q.size(2), D = q.size(3);
  const int64_t N = k.size(2), Dv = v.size(3);
  at::Tensor out = at::empty({B, H, Q, Dv}, q.options());
  at::Tensor lse = at::empty({B, H, Q}, q.options().dtype(at::kFloat));
  if (B * H * Q == 0) return {out, lse};
  if (N == 0) return {out.zero_(), lse.fill_(-INFINITY)};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const MaskArgs m = mask_args(mask, H);
  const at::Tensor flags = row_flags(m, B, Q, N, q.options(), stream);
  const dim3 grid(static_cast<unsigned int>((Q + kRows - 1) / kRows), static_cast<unsigned int>(H),
                  static_cast<unsigned int>(B));
  M2F_DISPATCH_FLOAT_HALF_BF16(q.scalar_type(), "masked_attention_fwd", [&] {
    ma_fwd_kernel<scalar_t><<<grid, kThreads, fwd_smem(D, Dv), stream>>>(
        q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), m, flags.data_ptr<int>(),
        out.data_ptr<scalar_t>(), lse.data_ptr<float>(), H, Q, N, static_cast<int>(D), static_cast<int>(Dv),
        static_cast<float>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& mask, const at::Tensor& out, const at::Tensor& lse, double scale) {
  check_qkv(q, k, v, mask);
  const int64_t B = q.size(0), H = q.size(1), Q = q.size(2), D = q.size(3);
  const int64_t N = k.size(2), Dv = v.size(3);
  for (const at::Tensor* t : {&grad_out, &out}) {
    TORCH_CHECK(t->device() == q.device() && t->scalar_type() == q.scalar_type() && t->is_contiguous() &&
                    t->dim() == 4 && t->size(0) == B && t->size(1) == H && t->size(2) == Q && t->size(3) == Dv,
                "masked_attention: grad_out and out must be contiguous [B, H, Q, Dv] in q's dtype on q's device");
  }
  TORCH_CHECK(lse.device() == q.device() && lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                  lse.dim() == 3 && lse.size(0) == B && lse.size(1) == H && lse.size(2) == Q,
              "masked_attention: lse must be contiguous float32 [B, H, Q] on q's device");
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor dq = at::empty_like(q);
  at::Tensor dk = at::empty_like(k);
  at::Tensor dv = at::empty_like(v);
  if (B * H * Q == 0 || N == 0) return {dq.zero_(), dk.zero_(), dv.zero_()};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const MaskArgs m = mask_args(mask, H);
  const at::Tensor flags = row_flags(m, B, Q, N, q.options(), stream);
  at::Tensor delta = at::empty({B, H, Q}, q.options().dtype(at::kFloat));
  const int64_t rows = B * H * Q;
  const dim3 grid_q(static_cast<unsigned int>((Q + kRows - 1) / kRows), static_cast<unsigned int>(H),
                    static_cast<unsigned int>(B));
  const dim3 grid_k(static_cast<unsigned int>((N + kTile - 1) / kTile), static_cast<unsigned int>(H),
                    static_cast<unsigned int>(B));
  M2F_DISPATCH_FLOAT_HALF_BF16(q.scalar_type(), "masked_attention_bwd", [&] {
    delta_kernel<scalar_t><<<warp_row_blocks(rows), kWarp * kFlagWarpsPerBlock, 0, stream>>>(
        grad_out.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), delta.data_ptr<float>(), rows,
        static_cast<int>(Dv));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    ma_bwd_dkdv_kernel<scalar_t><<<grid_k, kThreads, dkdv_smem(D, Dv), stream>>>(
        q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(), m,
        flags.data_ptr<int>(), lse.data_ptr<float>(), delta.data_ptr<float>(), dk.data_ptr<scalar_t>(),
        dv.data_ptr<scalar_t>(), H, Q, N, static_cast<int>(D), static_cast<int>(Dv), static_cast<float>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    ma_bwd_dq_kernel<scalar_t><<<grid_q, kThreads, dq_smem(D, Dv), stream>>>(
        q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(), m,
        flags.data_ptr<int>(), lse.data_ptr<float>(), delta.data_ptr<float>(), dq.data_ptr<scalar_t>(), H, Q, N,
        static_cast<int>(D), static_cast<int>(Dv), static_cast<float>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dq, dk, dv};
}

}  // namespace m2f_kernels
