"""A real OpenAI-compatible chat-completions server on loopback, for tests and the demo.

In tests:
    with FakeLLM() as llm:
        llm.script(status=429, json={"error": {"message": "slow down"}})
        llm.script(content='{"outcome": "done", "summary": "ok", "edits": []}',
                   usage={"prompt_tokens": 100, "completion_tokens": 20})
        ... point an Endpoint at llm.base_url ...
        llm.requests[0].headers["authorization"]

As a program (the README demo):
    python tests/fakellm.py --port 0 [--script FILE]
prints its base URL and serves until interrupted. FILE is a JSON list of
responses (the keyword arguments of `script`), answered in order; after them,
or without a script, the demo responder answers: specialists get a `done`
reply that edits nothing, orchestrator requests a small valid plan built from
the team roster in the prompt, and report reviews a summary with no orders.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from coordinator.llmagent import ORCHESTRATOR_ROLE, SYNTHESIS_ROLE

_AUTO: Any = object()  # usage counted from the text, like a real server


@dataclass(frozen=True)
class Response:
    """One scripted answer. `json` is sent as the body as is; else `content` becomes a completion."""

    status: int = 200
    json: Any = None
    content: str | None = None
    usage: Mapping[str, int] | None = _AUTO  # None: the completion carries no usage
    delay: float = 0.0  # seconds before answering (cut short when the server stops)
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: Any  # parsed JSON, or None


Responder = Callable[[Any], Response]


class FakeLLM:
    """A ThreadingHTTPServer on 127.0.0.1 answering /v1/chat/completions; stops with its `with`."""

    def __init__(self, responder: Responder | None = None, *, port: int = 0) -> None:
        self.responder: Responder = responder or demo_responder
        self.requests: list[Recorded] = []
        self._queue: deque[Response] = deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _handler_for(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, status: int = 200, json: Any = None, content: str | None = None,
               usage: Mapping[str, int] | None = _AUTO, delay: float = 0.0,
               headers: Mapping[str, str] | None = None) -> None:
        """Queue one answer; answers are given in order, then the responder takes over."""
        with self._lock:
            self._queue.append(Response(status, json, content, usage, delay, dict(headers or {})))

    def chat_bodies(self) -> list[Any]:
        return [r.body for r in self.requests if r.path.endswith("/chat/completions")]

    def start(self) -> FakeLLM:
        self._thread = threading.Thread(target=self._server.serve_forever, name="fakellm",
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> FakeLLM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _next(self, body: Any) -> Response:
        with self._lock:
            if self._queue:
                return self._queue.popleft()
        return self.responder(body)


def _handler_for(fake: FakeLLM) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # tests read .requests; stderr noise helps nobody

        def do_GET(self) -> None:
            fake.requests.append(Recorded("GET", self.path, _headers(self), None))
            if self.path.rstrip("/").endswith("/models"):
                self._send(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = None
            fake.requests.append(Recorded("POST", self.path, _headers(self), body))
            # Routed by the path alone, as a real server does: a query (?api-version=...) is no route.
            if not self.path.split("?", 1)[0].rstrip("/").endswith("/chat/completions"):
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
                self._send(400, {"error": {"message": "body must be JSON with messages"}})
                return
            response = fake._next(body)
            if response.delay and fake._stopping.wait(response.delay):
                self.close_connection = True
                return  # stopping: drop the answer
            payload = response.json if response.json is not None else _completion(body, response)
            # OSError: the client gave up (its timeout) and there is nobody to answer.
            with contextlib.suppress(OSError):
                self._send(response.status, payload, response.headers)

        def _send(self, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> None:
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

    return Handler


def _headers(handler: BaseHTTPRequestHandler) -> dict[str, str]:
    return {k.lower(): v for k, v in handler.headers.items()}


def _completion(body: dict[str, Any], response: Response) -> dict[str, Any]:
    content = response.content or ""
    usage = response.usage
    if usage is _AUTO:
        prompt = sum(len(str(m.get("content", ""))) for m in body["messages"])
        usage = {"prompt_tokens": max(1, prompt // 4), "completion_tokens": max(1, len(content) // 4)}
    out: dict[str, Any] = {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "fake"),
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": content}}],
    }
    if usage is not None:
        prompt_tokens = int(usage.get("prompt_tokens", 0))
        completion_tokens = int(usage.get("completion_tokens", 0))
        out["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                        "total_tokens": prompt_tokens + completion_tokens}
    return out


# -- the demo responder ---------------------------------------------------

_ROSTER_LINE = re.compile(r"^- (?P<name>[a-z][a-z0-9_-]{0,31}) \| writes: (?P<writes>[^|\n]*)", re.M)


def demo_responder(body: Any) -> Response:
    """Answer like a cooperative model: plan for orchestrators, `done` for specialists."""
    messages = body.get("messages", []) if isinstance(body, dict) else []
    system = "\n".join(str(m.get("content", "")) for m in messages if m.get("role") == "system")
    user = next((str(m.get("content", "")) for m in messages if m.get("role") == "user"), "")
    if SYNTHESIS_ROLE in system:
        reply: dict[str, Any] = {"summary": "All orders for the request are done; nothing is missing.",
                                 "orders": []}
    elif ORCHESTRATOR_ROLE in system:
        reply = _demo_plan(user)
    else:
        reply = {"outcome": "done", "summary": "Looked at the order; no change was needed.",
                 "edits": []}
    return Response(content=json.dumps(reply))


def _demo_plan(user: str) -> dict[str, Any]:
    request = _section(user, "Request")
    # The brief opens with YAML front matter; the objective line says what the request is.
    objective = re.search(r"^\*\*Objective:\*\*\s*(.+)$", request, re.M)
    lines = request.strip().splitlines()
    first_line = objective.group(1).strip() if objective else (lines[0].strip() if lines else "the request")
    agents = [(m["name"], m["writes"].strip()) for m in _ROSTER_LINE.finditer(_section(user, "Team"))]
    if not agents:
        return {"summary": "Nobody on the team can take this request.", "orders": []}
    name, writes = agents[0]
    files = [] if writes in ("", "none") else [writes.split(",")[0].strip()]
    order = {
        "to": name,
        "objective": f"Handle: {first_line}"[:200],
        "acceptance": ["The request is handled as asked",
                       "Nothing outside the listed files changes",
                       "The report says what was done"],
        "files": files,
        "branching": [{"action": "halt-with-note", "when": "the request is unclear"}],
    }
    return {"summary": f"{name} handles the request.", "orders": [order]}


def _section(text: str, heading: str) -> str:
    m = re.search(rf"^# {heading}\n(.*?)(?=^# |\Z)", text, re.M | re.S)
    return m.group(1) if m else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A fake OpenAI-compatible server on loopback.")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    parser.add_argument("--script", type=Path, help="JSON list of responses to give first")
    args = parser.parse_args(argv)
    fake = FakeLLM(port=args.port)
    if args.script:
        for item in json.loads(args.script.read_text("utf-8")):
            fake.script(**item)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with fake:
        print(fake.base_url, flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
