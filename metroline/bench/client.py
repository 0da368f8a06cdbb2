"""A streaming OpenAI-compatible client that time-stamps every chunk as it is read."""

from __future__ import annotations

import json
import time

import httpx

from metroline.bench.metrics import RequestRecord

ENDPOINTS = {"chat": "/chat/completions", "completions": "/completions"}


def api_root(base_url: str) -> str:
    """'http://h:p', 'http://h:p/' or 'http://h:p/v1' -> 'http://h:p/v1'."""
    base = base_url.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


class TokenCounter:
    """Counts tokens with the served model's tokenizer, for servers that send no usage: the
    prompt as the chat template renders it, and the reply's text re-encoded (chunks can carry
    several tokens, so counting chunks would undercount)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def prompt(self, messages: list[dict], endpoint: str, prompt: str | None = None) -> int | None:
        try:
            if endpoint == "chat":
                text = self.tok.apply_chat_template(messages, add_generation_prompt=True)
                return len(self.tok.encode(text, add_special_tokens=False))
            return len(self.tok.encode(prompt or ""))
        except Exception:  # noqa: BLE001 - a template this tokenizer cannot render: no count
            return None

    def output(self, text: str) -> int:
        return len(self.tok.encode(text, add_special_tokens=False))


class StreamingClient:
    """Sends one call at a time per coroutine; many coroutines share one connection pool.

    `fixed_length` asks the server for exactly `max_tokens` tokens (`ignore_eos` and
    `min_tokens`, vLLM's names, which metroline also takes); `include_usage` asks for the final
    usage chunk (stream_options), from which output tokens are counted when it comes.
    """

    def __init__(self, base_url: str, model: str, endpoint: str = "chat", *,
                 api_key: str | None = None, timeout: float = 600.0, max_connections: int = 256,
                 temperature: float = 0.0, fixed_length: bool = True, include_usage: bool = True,
                 extra_body: dict | None = None, token_counter: TokenCounter | None = None,
                 session_retention: float | None = None):
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}")
        self.root = api_root(base_url)
        self.url = self.root + ENDPOINTS[endpoint]
        self.model, self.endpoint = model, endpoint
        self.temperature, self.fixed_length, self.include_usage = temperature, fixed_length, include_usage
        self.extra_body = dict(extra_body or {})
        self.counter = token_counter
        # metroline's extension: each program is a session whose KV stays pinned between calls.
        self.session_retention = session_retention
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=30.0), limits=limits,
                                      headers=headers)

    async def aclose(self) -> None:
        await self.http.aclose()

    def payload(self, messages: list[dict], max_tokens: int, session_id: str | None = None) -> dict:
        body: dict = {"model": self.model, "max_tokens": max_tokens, "stream": True,
                      "temperature": self.temperature}
        if self.endpoint == "chat":
            body["messages"] = messages
        else:  # completions: the history as plain text, one message after another
            body["prompt"] = "\n\n".join(m["content"] for m in messages)
        if self.include_usage:
            body["stream_options"] = {"include_usage": True}
        if self.fixed_length:
            body["ignore_eos"] = True
            body["min_tokens"] = max_tokens
        if self.session_retention and session_id:
            body["session_id"] = session_id
            body["kv_retention_s"] = self.session_retention
        body.update(self.extra_body)
        return body

    async def call(self, messages: list[dict], max_tokens: int, record: RequestRecord,
                   session_id: str | None = None) -> str:
        """Stream one call, filling `record` (times relative to the send); returns the text.

        Never raises for a failed call: the error lands in `record.error`.
        """
        body = self.payload(messages, max_tokens, session_id)
        record.expected_output_tokens = max_tokens
        pieces: list[str] = []
        usage = None
        t0 = time.perf_counter()
        try:
            async with self.http.stream("POST", self.url, json=body) as resp:
                if resp.status_code != 200:
                    detail = (await resp.aread()).decode("utf-8", "replace")
                    record.error = f"HTTP {resp.status_code}: {' '.join(detail.split())[:300]}"
                    return ""
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    now = time.perf_counter() - t0
                    obj = json.loads(data)
                    if obj.get("error"):
                        record.error = f"stream error: {json.dumps(obj['error'])[:300]}"
                        return "".join(pieces)
                    if obj.get("usage"):
                        usage = obj["usage"]
                    for choice in obj.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content") if self.endpoint == "chat" \
                            else choice.get("text")
                        if text:
                            if record.ttft is None:
                                record.ttft = now
                            record.chunk_times.append(now)
                            pieces.append(text)
                            break  # one arrival per chunk (n=1)
        except (httpx.HTTPError, json.JSONDecodeError, OSError) as e:
            record.error = f"{type(e).__name__}: {e}"[:300]
            return "".join(pieces)
        record.latency = time.perf_counter() - t0
        text = "".join(pieces)
        if usage and usage.get("completion_tokens") is not None:
            record.output_tokens = int(usage["completion_tokens"])
            record.token_source = "usage"
            if usage.get("prompt_tokens") is not None:
                record.prompt_tokens = int(usage["prompt_tokens"])
            details = usage.get("prompt_tokens_details") or {}
            if details.get("cached_tokens") is not None:
                record.cached_tokens = int(details["cached_tokens"])
        elif self.counter is not None:
            record.output_tokens = self.counter.output(text)
            n = self.counter.prompt(messages, self.endpoint, body.get("prompt"))
            if n is not None:
                record.prompt_tokens = n
            record.token_source = "tokenizer"
        else:
            record.output_tokens = len(record.chunk_times)
        if record.ttft is None:
            record.error = "no output text in the stream"
            return ""
        record.success = True
        return text
