// Operator registration of the m2f_kernels CUDA extension.
//
// Schemas live in the `m2f_kernels_C` namespace (torch.ops.m2f_kernels_C.*) with CUDA
// implementations; the Python side of the `cuda` backend (m2f_kernels/cuda) calls them.
// Built as the Python extension m2f_kernels._C (setup.py defines TORCH_EXTENSION_NAME)
// it also exposes module-level helpers through pybind11; built by CMake for C++ users
// it is a plain library whose static initialisers register the ops.
#include <torch/library.h>

#include "assignment/assignment.h"
#include "ms_deform_attn/ms_deform_attn.h"
#include "masked_attention/masked_attention.h"
#include "point_loss/point_loss.h"

TORCH_LIBRARY_FRAGMENT(m2f_kernels_C, m) {
  m.def(
      "ms_deform_attn_fwd(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, bool softmax=False) -> Tensor");
  m.def(
      "ms_deform_attn_bwd(Tensor grad_out, Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, bool softmax=False, bool deterministic=False) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("masked_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> (Tensor, Tensor)");
  m.def(
      "masked_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor mask, Tensor out, "
      "Tensor lse, float scale) -> (Tensor, Tensor, Tensor)");
  m.def("point_sample_fwd(Tensor input, Tensor coords) -> Tensor");
  m.def("point_sample_bwd(Tensor grad_out, Tensor input, Tensor coords) -> Tensor");
  m.def("uncertain_point_coords(Tensor logits, Tensor candidates, Tensor random, int num_uncertain) -> Tensor");
  m.def(
      "point_mask_loss_fwd(Tensor pred, Tensor target, Tensor coords, float num_masks, Tensor? batch_index, "
      "Tensor? query_index, Tensor? weight) -> (Tensor, Tensor)");
  m.def(
      "point_mask_loss_bwd(Tensor grad_bce, Tensor grad_dice, Tensor pred, Tensor target, Tensor coords, "
      "float num_masks, Tensor? batch_index, Tensor? query_index, Tensor? weight) -> Tensor");
  m.def("pairwise_mask_cost(Tensor pred, Tensor target, Tensor coords) -> (Tensor, Tensor)");
  m.def("linear_sum_assignment(Tensor cost, Tensor num_targets) -> Tensor");
}

TORCH_LIBRARY_IMPL(m2f_kernels_C, CUDA, m) {
  m.impl("ms_deform_attn_fwd", &m2f_kernels::ms_deform_attn_fwd);
  m.impl("ms_deform_attn_bwd", &m2f_kernels::ms_deform_attn_bwd);
  m.impl("masked_attention_fwd", &m2f_kernels::masked_attention_fwd);
  m.impl("masked_attention_bwd", &m2f_kernels::masked_attention_bwd);
  m.impl("point_sample_fwd", &m2f_kernels::point_sample_fwd);
  m.impl("point_sample_bwd", &m2f_kernels::point_sample_bwd);
  m.impl("uncertain_point_coords", &m2f_kernels::uncertain_point_coords);
  m.impl("point_mask_loss_fwd", &m2f_kernels::point_mask_loss_fwd);
  m.impl("point_mask_loss_bwd", &m2f_kernels::point_mask_loss_bwd);
  m.impl("pairwise_mask_cost", &m2f_kernels::pairwise_mask_cost);
  m.impl("linear_sum_assignment", &m2f_kernels::linear_sum_assignment);
}

#ifdef TORCH_EXTENSION_NAME
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("compiled_archs", &m2f_kernels::compiled_archs,
        "The GPU architectures the kernels were compiled for, e.g. 'sm_80,sm_90'.");
}
#endif
