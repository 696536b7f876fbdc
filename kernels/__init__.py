"""Triton (and CUDA, via kernels._C) kernels for video DiTs. Each op file holds the kernels, their launches
as torch custom ops (``wmsd::*``, so torch.compile keeps them whole) with autograd registered on them,
and a pure-torch ``*_reference`` with the same signature."""
