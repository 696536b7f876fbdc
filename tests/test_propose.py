"""engine.propose: parsing/validation of proposer output, retries and counting over a real loopback
server (OpenAIProposer), and the tiny random Qwen2.5-VL (TransformersProposer): never a half pair."""

import asyncio

import numpy as np
import pytest
import torch

from engine.propose import OpenAIProposer, TaskPair, TransformersProposer, parse_proposals, task_key
from tests.judge_servers import SOLUTION_WORDS, FaultServer

WORDS = "red blue green cube block ball left right onto under slowly agent walks pushes lifts".split()


def _pairs(n: int, seed: int, lo: int, hi: int) -> list[TaskPair]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        task = "move the " + " ".join(rng.choice(WORDS, rng.integers(1, 5))) + f" {i}"
        sol = " ".join(rng.choice(WORDS, rng.integers(lo, hi + 1)))
        out.append(TaskPair(f"[Agent]: {task}", sol))
    return out


TIGHT = {"tight": "{i}. ", "tight_paren": "({i}) ", "tight_hash": "#{i} ", "tight_dash": "Task {i} - ",
         "tight_label": "{i}) Task: "}  # fmt: skip


@pytest.mark.parametrize("style", ["plain", "numbered", "markdown", "bold_labels", "headed", *TIGHT])
def test_parse_roundtrip_of_formatted_pairs(style):
    """Each layout parses back to exactly the pairs written: headings, list markers and closing chatter
    around the blocks stay out of the solutions (a solution that ends in a number keeps it)."""
    pairs = _pairs(6, seed=len(style), lo=40, hi=85)
    pairs = [TaskPair(p.task, f"{p.solution} in slot {i + 2}.") for i, p in enumerate(pairs)]
    blocks = []
    for i, p in enumerate(pairs):
        task = p.task.removeprefix("[Agent]: ")
        if style == "plain":
            blocks.append(f"[Agent]: {task}\nDescription: {p.solution}")
        elif style == "numbered":
            blocks.append(f"{i + 1}. [Agent]: {task}\n   Description: {p.solution}")
        elif style == "markdown":
            blocks.append(f"**[Agent]:** {task}\n**Description:** {p.solution}\n")
        elif style == "bold_labels":  # the emphasis closes before the colon: every block was "no_agent_tag"
            blocks.append(f"**[Agent]**: {task}\n**Description**: {p.solution}\n")
        elif style == "headed":
            blocks.append(f"### Task {i + 1}:\n[Agent]: {task}\nDescription: {p.solution}")
        else:  # no blank lines: the next item's marker ("2.", "(2)", "Task 2 -") follows a description ending
            # in a number; all but "2." ended up in the previous solution
            blocks.append(f"{TIGHT[style].format(i=i + 1)}[Agent]: {task}\nDescription: {p.solution}")
    text = "Here are the tasks:\n\n" + ("\n" if style in TIGHT else "\n\n").join(blocks)
    if style not in TIGHT:
        text += "\n\nI hope these tasks are helpful!"
    got, reasons = parse_proposals(text)
    assert got == pairs and reasons == {}


def test_invalid_blocks_are_rejected_and_counted():
    good = _pairs(1, 0, 5, 8)[0]
    text = (
        f"[Agent]: {good.task[9:]}\nDescription: {good.solution}\n"
        "[Agent]: is the cube red?\nDescription: " + "word " * 6 + "\n"
        "[Agent]: push the ball\n"
        "[Agent]: push the cube\nDescription: two words\n"
        "[Agent]: \nDescription: " + "word " * 6 + "\n"
        "[Agent]: a b c d e f g h i j k l m n o p q r s t u v\nDescription: " + "word " * 6
    )
    got, reasons = parse_proposals(text, min_words=5, max_words=8)
    assert got == [good]
    assert reasons == {
        "task_is_question": 1,
        "missing_description": 1,
        "solution_length": 1,
        "empty_task": 1,
        "task_length": 1,
    }
    assert parse_proposals("no tags at all")[1] == {"no_agent_tag": 1}
    assert task_key("[Agent]: Push the CUBE left.") == task_key("[agent]:push the cube   left")


def test_markdown_is_removed_but_underscores_inside_words_stay():
    """Emphasis and heading marks a VLM adds are dropped; an underscore inside a word (an object's name) and a
    '#' inside the text are not markdown (every '_' and '#' was stripped: 'red_block' became 'redblock')."""
    text = (
        "### **[Agent]:** Push the red_block to cup #2\n"
        "**Description:** Grip the _red_block_ with __both__ fingers, slide it left, stop at `cup #2`.\n"
    )
    (pair,), _ = parse_proposals(text, min_words=5, max_words=30)
    assert pair.task == "[Agent]: Push the red_block to cup #2"
    assert pair.solution == "Grip the red_block with both fingers, slide it left, stop at cup #2."


def _images(n):
    return [np.full((16, 16, 3), 10 * (i + 1), dtype=np.uint8) for i in range(n)]


def test_openai_proposer_retries_dedupes_and_fills_n():
    with FaultServer() as srv:
        prop = OpenAIProposer(
            srv.url,
            "m",
            timeout_s=10,
            min_words=SOLUTION_WORDS - 2,
            max_words=SOLUTION_WORDS + 2,
            max_attempts=3,
        )
        out = asyncio.run(prop.propose(_images(3), 4))
    s = prop.stats
    assert [len(o) for o in out] == [4, 4, 4] and s.short_images == 0
    for pairs in out:
        keys = [task_key(p.task) for p in pairs]
        assert len(set(keys)) == 4 and all(p.task.startswith("[Agent]: ") for p in pairs)
        assert all(len(p.solution.split()) == SOLUTION_WORDS for p in pairs)
    all_keys = [task_key(p.task) for o in out for p in o]
    assert len(set(all_keys)) == 12  # tasks name their image: nothing leaked across images
    assert s.requests == 6 and s.failed_calls == 0
    assert s.reasons == {"missing_description": 3, "solution_length": 3, "task_is_question": 3}
    assert s.duplicates == 3 + 3  # the first answer's repeat, and the second answer's repeat


def test_proposer_gives_up_and_counts_on_garbage_or_dead_server():
    with FaultServer(propose_garbage=True) as srv:
        prop = OpenAIProposer(srv.url, "m", timeout_s=10, max_attempts=2)
        out = asyncio.run(prop.propose(_images(2), 3))
    assert out == [[], []] and prop.stats.requests == 4 and prop.stats.short_images == 2
    assert prop.stats.reasons == {"no_agent_tag": 4}
    srv_url = srv.url  # now closed: connections are refused
    dead = OpenAIProposer(srv_url, "m", timeout_s=2, max_retries=0, max_attempts=2)
    assert asyncio.run(dead.propose(_images(1), 2)) == [[]] and dead.stats.failed_calls == 2
    with pytest.raises(ValueError, match=r"images\[0\]"):
        asyncio.run(dead.propose([np.zeros((4, 4), np.uint8)], 2))


def test_transformers_proposer_on_tiny_random_vlm(tmp_path):
    from engine.judge.tiny import build_tiny_qwen25vl

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        prop = TransformersProposer(
            str(build_tiny_qwen25vl(tmp_path)), device="cpu", max_attempts=2, max_new_tokens=12
        )
        images = [np.random.default_rng(i).integers(0, 256, (56, 56, 3), dtype=np.uint8) for i in range(2)]
        out = asyncio.run(prop.propose(images, 2))
    finally:
        torch.set_num_threads(threads)
    # Random words cannot form a 40-word description: every image ends short, and says so.
    assert out == [[], []] and prop.stats.requests == 4 and prop.stats.short_images == 2
    assert prop.stats.failed_calls == 0 and sum(prop.stats.reasons.values()) >= 4


class _CutServer:
    """A loopback OpenAI-compatible server that answers "Propose N" with N blocks of 45-word descriptions and,
    as vLLM does, stops after the request's max_tokens (here: words) with finish_reason "length"."""

    def __init__(self):
        import json
        import re
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.full: set[str] = set()

        def answer(n: int, start: int) -> str:
            blocks = []
            for k in range(start, start + n):
                sol = " ".join(f"step{k}w{w}" for w in range(45))
                self.full.add(sol)
                blocks.append(f"[Agent]: push block {k} left\nDescription: {sol}")
            return "\n\n".join(blocks)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = " ".join(p["text"] for p in body["messages"][-1]["content"] if p["type"] == "text")
                n = int(re.search(r"Propose (\d+)", prompt).group(1))
                words = answer(n, start=10 * n).split(" ")
                cut = len(words) > body["max_tokens"]
                content = " ".join(words[: body["max_tokens"]])
                choice = {"index": 0, "message": {"role": "assistant", "content": content},
                          "finish_reason": "length" if cut else "stop"}  # fmt: skip
                data = json.dumps({"choices": [choice]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/v1"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self):
        self.http.shutdown()
        self.http.server_close()


def test_an_answer_cut_at_max_new_tokens_gives_no_half_solution():
    """An answer stopped at max_new_tokens (finish_reason "length") ends mid-description: its last block, 41 of
    45 words, passed the 40-90 bound and was kept as a half solution. It is dropped and asked for again."""
    srv = _CutServer()
    try:
        # the answer's 148 space-separated words cut to 144: the third description keeps 41 of its 45
        prop = OpenAIProposer(srv.url, "m", timeout_s=10, max_attempts=2, max_new_tokens=144)
        out = asyncio.run(prop.propose(_images(2), 3))
    finally:
        srv.close()
    assert [len(o) for o in out] == [3, 3]
    assert all(p.solution in srv.full for o in out for p in o), [p.solution[-40:] for o in out for p in o]
    assert prop.stats.reasons == {"truncated": 2} and prop.stats.requests == 4


def test_an_item_without_its_agent_tag_does_not_merge_into_the_previous_solution():
    """The next item written without the [Agent] tag ("2. Pick up ...", "Agent: ...") ran into the previous
    block's description: one solution held two items' texts, tasks and a second 'Description:' (within the
    word bounds). Such a block is refused, never returned merged; a tagged item after it still parses."""
    a, b, c = (_pairs(3, 7, 25, 30)[i] for i in range(3))
    for untagged in (f"2. {b.task[9:]}", f"Agent: {b.task[9:]}", f"- Task: {b.task[9:]}"):
        text = (
            f"1. [Agent]: {a.task[9:]}\nDescription: {a.solution}\n{untagged}\nDescription: {b.solution}\n"
            f"3. [Agent]: {c.task[9:]}\nDescription: {c.solution}\n"
        )
        got, reasons = parse_proposals(text, min_words=20, max_words=90)  # the merged text is within them
        assert got == [c] and reasons == {"merged_blocks": 1}, (untagged, got)


def test_a_long_run_of_spaces_in_an_answer_does_not_hang_the_parser():
    """A degenerate answer with a long run of spaces on a description's last line: the heading check backtracked
    polynomially (400 spaces took seconds, a thousand minutes) and blocked the proposer's event loop."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "from engine.propose import parse_proposals\n"
        "sol = ' '.join(f'w{i}' for i in range(50))\n"
        "text = f'[Agent]: push the cube\\nDescription: {sol}\\n' + ' ' * 3000 + 'x\\n[Agent]: next'\n"
        "pairs, _ = parse_proposals(text)\n"
        "assert [p.solution for p in pairs] == [sol + ' x'], pairs\n"
    )
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr[-2000:]


def test_underscores_beside_non_ascii_letters_stay():
    """An underscore was kept only between ASCII letters or digits: 'tasse_à_café' became 'tasseàcafé' and
    'Würfel_ä' 'Würfelä' (a non-English object name rewritten); emphasis underscores still go."""
    text = (
        "[Agent]: pousse la tasse_à_café vers le bloc_bleu\n"
        "Description: l'agent saisit la _tasse_à_café_ et la pousse vers le __Würfel_ä__ à droite.\n"
    )
    (pair,), _ = parse_proposals(text, min_words=5, max_words=30)
    assert pair.task == "[Agent]: pousse la tasse_à_café vers le bloc_bleu"
    assert pair.solution == "l'agent saisit la tasse_à_café et la pousse vers le Würfel_ä à droite."


def test_json_answers_parse_to_the_pairs_written():
    """A VLM that answers in JSON: with 'Description:' inside a value, the JSON quotes and the next key were kept
    in the task ('push ... 0", "solution":') and the solution; other JSON forms lost every pair. Each form now
    parses to exactly the pairs written."""
    import json

    pairs = _pairs(3, seed=11, lo=40, hi=60)
    objs = [{"task": p.task, "description": p.solution} for p in pairs]
    forms = {
        "description_inside": [{"task": p.task, "solution": f"Description: {p.solution}"} for p in pairs],
        "objects": objs,
        "wrapped": {"tasks": [{"[Agent]": p.task[9:], "Description": p.solution} for p in pairs]},
        "strings": [f"{p.task}\nDescription: {p.solution}" for p in pairs],
    }
    for name, data in forms.items():
        for text in (json.dumps(data), f"```json\n{json.dumps(data, indent=2)}\n```"):
            got, reasons = parse_proposals(text)
            assert got == pairs and reasons == {}, (name, got)
