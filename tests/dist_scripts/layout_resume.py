"""Train TinyDiT under one parallel layout, then resume it in the same processes under another. Run by tests:

    torchrun --nproc_per_node 2 tests/dist_scripts/layout_resume.py D "<first overrides>" "<resume overrides>"

With ``--parallel.cp 2`` the model takes the sequence-parallel entry point as a no-op (each rank of the cp
group runs the whole sequence of the batch the group shares). Rank r writes D/rank<r>.json: per run, the step
it started from and one draw of the global torch RNG after the Trainer was built (the ranks of a cp group draw
alike), or the error that refused the resume.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny import SeededBatches, TinyDiT, flow_loss  # noqa: E402

from engine.config import JobConfig, build_config, overrides_to_dict  # noqa: E402
from engine.dist import end_process, init_distributed  # noqa: E402
from engine.trainer import Trainer  # noqa: E402


class SPTiny(TinyDiT):
    def set_sequence_parallel(self, group) -> None:
        pass


def run(run_dir: Path, overrides: list[str]) -> dict:
    cfg = build_config(JobConfig, None, overrides_to_dict(JobConfig, overrides))
    cfg.run.device = "cpu"
    info = init_distributed(cfg.parallel, "cpu")
    torch.manual_seed(0)
    batches = SeededBatches(batch=2, rank=info.dp_rank, world=info.dp_size, rng_noise=True)
    try:
        trainer = Trainer(cfg, SPTiny(), flow_loss, batches, run_dir=run_dir, dist_info=info)
    except ValueError as e:
        return {"error": str(e)}
    out = {"start": trainer.step, "draw": torch.rand(1).item()}
    while trainer.step < cfg.train.steps:
        trainer.train_step()
    trainer.close()
    return out


def main() -> None:
    run_dir, first, then = Path(sys.argv[1]), shlex.split(sys.argv[2]), shlex.split(sys.argv[3])
    torch.set_num_threads(1)
    common = ["--checkpoint.export_safetensors", "false", "--train.log_every", "100"]
    results = [run(run_dir, common + first), run(run_dir, common + then)]
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    (run_dir / f"rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
    end_process()
