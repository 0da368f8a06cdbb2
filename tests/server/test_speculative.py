"""A server whose engine speculates (ngram): the official client gets the same text as from
the non-speculative server, `usage` reports the accepted drafts, and /metrics the counters
and rates."""

from __future__ import annotations

import pytest

from metroline.config import CacheConfig, SchedulerConfig, ServerConfig, SpeculativeConfig
from metroline.engine.async_engine import AsyncEngine
from metroline.engine.core import EngineCore
from metroline.server.app import create_app
from tests.server.conftest import _start

MODEL = "SmolLM2-135M-Instruct"
TEXT = ("The lighthouse keeper climbed the spiral stairs every evening at dusk, trimmed the wick, "
        "polished the great lens and wrote the weather in a leather logbook.")


@pytest.fixture(scope="module")
def spec_server(default_loaded):
    core = EngineCore(default_loaded, CacheConfig(num_blocks=256), SchedulerConfig(max_num_seqs=8),
                      speculative_config=SpeculativeConfig(method="ngram", num_speculative_tokens=4))
    engine = AsyncEngine(core, idle_wait_s=0.01)
    st = _start(create_app(engine, ServerConfig()))
    yield st
    st.stop()
    engine.shutdown(timeout=10)


def test_speculating_server_same_text_usage_and_metrics(spec_server, client):
    args = dict(model=MODEL, messages=[{"role": "user", "content": f"Repeat this text exactly:\n\n{TEXT}"}],
                max_tokens=60, temperature=0)
    plain = client.chat.completions.create(**args)
    spec = spec_server.client().chat.completions.create(**args)
    assert spec.choices[0].message.content == plain.choices[0].message.content
    accepted = spec.usage.completion_tokens_details.accepted_prediction_tokens
    assert 0 < accepted < spec.usage.completion_tokens
    assert plain.usage.completion_tokens_details.accepted_prediction_tokens == 0
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       spec_server.client().chat.completions.create(**args, stream=True) if c.choices)
    assert streamed == plain.choices[0].message.content
    with spec_server.http() as http:
        text = http.get("/metrics").text
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("metroline_spec_decode")}
    assert values["metroline_spec_decode_num_accepted_tokens_total"] >= 2 * accepted
    assert 0 < values["metroline_spec_decode_acceptance_rate"] <= 1
    assert values["metroline_spec_decode_mean_accepted_length"] > 1
