"""Bad input gets OpenAI-shaped errors with the right status, and never disturbs other work."""

from __future__ import annotations

import concurrent.futures

import openai
import pytest

MODEL = "SmolLM2-135M-Instruct"
CHAT = [{"role": "user", "content": "Hi"}]


def error_of(r) -> dict:
    body = r.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def test_context_length_exceeded(client, tok):
    long_prompt = [tok.encode("hello")[0]] * 8192
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=1)
    assert e.value.code == "context_length_exceeded" and e.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=10**12)
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=9000)
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_completion_tokens"


@pytest.mark.parametrize("kwargs, param", [
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"n": 10**6}, "n"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"presence_penalty": 5}, "presence_penalty"),
    ({"logit_bias": {"49152": 1}}, "logit_bias"),
    ({"logit_bias": {"999999999": 1}}, "logit_bias"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 500}}, "logit_bias"),
    ({"logprobs": 10**6}, "logprobs"),
    ({"extra_body": {"top_k": -5}}, "top_k"),
    ({"extra_body": {"min_tokens": 10, "max_tokens": 2}}, "min_tokens"),
    ({"extra_body": {"stop_token_ids": [10**8]}}, "stop_token_ids"),
    ({"stop": [""]}, "stop"),
    ({"suffix": "x"}, "suffix"),
    ({"best_of": 3}, "best_of"),
    ({"echo": True, "logprobs": 1}, "echo"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_completion_bad_params(client, kwargs, param):
    args = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**args)
    assert e.value.param == param, e.value.body
    assert e.value.body["type"] == "invalid_request_error"


@pytest.mark.parametrize("kwargs, param", [
    ({"top_logprobs": 50, "logprobs": True}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content"),
    ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"response_format": {"type": "json_object"}, "extra_body": {"regex": "a+"}}, "regex"),
    ({"max_completion_tokens": -3}, "max_completion_tokens"),
])
def test_chat_bad_params(client, kwargs, param):
    args = {"model": MODEL, "messages": CHAT, "max_tokens": 2, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**args)
    assert e.value.param == param, e.value.body
    # The message names the parameter the client sent, not the engine's name for it.
    if param in ("top_logprobs", "max_completion_tokens"):
        assert param in e.value.message, e.value.message


def test_chat_context_errors_name_the_clients_parameters(client, tok):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=9000)
    assert e.value.param == "max_completion_tokens" and "max_completion_tokens" in e.value.message
    long = [{"role": "user", "content": "word " * 9000}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=long, max_tokens=2)
    assert e.value.param == "messages" and e.value.code == "context_length_exceeded"


def test_unknown_fields_are_ignored(client):
    out = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2,
                                         extra_body={"some_provider_extra": {"x": 1}})
    assert out.usage.completion_tokens == 2


def test_text_content_parts_are_joined(client):
    out = client.chat.completions.create(
        model=MODEL, max_tokens=2, temperature=0,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    ref = client.chat.completions.create(model=MODEL, max_tokens=2, temperature=0, messages=CHAT)
    assert out.choices[0].message.content == ref.choices[0].message.content


def test_role_the_template_cannot_render(aux_server):
    template = ("{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
                "{{ raise_exception('role ' + m['role'] + ' is not supported by this template') }}"
                "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    srv = aux_server(chat_template=template)
    client = srv.client()
    ok = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
    assert ok.choices[0].message.content is not None
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, max_tokens=2, messages=[
            {"role": "system", "content": "be brief"}, *CHAT])
    assert "role system is not supported by this template" in e.value.message
    assert e.value.code == "invalid_chat_template" and e.value.param == "messages"
    with srv.http() as http:  # the override is used to render and does not leak elsewhere
        r = http.post("/tokenize", json={"messages": CHAT})
        assert r.status_code == 200
    with srv.http() as http:
        r = http.post("/tokenize", json={"messages": [{"role": "tool", "content": "x"}]})
        assert r.status_code == 400 and error_of(r)["code"] == "invalid_chat_template"


def test_generation_prompt_is_added(server, tok):
    with server.http() as http:
        ids = http.post("/tokenize", json={"messages": CHAT}).json()["tokens"]
        bare = http.post("/tokenize", json={"messages": CHAT,
                                            "add_generation_prompt": False}).json()["tokens"]
    assert tok.decode(ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    assert len(bare) < len(ids)


def test_malformed_bodies(server):
    with server.http() as http:
        r = http.post("/v1/completions", content=b'{"prompt": "\xff\xfe", "max_tokens": 2}',
                      headers={"content-type": "application/json"})
        assert r.status_code == 400 and error_of(r)["code"] == "invalid_utf8"
        r = http.post("/v1/completions", content=b'{"prompt": ',
                      headers={"content-type": "application/json"})
        assert r.status_code == 400 and error_of(r)["code"] == "invalid_json"
        r = http.post("/v1/completions", content=b'{"prompt": "\\ud800", "max_tokens": 2}',
                      headers={"content-type": "application/json"})
        assert r.status_code == 400 and error_of(r)["code"] == "invalid_unicode"
        r = http.post("/v1/chat/completions", json={"model": MODEL})  # no messages
        err = error_of(r)
        assert r.status_code == 400 and err["param"] == "messages" and err["code"] == "missing"
        assert err["type"] == "invalid_request_error"
        r = http.post("/v1/completions", json={"prompt": "x", "temperature": "hot"})
        assert r.status_code == 400 and error_of(r)["param"] == "temperature"
        r = http.post("/v1/completions", json={"prompt": "", "max_tokens": 2})
        assert r.status_code == 400 and error_of(r)["param"] == "prompt"
        r = http.post("/v1/completions", json={"prompt": [], "max_tokens": 2})
        assert r.status_code == 400
        r = http.post("/v1/completions", json={"prompt": [-1, 5], "max_tokens": 2})
        assert r.status_code == 400 and error_of(r)["param"] == "prompt"
        r = http.get("/v1/nothing-here")
        assert r.status_code == 404 and error_of(r)["code"] == "not_found"
        r = http.get("/v1/completions")
        assert r.status_code == 405 and error_of(r)["code"] == "method_not_allowed"


def test_wrong_type_is_a_bad_request_via_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=2,
                                  extra_body={"n": "many"})
    assert e.value.param == "n"


def test_body_size_limit(aux_server):
    srv = aux_server(max_request_body_bytes=2048)
    with srv.http() as http:
        big = {"model": MODEL, "prompt": "x" * 4096, "max_tokens": 1}
        r = http.post("/v1/completions", json=big)
        assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"

        def chunks():  # no Content-Length: the limit applies while the body streams in
            yield b'{"prompt": "'
            for _ in range(8):
                yield b"y" * 512
            yield b'", "max_tokens": 1}'

        r = http.post("/v1/completions", content=chunks(),
                      headers={"content-type": "application/json"})
        assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1})
        assert r.status_code == 200


def test_bad_requests_do_not_disturb_a_good_one(server, client):
    """A stream runs while a barrage of bad requests hits the same server: it completes."""
    def good():
        return "".join(c.choices[0].text for c in client.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0,
            stream=True, extra_body={"ignore_eos": True}) if c.choices)

    def bad(i):
        with server.http() as http:
            bodies = [{"prompt": "x", "max_tokens": -1}, {"prompt": "x", "n": 0},
                      {"prompt": [10**9]}, {"prompt": "x", "logit_bias": {"q": 1}},
                      {"prompt": "x", "max_tokens": 10**9}]
            r = http.post("/v1/completions", json=bodies[i % len(bodies)])
            return r.status_code

    ref = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12,
                                    temperature=0, extra_body={"ignore_eos": True})
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        fut = pool.submit(good)
        statuses = list(pool.map(bad, range(20)))
        assert fut.result(timeout=60) == ref.choices[0].text
    assert set(statuses) == {400}
