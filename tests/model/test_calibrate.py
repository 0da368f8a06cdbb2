"""Importance-weighted quantization (`--quant-method imatrix`): the weighted quantizers are
round to nearest without importance and never worse than it with; collect_importance
measures the mean x^2 of each layer's input; the flags work end to end on a tiny model and
refuse what they cannot do in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from metroline.quant.quantizers import quantize_weighted, weighted_error
from tests.model.test_model_vs_hf import (G_FFN, G_HEADS, G_HIDDEN, G_LAYERS, tiny_tokenizer,  # noqa: F401
                                          write_tiny_gguf)

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import quantize  # noqa: E402

FORMATS = ["Q8_0", "Q4_0", "Q4_1"]


def _matrix(seed: int, n: int = 64, k: int = 256) -> np.ndarray:
    """Gaussian weights with some heavy rows, a zero block and a constant block."""
    rng = np.random.default_rng(seed)
    w = (0.05 * rng.standard_normal((n, k)) * rng.gamma(2.0, 0.5, (n, 1))).astype(np.float32)
    w[3, :32] = 0.0
    w[5, 32:64] = 0.02
    w[7, 70] = 1.5  # an outlier
    return w


@pytest.mark.parametrize("fmt", FORMATS)
def test_weighted_quantizer_without_importance_is_rtn_bit_for_bit(fmt):
    w = _matrix(1)
    got = quantize_weighted(w, int(Q[fmt]), None)
    want = quantize(w, Q[fmt])
    assert got.dtype == np.uint8 and got.shape == want.shape and np.array_equal(got, want)


@pytest.mark.parametrize("fmt", FORMATS)
def test_weighted_error_never_above_rtn_and_lower_where_it_can_be(fmt):
    """Per block, sum_k a_k (w_k - deq_k)^2 of the bytes as gguf decodes them is at most
    round-to-nearest's, over random importance; lower overall; and on a constructed block
    (one channel carrying nearly all the importance, its weight between two RTN steps)
    clearly lower."""
    w = _matrix(2)
    rng = np.random.default_rng(3)
    a = rng.gamma(0.5, 1.0, w.shape[1]).astype(np.float32)
    a[40:48] = 0.0  # dead channels
    qtype = int(Q[fmt])
    ours = quantize_weighted(w, qtype, a)
    rtn = quantize(w, Q[fmt])
    assert ours.shape == rtn.shape and ours.dtype == np.uint8
    e_ours, e_rtn = weighted_error(w, ours, qtype, a), weighted_error(w, rtn, qtype, a)
    assert np.all(e_ours <= e_rtn * (1 + 1e-12)), float((e_ours / np.maximum(e_rtn, 1e-30)).max())
    assert e_ours.sum() < 0.95 * e_rtn.sum()
    assert not np.array_equal(ours, rtn)

    # One block: the extremes -0.5 and 1.0 set RTN's scale; channel 5 (importance 1000, the
    # rest 1e-3) holds 0.33, which RTN's grid misses (Q4_0, step 1/8: 0.375; Q4_1, step 0.1
    # from -0.5: 0.3; Q8_0, step 1/127: 0.3307). A scale fitted to it nearly removes its error.
    block = np.linspace(-0.5, 1.0, 32).astype(np.float32)
    block[5] = 0.33
    imp = np.full(32, 1e-3, np.float32)
    imp[5] = 1000.0
    m = block[None, :]
    e1 = weighted_error(m, quantize_weighted(m, qtype, imp), qtype, imp)[0, 0]
    e0 = weighted_error(m, quantize(m, Q[fmt]), qtype, imp)[0, 0]
    assert e1 < 0.5 * e0, (e1, e0)


def test_bad_importance_is_refused():
    w = _matrix(4)
    with pytest.raises(ValueError, match="input channels"):
        quantize_weighted(w, int(Q.Q4_0), np.ones(10, np.float32))
    with pytest.raises(ValueError, match=">= 0"):
        quantize_weighted(w, int(Q.Q4_0), -np.ones(w.shape[1], np.float32))
    with pytest.raises(ValueError, match="no importance-weighted quantizer"):
        quantize_weighted(w, int(Q.F16), np.ones(w.shape[1], np.float32))


# --------------------------------------------------------------------------- tiny model

@pytest.fixture
def tiny_f32(tiny_tokenizer, tmp_path, monkeypatch):  # noqa: F811
    """A tiny F32 GGUF (every quantized format is then a real quantization), the importance
    cache in tmp_path, and a small default calibration sample."""
    import metroline.quant.calibrate as calibrate

    path = tmp_path / "tiny-f32.gguf"
    write_tiny_gguf(path, tiny_tokenizer[1], Q.F32, seed=11)
    monkeypatch.setenv("METROLINE_CACHE_DIR", str(tmp_path / "cache"))
    small = calibrate.CalibrationSample(num_seqs=2, tokens=32)  # the tiny model calibrates in ~1 s
    monkeypatch.setattr(calibrate, "SAMPLE", small)
    return str(path), small


def test_collect_importance_shapes_and_a_hand_computed_layer(tiny_f32):
    from metroline.model.loader import load_model
    from metroline.quant.calibrate import calibration_ids, collect_importance

    path, small = tiny_f32
    loaded = load_model(path, weights="fp32", device="cpu", show_progress=False)
    imp = collect_importance(loaded=loaded, sample=small, progress=False)
    q_size = G_HEADS * 64
    want_k = {"self_attn.qkv_proj.weight:q": G_HIDDEN, "self_attn.qkv_proj.weight:k": G_HIDDEN,
              "self_attn.qkv_proj.weight:v": G_HIDDEN, "self_attn.o_proj.weight": q_size,
              "mlp.gate_up_proj.weight:gate": G_HIDDEN, "mlp.gate_up_proj.weight:up": G_HIDDEN,
              "mlp.down_proj.weight": G_FFN}
    assert set(imp) == {f"model.layers.{i}.{k}" for i in range(G_LAYERS) for k in want_k}
    for name, v in imp.items():
        assert v.dtype == np.float32 and v.shape == (want_k[name.split(".", 3)[3]],) and np.all(v >= 0), name
    p = "model.layers.0."
    assert np.array_equal(imp[p + "self_attn.qkv_proj.weight:q"], imp[p + "self_attn.qkv_proj.weight:v"])
    assert np.array_equal(imp[p + "mlp.gate_up_proj.weight:gate"], imp[p + "mlp.gate_up_proj.weight:up"])
    # By hand: layer 0's q/k/v input is input_layernorm(embedding) of every sample token.
    seqs = calibration_ids(loaded.tokenizer, small)
    assert len(seqs) == 2 and all(len(s) == 32 for s in seqs)
    layer = loaded.model.model.layers[0]
    with torch.no_grad():
        x = loaded.model.model.embed_tokens(torch.tensor(sum(seqs, [])))
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + layer.input_layernorm.eps) * layer.input_layernorm.weight
    want = (h.double() ** 2).mean(0).numpy()
    np.testing.assert_allclose(imp[p + "self_attn.qkv_proj.weight:q"], want, rtol=1e-5, atol=1e-9)
    assert not np.allclose(imp[p + "mlp.gate_up_proj.weight:gate"], want)  # another layer input

    packed = load_model(path, weights="q8_0", device="cpu", show_progress=False)
    with pytest.raises(Exception, match="full precision"):
        collect_importance(loaded=packed, sample=small, progress=False)


def test_importance_is_cached_and_saved(tiny_f32, tmp_path, monkeypatch):
    import metroline.quant.calibrate as calibrate
    from metroline.model.loader import importance_of

    path, small = tiny_f32
    first = importance_of(path, progress=False)
    assert len(list((tmp_path / "cache" / "importance").iterdir())) == 1

    def refuse(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(calibrate, "collect_importance", refuse)
    again = importance_of(path, progress=False)  # from the cache
    assert again.keys() == first.keys() and all(np.array_equal(again[k], first[k]) for k in first)
    out = tmp_path / "imp.npz"
    importance_of(path, str(out), progress=False)  # written to the file asked for
    loaded = calibrate.load_importance(str(out))
    assert all(np.array_equal(loaded[k], first[k]) for k in first)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(calibrate.CalibrationError, match="cannot read importance file"):
        importance_of(path, str(tmp_path / "bad.npz"))
    with pytest.raises(calibrate.CalibrationError, match="overlap the evaluation slice"):
        calibrate.CalibrationSample(first=1500, count=600)


def test_cli_imatrix_end_to_end_on_a_tiny_model(tiny_f32, tmp_path, capsys):
    """`eval perplexity --weights q4_0 --quant-method imatrix --imatrix F` loads calibrated
    weights (and writes F); `quantize --to q4_0 --quant-method imatrix --imatrix F` writes a
    GGUF whose Q4_0 bytes are exactly what that load holds, and which differ from RTN's."""
    from metroline.cli import main
    from metroline.model.loader import load_model
    from metroline.quant.packed import PackedLinear

    path, _ = tiny_f32
    imp, out = tmp_path / "tiny-imp.npz", tmp_path / "ppl.json"
    assert main(["eval", "perplexity", path, "--weights", "q4_0", "--quant-method", "imatrix", "--imatrix",
                 str(imp), "--num-seqs", "1", "--tokens", "32", "--output", str(out)]) == 0
    got = json.loads(out.read_text())
    assert "imatrix-calibrated" in got["weights"] and "Q4_0" in got["weights"] and got["perplexity"] > 1
    assert imp.exists()
    exported = tmp_path / "tiny-q4_0-imatrix.gguf"
    assert main(["quantize", path, "--to", "q4_0", "--quant-method", "imatrix", "--imatrix", str(imp),
                 "-o", str(exported)]) == 0

    def packed_layers(model, **kw):
        net = load_model(model, device="cpu", show_progress=False, **kw).model
        return {n: m.packed.clone() for n, m in net.named_modules() if isinstance(m, PackedLinear)}

    calibrated = packed_layers(path, weights="q4_0", quant_method="imatrix", imatrix=str(imp))
    from_file = packed_layers(str(exported), weights="packed")
    rtn = packed_layers(path, weights="q4_0")
    assert calibrated.keys() == from_file.keys() == rtn.keys()
    assert all(torch.equal(calibrated[n], from_file[n]) for n in calibrated)
    decoder = [n for n in calibrated if n.startswith("model.layers.")]
    assert all(not torch.equal(calibrated[n], rtn[n]) for n in decoder)
    assert torch.equal(calibrated["lm_head"], rtn["lm_head"])  # no importance: to nearest


def test_bad_calibration_arguments_are_one_line_errors(tiny_f32, tmp_path, capsys):
    from metroline.cli import main

    path, _ = tiny_f32
    imp = str(tmp_path / "x.npz")
    cases = [
        (["eval", "perplexity", path, "--weights", "fp32", "--quant-method", "imatrix"], "quantized at load"),
        (["eval", "perplexity", path, "--weights", "packed", "--quant-method", "imatrix"], "kept as stored"),
        (["eval", "perplexity", path, "--weights", "q4_0", "--imatrix", imp], "goes with --quant-method imatrix"),
        (["generate", "hi", "--model", path, "--weights", "bf16", "--quant-method", "imatrix"], "quantized at load"),
        (["quantize", path, "--to", "f16", "--quant-method", "imatrix", "-o", str(tmp_path / "o.gguf")],
         "calibrates a quantized format"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, (argv, err)
    other = tmp_path / "other.npz"
    from metroline.quant.calibrate import save_importance

    save_importance({"model.layers.0.self_attn.o_proj.weight": np.ones(256, np.float32)}, str(other))
    assert main(["eval", "perplexity", path, "--weights", "q4_0", "--quant-method", "imatrix", "--imatrix",
                 str(other), "--num-seqs", "1", "--tokens", "32"]) == 2
    assert "no entry for" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "perplexity", path, "--quant-method", "gptq"])


def test_matrices_already_in_the_target_are_kept_without_calibrating(tiny_tokenizer, tmp_path, monkeypatch):  # noqa: F811
    """q4_1 + imatrix on a Q4_1 file keeps every decoder matrix as stored (its values are on
    the grid already), so nothing is measured and they are the file's bytes (the untied output
    projection goes to Q8_0 under a 4-bit target, as without calibration)."""
    import metroline.quant.calibrate as calibrate
    from metroline.model.loader import load_model
    from metroline.quant.packed import PackedLinear

    path = tmp_path / "tiny-q4_1.gguf"
    write_tiny_gguf(path, tiny_tokenizer[1], Q.Q4_1, seed=12)

    def refuse(*a, **k):
        raise AssertionError("calibrated for nothing")

    monkeypatch.setattr(calibrate, "importance_for", refuse)
    got = load_model(str(path), weights="q4_1", quant_method="imatrix", device="cpu", show_progress=False)
    want = load_model(str(path), weights="packed", device="cpu", show_progress=False)
    assert "imatrix" not in got.weights
    layers = dict(want.model.named_modules())
    decoder = [(n, m) for n, m in got.model.named_modules() if isinstance(m, PackedLinear) and n.startswith("model.")]
    assert len(decoder) == 4 * G_LAYERS and all(torch.equal(m.packed, layers[n].packed) for n, m in decoder)
