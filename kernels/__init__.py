"""Triton (and CUDA, via kernels._C) kernels for video DiTs. Each op file holds the kernels, an
autograd.Function, and a pure-torch ``*_reference`` with the same signature."""
