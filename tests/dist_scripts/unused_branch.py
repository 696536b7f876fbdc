"""TinyDiT with a conditioning branch that a step may use on one rank only, on both or on neither (``VARIANTS``),
trained with the engine's Trainer; each rank saves its final parameters. Run by tests/test_dist.py.

    torchrun --nproc_per_node 2 tests/dist_scripts/unused_branch.py --run-dir D --variants ddp,fsdp
        -> D/<variant>/rank<r>.pt (full parameters, as every rank holds them after training)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).parent))
from tiny import SeededBatches, TinyDiT  # noqa: E402

from engine.config import JobConfig  # noqa: E402
from engine.dist import end_process, init_distributed  # noqa: E402
from engine.trainer import Trainer  # noqa: E402

# variant -> parallel.fsdp and, per step, (rank 0's samples use the branch, rank 1's do). Plain DP keeps the
# grads of a branch no rank used None (as one process would); FSDP2 reduce-scatters zeros for them (Adam's
# momentum still moves them), so its steps have a user each.
VARIANTS = {
    "ddp": (False, [(True, False), (False, False), (True, True), (False, True), (False, False)]),
    "fsdp": (True, [(True, False), (True, True), (False, True), (True, False)]),
}


class CondDiT(TinyDiT):
    def __init__(self):
        super().__init__()
        self.cond = nn.Linear(16, 32)  # conditioning added to the timestep embedding

    def predict_velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        temb = self.temb(t.view(-1, 1).to(x_t.dtype))
        use = cond["use"]  # (B,) bool; the branch is skipped when no sample uses it
        if bool(use.any()):
            temb = temb + self.cond(cond["c"]) * use.view(-1, 1).to(temb.dtype)
        h = self.inp(x_t)
        for blk in self.blocks:
            h = blk(h, temb)
        return self.out(h)


class BranchLoss:
    """Rectified-flow MSE; the samples of rank r use the branch on step s when use[s][r]. One call per step
    (grad_accum 1). ``ranks``: the ranks whose samples a batch holds, in order (all of them in a single
    process's global batch)."""

    def __init__(self, use: list[tuple[bool, bool]], ranks: tuple[int, ...]):
        self.use, self.ranks, self.calls = use, ranks, 0

    def __call__(self, model: nn.Module, mb: dict[str, torch.Tensor]):
        step, self.calls = self.calls, self.calls + 1
        x0, t, noise = mb["x0"], mb["t"], mb["noise"]
        per = x0.shape[0] // len(self.ranks)
        use = torch.tensor([self.use[step][r] for r in self.ranks for _ in range(per)])
        tt = t.view(-1, 1, 1)
        v = model.predict_velocity((1 - tt) * x0 + tt * noise, t, {"use": use, "c": x0.mean(1)})
        return torch.nn.functional.mse_loss(v, noise - x0), {}


def make_cfg(variant: str) -> JobConfig:
    fsdp, use = VARIANTS[variant]
    cfg = JobConfig()
    cfg.run.device = "cpu"
    cfg.parallel.fsdp, cfg.parallel.timeout_s = fsdp, 60
    cfg.checkpoint.enabled = cfg.checkpoint.export_safetensors = False
    cfg.train.steps, cfg.train.lr, cfg.train.weight_decay = len(use), 3e-3, 0.1
    cfg.train.batch_size, cfg.train.grad_accum, cfg.train.log_every = 2, 1, 100
    return cfg


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for n, p in model.named_parameters()
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--variants", default="ddp")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    for name in args.variants.split(","):
        cfg = make_cfg(name)
        info = init_distributed(cfg.parallel, "cpu")
        torch.manual_seed(0)
        batches = SeededBatches(batch=2, rank=info.dp_rank, world=info.dp_size)
        run_dir = Path(args.run_dir) / name
        trainer = Trainer(
            cfg,
            CondDiT(),
            BranchLoss(VARIANTS[name][1], (info.dp_rank,)),
            batches,
            run_dir=run_dir,
            dist_info=info,
        )
        trainer.fit()
        torch.save(full_params(trainer.model), run_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
    end_process()
