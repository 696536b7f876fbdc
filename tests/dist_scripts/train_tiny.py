"""Train TinyDiT with the engine's Trainer; write per-step losses to JSON. Run by tests.

    python tests/dist_scripts/train_tiny.py --run-dir D [--section.key value ...]   -> D/out.json
    torchrun --nproc_per_node 2 tests/dist_scripts/train_tiny.py --run-dir D --variants fsdp,hsdp,ddp

``--kill-at-save N`` SIGKILLs this process in the middle of saving checkpoint N: after the DCP shards
and per-rank files are written, before the COMPLETE marker and the rename (the worst moment).
``--sigterm-at N`` sends this process SIGTERM during step N; ``--kill-after-commit N`` SIGKILLs it right after
checkpoint N is committed (a preemption's grace period ending there).
``--timeout-check`` afterwards makes rank 1 skip a barrier so rank 0 must report a DistTimeoutError.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny import SeededBatches, TinyDiT, flow_loss  # noqa: E402

from engine import checkpoint as ckpt  # noqa: E402
from engine.config import JobConfig, build_config, overrides_to_dict  # noqa: E402
from engine.dist import DistTimeoutError, barrier, end_process, init_distributed, shutdown  # noqa: E402
from engine.trainer import Trainer  # noqa: E402


def install_kill(step: int) -> None:
    commit = ckpt.CheckpointManager._commit

    def killing_commit(self, tmp: Path, final: Path) -> None:
        if final.name == f"step_{step:08d}":
            os.kill(os.getpid(), signal.SIGKILL)
        commit(self, tmp, final)

    ckpt.CheckpointManager._commit = killing_commit


def install_kill_after_commit(step: int) -> None:
    commit = ckpt.CheckpointManager._commit

    def commit_then_kill(self, tmp: Path, final: Path) -> None:
        commit(self, tmp, final)
        if final.name == f"step_{step:08d}":
            os.kill(os.getpid(), signal.SIGKILL)

    ckpt.CheckpointManager._commit = commit_then_kill


VARIANTS = {  # name -> overrides; one torchrun trains each in turn (process start-up dominates test time)
    "fsdp": [],
    "hsdp": ["--parallel.dp_replicate", "2"],
    "ddp": ["--parallel.fsdp", "false"],
    # async saves every step while training runs (DCP's collectives on a background thread beside training's);
    # stops at step 3, resumes from its last complete checkpoint to the end
    "fsdp_resume": ["--checkpoint.async_save", "true", "--checkpoint.interval", "1"],
}


def train(cfg, run_dir: str, rng_noise: bool, sigterm_at: int = 0) -> dict:
    info = init_distributed(cfg.parallel, "cpu")
    torch.manual_seed(0)
    model = TinyDiT()
    batches = SeededBatches(batch=cfg.train.batch_size, grad_accum=cfg.train.grad_accum, rank=info.dp_rank,
                            world=info.dp_size, rng_noise=rng_noise)  # fmt: skip
    trainer = None

    def loss_fn(m, mb):
        if sigterm_at and trainer.step + 1 == sigterm_at and not trainer._stop_signal:
            os.kill(os.getpid(), signal.SIGTERM)
        return flow_loss(m, mb)

    trainer = Trainer(cfg, model, loss_fn, batches, run_dir=run_dir, dist_info=info)
    start, losses = trainer.step, {}
    while trainer.step < cfg.train.steps:
        loss = trainer.train_step()["loss"].detach().clone()
        if info.distributed:
            torch.distributed.all_reduce(loss, op=torch.distributed.ReduceOp.AVG)
        losses[trainer.step] = loss.item()
    trainer.close()
    return {"start": start, "losses": losses, "skipped": trainer.skipped_steps}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument(
        "--variants", default="", help=f"comma list of {sorted(VARIANTS)}: run_dir/<name>/out.json"
    )
    ap.add_argument("--kill-at-save", type=int, default=0)
    ap.add_argument("--sigterm-at", type=int, default=0)
    ap.add_argument("--kill-after-commit", type=int, default=0)
    ap.add_argument("--timeout-check", action="store_true")
    ap.add_argument("--rng-noise", action="store_true")
    args, rest = ap.parse_known_args()
    torch.set_num_threads(1)
    if args.kill_at_save:
        install_kill(args.kill_at_save)
    if args.kill_after_commit:
        install_kill_after_commit(args.kill_after_commit)
    runs = {name: Path(args.run_dir) / name for name in args.variants.split(",")} if args.variants else {
        "": Path(args.run_dir)}  # fmt: skip
    for name, run_dir in runs.items():
        cfg = build_config(JobConfig, None, overrides_to_dict(JobConfig, rest + VARIANTS.get(name, [])))
        if name == "fsdp_resume":
            steps, cfg.train.steps = cfg.train.steps, 3
            first = train(cfg, str(run_dir), args.rng_noise)
            cfg.train.steps = steps
            result = train(cfg, str(run_dir), args.rng_noise)
            result["losses"] = {**first["losses"], **result["losses"]}
        else:
            result = train(cfg, str(run_dir), args.rng_noise, args.sigterm_at)
        if int(os.environ.get("RANK", "0")) == 0:
            (run_dir / "out.json").write_text(json.dumps(result))
    if args.timeout_check and torch.distributed.is_initialized():
        err = timeout_check(torch.distributed.get_rank())
        if err:
            (Path(args.run_dir) / "timeout.txt").write_text(err)
    shutdown()


def timeout_check(rank: int) -> str:
    """Rank 1 skips a barrier; rank 0's must fail with a clear DistTimeoutError within 2 s."""
    if rank == 1:
        import time

        time.sleep(4)
        return ""
    try:
        barrier("test barrier", timeout_s=2)
    except DistTimeoutError as e:
        return str(e)
    return "no error"


if __name__ == "__main__":
    main()
    end_process()
