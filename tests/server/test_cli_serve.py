"""`metroline serve` as a real process: flags, METROLINE_API_KEY, and a real SIGTERM that
drains (503 for new work, /ready 503, in-flight streams ended with an error event after
--shutdown-timeout) and exits 0; a new server comes up on the same port at once."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

KEY = "cli-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(port: int) -> subprocess.Popen:
    """`metroline serve` on `port`, once it answers /health."""
    env = {**os.environ, "METROLINE_API_KEY": KEY}
    cmd = [sys.executable, "-m", "metroline.cli", "serve", "--port", str(port),
           "--num-blocks", "256", "--max-num-seqs", "4", "--max-num-batched-tokens", "128",
           "--shutdown-timeout", "2", "--served-model-name", "smol", "smol-alias",
           "--log-level", "warning", "--no-access-log"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    try:
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "server did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    return proc
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
    except BaseException:
        _stop(proc)
        raise


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)
    proc.stdout.close()


@pytest.fixture
def serve_process():
    port = _free_port()
    proc = _start(port)
    try:
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)


def test_serve_cli_auth_and_sigterm_drain(serve_process):
    proc, url = serve_process
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200  # allowlisted
    assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, timeout=60, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["smol", "smol-alias"]
    out = client.chat.completions.create(model="smol-alias", max_tokens=3,
                                         messages=[{"role": "user", "content": "Hi"}])
    assert out.choices[0].message.content is not None

    stream = client.completions.create(model="smol", prompt="Once upon a time", max_tokens=2000,
                                       stream=True, extra_body={"ignore_eos": True})
    assert next(iter(stream)).choices
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while httpx.get(f"{url}/ready", headers=auth, timeout=10).status_code != 503:
        assert time.monotonic() < deadline, "/ready still 200 after SIGTERM"
        time.sleep(0.05)
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model="smol", prompt="new", max_tokens=2)
    assert e.value.code == "server_draining"
    with pytest.raises(openai.APIError) as e:  # cut after --shutdown-timeout 2
        for _ in stream:
            pass
    assert e.value.code == "server_shutdown"
    assert proc.wait(60) == 0

    # Restart on the same port at once (no "address already in use" from the old sockets).
    again = _start(int(url.rsplit(":", 1)[1]))
    try:
        out = client.completions.create(model="smol", prompt="Hello", max_tokens=2, extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 2
    finally:
        _stop(again)


def test_serve_flags_and_chat_template_file(tmp_path):
    from metroline.cli import _read_chat_template, build_parser
    from metroline.errors import MetrolineError

    args = build_parser().parse_args([
        "serve", "--host", "0.0.0.0", "--port", "9001", "--max-num-seqs", "8",
        "--max-num-batched-tokens", "64", "--max-queued-requests", "5", "--max-model-len", "512",
        "--kv-cache-memory", "1000000", "--request-timeout", "7.5", "--shutdown-timeout", "3",
        "--served-model-name", "a", "b", "--scheduling-policy", "priority"])
    assert (args.host, args.port, args.max_num_seqs, args.max_num_batched_tokens) == \
        ("0.0.0.0", 9001, 8, 64)
    assert (args.max_queued_requests, args.max_model_len, args.kv_cache_memory) == (5, 512, 10**6)
    assert (args.request_timeout, args.shutdown_timeout) == (7.5, 3.0)
    assert args.served_model_name == ["a", "b"] and args.scheduling_policy == "priority"
    defaults = build_parser().parse_args(["serve"])
    assert defaults.host == "127.0.0.1" and defaults.api_key is None

    path = tmp_path / "tpl.jinja"
    path.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert _read_chat_template(str(path)).startswith("{% for m in messages %}")
    assert _read_chat_template("{{ messages[0]['content'] }}") == "{{ messages[0]['content'] }}"
    with pytest.raises(MetrolineError):
        _read_chat_template(str(tmp_path / "missing.jinja"))
