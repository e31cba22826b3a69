// Batched linear sum assignment: one thread block per cost matrix, shortest augmenting
// paths with dual variables (Jonker-Volgenant as in Crouse 2016, the algorithm of
// scipy.optimize.linear_sum_assignment and of m2f_kernels/reference/assignment.py).
//
// Orientation: the algorithm augments every row of a matrix with no more rows than
// columns. With T_b = num_targets[b]: T_b <= Q -> rows = the T_b targets, columns = the Q
// queries (element (i, j) = cost[b, j, i]); T_b > Q -> rows = the Q queries, columns = the
// T_b targets (element (i, j) = cost[b, i, j]). Entries are read from global memory (L1/L2
// resident: a matrix is at most a few hundred KB) and sanitised on the fly: +inf / NaN ->
// +P, -inf -> -P (P from one pass over the matrix first).
//
// State in shared memory: duals u [rows] and v [cols], shortest path costs spc [cols], the
// predecessor row path [cols], the matching row4col [cols] / col4row [rows], a scanned flag
// [cols]. Everything that decides the result is fp64 (duals, path costs, P): fp32 costs are
// exact in fp64, the arithmetic is the reference's and scipy's operation for operation, so
// the optimum is the same to rounding; fp32 duals would accumulate rounding over up to
// min(Q, T) augmentations and could mis-order near ties by more than 1e-6 of the total, and
// could not hold P next to the finite costs.
//
// Ownership (what makes one barrier per search step enough): column j belongs to thread
// j % blockDim.x, which alone reads and writes spc[j], path[j], scanned[j] and v[j] during a
// row's search and dual update. All threads read u[i] (the current row's dual) and
// row4col[] during the search; u and row4col change only in the dual update (u, each row by
// the owner of its matched column, u[cur] by thread 0) and the path flip (thread 0), which
// sit between barriers. Each search step ends with a block argmin: a lexicographic
// (spc, free column first, lowest index) warp butterfly, one slot per warp in shared memory,
// one __syncthreads, then every thread folds the slots in the same order, so all threads
// take the same column and leave the search at the same step. The slots alternate between
// two buffers: a thread can only write a buffer again after the next barrier, which every
// thread reaches only after it has read the previous one.
#include "assignment/assignment.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common/warp.cuh"

namespace m2f_kernels {
namespace {

constexpr int kMaxThreads = 256;
constexpr int kMaxWarps = kMaxThreads / kWarp;
// Argmin code of a column: its index, + kMatched when a row holds it (free columns first).
constexpr int kMatched = 1 << 20;
constexpr int kMaxSide = kMatched;  // max(Q, T) must stay below kMatched
constexpr int kNoColumn = INT_MAX;
// The per-warp argmin slots (static shared memory beside the dynamic arrays).
constexpr size_t kSlotBytes = 2 * kMaxWarps * (sizeof(double) + sizeof(int));

template <typename scalar_t>
__device__ __forceinline__ double load_cost(const scalar_t* p, int64_t k) {
  return static_cast<double>(static_cast<float>(p[k]));
}

template <>
__device__ __forceinline__ double load_cost<double>(const double* p, int64_t k) {
  return p[k];
}

// +inf / NaN -> +P, -inf -> -P, finite values unchanged.
__device__ __forceinline__ double sanitize(double x, double p) {
  if (isfinite(x)) return x;
  return (x == -INFINITY) ? -p : p;
}

__device__ __forceinline__ double warp_max_f64(double x) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) x = fmax(x, __shfl_xor_sync(kFullMask, x, o));
  return x;
}

// (val, code) lexicographic minimum over the warp; every lane gets it.
__device__ __forceinline__ void warp_argmin(double& val, int& code) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const double ov = __shfl_xor_sync(kFullMask, val, o);
    const int oc = __shfl_xor_sync(kFullMask, code, o);
    if (ov < val || (ov == val && oc < code)) {
      val = ov;
      code = oc;
    }
  }
}

// Dynamic shared memory of one block: doubles first (8-byte aligned), then ints, then bytes.
__host__ __device__ inline size_t shared_bytes(int rows, int cols) {
  return sizeof(double) * (2 * static_cast<size_t>(cols) + rows) + sizeof(int) * (2 * static_cast<size_t>(cols) + rows) +
         static_cast<size_t>(cols);
}

// cost [B, Q, T] contiguous; num_targets [B]; out [B, T] (every element written).
// R = min(Q, T) and C = max(Q, T) bound each matrix's rows and columns (shared arrays).
template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreads)
lsa_kernel(const scalar_t* __restrict__ cost, const int64_t* __restrict__ num_targets, int64_t* __restrict__ out,
           int Q, int T, int R, int C) {
  extern __shared__ __align__(16) unsigned char smem[];
  double* v = reinterpret_cast<double*>(smem);  // [C] column duals
  double* spc = v + C;                          // [C] shortest path costs (owner only)
  double* u = spc + C;                          // [R] row duals
  int* path = reinterpret_cast<int*>(u + R);    // [C] predecessor row (owner writes)
  int* row4col = path + C;                      // [C] row matched to a column, -1 free
  int* col4row = row4col + C;                   // [R] column matched to a row, -1 free
  unsigned char* scanned = reinterpret_cast<unsigned char*>(col4row + R);  // [C] (owner only)
  __shared__ double slot_val[2][kMaxWarps];
  __shared__ int slot_code[2][kMaxWarps];

  const int b = blockIdx.x;
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  const int nthreads = blockDim.x, nwarps = nthreads / kWarp;
  const scalar_t* c = cost + static_cast<int64_t>(b) * Q * T;
  int64_t* o = out + static_cast<int64_t>(b) * T;

  const int64_t nt64 = num_targets[b];
  const int nt = static_cast<int>(nt64 < 0 ? 0 : (nt64 > T ? T : nt64));
  const bool flipped = nt > Q;             // rows = queries, columns = targets
  const int nr = flipped ? Q : nt;         // rows to augment (= pairs matched)
  const int nc = flipped ? nt : Q;         // valid columns
  // Element (i, j) of the oriented matrix sits at c[i * rs + j * cs].
  const int64_t rs = flipped ? T : 1, cs = flipped ? 1 : T;

  // P = (2 nr + 1) * max finite |cost| over the valid entries (1 when that is 0).
  // One warp per query row, the lanes along its valid targets (coalesced).
  double f = 0.0;
  for (int q = warp; q < Q; q += nwarps) {
    for (int t = lane; t < nt; t += kWarp) {
      const double x = load_cost(c, static_cast<int64_t>(q) * T + t);
      if (isfinite(x)) f = fmax(f, fabs(x));
    }
  }
  f = warp_max_f64(f);
  if (lane == 0) slot_val[0][warp] = f;
  for (int j = tid; j < nc; j += nthreads) {
    v[j] = 0.0;
    row4col[j] = -1;
  }
  for (int i = tid; i < nr; i += nthreads) {
    u[i] = 0.0;
    col4row[i] = -1;
  }
  __syncthreads();
  f = slot_val[0][0];
  for (int w = 1; w < nwarps; ++w) f = fmax(f, slot_val[0][w]);
  const double p = f > 0.0 ? static_cast<double>(2 * nr + 1) * f : 1.0;
  // slot buffer 0 is read above until the first search step's barrier: that step writes 1.
  int buf = 1;

  for (int cur = 0; cur < nr; ++cur) {
    for (int j = tid; j < nc; j += nthreads) {
      spc[j] = INFINITY;
      scanned[j] = 0;
    }
    // Dijkstra from row `cur` over reduced costs; ends at the first free column (sink).
    // Each non-final step reaches a matched row (at most cur of them): cur + 1 steps.
    int i = cur, sink = -1;
    double min_val = 0.0;
    for (int step = 0; step <= cur; ++step) {
      const double offset = min_val - u[i];
      const scalar_t* row = c + i * rs;
      double best = INFINITY;
      int best_code = kNoColumn;
      for (int j = tid; j < nc; j += nthreads) {
        if (scanned[j]) continue;
        const double r = (sanitize(load_cost(row, j * cs), p) - v[j]) + offset;
        if (r < spc[j]) {
          spc[j] = r;
          path[j] = i;
        }
        const double s = spc[j];
        const int code = j + (row4col[j] >= 0 ? kMatched : 0);
        if (s < best || (s == best && code < best_code)) {
          best = s;
          best_code = code;
        }
      }
      warp_argmin(best, best_code);
      if (lane == 0) {
        slot_val[buf][warp] = best;
        slot_code[buf][warp] = best_code;
      }
      __syncthreads();
      best = slot_val[buf][0];
      best_code = slot_code[buf][0];
      for (int w = 1; w < nwarps; ++w) {
        const double ov = slot_val[buf][w];
        const int oc = slot_code[buf][w];
        if (ov < best || (ov == best && oc < best_code)) {
          best = ov;
          best_code = oc;
        }
      }
      buf ^= 1;
      if (best_code == kNoColumn) break;  // no column left: unreachable for nr <= nc
      const int j = best_code & (kMatched - 1);
      min_val = best;
      if (j % nthreads == tid) scanned[j] = 1;
      const int owner = row4col[j];
      if (owner < 0) {
        sink = j;
        break;
      }
      i = owner;
    }

    // Duals: u[cur] += min_val; each scanned column j: delta = min_val - spc[j],
    // v[j] -= delta, and its matched row u += delta (the sink is free, its delta is 0).
    for (int j = tid; j < nc; j += nthreads) {
      if (!scanned[j]) continue;
      const double delta = min_val - spc[j];
      v[j] -= delta;
      const int r = row4col[j];
      if (r >= 0) u[r] += delta;
    }
    if (tid == 0) u[cur] += min_val;
    __syncthreads();  // path[], the duals and every read of row4col[] are done

    // Flip the matches along the path sink -> ... -> cur (at most cur + 1 columns).
    if (tid == 0 && sink >= 0) {
      int j = sink;
      for (int s = 0; s <= cur; ++s) {
        const int pi = path[j];
        row4col[j] = pi;
        const int prev = col4row[pi];
        col4row[pi] = j;
        if (pi == cur) break;
        j = prev;
      }
    }
    __syncthreads();  // the new matching is visible to the next row's search
  }

  for (int t = tid; t < T; t += nthreads) {
    int64_t q = -1;
    if (flipped) {
      if (t < nc) q = row4col[t];
    } else if (t < nr) {
      q = col4row[t];
    }
    o[t] = q;
  }
}

void check_cuda(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), "linear_sum_assignment: ", name,
              " must be a CUDA tensor on ", like.device(), ", got ", t.device());
}

}  // namespace

at::Tensor linear_sum_assignment(const at::Tensor& cost, const at::Tensor& num_targets) {
  check_cuda(cost, cost, "cost");
  check_cuda(num_targets, cost, "num_targets");
  TORCH_CHECK(cost.dim() == 3, "linear_sum_assignment: cost must be [B, Q, T], got ", cost.sizes());
  const auto st = cost.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "linear_sum_assignment: cost must be float32, float64, float16 or bfloat16, got ", st);
  const int64_t B = cost.size(0), Q = cost.size(1), T = cost.size(2);
  TORCH_CHECK(num_targets.dim() == 1 && num_targets.size(0) == B, "linear_sum_assignment: num_targets must be [B] = [",
              B, "], got ", num_targets.sizes());
  TORCH_CHECK(!at::isFloatingType(num_targets.scalar_type()) && num_targets.scalar_type() != at::kBool,
              "linear_sum_assignment: num_targets must be an integer tensor, got ", num_targets.scalar_type());
  const c10::cuda::CUDAGuard guard(cost.device());
  if (B == 0 || Q == 0 || T == 0) return at::full({B, T}, -1, cost.options().dtype(at::kLong));
  TORCH_CHECK(Q < kMaxSide && T < kMaxSide, "linear_sum_assignment: Q and T must be below ", kMaxSide, ", got Q = ",
              Q, ", T = ", T);
  TORCH_CHECK(B <= INT_MAX, "linear_sum_assignment: too many matrices: ", B);
  const int R = static_cast<int>(std::min(Q, T)), C = static_cast<int>(std::max(Q, T));
  const size_t smem = shared_bytes(R, C);
  int smem_optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, cost.get_device()));
  TORCH_CHECK(smem + kSlotBytes <= static_cast<size_t>(smem_optin), "linear_sum_assignment: Q = ", Q, ", T = ", T,
              " need ", smem + kSlotBytes, " bytes of shared memory per block, the device has ", smem_optin);
  const int threads = std::min(kMaxThreads, std::max(kWarp, (C + kWarp - 1) / kWarp * kWarp));

  const at::Tensor c = cost.contiguous();
  const at::Tensor nt = num_targets.to(at::kLong).contiguous();
  at::Tensor out = at::empty({B, T}, cost.options().dtype(at::kLong));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "linear_sum_assignment", [&] {
    if (smem + kSlotBytes > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(lsa_kernel<scalar_t>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem)));
    }
    lsa_kernel<scalar_t><<<static_cast<unsigned>(B), threads, smem, stream>>>(
        c.data_ptr<scalar_t>(), nt.data_ptr<int64_t>(), out.data_ptr<int64_t>(), static_cast<int>(Q),
        static_cast<int>(T), R, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace m2f_kernels
