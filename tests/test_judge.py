"""engine.judge.base: request validation, answer parsing, frame sampling from real video files, cache keys."""

import json
from fractions import Fraction

import numpy as np
import pytest

from engine.judge import (
    PROMPT_VERSION,
    QUESTIONS,
    JudgeRequest,
    build_prompt,
    cache_key,
    even_indices,
    make_grid,
    parse_answer,
    request_frames,
    sample_frames,
)


def _frames(n, h=16, w=24, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize("x", list(np.random.default_rng(1).uniform(0, 1, 6).round(3)) + [0.0, 1.0])
def test_parse_numeric_forms_roundtrip(x):
    forms = [
        f"Score: {x}",
        f"The frames show it.\nscore = {x}",
        f"**Score:** {x}",
        json.dumps({"score": x}),
        f"```json\n{json.dumps({'score': x})}\n```",
        f"{x}",
        f"{x * 100:.1f}%",
        f"Score: {x * 5}/5",
        f"Score: {x * 4} out of 4",
        f"Score: {x} (the agent reached step 2)",
        f"Score: {x} - the agent pushes the red block out of the tray.",  # "out of" without a number
        f"Score: {x}. The scale of the scene is preserved.",
    ]
    for text in forms:
        score, status = parse_answer(text)
        assert status == "ok", text
        assert score == pytest.approx(x, abs=1e-3), text


def test_parse_yes_no_and_last_score_line():
    assert parse_answer("Yes, the block is left of the cube.") == (1.0, "ok")
    assert parse_answer("no.") == (0.0, "ok")
    assert parse_answer("Yes - the block is left of the cube.") == (1.0, "ok")
    assert parse_answer("No, or at least not by the end.") == (0.0, "ok")
    assert parse_answer('{"answer": "No"}') == (0.0, "ok")
    assert parse_answer("Score: 0.2 at first, but on reflection\nScore: 0.9")[0] == pytest.approx(0.9)


@pytest.mark.parametrize(
    "text",
    [
        "Score: 1\nOn reflection the last frame shows it only partly.\nScore: 0,3",
        "Score: 1\nScore: 2e-1",
        "Score: 1.0\nScore: 0.2 (on a scale of 5)",
    ],
)
def test_an_unread_last_score_line_is_not_replaced_by_an_earlier_one(text):
    # the last score line decides; an earlier draft line read in its place made the reward up (1.0)
    assert parse_answer(text) == (None, "parse_error")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "I cannot tell.",
        "The answer is no",
        "Score: 1.7",
        "Score: -0.5",
        "150%",
        '{"score": 3}',
        '{"score": "high"}',
        '{"answer": "maybe"}',
        "nothing 0.5 here",
        "Score: 2/0",
        "Yesterday it moved",
        "Yes/No: No",  # a form's label, not the answer: it read as yes (1.0)
        "yes or no? no",
        "No-one can tell",
        "Score: 0,8",  # a decimal comma: reading "0" would make a reward up
        "Score: 1e-2",
        "Score: 1 (on a scale of 5)",
        "Score: 4 on a scale from 1 to 5",
        "Score: 1 out of 0",
    ],
)
def test_parse_rejects_off_format(text):
    assert parse_answer(text) == (None, "parse_error")


def test_request_validation_names_the_input():
    f = _frames(1)
    with pytest.raises(ValueError, match="question"):
        JudgeRequest("[Agent]: push", "quality", frames=f)
    with pytest.raises(ValueError, match="task"):
        JudgeRequest("  ", "task", frames=f)
    with pytest.raises(ValueError, match="give frames"):
        JudgeRequest("[Agent]: push", "task")
    with pytest.raises(ValueError, match=r"frames\[1\]"):
        JudgeRequest("[Agent]: push", "task", frames=[f[0], f[0].astype(np.float32)])
    with pytest.raises(ValueError, match="empty"):
        JudgeRequest("[Agent]: push", "task", frames=[])
    with pytest.raises(ValueError, match=r"frames\[1\]: expected an HxWx3"):  # 0 pixels high
        JudgeRequest("[Agent]: push", "task", frames=[f[0], np.zeros((0, 8, 3), np.uint8)])


def test_prompts_carry_task_and_differ_per_question():
    prompts = {
        q: build_prompt(JudgeRequest("[Agent]: push the cube", q, frames=_frames(1))) for q in QUESTIONS
    }
    assert len(set(prompts.values())) == len(QUESTIONS)
    assert all("[Agent]: push the cube" in p and "Score:" in p for p in prompts.values())


def test_cache_key_depends_on_content_task_question_version():
    f = _frames(3)
    base = cache_key(JudgeRequest("t1", "task", frames=f))
    assert base == cache_key(JudgeRequest("t1", "task", frames=[x.copy() for x in f], meta={"any": 1}))
    g = [x.copy() for x in f]
    g[2][0, 0, 0] ^= 1
    others = [
        cache_key(JudgeRequest("t1", "task", frames=g)),
        cache_key(JudgeRequest("t2", "task", frames=f)),
        cache_key(JudgeRequest("t1", "agent", frames=f)),
    ]
    assert all(k != base for k in others) and base[-1] == PROMPT_VERSION


def test_even_indices_and_grid_against_numpy():
    assert even_indices(10, 4) == [0, 3, 6, 9]
    assert even_indices(3, 8) == [0, 1, 2]
    assert even_indices(5, 1) == [4]
    f = _frames(5, 4, 6)
    grid = make_grid(f, cols=3)
    blank = np.zeros_like(f[0])
    rows = [np.concatenate(f[0:3], 1), np.concatenate([f[3], f[4], blank], 1)]
    np.testing.assert_array_equal(grid, np.concatenate(rows, 0))


def _write_video(path, n, h=32, w=48, codec="libx264"):
    """Frame i is a flat grey of value 8 + 20 * i, so decoded values identify the frame."""
    import av

    with av.open(str(path), "w") as out:
        s = out.add_stream(codec, rate=8)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"qp": "0"} if codec == "libx264" else {}
        for i in range(n):
            img = np.full((h, w, 3), 8 + 20 * i, dtype=np.uint8)
            out.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(s.encode(None))


@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
def test_sample_frames_from_real_video(tmp_path, codec):
    path = tmp_path / "v.mp4"
    _write_video(path, 10, codec=codec)
    frames = sample_frames(str(path), 4)
    assert len(frames) == 4 and frames[0].shape == (32, 48, 3) and frames[0].dtype == np.uint8
    got = [int(round(f.mean())) for f in frames]
    want = [8 + 20 * i for i in even_indices(10, 4)]
    assert np.allclose(got, want, atol=4), (got, want)
    grid = sample_frames(str(path), 4, layout="grid")
    assert len(grid) == 1 and grid[0].shape == (64, 96, 3)
    np.testing.assert_array_equal(grid[0], make_grid(frames))
    req = JudgeRequest("[Agent]: wave", "task", video=str(path))
    assert len(request_frames(req, 2)) == 2
    assert cache_key(req)[0] == cache_key(JudgeRequest("x", "task", video=str(path)))[0]


def _write_cut_video(path, n, cut, h=32, w=48):
    """An mpeg4 video of n frames (frame i a flat grey of 8 + 20 * i) whose packets start ``cut`` frames
    before 0: mp4 writes an edit list, so its header counts n frames while n - cut decode (a stream copy
    cut); mkv stores no frame count."""
    import av

    with av.open(str(path), "w") as out:
        s = out.add_stream("mpeg4", rate=8)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"

        def mux(packets):
            for pkt in packets:
                shift = cut * round(1 / (pkt.time_base * 8))
                pkt.pts, pkt.dts = pkt.pts - shift, pkt.dts - shift
                out.mux(pkt)

        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), 8 + 20 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 8)
            mux(s.encode(frame))
        mux(s.encode(None))


@pytest.mark.parametrize("name,cut", [("cut.mp4", 3), ("cut.mp4", 8), ("v.mkv", 0), ("v.mp4", 0)])
def test_sample_frames_do_not_trust_the_containers_frame_count(tmp_path, monkeypatch, name, cut):
    """The frames are spread over what decodes, whatever stream.frames says: an edit-list mp4 counting 10
    frames of which 10 - cut decode gave fewer frames than asked (missing ones between) or none for k=1;
    a right count decodes the file once."""
    import av

    path = tmp_path / name
    _write_cut_video(path, 10, cut)
    with av.open(str(path)) as c:
        claimed = c.streams.video[0].frames
        every = [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]
    assert len(every) == 10 - cut and claimed == (10 if name.endswith("mp4") else 0)
    opened = []
    real_open = av.open
    monkeypatch.setattr(av, "open", lambda *a, **kw: opened.append(a) or real_open(*a, **kw))
    for k in (1, 3, 4):
        got = sample_frames(str(path), k)
        want = [every[i] for i in even_indices(len(every), k)]
        assert len(got) == len(want), (k, len(got), len(want))
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)
    if claimed == len(every):  # one decode per call
        assert len(opened) == 3


def test_sample_frames_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        sample_frames(str(tmp_path / "missing.mp4"), 4)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(Exception, match="bad.mp4|Invalid"):
        sample_frames(str(bad), 4)
    with pytest.raises(ValueError, match="layout"):
        sample_frames(str(bad), 4, layout="mosaic")
