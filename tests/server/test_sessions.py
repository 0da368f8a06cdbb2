"""Prefix caching over HTTP: cached_tokens in usage, session retention, tenant and salt isolation."""

from __future__ import annotations

import openai
import pytest

SYSTEM = ("You are a meticulous travel planner. Always answer with a short numbered list, "
          "mention opening hours when you know them, and keep every item under twenty words.")


def _chat(client, messages, **extra):
    return client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, max_tokens=6, temperature=0,
                                          extra_body=extra or None)


def _metric(http, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_session_turns_reuse_the_history_and_release(server, client):
    http = server.http()
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Plan a day in Porto."}]
    first = _chat(client, messages, session_id="trip", kv_retention_s=120)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert _metric(http, "metroline_kv_cache_pinned_blocks") >= 2
    assert _metric(http, "metroline_kv_cache_pinned_sessions") == 1
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And the next day?"}]
    second = _chat(client, messages, session_id="trip", kv_retention_s=120)
    assert second.usage.prompt_tokens_details.cached_tokens >= 32
    assert http.delete("/v1/sessions/trip").json() == {"id": "trip", "object": "session", "deleted": True}
    assert _metric(http, "metroline_kv_cache_pinned_blocks") == 0
    r = http.delete("/v1/sessions/trip")
    assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"


def test_cache_salt_isolates_prefixes(client):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Salted question one."}]
    _chat(client, messages, cache_salt="alpha")
    assert _chat(client, messages, cache_salt="alpha").usage.prompt_tokens_details.cached_tokens >= 32
    assert _chat(client, messages, cache_salt="beta").usage.prompt_tokens_details.cached_tokens == 0


def test_tenants_never_share_cache_or_sessions(aux_server):
    srv = aux_server(api_key="key-one,key-two")
    one, two = srv.client(api_key="key-one"), srv.client(api_key="key-two")
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Tenant test prompt."}]
    _chat(one, messages, session_id="s", kv_retention_s=60)
    assert _chat(one, messages).usage.prompt_tokens_details.cached_tokens >= 32
    assert _chat(two, messages).usage.prompt_tokens_details.cached_tokens == 0
    with pytest.raises(openai.AuthenticationError):
        srv.client(api_key="key-three").models.list()
    http_two = srv.http(headers={"Authorization": "Bearer key-two"})
    assert http_two.delete("/v1/sessions/s").status_code == 404  # not tenant two's session
    http_one = srv.http(headers={"Authorization": "Bearer key-one"})
    assert http_one.delete("/v1/sessions/s").status_code == 200


def test_bad_retention_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, [{"role": "user", "content": "hi"}], session_id="x", kv_retention_s=-1)
    assert e.value.body["param"] == "kv_retention_s"
