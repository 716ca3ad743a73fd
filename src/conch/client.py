"""Call a running Magic Conch server from Python (what a web backend does).

    from conch.client import ConchClient
    conch = ConchClient("http://127.0.0.1:8000", api_key=None)
    conch.ask("你是谁？")                          # the answer text
    for piece in conch.stream("美味蟹堡怎么做？"):  # the answer as it is generated
        print(piece, end="")

The server speaks the OpenAI API, so the ``openai`` SDK works too:
``OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="…")``.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Iterator

import httpx


class ConchAPIError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


@dataclass
class Answer:
    content: str
    reasoning: str
    finish_reason: str
    usage: dict
    sources: list[dict] | None = None  # RAG mode: the passages the answer was based on


def retry_after(response: httpx.Response | None, attempt: int) -> float:
    """Seconds to wait: the response's Retry-After (seconds or an HTTP date), else 1, 2, 4, … s."""
    value = response.headers.get("retry-after") if response is not None else None
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
            except (TypeError, ValueError):
                pass
    return float(2 ** attempt)


class ConchClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 120,
                 max_retries: int = 2, transport: httpx.BaseTransport | None = None):
        """``max_retries``: how often a 503 (server busy) or a connection that never opened is retried,
        after the server's Retry-After (seconds or an HTTP date; else 1 s, 2 s, …) plus jitter. Nothing
        else is retried: after a read timeout the server may still be generating, and sending the
        request again would generate twice. 4xx errors are never retried."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout, transport=transport)
        self.max_retries = max_retries

    def _send(self, method: str, path: str, **kw) -> httpx.Response:
        for attempt in range(self.max_retries + 1):
            try:
                response = self.http.request(method, path, **kw)
            except (httpx.ConnectError, httpx.ConnectTimeout):  # the request never reached the server
                if attempt == self.max_retries:
                    raise
                response = None
            if response is not None and (response.status_code != 503 or attempt == self.max_retries):
                return self._check(response)
            time.sleep(retry_after(response, attempt) + random.uniform(0, 0.5))
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @staticmethod
    def _check(response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except Exception:
                message = response.text[:200]
            raise ConchAPIError(response.status_code, message)
        return response

    @staticmethod
    def _messages(question: str | list[dict], system: str | None) -> list[dict]:
        if not isinstance(question, str):
            return list(question)
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]

    def health(self) -> dict:
        return self._send("GET", "/health").json()

    def metrics(self) -> dict[str, float]:
        """The server's Prometheus samples (``GET /metrics``), parsed by prometheus-client and keyed
        as the exposition writes them: ``m['conch_requests_total{finish_reason="cancelled"}']``."""
        from prometheus_client.parser import text_string_to_metric_families

        samples = {}
        for family in text_string_to_metric_families(self._send("GET", "/metrics").text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
        return samples

    def generate(self, prompt: str, **params) -> dict:
        """The seeds' ``GET /generate?prompt=…`` endpoint: ``{"generated_text": …}``."""
        return self._send("GET", "/generate", params={"prompt": prompt, **params}).json()

    def chat(self, question: str | list[dict], system: str | None = None, **params) -> Answer:
        """One complete answer (``params``: temperature, top_p, max_tokens, stop, rag)."""
        body = {"messages": self._messages(question, system), **params}
        data = self._send("POST", "/v1/chat/completions", json=body).json()
        choice = data["choices"][0]
        message = choice["message"]
        return Answer(message["content"], message.get("reasoning_content") or message.get("reasoning") or "",
                      choice["finish_reason"], data["usage"], data.get("sources"))

    def ask(self, question: str | list[dict], **params) -> str:
        return self.chat(question, **params).content

    def stream(self, question: str | list[dict], system: str | None = None, reasoning: bool = False,
               **params) -> Iterator[str]:
        """Yield the answer's text as it is generated (and the reasoning first, if asked)."""
        body = {"messages": self._messages(question, system), "stream": True, **params}
        with self.http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code >= 400:
                response.read()
                self._check(response)
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise ConchAPIError(event["error"].get("code", 500), event["error"]["message"])
                for choice in event.get("choices", []):
                    delta = choice.get("delta", {})
                    if reasoning and delta.get("reasoning_content"):
                        yield delta["reasoning_content"]
                    if delta.get("content"):
                        yield delta["content"]
