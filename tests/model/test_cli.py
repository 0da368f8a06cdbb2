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


def test_generate_with_an_int8_kv_cache():
    proc = _run(["generate", "The capital of France is", "--max-tokens", "8", "--kv-cache-dtype", "int8"])
    assert proc.returncode == 0, proc.stderr
    assert "MiB int8" in proc.stderr and "Paris" in proc.stdout
    bad = _run(["generate", "hi", "--kv-cache-dtype", "int4"])  # argparse: usage, then the error line
    assert bad.returncode == 2 and "argument --kv-cache-dtype: invalid choice: 'int4'" in bad.stderr.splitlines()[-1]


def test_chat_keeps_the_conversation(default_llm, monkeypatch, capsys):
    import io

    from metroline import cli

    prompts = []
    real_stream = cli._stream

    def spy(llm, ids, params, out=sys.stdout):
        prompts.append(llm.tokenizer.decode(ids, skip_special_tokens=False))
        return real_stream(llm, ids, params, out)

    monkeypatch.setattr(cli, "_make_llm", lambda args, command: default_llm)
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


def test_chat_slash_commands_give_feedback_and_never_reach_the_model(default_llm, monkeypatch,
                                                                      capsys):
    import io

    from metroline import cli

    prompts = []
    real_stream = cli._stream

    def spy(llm, ids, params, out=sys.stdout):
        prompts.append((llm.tokenizer.decode(ids, skip_special_tokens=False), params))
        return real_stream(llm, ids, params, out)

    monkeypatch.setattr(cli, "_make_llm", lambda args, command: default_llm)
    monkeypatch.setattr(cli, "_stream", spy)
    script = ("/help\n/nonsense\n/params max_tokens=3 temperature=0\n/params top_p=7\n"
              "/params bogus\n/system You are a pirate.\nHello\n/reset\n/system\nHi\n/exit\n"
              "never sent\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    assert cli.main(["chat", "--max-tokens", "12"]) == 0
    err = capsys.readouterr().err
    assert "/params [K=V ...]" in err  # /help
    assert "unknown command /nonsense: try /help" in err
    assert "max_tokens=3" in err and "top_p must be in (0, 1]" in err
    assert "cannot set 'bogus'" in err
    assert "system prompt set: 'You are a pirate.'" in err
    assert "[conversation cleared]" in err and "system prompt removed" in err
    assert len(prompts) == 2  # only "Hello" and "Hi": no slash command, nothing after /exit
    assert "You are a pirate." in prompts[0][0] and prompts[0][1].max_tokens == 3
    assert "pirate" not in prompts[1][0] and "Hello" not in prompts[1][0]
    assert "/nonsense" not in prompts[0][0] + prompts[1][0]


def test_chat_in_a_pseudo_terminal_edits_lines(tmp_path):
    """Through a real pty: arrow keys edit the line (readline) instead of reaching the model."""
    import os
    import pty
    import select
    import time

    pid, fd = pty.fork()
    if pid == 0:  # child: the chat REPL on the terminal
        os.environ["HOME"] = str(tmp_path)
        os.execv(sys.executable, CLI + ["chat", "--max-tokens", "4"])
    out = b""

    def read_until(token: bytes, timeout: float = 120) -> bytes:
        nonlocal out
        deadline = time.monotonic() + timeout
        while token not in out and time.monotonic() < deadline:
            r, _, _ = select.select([fd], [], [], 0.5)
            if r:
                try:
                    out += os.read(fd, 4096)
                except OSError:
                    break
        return out

    try:
        assert b"/help lists the commands" in read_until(b"/help lists the commands")
        os.write(fd, b"/hlp\x1b[D\x1b[De\r")  # "/hlp", two left arrows, "e": "/help"
        read_until(b"/exit, /quit")
        assert b"/exit, /quit" in out and b"unknown command" not in out
        os.write(fd, b"\x1b[A\r")  # up arrow: the history brings back /help
        out = out.split(b"/exit, /quit")[-1]
        assert b"/exit, /quit" in read_until(b"/exit, /quit", 30)
        os.write(fd, b"/exit\r")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
