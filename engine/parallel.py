"""Parallelism applied from outside the model, in small named functions (torchtitan style).

The model only has to expose its repeated blocks as ``model.blocks`` (an ``nn.ModuleList``). Order
matters and is fixed by :func:`parallelize`:

0. :func:`apply_sp`      Ulysses sequence parallelism when ``parallel.cp`` > 1 (the model splits each
                         sample's tokens over the cp ranks: models/sp.py); FSDP then shards over
                         ``DistInfo.fsdp_mesh``, which folds the cp ranks into the shard dimension,
1. :func:`apply_ac`      activation checkpointing per block ("full": recompute the whole block;
                         "selective": keep matmul / attention outputs, recompute the cheap
                         element-wise and norm ops; blocks with Transformer Engine linears use TE's
                         checkpoint, whose recompute runs under the forward's FP8 recipe),
2. :func:`apply_compile` ``torch.compile`` per block (one graph per block; reused across blocks with the
                         same code, so compile time does not grow with depth),
3. :func:`apply_fsdp`    FSDP2 ``fully_shard`` per block, then on the root; parameters all-gathered in
                         ``param_dtype`` for compute, gradients reduced in ``reduce_dtype`` (fp32).

AC goes inside compile (so the compiled graph contains the recompute), and FSDP outermost so its
all-gather / reduce-scatter hooks wrap the compiled block.

Meta-device initialisation (``model.meta_init``, torchtitan's way): a model built under
``torch.device("meta")`` holds no memory; it is parallelised as above, then :func:`materialize`
allocates only this rank's shards (``to_empty``) and fills them, either from a full state dict that
only rank 0 reads (:func:`defer_weights` names the reader; the values are broadcast into every
rank's shards) or by random initialisation (:func:`init_weights`). A 14B model then needs one full
copy of the weights in host memory (rank 0's), not one per rank. It composes with torchao FP8 (converted
on meta), both AC modes, per-block compile and HSDP: tests/test_meta_init.py checks each against the
plain load on 2 gloo ranks. A model that is not sharded (evaluate / demonstrate) is materialised the same
way, every rank receiving the full tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from itertools import chain

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

import kernels.attention  # noqa: F401  (registers the wmsd:: attention ops named in _SAVE_OPS)
import kernels.attention_fp8  # noqa: F401
from engine.config import ParallelConfig, PrecisionConfig
from engine.dist import collective
from engine.log import get_logger
from engine.precision import is_te_module

log = get_logger("parallel")
# FSDP2 reduce-scatters a parameter that one rank's backward left without a gradient as zeros there, so the
# ranks' collectives match (torch 2.11's FSDP2 has no such switch: they mismatch and the run aborts)
FSDP_ZEROS_UNUSED_GRADS = hasattr(FSDPModule, "set_reduce_scatter_unused_params")
_WARNED_UNUSED_GRADS: list = []  # non-empty once apply_fsdp warned that it is missing

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Ops whose outputs selective AC keeps (expensive to recompute); everything else is recomputed. Our
# attention kernels are custom ops (kernels.attention, kernels.attention_fp8) and count as attention.
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    # SDPA's CPU kernel: without it a CPU run's selective AC recomputed every attention, as full AC does
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.wmsd.attention_fwd.default,
    torch.ops.wmsd.attention_fp8_fwd.default,
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


def _te_checkpoint(block: nn.Module) -> Callable | None:
    """Transformer Engine's checkpoint for a block holding TE modules (precision.fp8 = "te"), else None.

    The backward recomputes a checkpointed block outside the forward's ``te.autocast``: torch's checkpoint
    would rerun TE's linears without FP8, save tensors unlike the forward's and fail its metadata check;
    TE's non-reentrant checkpoint re-enters the autocast with the forward's recipe for the recompute."""
    if not any(is_te_module(m) for m in block.modules()):
        return None
    from transformer_engine.pytorch.distributed import checkpoint

    return checkpoint


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
        kw = (
            {}
            if mode == "full"
            else {"context_fn": partial(create_selective_checkpoint_contexts, _selective_policy)}
        )
        te_checkpoint = _te_checkpoint(block)
        if te_checkpoint is None:
            blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False, **kw)
        else:
            blocks[i] = checkpoint_wrapper(block, checkpoint_fn=te_checkpoint, use_reentrant=False, **kw)
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
    all-gather hooks. A model with ``casts_own_inputs`` (models/layers.py DiffusersInterop) gets its forward
    inputs as given: FSDP2 would cast every floating input to ``param_dtype``, the timestep (t = 0.99 to steps
    of 2^-8 in bf16) and the RoPE tables included. A parameter without a gradient on some rank (a branch its
    batch did not use) is reduce-scattered as zeros, so the ranks' reduce-scatters match (FSDP2's default
    leaves it out on that rank only: mismatched collectives); one that no rank used then gets a zero gradient.
    Needs a torch whose FSDP2 has ``set_reduce_scatter_unused_params`` (:data:`FSDP_ZEROS_UNUSED_GRADS`; a
    warning says so otherwise).
    """
    cast = not getattr(model, "casts_own_inputs", False)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=cast)
    blocks = model_blocks(model)
    for i, block in enumerate(blocks):
        last = i == len(blocks) - 1
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward and not last)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    if FSDP_ZEROS_UNUSED_GRADS:  # recurses into the blocks
        model.set_reduce_scatter_unused_params(True)
    elif not _WARNED_UNUSED_GRADS and (not dist.is_initialized() or dist.get_rank() == 0):
        _WARNED_UNUSED_GRADS.append(True)  # once per run (it was once per rank and per model)
        log.warning(
            "this torch's FSDP2 (%s) has no set_reduce_scatter_unused_params: a parameter that gets no gradient "
            "on some ranks only (a branch one rank's batch did not use) aborts the run in the reduce-scatter; "
            "keep every branch in every rank's graph, or use a torch that has it (2.13 does, 2.11 does not) or "
            "parallel.fsdp = false",
            torch.__version__,
        )
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


def apply_sp(model: nn.Module, cp_mesh: DeviceMesh) -> nn.Module:
    """Ulysses sequence parallelism over ``cp_mesh`` (``parallel.cp`` ranks): the model splits every
    sample's tokens over them and all-to-alls around self-attention (models/sp.py). The model must offer
    ``set_sequence_parallel(group)`` (WanModel and HunyuanVideo15Model do)."""
    if not callable(getattr(model, "set_sequence_parallel", None)):
        raise TypeError(
            f"parallel.cp = {cp_mesh.size()}: {type(model).__name__} does not support sequence parallelism "
            "(no set_sequence_parallel); use parallel.cp = 1 or a model family that has it (wan, hunyuan15)"
        )
    model.set_sequence_parallel(cp_mesh.get_group())
    log.info("sequence parallel (Ulysses) over %d ranks", cp_mesh.size())
    return model


def parallelize(
    model: nn.Module,
    pcfg: ParallelConfig,
    prec: PrecisionConfig,
    fsdp_mesh: DeviceMesh | None,
    cp_mesh: DeviceMesh | None = None,
) -> nn.Module:
    """Sequence parallelism (when a cp mesh is given), AC, then per-block compile, then FSDP (when a mesh
    of size > 1 is given: ``DistInfo.fsdp_mesh``, which folds the cp ranks in)."""
    if cp_mesh is not None and cp_mesh.size() > 1:
        apply_sp(model, cp_mesh)
    apply_ac(model, pcfg.activation_checkpointing)
    if pcfg.compile:
        apply_compile(model)
    if pcfg.fsdp and fsdp_mesh is not None and fsdp_mesh.size() > 1:
        apply_fsdp(
            model,
            fsdp_mesh,
            param_dtype=DTYPES[prec.param_dtype],
            reduce_dtype=DTYPES[prec.reduce_dtype],
            reshard_after_forward=pcfg.reshard_after_forward,
        )
    return model


# ---- meta-device initialisation ------------------------------------------------------------------

_WEIGHTS_SOURCE = "_engine_full_state_dict_fn"  # the attribute defer_weights sets and materialize reads


def is_meta(model: nn.Module) -> bool:
    """Whether the model was built on the meta device (and still has to be materialised)."""
    return any(t.is_meta for t in chain(model.parameters(), model.buffers()))


def defer_weights(model: nn.Module, read_full_state_dict: Callable[[], dict[str, torch.Tensor]]) -> nn.Module:
    """Name where a meta-built model's weights come from: a function returning the full state dict (our
    keys), which :func:`materialize` calls on rank 0 only. Without it the model is randomly initialised."""
    if not is_meta(model):
        raise ValueError(f"defer_weights: {type(model).__name__} is not on the meta device")
    setattr(model, _WEIGHTS_SOURCE, read_full_state_dict)
    return model


@torch.no_grad()
def init_weights(model: nn.Module) -> None:
    """Random initialisation of a materialised model: ``model.init_weights()`` when the model defines it
    (it then owns every parameter and buffer), else ``reset_parameters()`` of every module that has one.
    A parameter no module resets, or a persistent buffer, would keep ``to_empty``'s garbage: an error
    names it (non-persistent buffers are :func:`materialize`'s ``init_buffers()``)."""
    if callable(getattr(model, "init_weights", None)):
        model.init_weights()
        return
    covered: set[int] = set()
    for module in model.modules():
        if callable(getattr(module, "reset_parameters", None)):
            module.reset_parameters()
            covered |= {id(p) for p in module.parameters(recurse=False)}
    missing = [n for n, p in model.named_parameters() if id(p) not in covered]
    transient = {
        f"{m}.{b}" if m else b for m, mod in model.named_modules() for b in mod._non_persistent_buffers_set
    }
    missing += [n for n, _ in model.named_buffers() if n not in transient]  # those: init_buffers()
    if missing:
        raise TypeError(
            f"{type(model).__name__}: no reset_parameters() initialises {missing[:3]} after meta-device "
            "init; give the owning module a reset_parameters() or the model an init_weights()"
        )


def materialize(
    model: nn.Module, device: torch.device, *, seed: int = 0, timeout_s: float | None = None
) -> nn.Module:
    """Allocate a meta-built (and possibly FSDP-sharded) model on ``device`` and fill it: the state dict
    of :func:`defer_weights`, read on rank 0 only and broadcast into every rank's shards, or
    :func:`init_weights` under ``seed`` (the same on every rank; the caller's RNG stream is untouched).
    Models with non-persistent buffers (not in a state dict) must recompute them in ``init_buffers()``."""
    model.to_empty(device=device)
    read = getattr(model, _WEIGHTS_SOURCE, None)
    if read is not None:
        _load_from_rank0(model, read, timeout_s)
    else:
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
            torch.manual_seed(seed + _shard_seed_offset(model))
            init_weights(model)
    transient = [n for m in model.modules() for n in getattr(m, "_non_persistent_buffers_set", ())]
    if callable(getattr(model, "init_buffers", None)):
        model.init_buffers()
    elif transient:
        raise TypeError(f"{type(model).__name__} has non-persistent buffers {transient[:3]}: after meta-device "
                        "init they must be recomputed by a model.init_buffers()")  # fmt: skip
    return model


def _shard_seed_offset(model: nn.Module) -> int:
    """DTensor draws a sharded tensor coherently (one stream, offset per shard) only on GPU-like meshes;
    elsewhere (CPU / gloo) each rank draws its local shard from its own generator, so ranks holding
    different shards must be seeded differently (replicas, the HSDP outer dim, alike)."""
    import warnings

    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._random import is_rng_supported_mesh

    p = next((p for p in model.parameters() if isinstance(p, DTensor)), None)
    if p is None:
        return 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if is_rng_supported_mesh(p.device_mesh):
            return 0
    return 1_000_003 * (1 + p.device_mesh.get_coordinate()[-1])  # the shard index (last mesh dim)


def _load_from_rank0(model: nn.Module, read: Callable[[], dict], timeout_s: float | None) -> None:
    """Full state dict from ``read()`` on rank 0 -> every rank's parameters (DTensor shards or plain)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    distributed = dist.is_initialized() and dist.get_world_size() > 1
    sd: dict[str, torch.Tensor] = {}
    if not distributed or dist.get_rank() == 0:
        # cast to the model's dtypes: every rank must receive the dtype its own tensors have
        ours = {n.replace("_checkpoint_wrapped_module.", ""): t.dtype
                for n, t in chain(model.named_parameters(), model.named_buffers())}  # fmt: skip
        sd = {k: v.to(ours[k]) if k in ours else v for k, v in read().items()}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed, strict=True)
    with collective("load weights from rank 0", timeout_s):
        set_model_state_dict(model, sd, options=options)
