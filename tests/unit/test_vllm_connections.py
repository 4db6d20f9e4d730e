"""HttpVllmApi keeps its connections to a vLLM server alive across streamed completions.

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


def test_streamed_completions_reuse_one_connection():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:

        async def run() -> list[str]:
            api = HttpVllmApi(f"http://127.0.0.1:{server.server_address[1]}")
            try:
                return [(await api.complete("m", "word 3:", Sampling(max_tokens=2))).text for _ in range(3)]
            finally:
                await api.close()

        assert asyncio.run(run()) == [" zebra"] * 3
        assert Handler.connections == 1
    finally:
        server.shutdown()
        server.server_close()
