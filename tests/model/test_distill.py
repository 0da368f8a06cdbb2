"""`metroline distill`: a tiny run on this CPU trains (the KL falls), writes a folder that
metroline loads and serves, resumes from its checkpoint, and serves as a speculative draft
with outputs identical to the teacher alone."""

from __future__ import annotations

import json
import os

import pytest

from metroline.distill import DistillConfig, distill


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("student"))
    r = distill(None, out, DistillConfig(layers=2, steps=4, seq_len=32, batch=2, lr=1e-3, save_every=2),
                progress=False)
    assert r["steps"] == 4 and r["picked_layers"] == [0, 29]
    return out, r


def test_tiny_run_writes_a_loadable_student(student_dir, default_loaded):
    from metroline.engine.llm import LLM
    from metroline.engine.request import SamplingParams

    out, r = student_dir
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "loss.png",
              "checkpoint.pt"):
        assert os.path.exists(os.path.join(out, f)), f
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["num_hidden_layers"] == 2 and cfg["hidden_size"] == 576
    assert r["last_loss"] < r["first_loss"]  # it learns, even in four steps
    llm = LLM(out, num_blocks=64, show_progress=False)
    assert llm.tokenizer.encode("Hello world") == default_loaded.tokenizer.encode("Hello world")
    assert llm.tokenizer.chat_template == default_loaded.tokenizer.chat_template
    o = llm.generate(["The sky is"], SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)[0]
    assert len(o.outputs[0].token_ids) == 5


def test_resume_and_bad_arguments(student_dir):
    from metroline.cli import main

    out, _ = student_dir
    r = distill(None, out, DistillConfig(layers=2, steps=6, seq_len=32, batch=2, lr=1e-3, save_every=2),
                progress=False)
    assert r["steps"] == 6  # two more steps after the four of the checkpoint
    assert main(["distill", "--layers", "0", "--steps", "1", "-o", out]) == 2
    assert main(["distill", "--layers", "3", "--steps", "7", "-o", out]) == 2  # another run's folder


def test_student_as_speculative_draft(student_dir, default_loaded):
    from metroline.engine.llm import LLM
    from metroline.engine.request import SamplingParams

    out, _ = student_dir
    sp = SamplingParams(temperature=0, max_tokens=24)
    prompt = ["Once upon a time"]
    plain = LLM(loaded=default_loaded, num_blocks=64, show_progress=False).generate(prompt, sp, use_tqdm=False)
    spec = LLM(loaded=default_loaded, num_blocks=64, show_progress=False, speculative=f"draft:{out}")
    got = spec.generate(prompt, sp, use_tqdm=False)
    assert got[0].outputs[0].token_ids == plain[0].outputs[0].token_ids
    assert spec.engine.get_stats().spec_draft_tokens > 0


def test_student_exports_to_gguf_with_the_same_outputs(student_dir, tmp_path):
    """The student's folder written as GGUF (llama.cpp's names, q/k order, tokenizer metadata):
    it loads with the same tokenizer and chat template, and gives the tokens and logprobs the
    folder gives quantized at load in the same format."""
    from metroline.cli import main
    from metroline.engine.llm import LLM
    from metroline.engine.request import SamplingParams
    from metroline.model.gguf_meta import open_gguf

    out, _ = student_dir
    gguf = tmp_path / "student-q8_0.gguf"
    assert main(["quantize", out, "--to", "q8_0", "-o", str(gguf)]) == 0
    meta = open_gguf(gguf).metadata
    assert meta["llama.block_count"] == 2 and meta["tokenizer.ggml.pre"] == "gpt-2"
    sp = SamplingParams(temperature=0, max_tokens=8, logprobs=0)
    a = LLM(out, weights="q8_0", num_blocks=64, show_progress=False)
    b = LLM(str(gguf), num_blocks=64, show_progress=False)
    assert b.tokenizer.chat_template == a.tokenizer.chat_template
    text = "Hello world, 12 + 30 = 42!"
    assert b.tokenizer.encode(text) == a.tokenizer.encode(text)
    oa = a.generate(["The sky is"], sp, use_tqdm=False)[0].outputs[0]
    ob = b.generate(["The sky is"], sp, use_tqdm=False)[0].outputs[0]
    assert ob.token_ids == oa.token_ids and [x[1] for x in ob.logprobs] == [x[1] for x in oa.logprobs]
