"""recipes/propose.py as a user meets it: a proposer endpoint that is down, or a VLM whose every answer
fails validation, is told apart in the run's warning (over real loopback servers)."""

import logging

import numpy as np

from engine.propose import OpenAIProposer
from recipes.common import save_image
from recipes.propose import propose
from tests.judge_servers import FaultServer, free_port


def _images(tmp_path, n):
    out = []
    for i in range(n):
        path = tmp_path / f"im{i}.png"
        save_image(np.full((16, 16, 3), 20 * (i + 1), dtype=np.uint8), path)
        out.append((path.stem, path))
    return out


def _warnings(fn):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("wmsd.propose")
    logger.addHandler(handler)
    try:
        fn()
    finally:
        logger.removeHandler(handler)
    return [r.getMessage() for r in records if r.levelno == logging.WARNING]


def test_propose_says_why_no_image_got_a_pair(tmp_path):
    images = _images(tmp_path, 2)
    dead = OpenAIProposer(
        f"http://127.0.0.1:{free_port()}/v1", "m", timeout_s=5, max_retries=0, max_attempts=1
    )
    msgs = _warnings(lambda: propose(dead, images, tmp_path / "dead.jsonl", 2))
    assert any("2 of 2 images" in m and "failed (no answer) 2" in m for m in msgs), msgs
    with FaultServer() as srv:  # answers, but its 15-word solutions fail the default 40-90 word bound
        strict = OpenAIProposer(srv.url, "m", timeout_s=10, max_attempts=1)
        msgs = _warnings(lambda: propose(strict, images, tmp_path / "strict.jsonl", 2))
    assert any("failed (no answer) 0" in m and "solution_length" in m for m in msgs), msgs
