"""The routes without a model: `conch.serving.routes.router` reads its service from app.state, and the
response models keep the bodies as they were (keys left out stay out, byte for byte)."""

import json
from types import SimpleNamespace

import pytest
from starlette.responses import JSONResponse

from conch.serve import ServeConfig, create_app
from conch.serving.protocol import ErrorResponse

testclient = pytest.importorskip("fastapi.testclient")

LOGPROBS = {"content": [{"token": "海", "logprob": -0.5, "bytes": [230],
                         "top_logprobs": [{"token": "x", "logprob": -2.25, "bytes": [120]}]}]}


class FakeService:
    """What the routes ask of a `ChatService`, with fixed answers."""

    def __init__(self, cfg, *args, **kwargs):
        self.cfg, self.started = cfg, 1700000000.5
        self.engine = SimpleNamespace(shutdown=lambda: None)
        counter = SimpleNamespace(inc=lambda: None)
        self.metrics = SimpleNamespace(content_type="text/plain", render=lambda: b"conch_up 1\n",
                                       rejected=SimpleNamespace(labels=lambda *a: counter))

    def health(self):
        return {"status": "ok", "model": self.cfg.served_model_name, "device": "cpu", "queue_depth": 0,
                "running": 0, "uptime_s": 1.5}

    async def prepare(self, messages, body):
        return SimpleNamespace(sources=[{"id": "menu.md#0", "text": "蟹堡"}] if body.rag else None)

    def submit(self, prepared):
        return prepared

    async def complete(self, prepared, disconnected):
        return [{"index": 0, "answer": "海螺", "reasoning": "", "finish_reason": "stop", "logprobs": LOGPROBS}]

    def reply(self, choices, sources):
        body = {"id": "chatcmpl-1", "object": "chat.completion", "created": 5, "model": self.cfg.served_model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "海螺"}, "finish_reason": "stop",
                             "logprobs": choices[0]["logprobs"]}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
        return body if sources is None else {**body, "sources": sources}


@pytest.fixture
def client(monkeypatch):
    monkeypatch.setattr("conch.serving.service.ChatService", FakeService)
    with testclient.TestClient(create_app(ServeConfig(model="demo"), model=object(), tokenizer=object())) as c:
        yield c


def test_the_bodies_are_the_dicts_the_service_built(client):
    service = client.app.state.service
    assert isinstance(service, FakeService)  # the startup put it there; the router found it there
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    for response, body in [(client.get("/health"), service.health()),
                           (client.post("/v1/chat/completions", json=chat), service.reply([{"logprobs": LOGPROBS}],
                                                                                            None)),
                           (client.post("/v1/chat/completions", json={**chat, "rag": True}),
                            service.reply([{"logprobs": LOGPROBS}], [{"id": "menu.md#0", "text": "蟹堡"}]))]:
        assert response.status_code == 200
        assert response.content == JSONResponse(body).body  # the same bytes as before the response models
    generated = client.get("/generate", params={"prompt": "hi"}).json()
    assert generated == {"generated_text": "海螺", "reasoning": "", "finish_reason": "stop",
                         "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
    assert client.get("/v1/models").json()["data"][0] == {"id": "magic-conch", "object": "model",
                                                          "created": 1700000000, "owned_by": "krusty-krab"}


def test_openapi_shows_the_response_models(client):
    spec = client.get("/openapi.json").json()

    def ok(path, method="get"):
        return spec["paths"][path][method]["responses"]["200"]["content"]

    assert ok("/health")["application/json"]["schema"]["$ref"].endswith("/Health")
    assert ok("/v1/models")["application/json"]["schema"]["$ref"].endswith("/ModelList")
    assert ok("/generate")["application/json"]["schema"]["$ref"].endswith("/GenerateResponse")
    chat = ok("/v1/chat/completions", "post")
    assert chat["application/json"]["schema"]["$ref"].endswith("/ChatCompletion")
    assert chat["text/event-stream"]["schema"]["$ref"].endswith("/ChatCompletionChunk")
    schemas = spec["components"]["schemas"]
    refs = {v for v in json.dumps(spec).split('"') if v.startswith("#/components/schemas/")}
    assert {r.rsplit("/", 1)[1] for r in refs} <= set(schemas)  # every reference resolves
    assert "finish_reason" in schemas["ChunkChoice"]["properties"]


def test_openapi_shows_the_error_body_for_each_error_status(client):
    """Every 4xx and 5xx a route documents has `ErrorResponse` (OpenAI's shape) as its body, as the app sends it."""
    spec = client.app.openapi()
    documented = {}
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            for code, response in operation["responses"].items():
                assert code != "422", (path, method)  # FastAPI's own entry: the app answers 400 instead
                if code[0] in "45":
                    schema = response["content"]["application/json"]["schema"]
                    assert schema["$ref"].endswith("/ErrorResponse"), (path, method, code)
                    documented.setdefault(f"{method} {path}", set()).add(int(code))
    assert documented == {"get /v1/models": {401}, "get /generate": {400, 401, 500, 503, 504},
                          "post /v1/chat/completions": {400, 401, 500, 503, 504}}
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    detail = spec["components"]["schemas"]["ErrorDetail"]
    assert set(detail["properties"]) == {"message", "type", "code"}
    refused = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "tools": []})
    assert refused.status_code == 400
    ErrorResponse.model_validate(refused.json())  # what is sent is what is documented
