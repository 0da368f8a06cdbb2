"""--api-key: every route but the explicit allowlist needs the key; proven by walking the
app's route table, so a route added later is covered without touching this test."""

from __future__ import annotations

import re

import openai
import pytest

from metroline.server.app import AUTH_ALLOWLIST, api_key_from_env

KEY = "test-secret-key"
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def secured(aux_server):
    return aux_server(api_key=KEY)


def _routes(app):
    """(method, concrete path) for every HTTP route of the app."""
    out = []
    for route in app.routes:
        methods = getattr(route, "methods", None)
        if not methods:
            continue
        path = re.sub(r"\{[^}]+\}", "x", route.path)
        out += [(m, path) for m in sorted(methods)]
    return out


def test_allowlist_is_health_and_the_page():
    """Liveness, and the page with its two assets (it holds no data: it asks for the key)."""
    assert AUTH_ALLOWLIST == frozenset({"/health", "/", "/static/app.js", "/static/style.css"})


def test_every_route_but_the_allowlist_needs_the_key(secured):
    routes = _routes(secured.app)
    paths = {p for _, p in routes}
    for expected in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/models/x",
                     "/tokenize", "/detokenize", "/health", "/ready", "/metrics", "/openapi.json",
                     "/docs", "/version", "/v1/responses", "/v1/responses/x",
                     "/v1/agents/runs", "/v1/agents/runs/x", "/v1/agents/runs/x/cancel", "/v1/sessions/x"):
        assert expected in paths, f"{expected} missing from the route table"
    with secured.http() as http:
        for method, path in routes:
            bare = http.request(method, path)
            wrong = http.request(method, path, headers={"Authorization": "Bearer nope"})
            right = http.request(method, path, headers={"Authorization": f"Bearer {KEY}"})
            if path in AUTH_ALLOWLIST:
                assert bare.status_code != 401 and wrong.status_code != 401, (method, path)
            else:
                assert bare.status_code == 401, (method, path, bare.status_code)
                assert wrong.status_code == 401, (method, path, wrong.status_code)
                if method != "HEAD":
                    err = bare.json()["error"]
                    assert err["code"] == "invalid_api_key" and err["type"]
                assert bare.headers.get("www-authenticate") == "Bearer"
            assert right.status_code != 401, (method, path)
        # Unknown routes too: nothing is learned without the key.
        assert http.get("/no/such/route").status_code == 401
        assert http.get("/no/such/route",
                        headers={"Authorization": f"Bearer {KEY}"}).status_code == 404


def test_openai_client_with_and_without_key(secured):
    with pytest.raises(openai.AuthenticationError) as e:
        secured.client(api_key="wrong").completions.create(model=MODEL, prompt="Hi",
                                                           max_tokens=1)
    assert e.value.code == "invalid_api_key"
    out = secured.client(api_key=KEY).completions.create(model=MODEL, prompt="Hi", max_tokens=1)
    assert out.usage.completion_tokens == 1
    assert [m.id for m in secured.client(api_key=KEY).models.list().data] == [MODEL]


def test_api_key_from_env(monkeypatch):
    monkeypatch.setenv("METROLINE_API_KEY", "from-env")
    assert api_key_from_env(None) == "from-env"
    assert api_key_from_env("explicit") == "explicit"
    monkeypatch.delenv("METROLINE_API_KEY")
    assert api_key_from_env(None) is None


def test_metrics_token_lets_a_scraper_in_without_the_api_key(aux_server):
    srv = aux_server(api_key=KEY, metrics_token="scrape-token")
    with srv.http() as http:
        assert http.get("/metrics").status_code == 401
        ok = http.get("/metrics", headers={"Authorization": "Bearer scrape-token"})
        assert ok.status_code == 200 and "metroline_num_requests_running" in ok.text
        assert http.get("/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        # The scraper's token opens /metrics only.
        r = http.get("/v1/models", headers={"Authorization": "Bearer scrape-token"})
        assert r.status_code == 401


def test_public_metrics_and_token_without_api_key(aux_server):
    srv = aux_server(api_key=KEY, public_metrics=True)
    with srv.http() as http:
        assert http.get("/metrics").status_code == 200
        assert http.get("/v1/models").status_code == 401
    srv = aux_server(metrics_token="only-metrics")  # no API key: only /metrics is guarded
    with srv.http() as http:
        assert http.get("/metrics").status_code == 401
        assert http.get("/metrics",
                        headers={"Authorization": "Bearer only-metrics"}).status_code == 200
        assert http.get("/v1/models").status_code == 200


def test_ready_is_cached_and_not_counted(aux_server):
    srv = aux_server(ready_cache_s=60.0)
    engine = srv.app.state.metroline.engine
    with srv.http() as http:
        assert http.get("/ready").status_code == 200
        before = engine.get_stats()
        for _ in range(5):
            assert http.get("/ready").status_code == 200
        after = engine.get_stats()
    assert after.steps == before.steps  # answered from the cache
    srv = aux_server(ready_cache_s=0.0)
    with srv.http() as http:
        before = engine.get_stats()
        assert http.get("/ready").status_code == 200
        after = engine.get_stats()
    # It generated, but the probe's tokens and steps are not the users'.
    assert (after.generation_tokens, after.prompt_tokens, after.steps) == (
        before.generation_tokens, before.prompt_tokens, before.steps)
