"""python -m tests.cuda_emulation: build the emulated CUDA kernels and print the library's path."""
from . import build

print(build(verbose=True))
