"""Precision: the bf16 compute policy and FP8 linear layers.

FP8 backends (``precision.fp8``):

- ``"none"``: linears stay in their dtype (bf16 compute comes from FSDP's MixedPrecisionPolicy, or
  from :func:`autocast` in single-process runs).
- ``"torchao"``: ``nn.Linear`` -> torchao ``Float8Linear`` (dynamic tensor-wise scales; forward in
  e4m3, gradients in e5m2). torch._scaled_mm needs inner dims that are multiples of 16; in backward
  the inner dim of grad_weight = grad_out^T @ x is the token count (Wan 480p x 81f = 32,760 is not a
  multiple of 16), so we set torchao's ``pad_inner_dim=True`` which pads that dim inside the matmul.
  torch._scaled_mm also runs on CPU (torch >= 2.7), so the same path trains in CPU tests.
- ``"te"``: ``nn.Linear`` -> ``transformer_engine.pytorch.Linear``, and the forward runs under
  :func:`fp8_context` (TE's fp8 autocast) with the recipe ``delayed`` | ``current`` | ``mxfp8``.
  TE is imported only when asked for; a missing TE, or one that fails to load its CUDA library
  (RuntimeError / OSError on import), becomes a clear error then.

Meta-device init (``model.meta_init``): the torchao conversion runs on the meta-built model, before
FSDP, and the weights read by rank 0 then load into the Float8Linear modules (same keys as nn.Linear);
tested bit-exact against a plain load on 2 gloo ranks, with AC, compile and HSDP. "te" with meta_init is
refused with an error naming both keys (TE's ``_extra_state`` is not in the weights rank 0 reads).

Which linears convert (:func:`fp8_filter`): only those inside ``model.blocks`` (the token-wise layers
where the FLOPs are; time/condition embedders fed one row per sample and the output head stay in high
precision), with in and out features multiples of 16 and >= ``fp8_min_features``, and whose name
contains none of ``fp8_skip``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.config import ModelConfig, PrecisionConfig
from engine.log import get_logger
from kernels.te_loader import import_te, te_autocast

log = get_logger("precision")


class FP8UnavailableError(RuntimeError):
    """The FP8 backend that the config asks for cannot be used here."""


def fp8_filter(model: nn.Module, prec: PrecisionConfig) -> Callable[[nn.Module, str], bool]:
    """``filter(module, fqn) -> bool``: True for the linears that should run in FP8: in a block, named by
    neither ``precision.fp8_skip`` nor the model's own ``fp8_skip`` (linears fed one row per sample), with
    sizes that are multiples of 16 and at least ``precision.fp8_min_features``."""
    blocks = getattr(model, "blocks", None)
    in_blocks = {id(m) for m in blocks.modules()} if isinstance(blocks, nn.Module) else None
    skip = (*prec.fp8_skip, *getattr(model, "fp8_skip", ()))

    def keep(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear):
            return False
        if in_blocks is not None and id(module) not in in_blocks:
            return False
        if any(s in fqn for s in skip):
            return False
        i, o = module.in_features, module.out_features
        return i % 16 == 0 and o % 16 == 0 and min(i, o) >= prec.fp8_min_features

    return keep


def _import_te() -> Any:
    try:
        te = import_te()
    except ImportError as e:
        raise FP8UnavailableError(
            f"precision.fp8 = 'te' needs Transformer Engine (pip install 'transformer-engine[pytorch]'): {e}"
        ) from e
    except (RuntimeError, OSError) as e:  # TE present but its CUDA library / driver failed to load
        raise FP8UnavailableError(f"precision.fp8 = 'te': Transformer Engine failed to load: {e}") from e
    return te


def te_recipe(name: str) -> Any:
    """The TE scaling recipe object for ``precision.fp8_recipe``."""
    _import_te()
    from transformer_engine.common import recipe

    if name == "delayed":
        return recipe.DelayedScaling()
    if name == "current":
        return recipe.Float8CurrentScaling()
    if name == "mxfp8":
        return recipe.MXFP8BlockScaling()
    raise ValueError(f"precision.fp8_recipe {name!r}: expected 'delayed', 'current' or 'mxfp8'")


@functools.cache
def _te_linear_class(te: Any) -> type:
    class TELinear(te.Linear):
        """``te.Linear`` that pads the rows of its input (the product of the leading dims) with zeros to a
        multiple of ``fp8_rows``: TE's FP8 GEMMs need a multiple of 8 rows in the forward and of 16 in
        the weight-gradient GEMM, where the rows are the inner dim (Wan 480p x 81f has 32,760 tokens:
        "lda % 16 == 0" failed in backward on an H200). Zero rows add nothing to the weight gradient and
        their outputs are dropped; the per-tensor amax is unchanged."""

        fp8_rows = 16

        def forward(self, inp: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            d = inp.shape[-1]
            rows = inp.numel() // max(d, 1)
            pad = -rows % self.fp8_rows
            if not pad:
                return super().forward(inp, *args, **kwargs)
            out = super().forward(F.pad(inp.reshape(rows, d), (0, 0, 0, pad)), *args, **kwargs)
            return out[:rows].reshape(*inp.shape[:-1], out.shape[-1])

    return TELinear


def is_te_module(module: nn.Module) -> bool:
    """A Transformer Engine module (or a subclass of one, as our TELinear)."""
    return any(c.__module__.startswith("transformer_engine") for c in type(module).__mro__)


def _swap_te_linears(model: nn.Module, keep: Callable[[nn.Module, str], bool], recipe: str) -> int:
    te = _import_te()
    cls = _te_linear_class(te)
    swaps = [(n, m) for n, m in model.named_modules() if keep(m, n)]
    for name, lin in swaps:
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        new = cls(
            lin.in_features,
            lin.out_features,
            bias=lin.bias is not None,
            params_dtype=lin.weight.dtype,
            device=lin.weight.device,
        )
        with torch.no_grad():
            new.weight.copy_(lin.weight)
            if lin.bias is not None:
                new.bias.copy_(lin.bias)
        new.weight.requires_grad_(lin.weight.requires_grad)
        new.fp8_rows = 32 if recipe == "mxfp8" else 16
        setattr(parent, name.rsplit(".", 1)[-1], new)
    return len(swaps)


def _convert_torchao(model: nn.Module, keep: Callable[[nn.Module, str], bool]) -> int:
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:
        raise FP8UnavailableError(
            f"precision.fp8 = 'torchao' needs torchao (pip install torchao): {e}"
        ) from e
    n = sum(1 for name, m in model.named_modules() if keep(m, name))
    convert_to_float8_training(model, module_filter_fn=keep, config=Float8LinearConfig(pad_inner_dim=True))
    return n


def apply_fp8(model: nn.Module, prec: PrecisionConfig) -> nn.Module:
    """Convert the model's eligible linears to the FP8 backend in ``prec.fp8`` (before FSDP/compile)."""
    if prec.fp8 == "none":
        return model
    if prec.fp8 == "te" and any(p.is_meta for p in model.parameters()):
        raise ValueError(
            "precision.fp8 = 'te' with model.meta_init = true is not supported: a TE Linear keeps its FP8 "
            "scaling state as an '_extra_state' entry of the state dict, which the weights that rank 0 "
            "reads do not hold, so engine.parallel.materialize cannot fill it (and TE on the meta device "
            "is untested here); set model.meta_init = false, or precision.fp8 = 'torchao' (works with "
            "meta_init)"
        )
    keep = fp8_filter(model, prec)
    total = sum(1 for m in model.modules() if isinstance(m, nn.Linear))  # before: a TE Linear is no nn.Linear
    if prec.fp8 == "te":
        n = _swap_te_linears(model, keep, prec.fp8_recipe)
    elif prec.fp8 == "torchao":
        n = _convert_torchao(model, keep)
    else:
        raise ValueError(f"precision.fp8 {prec.fp8!r}: expected 'none', 'te' or 'torchao'")
    log.info("fp8 (%s): %d linears converted, %d stay in high precision", prec.fp8, n, total - n)
    if n == 0:
        log.warning(
            "fp8 (%s) converted no linear (all below fp8_min_features=%d or skipped)",
            prec.fp8,
            prec.fp8_min_features,
        )
    return model


def fp8_context(prec: PrecisionConfig, group: Any = None) -> contextlib.AbstractContextManager:
    """The context the forward runs under: TE's fp8 autocast for "te", else a no-op.

    ``group``: the process group over which TE reduces amax statistics (the data-parallel ranks), so
    every rank uses the same scales; None in single-process runs.
    """
    if prec.fp8 != "te":
        return contextlib.nullcontext()
    # te_recipe raises FP8UnavailableError if TE is unusable
    return te_autocast(te_recipe(prec.fp8_recipe), group)


def autocast(device: torch.device, prec: PrecisionConfig, sharded: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast for unsharded runs; under FSDP2 the MixedPrecisionPolicy does the casting."""
    if sharded or prec.param_dtype == "float32":
        return contextlib.nullcontext()
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[prec.param_dtype]
    return torch.autocast(device_type=device.type, dtype=dtype)


def attention_precision_problem(
    model_cfg: ModelConfig, fp8_linears: str = "none", activation_checkpointing: str = "none"
) -> str | None:
    """Why ``model_cfg.attention_precision`` cannot run as asked (None if it can), given ``precision.fp8``
    and ``parallel.activation_checkpointing``: "fp8" with ``fp8_attention_backend`` "triton" is our FP8
    kernel, the FP8 mode of backend "triton", so it needs ``model.attention`` "triton" (the other backends
    would warn and run bf16); with "te" (cuDNN's FP8 attention through TE, a kernel of its own) any
    ``model.attention`` runs the rest, but not inside TE's activation checkpoint (TE linears and activation
    checkpointing): its recompute restores each TE module's FP8 scales from a queue filled in forward order,
    and backend "te" shares one module among the layers, so a block would be recomputed with another's."""
    if model_cfg.fp8_attention_backend not in ("triton", "te"):
        return (
            f"model.fp8_attention_backend: expected 'triton' or 'te', got {model_cfg.fp8_attention_backend!r}"
        )
    m = model_cfg
    te_attention = m.attention_precision == "fp8" and m.fp8_attention_backend == "te"
    if te_attention and fp8_linears == "te" and activation_checkpointing != "none":
        return (
            "model.fp8_attention_backend 'te' with precision.fp8 'te' and parallel.activation_checkpointing "
            f"{activation_checkpointing!r} is not supported (TE's checkpoint would recompute a block with another "
            "layer's FP8 attention scales); set --parallel.activation_checkpointing none, --precision.fp8 "
            "torchao, or --model.fp8_attention_backend triton"
        )
    if m.attention_precision == "fp8" and m.fp8_attention_backend == "triton" and m.attention != "triton":
        return (
            "model.attention_precision 'fp8' runs our FP8 kernel: it needs model.attention 'triton', "
            f"got {model_cfg.attention!r} (set --model.attention triton, or --model.fp8_attention_backend te "
            "for cuDNN's FP8 attention through Transformer Engine)"
        )
    return None


def apply_attention_precision(model: nn.Module, model_cfg: ModelConfig) -> nn.Module:
    """Set ``attention_precision`` ("bf16" | "fp8", kernels.attention) and ``fp8_backend`` ("te" for
    ``model_cfg.fp8_attention_backend`` "te": the "fp8" blocks' attention runs there; else None, the FP8 mode
    of the module's own backend) on the attention modules of each of ``model.blocks``; blocks listed in
    ``model_cfg.fp8_attention_skip_blocks`` (negative = from the end, e.g. [0, -1] keeps the first and last
    blocks) stay "bf16". Composable with :func:`apply_fp8`."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"apply_attention_precision: {type(model).__name__} has no ModuleList 'blocks'")
    n = len(blocks)
    bad = [i for i in model_cfg.fp8_attention_skip_blocks if not -n <= i < n]
    if bad:
        raise ValueError(f"model.fp8_attention_skip_blocks {bad}: out of range for {n} blocks")
    skip = {i % n for i in model_cfg.fp8_attention_skip_blocks}
    for i, block in enumerate(blocks):
        prec = "bf16" if i in skip else model_cfg.attention_precision
        for m in block.modules():
            if hasattr(m, "attention_precision"):
                m.attention_precision = prec
                # "triton": the FP8 mode of the module's own backend (the trainer checks that it is "triton")
                m.fp8_backend = "te" if model_cfg.fp8_attention_backend == "te" else None
    if model_cfg.attention_precision == "fp8":
        log.info("fp8 attention (%s) in %d of %d blocks (kept bf16: %s)", model_cfg.fp8_attention_backend,
                 n - len(skip), n, sorted(skip))  # fmt: skip
    return model
