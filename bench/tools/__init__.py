"""Developer tools that need no GPU: ahead-of-time dumps of the compiled kernels.

- ``python -m bench.tools.triton_aot_dump dump|diff``: PTX, SASS and resources of every
  Triton kernel launch, compiled for sm_90a / sm_80 without a GPU.
- ``bash bench/tools/cuda_sass_dump.sh OUT | --diff A B``: SASS and resources of every
  CUDA kernel of csrc/, compiled as the CI compile check does.
"""
