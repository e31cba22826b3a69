"""The m2f_kernels benchmark suite: ``pytest bench/ --benchmark`` (see bench/README.md)."""
