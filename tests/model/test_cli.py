"""The `metroline` command as a user runs it: real processes, real model, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

CLI = [sys.executable, "-m", "metroline.cli"]


def _run(args, stdin: str | None = None, timeout: float = 180):
    return subprocess.run(CLI + args, input=stdin, capture_output=True, text=True, timeout=timeout)


def _assert_one_line_error(proc, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    for f in fragments:
        assert f in err, err


def test_generate_default_model_greedy_matches_engine(default_llm):
    from metroline.engine.request import SamplingParams

    proc = _run(["generate", "The capital of France is", "--max-tokens", "8"])
    assert proc.returncode == 0, proc.stderr
    expected = default_llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8),
                                    use_tqdm=False)[0].outputs[0].text
    assert proc.stdout == expected + "\n"
    assert "Paris" in proc.stdout


def test_chat_keeps_the_conversation(default_llm, monkeypatch, capsys):
    import io

    from metroline import cli

    prompts = []
    real_stream = cli._stream

    def spy(llm, ids, params, out=sys.stdout):
        prompts.append(llm.tokenizer.decode(ids, skip_special_tokens=False))
        return real_stream(llm, ids, params, out)

    monkeypatch.setattr(cli, "_make_llm", lambda args: default_llm)
    monkeypatch.setattr(cli, "_stream", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("My name is Ada.\n/reset\nHi\nWhat is my name?\n"))
    assert cli.main(["chat", "--max-tokens", "12"]) == 0
    replies = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(prompts) == 3 and len(replies) == 3
    assert "My name is Ada." in prompts[0] and prompts[0].endswith("<|im_start|>assistant\n")
    assert "Ada" not in prompts[1]  # /reset forgot the first turn
    # The third turn's prompt holds the second exchange: question, streamed reply, new question.
    assert "Hi<|im_end|>" in prompts[2] and replies[1] in prompts[2] and "What is my name?" in prompts[2]


def test_missing_model_file():
    _assert_one_line_error(_run(["generate", "hi", "--model", "/nonexistent/model.gguf"]),
                           "not found", "/nonexistent/model.gguf")


def test_file_that_is_not_a_model(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    _assert_one_line_error(_run(["generate", "hi", "--model", str(junk)]), "not a GGUF file")
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    _assert_one_line_error(_run(["generate", "hi", "--model", str(text)]), "not a GGUF file")


def test_unsupported_architecture(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _assert_one_line_error(_run(["generate", "hi", "--model", str(path)]), "unsupported architecture", "gpt2")


def test_invalid_sampling_parameter():
    _assert_one_line_error(_run(["generate", "hi", "--temperature", "-1"]), "temperature")
