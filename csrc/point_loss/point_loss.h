// Point-sampled mask loss on CUDA: host entry points (the `cuda` backend of point_sample,
// uncertain_point_coords, point_mask_loss and pairwise_mask_cost).
//
// Coordinates are (x, y) in [0, 1], sampled bilinearly with zero padding in the
// grid_sample(align_corners=False) convention (pixel = coord * size - 0.5). Maps
// (input / logits / pred / target) are read through their strides, so they need not be
// contiguous; pred and floating maps are fp32/fp16/bf16 (fp64 also compiles), targets may
// also be bool or uint8 (read as bytes). Coordinates are read as float32 (converted
// when given otherwise). Everything accumulates in fp32. All tensors on one CUDA device.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace m2f_kernels {

// input [N, C, H, W] floating, or bool / uint8 0/1 maps; coords [N, P, 2] -> [N, C, P]
// contiguous, in input's dtype (float32 for bool / uint8).
at::Tensor point_sample_fwd(const at::Tensor& input, const at::Tensor& coords);

// grad_out [N, C, P] -> grad_input [N, C, H, W] contiguous, in input's dtype
// (fp32 atomic scatter, then one cast).
at::Tensor point_sample_bwd(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& coords);

// logits [N, H, W]; candidates [N, S, 2]; random [N, R, 2] -> [N, num_uncertain + R, 2] in
// candidates' dtype: the num_uncertain candidates of largest -|logit| (at::topk order),
// then the random points.
at::Tensor uncertain_point_coords(const at::Tensor& logits, const at::Tensor& candidates, const at::Tensor& random,
                                  int64_t num_uncertain);

// pred [N, Hp, Wp], or [B, Q, Hp, Wp] with batch_index / query_index [N] int64;
// target [N, Ht, Wt]; coords [N, P, 2]; weight [N] float32 contiguous or none (ones): a
// factor on each mask's two terms. (loss_bce, loss_dice): 0-dim float32.
// Deterministic: per-block partial sums, then fixed-order finishes (no float atomics).
std::tuple<at::Tensor, at::Tensor> point_mask_loss_fwd(const at::Tensor& pred, const at::Tensor& target,
                                                       const at::Tensor& coords, double num_masks,
                                                       const std::optional<at::Tensor>& batch_index,
                                                       const std::optional<at::Tensor>& query_index,
                                                       const std::optional<at::Tensor>& weight);

// grad_bce, grad_dice: 0-dim (any floating dtype). grad_pred shaped like pred, contiguous,
// in pred's dtype (fp32 atomic scatter, then one cast).
at::Tensor point_mask_loss_bwd(const at::Tensor& grad_bce, const at::Tensor& grad_dice, const at::Tensor& pred,
                               const at::Tensor& target, const at::Tensor& coords, double num_masks,
                               const std::optional<at::Tensor>& batch_index,
                               const std::optional<at::Tensor>& query_index,
                               const std::optional<at::Tensor>& weight);

// pred [Q, Hp, Wp], target [T, Ht, Wt], coords [P, 2] -> (cost_bce [Q, T], cost_dice [Q, T])
// float32: the matcher's batch_sigmoid_ce_loss / P and batch_dice_loss.
std::tuple<at::Tensor, at::Tensor> pairwise_mask_cost(const at::Tensor& pred, const at::Tensor& target,
                                                      const at::Tensor& coords);

}  // namespace m2f_kernels
