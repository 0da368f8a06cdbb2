"""The web page at / (server/static): served without a key so it can ask for one; its data
calls need the key. End to end in headless Chromium (Playwright driving Debian's chromium):
the dashboard updates while a request runs, a chat reply streams, an agent run's trace
appears, a wrong key is refused. With METROLINE_SCREENSHOTS=DIR the browser tests also save
the screenshots docs/ shows."""

from __future__ import annotations

import os
import shutil
import threading
import time

import httpx
import pytest

KEY = "page-key"
CHEAP_RUN = {"max_steps": 2, "max_tokens_per_call": 32, "final_answer_max_tokens": 16, "deadline_s": 60}


def test_the_page_loads_without_a_key_and_its_data_needs_one(aux_server):
    s = aux_server(api_key=KEY)
    with s.http() as http:
        page = http.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "<title>metroline</title>" in page.text and "/static/app.js" in page.text
        js = http.get("/static/app.js")
        assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
        assert http.get("/static/style.css").headers["content-type"].startswith("text/css")
        assert http.get("/static/secrets.txt").status_code == 401  # not an asset: the key is asked
        assert http.get("/metrics").status_code == 401
        assert http.get("/v1/metroline/roofline").status_code == 401
        r = http.get("/v1/metroline/roofline", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200
    roof = r.json()
    assert roof["bandwidth_bytes_s"] > 1e8 and roof["weight_bytes_per_token"] > 1e6
    assert roof["decode_ceiling_tok_s"] == pytest.approx(roof["bandwidth_bytes_s"] / roof["weight_bytes_per_token"])


def test_an_unknown_asset_is_a_404_where_no_key_is_needed(server):
    with server.http() as http:
        r = http.get("/static/nothing.js")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


# ---------------------------------------------------------------------------- in a browser

def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no chromium on this machine (scripts/setup.sh test installs Debian's where it can: "
                "apt-get install chromium)")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (metroline[test])")
    exe = _chromium()
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


def _shot(page, name: str) -> None:
    where = os.environ.get("METROLINE_SCREENSHOTS")
    if where:
        os.makedirs(where, exist_ok=True)
        page.screenshot(path=os.path.join(where, f"page-{name}.png"), full_page=True)


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, errors  # no JavaScript error on the page


def test_the_dashboard_updates_while_a_request_runs(server, page):
    page.goto(server.url + "/")
    page.wait_for_function("Number(document.getElementById('updated').dataset.ticks || 0) >= 2", timeout=20000)
    done = threading.Event()

    def long_request() -> None:
        with server.http() as http:
            http.post("/v1/completions", json={"prompt": "Tell a long story:", "max_tokens": 160,
                                               "ignore_eos": True})
        done.set()

    threading.Thread(target=long_request, daemon=True).start()
    # running >= 1 in the card, and a tokens/s figure above zero, while it runs
    page.wait_for_function("Number(document.getElementById('v-queue').textContent.split(' / ')[0]) >= 1", timeout=30000)
    page.wait_for_function("parseFloat(document.getElementById('v-toks').textContent) > 0", timeout=30000)
    # the charts' series hold the new points (tokens/s above zero, a running request)
    assert page.evaluate("metrolineSeries.toks.some(v => v > 0) && metrolineSeries.running.some(v => v >= 1)")
    _shot(page, "dashboard")
    assert done.wait(60)
    page.wait_for_function("document.getElementById('v-ttft').textContent.includes('ms')", timeout=10000)


def test_a_chat_message_streams_a_reply(server, page):
    page.goto(server.url + "/")
    page.click("button[data-tab=playground]")
    page.fill("#p-temperature", "0")
    page.fill("#p-max_tokens", "24")
    page.fill("#prompt", "Name three colours.")
    seen: list[str] = []
    page.click("#send")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the reply's text as the chunks arrive
        text = page.eval_on_selector(".msg.assistant", "e => e.textContent") or ""
        if not seen or text != seen[-1]:
            seen.append(text)
        if page.eval_on_selector(".msg.assistant", "e => e.dataset.done") == "1":
            break
        time.sleep(0.02)
    final = page.eval_on_selector(".msg.assistant", "e => e.textContent")
    assert final.strip() and "error" not in final
    assert len([t for t in seen if t]) >= 2, seen  # it grew piece by piece
    assert "generated" in page.text_content("#usage")
    _shot(page, "playground")


def test_json_schema_mode_answers_in_the_schema(server, page):
    page.goto(server.url + "/")
    page.click("button[data-tab=playground]")
    page.select_option("#p-mode", "json")
    page.fill("#p-schema", '{"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], '
                           '"additionalProperties": false}')
    page.fill("#p-temperature", "0")
    page.fill("#prompt", "Is the sky blue? Answer in JSON.")
    page.click("#send")
    page.wait_for_function("document.querySelector('.msg.assistant') && document.querySelector('.msg.assistant').dataset.done === '1'",
                           timeout=30000)
    import json
    answer = json.loads(page.text_content(".msg.assistant"))
    assert isinstance(answer["ok"], bool)


def test_an_agent_runs_trace_appears(server, page):
    with server.http() as http:
        r = http.post("/v1/agents/runs", json={"task": "What is 6 * 7? Use the calculator.", "tools": ["calculator"],
                                               "tool_choice": "required", "budgets": CHEAP_RUN})
        assert r.status_code == 201, r.text
        run_id = r.json()["id"]
        deadline = time.monotonic() + 90
        while http.get(f"/v1/agents/runs/{run_id}").json()["status"] in ("queued", "running"):
            assert time.monotonic() < deadline
            time.sleep(0.2)
    page.goto(server.url + "/")
    page.click("button[data-tab=runs]")
    page.click(f"#runlist li[data-id='{run_id}']", timeout=15000)
    page.wait_for_selector("#timeline .ev[data-kind=model_call]", timeout=15000)
    kinds = page.eval_on_selector_all("#timeline .ev", "es => es.map(e => e.dataset.kind)")
    assert kinds[0] == "model_call" and ("tool_finished" in kinds or "final" in kinds), kinds
    _shot(page, "agent-trace")


def test_a_wrong_api_key_is_refused(aux_server, page):
    s = aux_server(api_key=KEY)
    page.goto(s.url + "/")
    page.wait_for_function("document.getElementById('keystatus').dataset.state === 'refused'", timeout=10000)
    page.fill("#apikey", "not-the-key")
    page.click("#keyform button")
    page.wait_for_function("document.getElementById('keystatus').dataset.state === 'refused'", timeout=10000)
    assert "refused" in page.text_content("#keystatus")
    page.fill("#apikey", KEY)
    page.click("#keyform button")
    page.wait_for_function("document.getElementById('keystatus').dataset.state === 'ok'", timeout=10000)
    page.wait_for_function("Number(document.getElementById('updated').dataset.ticks || 0) >= 1", timeout=10000)
    assert httpx.get(s.url + "/metrics").status_code == 401  # the page's key never opened it for others


def test_the_grafana_dashboard_names_only_metrics_the_server_exports(server):
    """docs/grafana/metroline.json: every metroline_* series its queries read is one /metrics
    sends (the per-replica ones only come with serve --replicas: server/metrics.py names them)."""
    import json
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    dash = json.loads((root / "docs/grafana/metroline.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|total)$", "", m) for e in exprs for m in re.findall(r"metroline_\w+", e)}
    with server.http() as http:
        http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        text = http.get("/metrics").text
    # (a labelled counter with no sample yet still has its # TYPE line)
    names = re.findall(r"^(metroline_\w+)", text, re.M) + re.findall(r"^# TYPE (metroline_\w+)", text, re.M)
    exported = {re.sub(r"_(bucket|total|count|sum|created)$", "", m) for m in names}
    cluster_only = set(re.findall(r'"(metroline_replicas?|metroline_routing_decisions)', (root / "metroline/server/metrics.py").read_text()))
    cluster_only |= {"metroline_replica_" + n for n in re.findall(r'\("(\w+)", "(?:gauge|counter)"', (root / "metroline/server/metrics.py").read_text())}
    missing = used - exported - cluster_only
    assert not missing, missing
    assert len(used) >= 15
