"""A real HTTP server on 127.0.0.1 that speaks the Anthropic Messages API with scripted replies: the agent loop's
tests (``test_agent.py``) and its GPU benchmark (``benchmarks/bench_agent.py``) point the SDK's base URL at it.
Nothing here reaches another host."""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Reply = tuple[int, dict[str, Any]]  # (HTTP status, JSON body)
_ids = itertools.count(1)


def message(content: list[dict[str, Any]], stop: str = "tool_use") -> Reply:
    """An assistant message as the API returns it (100 input and 20 output tokens each)."""
    return 200, {"id": f"msg_{next(_ids)}", "type": "message", "role": "assistant", "model": "scripted",
                 "content": content, "stop_reason": stop, "stop_sequence": None,
                 "usage": {"input_tokens": 100, "output_tokens": 20}}


def tool(name: str, **tool_input: Any) -> dict[str, Any]:
    """A ``tool_use`` content block."""
    return {"type": "tool_use", "id": f"toolu_{name}_{next(_ids)}", "name": name, "input": tool_input}


class MessagesServer:
    """Answers each POST with the next scripted reply (an ``end_turn`` message once the script is spent) and
    records every request (path, JSON body, API key). ``url`` is the base URL to give the SDK."""

    def __init__(self, script: Iterable[Reply]):
        self.script = list(script)
        self.requests: list[dict[str, Any]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                key = self.headers.get("x-api-key") or self.headers.get("authorization", "").removeprefix("Bearer ")
                server.requests.append({"path": self.path, "body": body, "key": key})
                status, payload = server.script.pop(0) if server.script else message([], stop="end_turn")
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
