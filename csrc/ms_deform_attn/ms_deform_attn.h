// Multi-scale deformable attention (MSDeformAttn) on CUDA: host entry points.
//
// Shapes (docs/ops.md): value [B, S, H, D]; spatial_shapes [L, 2] int64 (H_l, W_l);
// level_start_index [L] int64; sampling_locations [B, Lq, H, L, P, 2] as (x, y) in
// [0, 1]; attention_weights [B, Lq, H, L, P] (logits over the L*P entries when
// `softmax`); out [B, Lq, H*D]. value is fp32/fp16/bf16; locations and weights are
// float32 or value's dtype. All tensors contiguous and on one CUDA device (the Python
// side of the `cuda` backend makes them so).
#pragma once

#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace m2f_kernels {

// out [B, Lq, H*D] in value's dtype (fp32 accumulation).
at::Tensor ms_deform_attn_fwd(const at::Tensor& value, const at::Tensor& spatial_shapes,
                              const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                              const at::Tensor& attention_weights, bool softmax);

// (grad_value, grad_sampling_locations, grad_attention_weights) in the inputs' dtypes.
// With `softmax` the weight gradient is with respect to the logits. `deterministic`
// accumulates grad_value in int64 fixed point, so it is bitwise repeatable.
std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_bwd(
    const at::Tensor& grad_out, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights, bool softmax, bool deterministic);

// The GPU architectures the device code was compiled for, e.g. "sm_80,sm_90".
std::string compiled_archs();

}  // namespace m2f_kernels
