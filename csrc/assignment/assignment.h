// Batched linear sum assignment (the Hungarian matcher's solver) on CUDA: host entry point
// of the `cuda` backend of m2f_kernels.linear_sum_assignment.
//
// Contract (m2f_kernels/reference/assignment.py is the spec): cost [B, Q, T] fp32 / fp64 /
// fp16 / bf16 (any strides; non-contiguous costs are copied), num_targets [B] integer (the
// valid target columns of each matrix, clamped to [0, T]), both on one CUDA device.
// Returns [B, T] int64: the query matched to each target, -1 on padding columns and on the
// targets left unmatched when a matrix has more valid targets than queries. Minimal total
// cost (scipy's optimum; ties may pick another); +inf / NaN -> +P and -inf -> -P with
// P = (2 min(T_b, Q) + 1) * max finite |cost| (1 when that is 0), as the reference.
// One kernel launch, no host sync, no work space beyond the output.
#pragma once

#include <ATen/core/Tensor.h>

namespace m2f_kernels {

at::Tensor linear_sum_assignment(const at::Tensor& cost, const at::Tensor& num_targets);

}  // namespace m2f_kernels
