"""A fake OpenAI-compatible streaming server with exact, known timings.

Token k of a reply (k = 0, 1, ...) is sent at `ttft + k * itl` seconds after the request was
read (absolute deadlines, so sleeps do not accumulate lateness). With `serialize`, one request
is served at a time, as llama-cpp-python's server does. Every request body is kept in
`bodies`. Responses close the connection (no keep-alive), which keeps the HTTP code small.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time


class FakeServer:
    def __init__(self, ttft: float = 0.05, itl: float = 0.01, serialize: bool = False,
                 eos_after: int | None = None, usage: bool = True, role_chunk: bool = True,
                 tokens_per_chunk: int = 1):
        self.ttft, self.itl, self.serialize = ttft, itl, serialize
        self.eos_after = eos_after  # without ignore_eos, replies end after this many tokens
        self.usage, self.role_chunk = usage, role_chunk
        self.tokens_per_chunk = tokens_per_chunk  # > 1: chunks carry several tokens, as a
        # server holding back a partial character or a possible stop string sends them
        self.bodies: list[dict] = []
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="fake-openai")
        self.thread.start()
        assert self._ready.wait(10), "fake server did not start"
        self.url = f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.lock = asyncio.Lock()
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self._ready.set()
        self.loop.run_forever()

    def stop(self) -> None:
        async def close():
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            t0 = time.perf_counter()
            lines = head.decode().split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
            body = await reader.readexactly(int(headers.get("content-length", 0)))
            if method == "GET" and path == "/v1/models":
                await self._json(writer, 200, {"object": "list", "data": [{"id": "fake-model"}]})
            elif method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
                req = json.loads(body)
                self.bodies.append(req)
                if req.get("model") == "bad":
                    await self._json(writer, 404, {"error": {"message": "no such model"}})
                elif self.serialize:
                    async with self.lock:
                        await self._stream(writer, req, path.endswith("chat/completions"), time.perf_counter())
                else:
                    await self._stream(writer, req, path.endswith("chat/completions"), t0)
            else:
                await self._json(writer, 404, {"error": {"message": "not found"}})
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _json(self, writer, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
        await writer.drain()

    async def _stream(self, writer, req: dict, chat: bool, t0: float) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
        n = int(req.get("max_tokens") or 16)
        if self.eos_after is not None and not req.get("ignore_eos"):
            n = min(n, self.eos_after)
        if chat and self.role_chunk:
            await self._event(writer, {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        for k in range(0, n, self.tokens_per_chunk):
            last = min(k + self.tokens_per_chunk, n) - 1
            delay = t0 + self.ttft + last * self.itl - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            piece = "".join(f" t{i}" for i in range(k, last + 1))
            choice = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
            await self._event(writer, {"choices": [{**choice, "finish_reason": None}]})
        if self.usage and (req.get("stream_options") or {}).get("include_usage"):
            if chat:
                prompt = " ".join(m["content"] for m in req["messages"])
            else:
                prompt = req["prompt"]
            await self._event(writer, {"choices": [], "usage": {
                "prompt_tokens": len(prompt.split()), "completion_tokens": n,
                "total_tokens": len(prompt.split()) + n}})
        writer.write(b"data: [DONE]\n\n")
        await writer.drain()

    async def _event(self, writer, obj: dict) -> None:
        writer.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
        await writer.drain()
