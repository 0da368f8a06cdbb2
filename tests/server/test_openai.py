"""The OpenAI API, driven by the official `openai` client against a real server."""

from __future__ import annotations

import math

import openai
import pytest

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
MODEL = "SmolLM2-135M-Instruct"


def test_models_list_and_retrieve(client):
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert ids == [MODEL]
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.object == "model" and card.owned_by == "metroline"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4")
    assert e.value.code == "model_not_found"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=2)
    assert e.value.code == "model_not_found" and e.value.param == "model"


def test_completion_stream_matches_non_stream(client):
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    choice = full.choices[0]
    assert choice.text and choice.finish_reason == "length"
    assert full.object == "text_completion" and full.model == MODEL
    assert full.usage.completion_tokens == 6
    assert full.usage.prompt_tokens == 5 and full.usage.total_tokens == 11

    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == choice.text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_stream_matches_non_stream(client):
    full = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6,
                                          temperature=0)
    msg = full.choices[0].message
    assert msg.role == "assistant" and msg.content
    assert full.object == "chat.completion" and 1 <= full.usage.completion_tokens <= 6

    stream = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.content
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_max_completion_tokens(client):
    out = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=3,
                                         temperature=0, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length"


def test_n2_streaming_and_not(client):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, n=2, seed=7,
                                    temperature=1.0)
    assert [c.index for c in out.choices] == [0, 1]
    assert 2 <= out.usage.completion_tokens <= 8 and out.usage.prompt_tokens == 5
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, n=2,
                                                 seed=7, stream=True))
    texts = {0: "", 1: ""}
    finished = set()
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finished.add(ch.index)
    assert finished == {0, 1} and all(texts.values())


def test_seed_reproducible(client):
    def sample(seed):
        return client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8,
                                         temperature=1.0, seed=seed).choices[0].text

    a, b = sample(1234), sample(1234)
    assert a == b
    assert any(sample(s) != a for s in (1, 2, 3))
    chat = [client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, seed=99,
                                           temperature=1.0).choices[0].message.content
            for _ in range(2)]
    assert chat[0] == chat[1]


def test_stop_string(client):
    base = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    text = base.choices[0].text
    words = text.split()
    assert len(words) >= 2, text
    stop = words[1]
    cut = text[:text.index(stop)]
    for stops in (stop, [stop, "zzzz-never"]):
        out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                        stop=stops)
        assert out.choices[0].text == cut
        assert out.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, stop=[stop], stream=True))
    assert streamed == cut


def test_completion_logprobs(client):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0,
                                    logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    for tok, val, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert val <= 0 and 1 <= len(top) <= 3 and tok in top
        assert math.isclose(max(top.values()), val, abs_tol=1e-4)  # greedy: the best token

    streamed = [c.choices[0].logprobs for c in client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2, stream=True)
        if c.choices[0].logprobs]
    assert [t for s in streamed for t in s.tokens] == lp.tokens
    assert [o for s in streamed for o in s.text_offset] == lp.text_offset


def test_chat_logprobs(client):
    out = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4,
                                         temperature=0, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
        assert entry.top_logprobs[0].token == entry.token  # greedy
    plain = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2,
                                           temperature=0, logprobs=True)
    assert all(e.top_logprobs == [] for e in plain.choices[0].logprobs.content)
    none = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
    assert none.choices[0].logprobs is None


def test_every_sampling_parameter_is_accepted(client, tok):
    out = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0.8, top_p=0.9, seed=3,
        presence_penalty=0.5, frequency_penalty=0.5, logit_bias={"0": -100}, stop=["\n\n\n"],
        user="user-1",
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 2,
                    "stop_token_ids": [tok.eos_token_id], "ignore_eos": False,
                    "priority": 0, "session_id": "s-1", "cache_salt": "salt-1",
                    "skip_special_tokens": True, "include_stop_str_in_output": False})
    assert out.choices[0].finish_reason in ("stop", "length")
    chat = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=5, temperature=0.8, top_p=0.9, seed=3,
        presence_penalty=0.5, frequency_penalty=0.5, logit_bias={"0": -100}, stop="\n\n\n",
        user="user-1",
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 2,
                    "priority": 1, "session_id": "s-1", "cache_salt": "salt-1"})
    assert chat.choices[0].finish_reason in ("stop", "length")


def test_logit_bias_steers_greedy_output(client, tok):
    (bang,) = tok.encode("!", add_special_tokens=False)
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0,
                                    logit_bias={str(bang): 100})
    assert out.choices[0].text == "!!!!"


def test_ignore_eos_min_tokens_and_stop_token_ids(client, tok):
    out = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 5
    greedy = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0,
                                       logprobs=0)
    second = tok.encode(greedy.choices[0].logprobs.tokens[1], add_special_tokens=False)
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0,
                                    extra_body={"stop_token_ids": second})
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens == 2
    assert out.choices[0].model_extra.get("stop_reason") == second[0]
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0,
                                    extra_body={"stop_token_ids": second, "min_tokens": 3})
    assert out.usage.completion_tokens == 4


def test_batch_prompts_token_prompts_and_echo(client, tok):
    ids = tok.encode(PROMPT)
    out = client.completions.create(model=MODEL, prompt=[PROMPT, "Hello, my name is"],
                                    max_tokens=3, temperature=0, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[0].text == out.choices[1].text  # greedy: both samples agree
    assert out.usage.prompt_tokens == len(ids) + len(tok.encode("Hello, my name is"))
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=3, temperature=0)
    assert by_ids.choices[0].text == out.choices[0].text
    echo = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0,
                                     echo=True)
    assert echo.choices[0].text == PROMPT + out.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, echo=True, stream=True))
    assert streamed == echo.choices[0].text


def test_tokenize_detokenize(server, tok):
    with server.http() as http:
        r = http.post("/tokenize", json={"prompt": PROMPT})
        assert r.status_code == 200
        body = r.json()
        assert body["tokens"] == tok.encode(PROMPT) and body["count"] == len(body["tokens"])
        assert body["max_model_len"] == 8192
        r = http.post("/detokenize", json={"tokens": body["tokens"]})
        assert r.json() == {"prompt": PROMPT}
        r = http.post("/tokenize", json={"messages": CHAT})
        rendered = tok.apply_chat_template(CHAT, add_generation_prompt=True)
        assert r.json()["tokens"] == tok.encode(rendered, add_special_tokens=False)
        r = http.post("/detokenize", json={"tokens": [10**9]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"


def test_openapi_and_version(server):
    with server.http() as http:
        spec = http.get("/openapi.json").json()
        for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize",
                     "/detokenize", "/health", "/ready", "/metrics"):
            assert path in spec["paths"], path
        assert http.get("/version").json()["version"]


def test_health_ready_metrics(server, client):
    with server.http() as http:
        assert http.get("/health").json() == {"status": "ok"}
        assert http.get("/ready").status_code == 200
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0)
        text = http.get("/metrics").text
    for name in ("metroline_num_requests_running", "metroline_num_requests_waiting",
                 "metroline_kv_cache_usage_perc", "metroline_prompt_tokens_total",
                 "metroline_generation_tokens_total", "metroline_num_preemptions_total",
                 "metroline_prefix_cache_queries_total", "metroline_prefix_cache_hits_total",
                 "metroline_time_to_first_token_seconds_bucket",
                 "metroline_time_per_output_token_seconds_bucket",
                 "metroline_e2e_request_latency_seconds_bucket",
                 "metroline_request_success_total"):
        assert name in text, name
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line and not line.startswith("#") and "_bucket" not in line}
    assert values["metroline_generation_tokens_total"] >= 3
    assert values["metroline_e2e_request_latency_seconds_count"] >= 1
    assert values["metroline_engine_alive"] == 1.0
