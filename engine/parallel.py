"""Parallelism applied from outside the model, in small named functions (torchtitan style).

The model only has to expose its repeated blocks as ``model.blocks`` (an ``nn.ModuleList``). Order
matters and is fixed by :func:`parallelize`:

1. :func:`apply_ac`      activation checkpointing per block ("full": recompute the whole block;
                         "selective": keep matmul / attention outputs, recompute the cheap
                         element-wise and norm ops),
2. :func:`apply_compile` ``torch.compile`` per block (one graph per block; reused across blocks with the
                         same code, so compile time does not grow with depth),
3. :func:`apply_fsdp`    FSDP2 ``fully_shard`` per block, then on the root; parameters all-gathered in
                         ``param_dtype`` for compute, gradients reduced in ``reduce_dtype`` (fp32).

AC goes inside compile (so the compiled graph contains the recompute), and FSDP outermost so its
all-gather / reduce-scatter hooks wrap the compiled block.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from engine.config import ParallelConfig, PrecisionConfig
from engine.log import get_logger

log = get_logger("parallel")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Ops whose outputs selective AC keeps (expensive to recompute); everything else is recomputed.
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}


def model_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's repeated blocks; every parallelism function wraps these one by one."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(
            f"{type(model).__name__} has no 'blocks' nn.ModuleList (got {type(blocks).__name__}); "
            "the engine wraps each block for FSDP / AC / compile and needs model.blocks"
        )
    return blocks


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_ac(model: nn.Module, mode: str) -> nn.Module:
    """Wrap each block in activation checkpointing. ``mode``: "none" | "full" | "selective"."""
    if mode not in ("none", "full", "selective"):
        raise ValueError(
            f"parallel.activation_checkpointing {mode!r}: expected 'none', 'full' or 'selective'"
        )
    if mode == "none":
        return model
    blocks = model_blocks(model)
    for i, block in enumerate(blocks):
        if mode == "full":
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        else:
            ctx = partial(create_selective_checkpoint_contexts, _selective_policy)
            wrapped = checkpoint_wrapper(block, context_fn=ctx, preserve_rng_state=False)
        blocks[i] = wrapped
    log.info("activation checkpointing (%s) on %d blocks", mode, len(blocks))
    return model


def apply_compile(model: nn.Module, **compile_kwargs) -> nn.Module:
    """``torch.compile`` each block in place (``Module.compile`` keeps state-dict keys unchanged)."""
    blocks = model_blocks(model)
    for block in blocks:
        block.compile(**compile_kwargs)
    log.info("torch.compile on %d blocks", len(blocks))
    return model


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype = torch.bfloat16,
    reduce_dtype: torch.dtype = torch.float32,
    reshard_after_forward: bool = True,
    forward_methods: tuple[str, ...] = ("predict_velocity",),
) -> FSDPModule:
    """FSDP2 ``fully_shard`` on each block, then on the root module.

    A 2-D mesh (dp_replicate, dp_shard) gives HSDP: shard inside a group, all-reduce across groups.
    The last block is not resharded after forward: backward needs it first. ``forward_methods`` are
    entry points other than ``forward`` (e.g. ``predict_velocity``) that must also run FSDP's root
    all-gather hooks.
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    blocks = model_blocks(model)
    for i, block in enumerate(blocks):
        last = i == len(blocks) - 1
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward and not last)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    for name in forward_methods:
        if callable(getattr(model, name, None)):
            register_fsdp_forward_method(model, name)
    log.info(
        "FSDP2 over mesh %s: %d blocks + root, param %s, reduce %s",
        tuple(mesh.shape),
        len(blocks),
        param_dtype,
        reduce_dtype,
    )
    return model


def parallelize(
    model: nn.Module, pcfg: ParallelConfig, prec: PrecisionConfig, dp_mesh: DeviceMesh | None
) -> nn.Module:
    """AC, then per-block compile, then FSDP (when a data-parallel mesh of size > 1 is given)."""
    apply_ac(model, pcfg.activation_checkpointing)
    if pcfg.compile:
        apply_compile(model)
    if pcfg.fsdp and dp_mesh is not None and dp_mesh.size() > 1:
        apply_fsdp(
            model,
            dp_mesh,
            param_dtype=DTYPES[prec.param_dtype],
            reduce_dtype=DTYPES[prec.reduce_dtype],
            reshard_after_forward=pcfg.reshard_after_forward,
        )
    return model
