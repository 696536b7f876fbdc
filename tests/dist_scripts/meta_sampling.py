"""The sampling recipes (demonstrate, then evaluate) under model.meta_init. Run by tests/test_meta_init.py:

    torchrun --nproc_per_node 2 tests/dist_scripts/meta_sampling.py --out D --section.key value ...

Writes what the recipes write (under run.out_dir / run.name), plus D/loaded_by_rank<r>: one line per
transformer weights-file read made by rank r (models.layers.load_safetensors, what from_pretrained calls).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from meta_init import record_loader_calls  # noqa: E402

from engine.config import JobConfig, build_config, overrides_to_dict  # noqa: E402
from engine.dist import end_process, init_distributed, shutdown  # noqa: E402
from recipes import demonstrate, evaluate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args, rest = ap.parse_known_args()
    torch.set_num_threads(1)
    cfg = build_config(JobConfig, None, overrides_to_dict(JobConfig, rest))
    assert cfg.model.meta_init
    info = init_distributed(cfg.parallel, cfg.run.device)
    record_loader_calls(Path(args.out), info.rank)
    demonstrate.run(cfg)
    evaluate.run(cfg)
    shutdown()


if __name__ == "__main__":
    main()
    end_process()
