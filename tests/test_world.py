"""The toy world: rendering, the exact latent map, text, and the oracle judge/proposer round trips."""

import asyncio

import numpy as np
import pytest
import torch

from engine.judge.base import Judge, JudgeRequest
from engine.propose import Proposer
from engine.world import latent
from engine.world.oracle import OracleJudge, OracleProposer, judge_frames, parse_task, read_scene
from engine.world.scene import (
    CELL,
    COLOURS,
    Move,
    Scene,
    random_scene,
    render,
    render_one,
    task_move,
    task_pairs,
    task_text,
)
from engine.world.text import PAD, UNK, ToyTextEncoder, tokenize


def _scenes(n, seed=0):
    rng = np.random.default_rng(seed)
    return [random_scene(rng) for _ in range(n)]


def _key(s: Scene):
    return sorted(zip(s.colours, s.rows, s.cols))


def test_correct_solution_videos_are_judged_solved():
    n = 0
    for s in _scenes(40):
        for task, solution, move in task_pairs(s):
            video = render_one(s, move)
            assert judge_frames(list(video), task) == {"task": 1, "agent": 1, "consistency": 1, "reward": 1}
            assert solution.startswith("the agent grabs the " + s.colours[move.block])
            n += 1
    assert n > 100


def test_still_video_and_wrong_block_fail_the_task():
    s = Scene(("red", "blue", "green"), (0, 2, 3), (0, 3, 1))
    task = "[Agent]: put the red block above the blue block"
    assert task_move(s, 0, 1) == Move(0, 3)
    still = judge_frames(list(render_one(s, None)), task)
    assert still["task"] == 0 and still["agent"] == 0 and still["consistency"] == 1
    wrong = judge_frames(list(render_one(s, Move(2, 2))), task)  # green moves under blue instead
    assert wrong["task"] == 0 and wrong["agent"] == 0


def test_teleport_is_caught_by_agent():
    s = Scene(("red", "blue", "green"), (0, 2, 3), (0, 3, 1))
    task = "[Agent]: put the red block above the blue block"
    good = render_one(s, Move(0, 3))
    teleport = np.stack([good[0], good[1], good[3], good[3]])  # 2 cells in one frame
    r = judge_frames(list(teleport), task)
    assert r["task"] == 1 and r["agent"] == 0
    no_grip = good.copy()
    no_grip[1:][(no_grip[1:] == 255).all(-1)] = COLOURS["red"]  # the block slides by itself
    assert judge_frames(list(no_grip), task)["agent"] == 0


def test_changed_colour_or_moved_bystander_is_caught_by_consistency():
    s = Scene(("red", "blue", "green"), (0, 2, 3), (0, 3, 1))
    task = "[Agent]: put the red block above the blue block"
    good = render_one(s, Move(0, 3))
    recoloured = good.copy()
    recoloured[-1][(recoloured[-1] == COLOURS["green"]).all(-1)] = COLOURS["yellow"]
    r = judge_frames(list(recoloured), task)
    assert r["task"] == 1 and r["consistency"] == 0
    shifted = good.copy()
    bystander = render_one(Scene(s.colours, s.rows, (0, 3, 2)), None)[0]
    shifted[-1][24:32] = bystander[24:32]  # green (row 3) jumps one cell in the last frame
    assert judge_frames(list(shifted), task)["consistency"] == 0
    other = Scene(s.colours, s.rows, (1, 3, 1))  # the video starts from another scene than the image
    video = render_one(other, Move(0, 2))
    assert judge_frames(list(video), task)["consistency"] == 1
    assert judge_frames(list(video), task, image=good[0])["consistency"] == 0
    assert judge_frames(list(good), task, image=good[0])["consistency"] == 1


def test_latent_map_is_exact_and_normalised():
    scenes = _scenes(64, 1)
    moves = [task_pairs(s)[0][2] if task_pairs(s) else None for s in scenes]
    video = render(scenes, moves)
    z = latent.encode(video)
    assert z.shape == (64, 12, 4, 16, 16)
    assert torch.equal(latent.decode(z), video)
    assert abs(float(z.mean())) < 0.2 and 0.7 < float(z.std()) < 1.3
    assert latent.image_latent(video[:, 0]).shape == (64, 12, 1, 16, 16)
    with pytest.raises(ValueError, match="uint8"):
        latent.encode(video.float())


def test_tokenizer_and_text_encoder():
    ids, lengths = tokenize(["[Agent]: put the red block under the blue block", "", "zebra red"], max_len=12)
    assert ids.shape == (3, 12) and lengths.tolist() == [10, 0, 2]
    assert ids[2, 0] == UNK and (ids[1] == PAD).all()
    # characters outside the grammar are unknown words, not dropped: "2" is not "" (the docstring's contract)
    odd, odd_lengths = tokenize(["slides it 2 cells!", "slides it cells"], max_len=12)
    assert odd_lengths.tolist() == [5, 3] and odd[0, 2] == UNK and odd[0, 4] == UNK
    enc = ToyTextEncoder(dim=16, layers=1, max_len=12)
    out = enc(ids)
    assert out.shape == (3, 12, 16) and torch.isfinite(out).all()
    assert (out[1] == 0).all() and (out[0, 10:] == 0).all() and (out[0, :10] != 0).any()
    cond = enc.cond(["the agent grabs the red block", ""])
    assert cond["text"].shape == (2, 12, 16) and cond["text_lengths"].tolist() == [12, 12]


def test_oracle_judge_protocol_and_bad_task():
    s = _scenes(1, 3)[0]
    task, _, move = task_pairs(s)[0]
    frames = list(render_one(s, move))
    judge = OracleJudge()
    assert isinstance(judge, Judge)
    reqs = [
        JudgeRequest(task=task, question=q, frames=frames) for q in ("task", "agent", "consistency", "reward")
    ]
    reqs.append(JudgeRequest(task="[Agent]: dance", question="task", frames=frames))
    verdicts = asyncio.run(judge.score(reqs))
    assert [v.score for v in verdicts[:4]] == [1.0, 1.0, 1.0, 1.0]
    assert verdicts[4].status == "parse_error" and verdicts[4].score is None


def test_proposer_pairs_parse_and_are_solvable():
    scenes = _scenes(12, 4)
    images = [render_one(s, None)[0] for s in scenes]
    proposer = OracleProposer(seed=0)
    assert isinstance(proposer, Proposer)
    out = asyncio.run(proposer.propose(images, 4))
    assert len(out) == len(scenes)
    for s, image, pairs in zip(scenes, images, out):
        assert _key(read_scene(image)) == _key(s)
        assert 1 <= len(pairs) <= 4 or not task_pairs(s)
        for p in pairs:
            assert p.task.startswith("[Agent]: ")
            target, _, ref = parse_task(p.task)
            a, b = s.index(target), s.index(ref)
            video = render_one(s, task_move(s, a, b))
            assert judge_frames(list(video), p.task)["task"] == 1
            assert f"the {target} block" in p.solution and str(abs(s.cols[b] - s.cols[a])) not in p.solution


def test_proposer_pairs_of_an_image_do_not_depend_on_the_call():
    """An image gets the same pairs proposed alone, first or second in a call: a resumed or re-batched
    propose run (other images around it) must not change its tasks (it was shuffled by its position)."""
    scenes = [s for s in _scenes(40, 9) if len(task_pairs(s)) >= 4][:4]
    images = [render_one(s, None)[0] for s in scenes]
    proposer = OracleProposer(seed=0)
    together = asyncio.run(proposer.propose(images, 2))
    reversed_ = asyncio.run(proposer.propose(images[::-1], 2))[::-1]
    alone = [asyncio.run(proposer.propose([im], 2))[0] for im in images]
    assert together == reversed_ == alone
    # the seed still decides the shuffle
    others = asyncio.run(OracleProposer(seed=1).propose(images, 4))
    assert others != asyncio.run(proposer.propose(images, 4))


def test_render_geometry():
    s = Scene(("yellow",), (1,), (2,))
    v = render_one(s, Move(0, -1))
    ys, xs = np.nonzero((v[0] == COLOURS["yellow"]).all(-1))
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (CELL + 1, CELL + 6, 2 * CELL + 1, 2 * CELL + 6)
    assert (v[0] == 255).sum() == 0 and (v[1] == 255).all(-1).sum() == 4
    ys, xs = np.nonzero((v[-1] != 0).any(-1))
    assert xs.min() == CELL + 1  # one cell left after the last frame


def _perfect_velocity():
    """An analytic Demonstrator: reads the scene from the first-frame latent and the move from the solution
    text, renders that video x0 and returns the exact velocity (x_t - x0) / t. Task prompts name no move:
    it then predicts the still scene."""
    import re

    from engine.world.scene import WORD_NUMBERS, Move

    def encode_text(texts):
        return {"texts": texts}

    def v_fn(x_t, t, cond):
        images = latent.decode(cond["image_latent"])[:, 0].numpy()
        scenes, moves = [], []
        for image, text in zip(images, cond["texts"]):
            scene = read_scene(image)
            m = re.search(r"the (\w+) block and slides it (\w+) cells? to the (left|right)", text)
            n = WORD_NUMBERS[m.group(2)] if m else 0
            scenes.append(scene)
            moves.append(Move(scene.index(m.group(1)), n if m.group(3) == "right" else -n) if m else None)
        x0 = latent.encode(render(scenes, moves))
        return (x_t - x0) / t.view(-1, 1, 1, 1, 1)

    return v_fn, encode_text


def test_probe_reads_the_final_column_of_a_perfect_and_of_a_blind_model():
    """engine.world.probe: the exact solution-following velocity puts every block in its final column at
    every noise level; a model that predicts nothing (v = 0: x0_hat = x_t) is right at low noise only."""
    from engine.world.demonstrator import eval_items
    from engine.world.probe import probe

    items = eval_items(48, seed=5)
    v_fn, encode_text = _perfect_velocity()
    exact = probe(v_fn, encode_text, items, prompt="solution", t_levels=(1.0, 0.5), batch_size=16)
    assert all(r == {"column": 1.0, "direction": 1.0} for r in exact.values())
    still = probe(v_fn, encode_text, items, prompt="task", t_levels=(1.0,))  # no move named: block stays put
    assert still[1.0]["column"] == 0.0 and still[1.0]["direction"] == 0.0
    blind = probe(lambda x, t, c: torch.zeros_like(x), encode_text, items, t_levels=(1.0, 0.05))
    assert blind[1.0]["column"] < 0.6 and blind[0.05]["column"] == 1.0


def test_probe_gives_no_credit_when_the_block_is_gone():
    """A model whose one-step prediction is an empty (all background) video puts the block in no column and
    moves it in no direction: 0 for both, not the share of items ending in column 0 / moving left."""
    from engine.world.demonstrator import eval_items
    from engine.world.probe import final_columns, probe

    items = eval_items(48, seed=5)
    black = latent.encode(torch.zeros(1, 4, 32, 32, 3, dtype=torch.uint8))

    def v_fn(x_t, t, cond):
        return (x_t - black) / t.view(-1, 1, 1, 1, 1)  # x0_hat = x_t - t v = the black video

    assert any(it.meta["move"].dx < 0 for it in items)
    empty = probe(v_fn, lambda texts: {}, items, t_levels=(1.0, 0.5))
    assert all(r == {"column": 0.0, "direction": 0.0} for r in empty.values())
    frames = torch.zeros(2, 32, 32, 3, dtype=torch.uint8)
    frames[1, 9:15, 1:7] = torch.tensor(COLOURS["red"], dtype=torch.uint8)  # red in row 1, column 0
    assert final_columns(frames, ["red", "red"], [1, 1]).tolist() == [-1, 0]


def test_invalid_scene_is_refused():
    """Two blocks in one row rendered as one square of a colour no block has (red + blue summed to
    (255, 130, 255)); a scene must say what it cannot draw."""
    with pytest.raises(ValueError, match="one block per row"):
        Scene(("red", "blue", "green"), (0, 0, 1), (1, 1, 2))
    with pytest.raises(ValueError, match="distinct names"):
        Scene(("red", "red", "green"), (0, 1, 2), (0, 1, 2))
    with pytest.raises(ValueError, match="cells 0..3"):
        Scene(("red", "blue", "green"), (0, 1, 4), (0, 1, 2))
    with pytest.raises(ValueError, match="one each per block"):
        Scene(("red", "blue", "green"), (0, 1), (0, 1, 2))


def test_task_text_of_one_block_is_refused():
    """target == reference wrote a task the oracle's own parser rejects."""
    s = Scene(("red", "blue", "green"), (0, 2, 3), (0, 3, 1))
    with pytest.raises(ValueError, match="same block"):
        task_text(s, 1, 1)
    assert parse_task(task_text(s, 1, 0)) == ("blue", "under", "red")


def test_render_refuses_an_illegal_move():
    """Blue in column 3 sliding two cells right left the frame (0 blue pixels in the last frame), and a block
    index past the scene's blocks rendered a still video: both silently."""
    s = Scene(("red", "blue", "green"), (0, 2, 3), (0, 3, 1))
    with pytest.raises(ValueError, match="not legal"):
        render_one(s, Move(1, 2))
    with pytest.raises(ValueError, match="not legal"):
        render_one(s, Move(3, 1))
    with pytest.raises(ValueError, match="not legal"):
        render_one(s, Move(0, -1))
    # the legal extremes still render: red from column 0 to 3, blue from column 3 to 0
    last = render_one(s, Move(0, 3))[-1]
    assert (last[1:7, 25:31] == COLOURS["red"]).all(-1).sum() == 32  # 36 less the 2x2 grip
    assert (render_one(s, Move(1, -3))[-1][17:23, 1:7] == COLOURS["blue"]).all(-1).sum() == 32


def test_proposer_pairs_every_block_of_the_image():
    """read_scene returns the blocks it sees: two of them made task_pairs raise IndexError (a crash, not a
    clear status), four of them silently left the fourth out of every task."""
    two = render_one(Scene(("red", "blue"), (0, 2), (0, 3)), None)[0]
    pairs = asyncio.run(OracleProposer().propose([two], 8))[0]
    assert sorted(p.task for p in pairs) == [
        "[Agent]: put the blue block under the red block",
        "[Agent]: put the red block above the blue block",
    ]
    four = Scene(("red", "yellow", "blue", "green"), (0, 1, 2, 3), (0, 1, 3, 1))
    pairs = asyncio.run(OracleProposer().propose([render_one(four, None)[0]], 20))[0]
    # ordered pairs in different columns: 12 ordered pairs less yellow/green both ways (same column)
    assert len(pairs) == 10 and sum("green" in p.task for p in pairs) == 4


def test_judge_needs_two_frames():
    """One frame failed inside the agent question with "max() arg is an empty sequence"."""
    s = Scene(("red", "blue", "green"), (0, 2, 3), (0, 3, 1))
    frame = render_one(s, None)[0]
    with pytest.raises(ValueError, match="expected >= 2"):
        judge_frames([frame], "[Agent]: put the red block above the blue block")


def test_proposer_refuses_a_scene_at_another_size():
    """A toy scene at twice the size (64x64, each pixel doubled) was read on the 8-pixel grid anyway: its blocks
    landed in wrong columns and rows, and the proposer wrote solutions that move the wrong distance."""
    s = Scene(("red", "green", "blue"), (0, 1, 2), (0, 1, 3))
    image = render_one(s, None)[0]
    assert _key(read_scene(image)) == _key(s)
    with pytest.raises(ValueError, match="expected a 32x32"):
        asyncio.run(OracleProposer().propose([image.repeat(2, 0).repeat(2, 1)], 2))


def test_random_moves_of_two_and_four_block_scenes():
    """random_moves drew the block among NUM_BLOCKS = 3 whatever the scene held: on a two-block scene it raised
    IndexError, on a four-block one the fourth block never moved. Every draw is now legal (render accepts it)
    and every block of the scene gets moved."""
    from engine.world.scene import random_moves

    rng = np.random.default_rng(0)
    for scene in (
        Scene(("red", "blue"), (0, 2), (0, 3)),
        Scene(("red", "yellow", "blue", "green"), (0, 1, 2, 3), (0, 1, 3, 1)),
    ):
        moves = [random_moves(scene, rng) for _ in range(200)]
        render([scene] * len(moves), moves)  # raises on an illegal move
        assert {m.block for m in moves} == set(range(len(scene.colours)))
