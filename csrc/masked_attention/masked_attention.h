// Masked cross-attention (Mask2Former decoder) on CUDA: host entry points.
//
// Shapes (docs/ops.md): q [B, H, Q, D], k [B, H, N, D], v [B, H, N, Dv], D and Dv <= 128;
// mask [B, Q, N] (shared by the heads, read with head stride 0) or [B, H, Q, N], any
// strides: bool / uint8 (non-zero = blocked) or floating logits (blocked where < 0, NaN
// visible). A row whose keys are all blocked attends to all keys (the empty-row rule).
// q, k, v (and grad_out, out, lse) contiguous on one CUDA device, fp32 / fp16 / bf16
// (the Python side of the `cuda` backend makes them so). Everything accumulates in fp32.
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>

namespace m2f_kernels {

// (out [B, H, Q, Dv] in q's dtype, lse [B, H, Q] float32: natural-log log-sum-exp of the
// scaled scores over the keys the row uses).
std::tuple<at::Tensor, at::Tensor> masked_attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& v, const at::Tensor& mask,
                                                        double scale);

// (dq, dk, dv) shaped and typed like q, k, v. Deterministic (no atomics).
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& mask, const at::Tensor& out, const at::Tensor& lse, double scale);

}  // namespace m2f_kernels
