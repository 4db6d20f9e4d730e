"""HttpVllmApi keeps its connections to a vLLM server alive across streamed completions, and drops idle ones
before the server would (vllm_api.KEEPALIVE_SECONDS).

A real HTTP/1.1 server on loopback (http.server, one handler per connection) answers with vLLM's stream format;
the test counts the connections it accepted.
"""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from layercard_service.serving.vllm_api import HttpVllmApi, Sampling

EVENTS = [
    {"choices": [{"text": " zebra", "finish_reason": None}]},
    {"choices": [{"text": "", "finish_reason": "length"}]},
    {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}},
]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn serves vLLM
    connections = 0

    def setup(self) -> None:
        type(self).connections += 1
        super().setup()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        body = "".join(f"data: {json.dumps(e)}\n\n" for e in EVENTS) + "data: [DONE]\n\n"
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:  # quiet
        pass


def _serving(run, **api_settings) -> tuple[list[str], int]:
    """Runs ``run(api)`` against a fresh loopback server; its answers and the connections the server accepted."""
    Handler.connections = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:

        async def main() -> list[str]:
            api = HttpVllmApi(f"http://127.0.0.1:{server.server_address[1]}", **api_settings)
            try:
                return await run(api)
            finally:
                await api.close()

        return asyncio.run(main()), Handler.connections
    finally:
        server.shutdown()
        server.server_close()


async def _complete(api: HttpVllmApi) -> str:
    return (await api.complete("m", "word 3:", Sampling(max_tokens=2))).text


def test_streamed_completions_reuse_one_connection():
    async def three(api):
        return [await _complete(api) for _ in range(3)]

    assert _serving(three) == ([" zebra"] * 3, 1)


def test_an_idle_connection_is_dropped_before_the_server_would_drop_it():
    async def with_a_pause(api):
        first = await _complete(api)
        await asyncio.sleep(0.4)  # idle past the client's keep-alive, not yet past a server's
        return [first, await _complete(api)]

    assert _serving(with_a_pause, keepalive_seconds=0.1) == ([" zebra"] * 2, 2)  # a fresh connection
    assert _serving(with_a_pause, keepalive_seconds=5.0) == ([" zebra"] * 2, 1)  # kept: what races vLLM's close
