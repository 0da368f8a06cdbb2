"""Regression tests for the failures other engines shipped (issue 16), on metroline's server:
each input gets a clear answer (200, or an OpenAI-shaped 4xx), the server lives on, and the
requests around it are unharmed. (Bad schemas, regexes and grammars: test_structured.py;
numeric extremes: test_extremes.py; disconnects mid-prefill: test_lifecycle.py.)"""

from __future__ import annotations

import concurrent.futures
import json

import pytest

MODEL = "SmolLM2-135M-Instruct"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def post(server, path, body=None, content=None):
    with server.http() as http:
        if content is not None:
            return http.post(path, content=content, headers={"content-type": "application/json"})
        return http.post(path, json=body)


def assert_error(r, status=400, param=None):
    assert r.status_code == status, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert err["message"] and err["type"], err
    if param is not None:
        assert err["param"] == param, err
    return err


def assert_alive(server):
    r = post(server, COMPLETIONS, {"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_deeply_nested_json_is_a_400_not_a_crash(server):
    """JSON nested far deeper than any request needs (the parser's recursion limit): 400."""
    for depth in (1_000, 100_000):
        body = '{"model": "%s", "prompt": "Hi", "max_tokens": 1, "metadata": %s1%s}' % (
            MODEL, "[" * depth, "]" * depth)
        r = post(server, COMPLETIONS, content=body)
        assert r.status_code in (200, 400), (depth, r.status_code, r.text[:200])
        if r.status_code == 400:
            assert r.json()["error"]["type"] == "invalid_request_error"
    deep_schema = {"type": "object"}
    for _ in range(400):
        deep_schema = {"type": "object", "properties": {"a": deep_schema}}
    r = post(server, CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                            "response_format": {"type": "json_schema", "json_schema": {"name": "d", "schema": deep_schema}}})
    assert r.status_code in (200, 400), r.text[:300]
    wide = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(5000)},
            "required": [f"p{i}" for i in range(5000)]}
    r = post(server, CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                            "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": wide}}})
    assert r.status_code in (200, 400), r.text[:300]
    assert_alive(server)


def test_out_of_vocabulary_ids_anywhere_an_id_is_accepted(server, tok):
    vocab = server.state.vocab_size
    for bad in (vocab, -1, 2**40):
        assert_error(post(server, COMPLETIONS, {"model": MODEL, "prompt": [1, bad], "max_tokens": 1}), param="prompt")
        assert_error(post(server, COMPLETIONS, {"model": MODEL, "prompt": [[1, 2], [bad]], "max_tokens": 1}),
                     param="prompt")
        assert_error(post(server, COMPLETIONS, {"model": MODEL, "prompt": "Hi", "max_tokens": 1,
                                                "stop_token_ids": [bad]}), param="stop_token_ids")
        assert_error(post(server, COMPLETIONS, {"model": MODEL, "prompt": "Hi", "max_tokens": 1,
                                                "logit_bias": {str(bad): 1}}), param="logit_bias")
        assert_error(post(server, "/detokenize", {"model": MODEL, "tokens": [1, bad]}), param="tokens")
    assert_alive(server)


def test_prompts_at_just_under_and_just_over_the_context_length(default_loaded, tok):
    """On an engine whose context is 128 tokens (so the test computes little): a prompt of 127
    tokens and one generated token fit exactly; 128 or 129 tokens, or 127 + 2, are 400s."""
    from metroline.server.app import ServerConfig, create_app

    from .conftest import ServerThread, make_engine

    engine = make_engine(default_loaded, num_blocks=32, max_model_len=128)
    srv = ServerThread(create_app(engine, ServerConfig()))
    try:
        limit = srv.state.max_model_len
        assert limit == 128
        one = tok.encode("hello")[0]
        r = post(srv, COMPLETIONS, {"model": MODEL, "prompt": [one] * (limit - 1), "max_tokens": 1})
        assert r.status_code == 200, r.text[:300]
        assert r.json()["usage"]["completion_tokens"] == 1
        for n in (limit, limit + 1):
            err = assert_error(post(srv, COMPLETIONS, {"model": MODEL, "prompt": [one] * n, "max_tokens": 1}),
                               param="prompt")
            assert err["code"] == "context_length_exceeded"
        err = assert_error(post(srv, COMPLETIONS, {"model": MODEL, "prompt": [one] * (limit - 1), "max_tokens": 2}),
                           param="max_tokens")
        assert err["code"] == "context_length_exceeded"
        assert_alive(srv)
    finally:
        srv.stop()
        engine.shutdown(timeout=10)


def test_empty_prompts_and_messages(server):
    assert_error(post(server, COMPLETIONS, {"model": MODEL, "prompt": "", "max_tokens": 1}), param="prompt")
    assert_error(post(server, COMPLETIONS, {"model": MODEL, "prompt": [""], "max_tokens": 1}))
    assert_error(post(server, COMPLETIONS, {"model": MODEL, "prompt": [[]], "max_tokens": 1}))
    assert_error(post(server, CHAT, {"model": MODEL, "messages": [], "max_tokens": 1}), param="messages")
    # An empty message content is a valid (if odd) turn: the template renders it.
    r = post(server, CHAT, {"model": MODEL, "messages": [{"role": "user", "content": ""}], "max_tokens": 1})
    assert r.status_code == 200, r.text[:300]
    assert_alive(server)


@pytest.mark.parametrize("text", ["a\x00b", "\x00", "tab\tnl\ncr\r", "\u202e\u200b\ufeff", "日本語の文章🎉👩‍👩‍👧"])
def test_nul_control_and_multibyte_text_streams_as_valid_utf8(server, text):
    """Every stream chunk is valid JSON holding whole characters, whatever the tokens' byte
    boundaries; the streamed text equals the non-streamed one."""
    body = {"model": MODEL, "prompt": text, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    full = post(server, COMPLETIONS, body)
    assert full.status_code == 200, full.text[:300]
    with server.http() as http:
        with http.stream("POST", COMPLETIONS, json={**body, "stream": True}) as s:
            raw = b"".join(s.iter_bytes())
    pieces = []
    for line in raw.decode("utf-8").splitlines():  # raises on invalid UTF-8
        if line.startswith("data: ") and line != "data: [DONE]":
            ev = json.loads(line[6:])
            pieces += [c["text"] for c in ev["choices"]]
    assert "".join(pieces) == full.json()["choices"][0]["text"]
    assert "\ufffd" not in "".join(pieces) or "\ufffd" in full.json()["choices"][0]["text"]


def test_huge_stop_lists_logprobs_and_n(server):
    assert_error(post(server, COMPLETIONS, {"model": MODEL, "prompt": "Hi", "max_tokens": 1,
                                            "stop": [f"s{i}" for i in range(100_000)]}), param="stop")
    assert_error(post(server, COMPLETIONS, {"model": MODEL, "prompt": "Hi", "max_tokens": 1,
                                            "stop": ["x" * 1_000_000]}), param="stop")
    assert_error(post(server, COMPLETIONS, {"model": MODEL, "prompt": "Hi", "max_tokens": 1, "logprobs": 10**9}),
                 param="logprobs")
    assert_error(post(server, CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                     "max_tokens": 1, "logprobs": True, "top_logprobs": 10**6}), param="top_logprobs")
    assert_error(post(server, COMPLETIONS, {"model": MODEL, "prompt": "Hi", "max_tokens": 1, "n": 10**6}), param="n")
    assert_alive(server)


def test_a_burst_of_retries_after_a_failing_request(server, client):
    """Fifty clients retry the same bad request at once while a good stream runs: fifty 400s,
    the stream's text is the one it has alone, and the next good request is served."""
    def story():
        return "".join(c.choices[0].text for c in client.completions.create(
            model=MODEL, prompt="The river", max_tokens=16, temperature=0, stream=True,
            extra_body={"ignore_eos": True}) if c.choices)

    ref = story()
    bad = {"model": MODEL, "prompt": "Hi", "max_tokens": 10**12}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        fut = pool.submit(story)
        codes = list(pool.map(lambda _: post(server, COMPLETIONS, bad).status_code, range(50)))
        assert fut.result(timeout=120) == ref
    assert codes == [400] * 50
    assert_alive(server)


def test_huge_headers_are_refused_and_the_server_lives_on(server):
    """A header block past the HTTP parser's bound is refused at the connection (4xx or a
    closed connection), never buffered without end; the next request is served."""
    import socket

    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n")
    except OSError:
        pass  # the server closed the connection while we were still sending: refused
    try:
        answer = sock.recv(4096)
    except OSError:
        answer = b""
    finally:
        sock.close()
    assert answer == b"" or answer.split(b" ")[1][:1] == b"4", answer[:100]
    assert_alive(server)


def test_echo_of_out_of_vocabulary_token_prompts_is_a_400(server):
    """Found by schemathesis: echo decoded the prompt's ids before the engine checked them, and
    an id past the tokenizer's integer type was a 500 (OverflowError)."""
    for prompt in ([[1, 263075370547291904]], [[1, 2], [-5]], [10**12]):
        assert_error(post(server, COMPLETIONS, {"model": MODEL, "prompt": prompt, "max_tokens": 1, "echo": True}),
                     param="prompt")
    assert_alive(server)
