"""Triton (and CUDA, via kernels._C) kernels for video DiTs. Each op file holds the kernels, the launcher,
and a pure-torch ``*_reference`` with the same signature. The ops a training step runs inside a model
block (attention, FP8 attention, RoPE, adaLN, gated residual) are torch custom ops (``wmsd::*``) with their
autograd registered, so torch.compile keeps them whole; the sampler step and qk_norm_rope (sampling and
inference code, outside compiled blocks) are plain launchers.

Importing the package installs kernels.te_loader's import hook: whoever imports Transformer Engine (our FP8
backends, or accelerate / peft under diffusers) gets it loaded against torch's cuDNN."""

from kernels.te_loader import install_import_hook

install_import_hook()


def no_double_backward(op, what: str, hint: str) -> None:
    """Register the autograd of a backward custom op: a clear error on a second derivative (torch's own error
    named the internal op and asked for register_autograd). ``what`` names the function, ``hint`` the way out."""

    def backward(ctx, *grads):
        raise RuntimeError(f"{what}: no double backward (its backward is not differentiable); {hint}")

    op.register_autograd(backward)
