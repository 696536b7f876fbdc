"""Ulysses sequence parallelism (parallel.cp = 2) on the Wan "debug" flavour. Run by tests/test_sp.py:

    torchrun --nproc_per_node 2 tests/dist_scripts/sequence_parallel.py --out D [--section.key value ...]

Writes to D (rank 0, except forward_rank<r>):
  forward_rank<r>.safetensors  rank r's sequence-parallel forward of the seeded models and inputs (Wan with
                               per-sample and per-token timesteps, HunyuanVideo-1.5 I2V), its input gradient
                               and its parameter gradients
  losses.json                  per-step losses of the Trainer run with parallel.cp = 2
  final.safetensors            that run's trained weights (full state dict)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

sys.path.insert(0, str(Path(__file__).parent))
from meta_init import WanBatches, wan_flow_loss  # noqa: E402

import models  # noqa: E402
from engine.config import JobConfig, build_config, overrides_to_dict  # noqa: E402
from engine.dist import end_process, init_distributed  # noqa: E402
from engine.parallel import apply_sp  # noqa: E402
from engine.trainer import Trainer  # noqa: E402

SHAPE = (2, 4, 2, 4, 4)  # (B, C, F, h, w): 8 Wan tokens per sample at patch (1, 2, 2)


def inputs(seed: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(*SHAPE, generator=g), "t": torch.rand(SHAPE[0], generator=g) * 1000,
            "t_tok": torch.rand(SHAPE[0], 8, generator=g) * 1000, "text": torch.randn(SHAPE[0], 3, 24, generator=g)}  # fmt: skip


def cases():
    """(name, family, call(model, x) -> output, x): Wan with per-sample and per-token timesteps;
    HunyuanVideo-1.5 I2V (72 video tokens, padded text, glyph and image context: tests/test_hunyuan15.py)."""
    from tests.test_hunyuan15 import inputs as hy_inputs

    w = inputs()
    (hx, ht, htext), hkw = hy_inputs(2)
    return [
        ("wan.t", "wan", lambda m, x: m(x, w["t"], w["text"]), w["x"]),
        ("wan.t_tok", "wan", lambda m, x: m(x, w["t_tok"], w["text"]), w["x"]),
        ("hy.i2v", "hunyuan15", lambda m, x: m(x, ht, htext, **hkw), hx),
    ]


def forward_and_grads(sp_mesh=None) -> dict[str, torch.Tensor]:
    """Each case's seeded "debug" model (under apply_sp when a mesh is given): output, input gradient and
    parameter gradients of a fixed linear functional of the output."""
    res = {}
    for name, family, call, x in cases():
        torch.manual_seed(3)
        model = models.build_model(family, "debug")
        if sp_mesh is not None:
            apply_sp(model, sp_mesh)
        xin = x.clone().requires_grad_()
        y = call(model, xin)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        res[f"{name}.out"], res[f"{name}.dx"] = y.detach().contiguous(), xin.grad
        for n, p in model.named_parameters():
            res[f"{name}.grad.{n}"] = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args, rest = ap.parse_known_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    cfg = build_config(JobConfig, None, overrides_to_dict(JobConfig, rest))
    info = init_distributed(cfg.parallel, "cpu")
    save_file(forward_and_grads(info.cp_mesh), out / f"forward_rank{info.rank}.safetensors")

    torch.manual_seed(3)
    model = models.build_model("wan", "debug")
    batches = WanBatches(cfg.train.batch_size, cfg.train.grad_accum, info.dp_rank, info.dp_size)
    trainer = Trainer(cfg, model, wan_flow_loss, batches, run_dir=out / "run", dist_info=info)
    losses = []
    while trainer.step < cfg.train.steps:
        loss = trainer.train_step()["loss"].detach().clone()
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)  # the data-parallel mean (a cp group's ranks agree)
        losses.append(loss.item())
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = {k: v.clone().contiguous() for k, v in get_model_state_dict(trainer.model, options=opts).items()}
    trainer.close()
    if info.is_main:
        save_file(full, out / "final.safetensors")
        (out / "losses.json").write_text(json.dumps({"losses": losses, "fsdp_mesh": list(info.fsdp_mesh.shape),
                                                     "dp_size": info.dp_size, "cp": info.cp_mesh.size(),
                                                     "sp": trainer.unwrapped.sequence_parallel.size,
                                                     "compiled": sum(getattr(b, "_compiled_call_impl", None) is not None for b in trainer.unwrapped.blocks)}))  # fmt: skip
    dist.barrier()


if __name__ == "__main__":
    main()
    end_process()
