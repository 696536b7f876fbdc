"""Meta-device initialisation on the Wan "debug" flavour. Run by tests/test_meta_init.py:

    torchrun --nproc_per_node 2 tests/dist_scripts/meta_init.py --folder F --out D [--section.key value ...]
    torchrun --nproc_per_node 2 tests/dist_scripts/meta_init.py --folder F --out D --variants fp8_ac,hsdp,...

Writes to D (rank 0 only, except the loader marks):
  meta_full.safetensors     the Executor's full parameters right after Trainer() under model.meta_init
  teacher_full.safetensors  the frozen Demonstrator's after prepare_teacher under model.meta_init
  random_full.safetensors   a randomly initialised meta-built model's (run.seed), + random.json (rope check)
  losses.json               {"meta": [...], "plain": [...]} per-step losses (rank mean) of both paths
  final_meta.safetensors / final_plain.safetensors   the trained weights of both paths
  loaded_by_rank<r>         one line per weights-file read made by rank r while meta_init was on

With ``--variants`` (names of VARIANTS: FP8, activation checkpointing, compile, HSDP) it writes instead,
per variant V, into D/V/: {meta,plain}_init.safetensors (the Executor's full parameters right after
Trainer() with and without meta_init), {meta,plain}_teacher.safetensors (after prepare_teacher),
{meta,plain}_final.safetensors (after training), losses.json and structure.json (what was applied).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

import models.layers
from engine.config import JobConfig, build_config, overrides_to_dict
from engine.dist import end_process, init_distributed, shutdown
from engine.parallel import is_meta
from engine.trainer import Trainer
from recipes.common import build_denoiser, load_pretrained_denoiser, prepare_teacher

SHAPE = (4, 2, 4, 4)  # (C, F, h, w) latents of the debug flavour
TEXT = (3, 24)  # (L, text_dim)


class WanBatches:
    """Micro-batch k from seed 1000 + k (this rank's share of the global batch), resumable."""

    def __init__(self, batch: int, grad_accum: int, rank: int, world: int):
        self.batch, self.grad_accum, self.rank, self.world, self.position = batch, grad_accum, rank, world, 0

    def next(self, step: int, model) -> list[dict[str, torch.Tensor]]:
        out = []
        for _ in range(self.grad_accum):
            g = torch.Generator().manual_seed(1000 + self.position * self.world + self.rank)
            out.append({"x0": torch.randn(self.batch, *SHAPE, generator=g), "noise": torch.randn(self.batch, *SHAPE, generator=g),
                        "t": torch.rand(self.batch, generator=g), "text": torch.randn(self.batch, *TEXT, generator=g)})  # fmt: skip
            self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, sd: dict) -> None:
        self.position = int(sd["position"])


def wan_flow_loss(model, mb: dict[str, torch.Tensor]):
    """Rectified flow on the Wan denoiser: x_t = (1 - t) x0 + t noise, target noise - x0."""
    tt = mb["t"].view(-1, 1, 1, 1, 1)
    xt = (1 - tt) * mb["x0"] + tt * mb["noise"]
    v = model.predict_velocity(xt, mb["t"], {"text": mb["text"]})
    return torch.nn.functional.mse_loss(v.float(), (mb["noise"] - mb["x0"]).float()), {}


def full_state(model) -> dict[str, torch.Tensor]:
    """Every rank takes part; the gathered full state dict (our keys, CPU)."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {k: v.clone().contiguous() for k, v in get_model_state_dict(model, options=opts).items()}


def record_loader_calls(out: Path, rank: int):
    """Mark every weights-file read (models.layers.load_safetensors, what from_pretrained calls); returns
    the original reader."""
    read = models.layers.load_safetensors

    def recording(*args, **kwargs):
        with open(out / f"loaded_by_rank{rank}", "a") as f:
            f.write(f"{args[0]}\n")
        return read(*args, **kwargs)

    models.layers.load_safetensors = recording
    return read


def train(cfg: JobConfig, model, info, out: Path, name: str) -> list[float]:
    batches = WanBatches(cfg.train.batch_size, cfg.train.grad_accum, info.dp_rank, info.dp_size)
    trainer = Trainer(cfg, model, wan_flow_loss, batches, run_dir=out / name, dist_info=info)
    if name == "meta":
        full = full_state(trainer.model)
        if info.is_main:
            save_file(full, out / "meta_full.safetensors")
    losses = []
    while trainer.step < cfg.train.steps:
        loss = trainer.train_step()["loss"].detach().clone()
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        losses.append(loss.item())
    full = full_state(trainer.model)
    if info.is_main:
        save_file(full, out / f"final_{name}.safetensors")
    trainer.close()
    return losses


FP8 = ["--precision.fp8", "torchao", "--precision.fp8_min_features", "16"]  # every block linear of "debug"
VARIANTS = {  # name -> overrides; each trains with and without model.meta_init
    "fp8_ac": [*FP8, "--parallel.activation_checkpointing", "selective"],  # FSDP over the 2 ranks
    "hsdp": [*FP8, "--parallel.activation_checkpointing", "full", "--parallel.dp_replicate", "2"],  # 2 x 1
    "compile": [*FP8, "--parallel.activation_checkpointing", "selective", "--parallel.compile", "true"],
}


def structure(model, info) -> dict:
    """What the trainer applied: FP8 linears, AC wrappers, compiled blocks, the FSDP mesh."""
    from torch._dynamo.utils import counters
    from torch.distributed.tensor import DTensor
    from torchao.float8.float8_linear import Float8Linear

    p = next(p for p in model.parameters() if isinstance(p, DTensor))
    return {
        "float8": sum(isinstance(m, Float8Linear) for m in model.modules()),
        "ac": sum(type(m).__name__.endswith("CheckpointWrapper") for m in model.modules()),
        "compiled": sum(getattr(b, "_compiled_call_impl", None) is not None for b in model.blocks),
        "dynamo_graphs": int(counters["stats"]["unique_graphs"]),
        "mesh": list(p.device_mesh.shape),
    }


def run_variant(name: str, cfg: JobConfig, out: Path) -> None:
    """Executor (Trainer) and Demonstrator (prepare_teacher) with and without meta_init under cfg."""
    info = init_distributed(cfg.parallel, "cpu")
    out.mkdir(exist_ok=True)
    losses, shape = {}, {}
    for path in ("meta", "plain"):
        cfg.model.meta_init = path == "meta"
        model = load_pretrained_denoiser(cfg, "", meta=cfg.model.meta_init)
        batches = WanBatches(cfg.train.batch_size, cfg.train.grad_accum, info.dp_rank, info.dp_size)
        trainer = Trainer(cfg, model, wan_flow_loss, batches, run_dir=out / path, dist_info=info)
        states = {"init": full_state(trainer.model)}
        losses[path] = []
        while trainer.step < cfg.train.steps:
            loss = trainer.train_step()["loss"].detach().clone()
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
            losses[path].append(loss.item())
        states["final"] = full_state(trainer.model)
        shape[path] = structure(trainer.model, info)
        trainer.close()
        states["teacher"] = full_state(
            prepare_teacher(load_pretrained_denoiser(cfg, "", meta=cfg.model.meta_init), cfg)
        )
        if info.is_main:
            for k, sd in states.items():
                save_file(sd, out / f"{path}_{k}.safetensors")
    if info.is_main:
        (out / "losses.json").write_text(json.dumps(losses))
        (out / "structure.json").write_text(json.dumps(shape))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--variants", default="")
    args, rest = ap.parse_known_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    base = ["--model.family", "wan", "--model.flavour", "debug", "--model.pretrained", args.folder]
    if args.variants:
        for name in args.variants.split(","):
            run_variant(name, build_config(JobConfig, None, overrides_to_dict(JobConfig, base + rest + VARIANTS[name])),
                        out / name)  # fmt: skip
        shutdown()
        return
    cfg = build_config(JobConfig, None, overrides_to_dict(JobConfig, base + rest))
    info = init_distributed(cfg.parallel, "cpu")
    rank = dist.get_rank()

    # meta_init: build on meta, shard, rank 0 alone reads the weights (Executor, then the Demonstrator)
    cfg.model.meta_init = True
    read = record_loader_calls(out, rank)
    executor = load_pretrained_denoiser(cfg, "", meta=True)
    assert is_meta(executor)
    losses = {"meta": train(cfg, executor, info, out, "meta")}
    teacher = prepare_teacher(load_pretrained_denoiser(cfg, "", meta=True), cfg)
    assert not any(p.requires_grad for p in teacher.parameters())
    full = full_state(teacher)
    if info.is_main:
        save_file(full, out / "teacher_full.safetensors")

    # random init under meta_init: a meta-built model materialised by the Trainer
    random_model = build_denoiser(cfg)
    trainer = Trainer(
        cfg, random_model, wan_flow_loss, WanBatches(1, 1, 0, 1), run_dir=out / "random", dist_info=info
    )
    full = full_state(trainer.model)
    cos, sin = random_model.rope_tables((2, 2, 2), torch.device("cpu"))
    if info.is_main:
        save_file(full, out / "random_full.safetensors")
        save_file({"cos": cos, "sin": sin}, out / "random_rope.safetensors")
    trainer.close()

    # the path without meta_init: every rank loads the whole model
    models.layers.load_safetensors = read
    cfg.model.meta_init = False
    losses["plain"] = train(cfg, load_pretrained_denoiser(cfg, ""), info, out, "plain")
    if info.is_main:
        (out / "losses.json").write_text(json.dumps(losses))
    shutdown()


if __name__ == "__main__":
    main()
    end_process()
