"""TransformersJudge on a tiny random Qwen2.5-VL built locally: plumbing, batching, statuses, determinism.

Its answers are random words, so quality is not tested; what is: a batched answer equals the same
item answered alone (left padding is right), statuses follow parse_answer of the raw text, a fresh
load of the same folder answers identically, video files and grids reach the model.
"""

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.judge import JudgeRequest, TransformersJudge, TransformersVLM, parse_answer
from engine.judge.tiny import build_tiny_qwen25vl


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 0.2M-parameter model: more threads only contend on a busy box
    yield str(build_tiny_qwen25vl(tmp_path_factory.mktemp("tiny")))
    torch.set_num_threads(threads)


def _reqs(n: int, frames: int = 2) -> list[JudgeRequest]:
    rng = np.random.default_rng(3)
    qs = ("task", "agent", "consistency", "reward")
    # Different image sizes give different image-token counts, so the batch really needs padding.
    sizes = [(56, 56), (56, 84), (84, 56)]
    return [
        JudgeRequest(
            f"[Agent]: push block {i}",
            qs[i % 4],
            frames=[rng.integers(0, 256, (*sizes[i % 3], 3), dtype=np.uint8) for _ in range(frames)],
        )
        for i in range(n)
    ]


def test_batched_equals_single_and_statuses_follow_parse(tiny_path):
    judge = TransformersJudge(tiny_path, device="cpu", max_batch=4, num_frames=2, max_new_tokens=5)
    reqs = _reqs(6)
    batched = asyncio.run(judge.score(reqs))
    single = [asyncio.run(judge.score([r]))[0] for r in reqs]
    assert [v.raw for v in batched] == [v.raw for v in single]
    assert len({v.raw for v in batched}) > 1  # answers depend on the input
    for v in batched:
        assert (v.score, v.status) == parse_answer(v.raw) and v.latency_s > 0


def test_fresh_load_is_deterministic_and_grid_layout(tiny_path):
    reqs = _reqs(3, frames=4)
    a = asyncio.run(TransformersJudge(tiny_path, device="cpu", num_frames=4, max_new_tokens=4).score(reqs))
    # a pathlib.Path is a folder as a str is (it was taken for a loaded model)
    b = asyncio.run(
        TransformersJudge(Path(tiny_path), device="cpu", num_frames=4, max_new_tokens=4).score(reqs)
    )
    assert [v.raw for v in a] == [v.raw for v in b]
    g = asyncio.run(
        TransformersJudge(tiny_path, device="cpu", num_frames=4, layout="grid", max_new_tokens=4).score(reqs)
    )
    assert all(v.status in ("ok", "parse_error") for v in g)


def test_video_requests_and_unreadable_video(tiny_path, tmp_path):
    import av

    path = tmp_path / "v.mp4"
    with av.open(str(path), "w") as out:
        s = out.add_stream("mpeg4", rate=8)
        s.width, s.height, s.pix_fmt = 56, 56, "yuv420p"
        for i in range(6):
            out.mux(
                s.encode(av.VideoFrame.from_ndarray(np.full((56, 56, 3), 30 * i, np.uint8), format="rgb24"))
            )
        out.mux(s.encode(None))
    judge = TransformersJudge(TransformersVLM(tiny_path, device="cpu"), num_frames=3, max_new_tokens=4)
    good, missing = asyncio.run(
        judge.score(
            [
                JudgeRequest("[Agent]: wave", "task", video=str(path)),
                JudgeRequest("[Agent]: wave", "task", video=str(tmp_path / "no.mp4")),
            ]
        )
    )
    assert good.status in ("ok", "parse_error") and good.raw
    assert missing.status == "error" and "no.mp4" in missing.raw and missing.score is None


def test_one_bad_image_fails_only_its_own_item(tiny_path):
    """An image the processor refuses (aspect ratio over 200) batched with good items: only its item is
    "rejected" (the same on every attempt); the others get the answers they get alone (the whole batch of 4
    was "error")."""
    from engine.judge.chat import ChatItem

    vlm = TransformersVLM(tiny_path, device="cpu", max_batch=4)
    rng = np.random.default_rng(0)
    good = [
        ChatItem([rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)], f"push block {i}", 5) for i in range(3)
    ]
    bad = ChatItem([rng.integers(0, 256, (28, 6000, 3), dtype=np.uint8)], "push block", 5)
    mixed = asyncio.run(vlm.chat([good[0], bad, *good[1:]]))
    alone = [asyncio.run(vlm.chat([it]))[0] for it in good]
    assert [r.status for r in mixed] == ["ok", "rejected", "ok", "ok"] and "aspect ratio" in mixed[1].text
    assert [r.text for r in (mixed[0], *mixed[2:])] == [r.text for r in alone]


def test_a_timed_out_batch_does_not_keep_the_model_busy(tiny_path):
    """12 one-request batches at once with a batch timeout of 3.5 generations: most time out while waiting
    for the model. A request sent after that is answered in time: the abandoned batches that had not started
    are skipped (they were generated anyway, one after the other, and timed the new request out too)."""
    import time

    from engine.judge import AsyncJudge

    backend = TransformersJudge(TransformersVLM(tiny_path, device="cpu"), num_frames=1, max_new_tokens=1024)
    img = np.random.default_rng(0).integers(0, 256, (56, 56, 3), dtype=np.uint8)
    req = lambda i: JudgeRequest(f"[Agent]: push block {i}", "task", frames=[img])  # noqa: E731

    async def run():
        t0 = time.perf_counter()
        await backend.score([req(100)])
        g = time.perf_counter() - t0  # one generation alone
        judge = AsyncJudge(
            backend, max_batch=1, max_wait_ms=0, max_concurrency=12, cache=False, batch_timeout_s=3.5 * g
        )
        first = await asyncio.gather(*[await judge.submit(req(100)) for _ in range(12)])
        late = await (await judge.submit(req(100)))
        await judge.aclose()
        return first, late

    first, late = asyncio.run(run())
    assert "timeout" in [v.status for v in first]
    assert late.status in ("ok", "parse_error"), late


def test_truncated_says_which_answers_were_cut_at_max_new_tokens(tiny_path):
    """An answer stopped at its max_new_tokens may end mid-score ("Score: 0." of "Score: 0.75", read 0.0): its
    ChatResult says truncated, checked against the model's own generation given room to finish (the end-of-answer
    token within the first max_new_tokens or not)."""
    from engine.judge.chat import ChatItem

    vlm = TransformersVLM(tiny_path, device="cpu", max_batch=8)
    rng = np.random.default_rng(7)
    items = [
        ChatItem(
            [rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)], f"the agent pushes the red block {i}", 3
        )
        for i in range(24)
    ]
    results = asyncio.run(vlm.chat(items))
    eos, want = vlm.model.generation_config.eos_token_id, []
    for it in items:
        inputs = vlm._inputs([it])
        out = vlm.model.generate(
            **inputs, max_new_tokens=8, do_sample=False, pad_token_id=vlm.tokenizer.pad_token_id
        )
        want.append(eos not in out[0, inputs["input_ids"].shape[1] :][:3].tolist())
    assert [r.truncated for r in results] == want and True in want and False in want
