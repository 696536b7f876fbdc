"""Test helpers: a fault-injecting OpenAI-compatible server on 127.0.0.1 (stdlib http.server, threads).

It is written independently of engine.judge.serve. The reply for a request is decided by a
``fault=<name>`` word in its text (the judge prompt carries the task, so tests put it in the task):

    (none)     "Score: <m>" where m = mean of the first image's pixels / 255 (4 decimals): the right
               answer is known to the test, so a wrong reward cannot pass silently
    json       '{"score": <m>}'          yes        "Yes."               malformed  "I cannot tell."
    empty      ""                        outofrange "Score: 1.7"         badbody    200, body not JSON
    500        HTTP 500 always           500once    HTTP 500 on the first attempt per text, then ok
    slow       sleeps ``slow_s`` then ok drop       closes the connection without an answer
    ratelimit  HTTP 429 with "Retry-After: <retry_after_s>" until that long after the first attempt
               per text, then ok
    cut        finish_reason "length" (stopped at max_tokens, as vLLM does) inside the score line:
               "...\nScore: 0" of "...\nScore: <m>"
    cutafter   finish_reason "length" after a whole score line: "Score: <m>\nThe agent"

A prompt that asks to "Propose N" tasks gets proposer blocks instead (see ``proposal_text``): on the
first attempt per prompt one valid pair plus broken and duplicated blocks, on later attempts N valid
new pairs plus one repeating an earlier task; with ``propose_garbage=True`` only prose without any block.

``kill()`` stops the server and cuts every open connection (a server dying mid-batch).
"""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

_FAULT = re.compile(r"fault=(\w+)")
_PROPOSE = re.compile(r"Propose (\d+)")
SOLUTION_WORDS = 15


def proposal_text(n: int, first: bool, m: float) -> str:
    """Proposer blocks; tasks name the image (its mean, m) so images never share a task."""
    tag = f"{m:.4f}".replace(".", "")
    sol = lambda k: (
        "Description: "
        + " ".join(["the agent walks to block", tag, str(k), "and slowly pushes it", "left until it stops"])
    )
    if first:
        return (
            f"1. [Agent]: push block {tag} 0 left\n{sol(0)}\n"
            f"2. [Agent]: Push block {tag} 0 LEFT.\n{sol(0)}\n"  # a duplicate of 1.
            f"3. [Agent]: lift block {tag} 9\n"  # no description
            f"4. [Agent]: jump {tag} 8 high\nDescription: too short\n"
            f"5. [Agent]: what is block {tag} 7?\n{sol(7)}"
        )
    return "\n\n".join(f"**[Agent]:** push block {tag} {k} left\n{sol(k)}" for k in range(n + 1))


def mean_score(image_url: str) -> float:
    raw = base64.b64decode(image_url.split(",", 1)[1])
    return round(float(np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")).mean()) / 255.0, 4)


def expected_score(frame: np.ndarray) -> float:
    """What the fault server answers for a request whose first image is ``frame``."""
    return round(float(frame.mean()) / 255.0, 4)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FaultServer._HTTP

    def log_message(self, *args) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        self.server.owner._track(self.connection, True)

    def finish(self) -> None:
        self.server.owner._track(self.connection, False)
        try:
            super().finish()
        except OSError:
            pass

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        owner = self.server.owner
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        parts = body["messages"][-1]["content"]
        text = " ".join(p["text"] for p in parts if p["type"] == "text")
        urls = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
        m = _FAULT.search(text)
        fault = m.group(1) if m else "none"
        with owner.lock:
            owner.requests += 1
            owner.attempts[text] = owner.attempts.get(text, 0) + 1
            first = owner.attempts[text] == 1
            since_first = time.monotonic() - owner.first_seen.setdefault(text, time.monotonic())
            owner.in_flight += 1
            owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
            owner.images_seen.append(len(urls))
        try:
            if fault == "ratelimit" and since_first < owner.retry_after_s:
                self.send_response(429)
                self.send_header("Retry-After", str(owner.retry_after_s))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self._reply(fault, first, mean_score(urls[0]) if urls else 0.0, body.get("model"), text)
        finally:
            with owner.lock:
                owner.in_flight -= 1

    def _reply(self, fault: str, first: bool, m: float, model: str, text: str = "") -> None:
        owner = self.server.owner
        asked = _PROPOSE.search(text)
        if asked:
            fault = "proposal"
            with owner.lock:  # "first" per image: the prompt changes as the proposer asks for fewer
                first = m not in owner.proposed
                owner.proposed.add(m)
            content = (
                "I see a scene." if owner.propose_garbage else proposal_text(int(asked.group(1)), first, m)
            )
        if fault == "slow":
            time.sleep(self.server.owner.slow_s)
        if fault == "drop":
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        if fault == "500" or (fault == "500once" and first):
            return self._send(500, b'{"error": {"message": "injected"}}')
        if fault == "badbody":
            return self._send(200, b"<html>not json</html>", "text/html")
        if fault == "badgzip":  # says gzip, is not: the client cannot decode the body
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", "8")
            self.end_headers()
            self.wfile.write(b"not gzip")
            return None
        finish = "length" if fault in ("cut", "cutafter") else "stop"
        if fault != "proposal":
            replies = {
                "cut": f"The agent pushes the block.\nScore: {m:.4f}"[: -len(f"{m:.4f}") + 1],
                "cutafter": f"Score: {m:.4f}\nThe agent",
                "json": json.dumps({"score": m}),
                "yes": "Yes.",
                "malformed": "I cannot tell.",
                "empty": "",
                "outofrange": "Score: 1.7",
            }
            content = replies.get(fault, f"Score: {m:.4f}")
        msg = {"role": "assistant", "content": content}
        choice = {"index": 0, "message": msg, "finish_reason": finish}
        self._send(200, json.dumps({"choices": [choice], "model": model}).encode())


class FaultServer:
    """``with FaultServer() as s: OpenAIChat(s.url, "m")``: a loopback server with injected faults."""

    class _HTTP(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 128  # the listen backlog (default 5) refused some of many simultaneous connects
        owner: FaultServer

        def handle_error(self, request, client_address) -> None:  # cut connections are expected
            pass

    def __init__(
        self, *, slow_s: float = 1.0, propose_garbage: bool = False, port: int = 0, retry_after_s: int = 1
    ) -> None:
        self.slow_s, self.propose_garbage, self.retry_after_s = slow_s, propose_garbage, retry_after_s
        self.first_seen: dict[str, float] = {}
        self.lock = threading.Lock()
        self.requests = 0
        self.attempts: dict[str, int] = {}
        self.in_flight = self.max_in_flight = 0
        self.images_seen: list[int] = []
        self.proposed: set[float] = set()
        self._conns: set[socket.socket] = set()
        self._http = self._HTTP(("127.0.0.1", port), _Handler)  # port 0: any free one
        self._http.owner = self
        self.port = self._http.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(
            target=self._http.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self.lock:
            (self._conns.add if add else self._conns.discard)(conn)

    def open_connections(self) -> int:
        """Connections the server holds open (closed ones leave once their handler sees EOF)."""
        with self.lock:
            return len(self._conns)

    def __enter__(self) -> FaultServer:
        self._thread.start()
        return self

    def kill(self) -> None:
        """Stop accepting and cut every open connection."""
        self._http.shutdown()
        self._http.server_close()
        with self.lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __exit__(self, *exc) -> None:
        if self._thread.is_alive():
            self.kill()


def free_port() -> int:
    """A port with nothing listening on it (bound, then closed): connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
