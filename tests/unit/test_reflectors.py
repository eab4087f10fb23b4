"""The `openai` reflector against a chat-completions server started here on loopback (a
stand-in for a remote LLM), inside a real GEPA round."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fst.config import ReflectorConfig, TaskConfig
from fst.fast.population import PromptRecord
from fst.fast.reflectors import OpenAIReflector
from fst.tasks import build_task
from tests.unit.test_fast import scripted_round


class ChatServer:
    """Speaks POST /v1/chat/completions; replies from a script, records requests."""

    def __init__(self, replies: list[tuple[int, str]]) -> None:
        self.replies, self.requests = list(replies), []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(
                    {"path": self.path, "body": body, "auth": self.headers.get("Authorization")}
                )
                status, content = server.replies.pop(0) if server.replies else (200, "```\nx\n```")
                payload = (
                    {"choices": [{"message": {"role": "assistant", "content": content}}]}
                    if status == 200
                    else {"error": {"message": content}}
                )
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server_factory():
    servers = []

    def make(replies):
        servers.append(ChatServer(replies))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def reflector(url: str) -> OpenAIReflector:
    cfg = ReflectorConfig(
        kind="openai", base_url=url, model="judge-1", api_key_env="REFLECTOR_TEST_KEY"
    )
    return OpenAIReflector(cfg, timeout_s=5, retries=3)


def test_request_shape_key_and_reply(server_factory, monkeypatch):
    monkeypatch.setenv("REFLECTOR_TEST_KEY", "sk-test")
    srv = server_factory([(200, "hello")])
    assert reflector(srv.url)("reflect on this") == "hello"
    req = srv.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    assert req["body"]["model"] == "judge-1"
    assert req["body"]["messages"] == [{"role": "user", "content": "reflect on this"}]


def test_server_errors_are_retried_client_errors_are_not(server_factory, monkeypatch):
    monkeypatch.setattr("fst.fast.reflectors.time.sleep", lambda s: None)
    srv = server_factory([(503, "busy"), (200, "ok after retry")])
    assert reflector(srv.url)("x") == "ok after retry"
    srv = server_factory([(400, "bad model name")])
    with pytest.raises(RuntimeError, match=r"HTTP 400.*bad model name"):
        reflector(srv.url)("x")
    assert len(srv.requests) == 1


def test_missing_settings_are_named():
    with pytest.raises(ValueError, match="baseUrl and model"):
        OpenAIReflector(ReflectorConfig(kind="openai"))


def test_gepa_round_with_the_openai_reflector(server_factory, tmp_path):
    better = "Think, then write the answer BOXED as \\boxed{n}."
    srv = server_factory([(200, f"Here is the new instruction:\n```\n{better}\n```")] * 8)
    task = build_task(TaskConfig(name="arithmetic", train_size=64, val_size=12, test_size=4))
    seed = PromptRecord("You are a helpful assistant.")
    result = scripted_round(task, tmp_path, [seed], 1, 2, 24, reflection_lm=reflector(srv.url))
    assert srv.requests, "GEPA must have asked the reflector"
    prompt_sent = srv.requests[0]["body"]["messages"][0]["content"]
    assert seed.text in prompt_sent  # GEPA's reflection prompt carries the current instruction
    assert result.population[0].text == better
