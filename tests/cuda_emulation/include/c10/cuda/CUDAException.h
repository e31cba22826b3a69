// cuda emulation (tests/cuda_emulation): the emulated runtime raises its own errors.
#pragma once

#define C10_CUDA_CHECK(EXPR) \
  do {                       \
    (void)(EXPR);            \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
