// Host-side dtype dispatch shared by the CUDA kernels' launch code.
#pragma once

#include <ATen/Dispatch.h>

// Runs the lambda with scalar_t = float, at::Half or at::BFloat16 (the three dtypes the
// kernels take); any other dtype is a c10::Error naming NAME.
#define M2F_DISPATCH_FLOAT_HALF_BF16(TYPE, NAME, ...)                   \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                        \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))
