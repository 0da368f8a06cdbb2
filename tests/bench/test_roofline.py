"""Roofline arithmetic: bytes per weight, ceilings, the compute take-over batch, fractions."""

from __future__ import annotations

import pytest

from metroline.bench import roofline as rl
from metroline.bench.hardware import decode_roofline

SHAPE = rl.ModelShape("toy", num_layers=2, hidden_size=64, intermediate_size=128, q_size=64,
                      kv_size=32, vocab_size=1000)


@pytest.mark.parametrize("fmt,b", [("fp32", 4), ("bf16", 2), ("F16", 2), ("q4_0", 18 / 32),
                                   ("q4_1", 20 / 32), ("q8_0", 34 / 32), ("Q6_K", 210 / 256),
                                   ("int4", 0.5625), ("ternary", 0.25)])
def test_bytes_per_weight(fmt, b):
    assert rl.bytes_per_weight(fmt) == pytest.approx(b)


def test_unknown_format():
    with pytest.raises(ValueError, match="unknown weight format"):
        rl.bytes_per_weight("q3_z")


def test_matmul_weights_count():
    per_layer = 64 * (2 * 64 + 2 * 32) + 3 * 64 * 128
    assert SHAPE.matmul_weights == 2 * per_layer + 1000 * 64
    assert SHAPE.kv_bytes_per_token(2) == 2 * 2 * 32 * 2


def test_ceilings_match_hardware_decode_roofline_without_context():
    bw, flops = 20e9, 200e9
    c = rl.decode_ceilings(SHAPE, "bf16", bw, flops)
    ref = decode_roofline(bw, SHAPE.matmul_weights * 2, flops, 2 * SHAPE.matmul_weights)
    assert c["decode_ceiling_batch1_tok_s"] == pytest.approx(ref["decode_ceiling_tok_s"])
    assert c["compute_bound_batch"] == pytest.approx(ref["compute_bound_batch"])
    # at the take-over batch, bandwidth and compute take equally long
    b = c["compute_bound_batch"]
    assert rl.throughput_at(b, c["weight_bytes_per_step"], bw, flops, c["flops_per_token"]) == \
        pytest.approx(c["compute_bound_tok_s"])
    assert rl.throughput_at(1, c["weight_bytes_per_step"], bw, flops, c["flops_per_token"]) == \
        pytest.approx(bw / c["weight_bytes_per_step"])


def test_context_adds_kv_reads_and_attention_flops():
    c0 = rl.decode_ceilings(SHAPE, "fp32", 20e9, 200e9, context=0)
    c = rl.decode_ceilings(SHAPE, "fp32", 20e9, 200e9, context=1000, kv_elem_bytes=4)
    assert c["kv_bytes_per_sequence"] == 1000 * SHAPE.kv_bytes_per_token(4)
    assert c["decode_ceiling_batch1_tok_s"] < c0["decode_ceiling_batch1_tok_s"]
    assert c["flops_per_token"] == c0["flops_per_token"] + 4 * 2 * 64 * 1000
    # KV reads that cost more than the compute they feed: never compute-bound
    huge = rl.decode_ceilings(SHAPE, "fp32", 1e9, 1e15, context=100000)
    assert huge["compute_bound_batch"] == float("inf")


def test_default_model_shape():
    shape = rl.model_shape(None)  # SmolLM2-135M: 30 layers, 576 hidden, 1536 ffn, 9/3 heads
    assert (shape.num_layers, shape.hidden_size, shape.intermediate_size) == (30, 576, 1536)
    assert shape.matmul_weights == 134_479_872
    assert rl.weight_bytes(shape, "fp32") == pytest.approx(538e6, rel=0.01)
    # the file: Q4_1 layers and a Q8_0 tied embedding, read as the output head
    assert shape.file_matmul_bytes == 30 * 2_211_840 + 30_081_024
    assert "Q4_1" in shape.file_format


def test_achieved_fraction_of_a_serve_result():
    res = {"label": "x", "runs": [{"max_concurrency": 4, "metrics": {
        "completed": 8, "input_tokens": 800, "output_tokens": 400, "output_throughput": 50.0,
        "tpot_ms": {"p50": 100.0}}}]}
    (row,) = rl.achieved(res, SHAPE, "fp32", 1e9, 1e12)
    assert row["context"] == 100 + 25
    c = rl.decode_ceilings(SHAPE, "fp32", 1e9, 1e12, 125)
    agg = rl.throughput_at(4, c["weight_bytes_per_step"], 1e9, 1e12, c["flops_per_token"],
                           c["kv_bytes_per_sequence"])
    assert row["fraction"] == pytest.approx(50 / agg)
    assert row["stream_tok_s"] == pytest.approx(10)
    assert row["stream_fraction"] == pytest.approx(10 / c["decode_ceiling_batch1_tok_s"])
    off = rl.achieved({"single_stream": {"metroline_tok_s": 10.0}}, SHAPE, "fp32", 1e9, 1e12)
    assert off[0]["fraction"] == pytest.approx(10 / (1e9 / (4 * SHAPE.matmul_weights)))
