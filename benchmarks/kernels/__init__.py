"""Kernel benchmarks: our Triton and CUDA ops against each other and their anchors, on one GPU."""
