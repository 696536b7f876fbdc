"""Triton (and CUDA, via kernels._C) kernels for video DiTs. Each op file holds the kernels, the launcher,
and a pure-torch ``*_reference`` with the same signature. The ops a training step runs inside a model
block (attention, FP8 attention, RoPE, adaLN, gated residual) are torch custom ops (``wmsd::*``) with their
autograd registered, so torch.compile keeps them whole; the sampler step and qk_norm_rope (sampling and
inference code, outside compiled blocks) are plain launchers."""
