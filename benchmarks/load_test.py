"""Serving load test on loopback: N concurrent streaming clients against `metroline serve`.

Starts the server as its own process (the default model, 127.0.0.1, a free port) unless --url
is given, then runs `--clients` closed-loop clients, each sending `--requests` streaming chat
completions one after another (ShareGPT first turns as prompts, `max_tokens` fixed with
ignore_eos so every complete response has a known length). Meanwhile /health is polled every
100 ms to see whether the HTTP event loop stays responsive while the engine thread works.

Everything is bounded: the request count, and a wall-clock limit (--time-limit) after which
all clients are cancelled and the run is reported as failed.

Checks: every response is HTTP 200, ends with `data: [DONE]`, carries no error event, has a
finish_reason and exactly max_tokens completion tokens (usage via include_usage).

Writes benchmarks/results/load_test.json and load_test.png (TTFT / latency distributions,
/health latency over time).
Usage: python benchmarks/load_test.py [--clients 64] [--requests 2] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time

import httpx

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_prompts(n: int, max_chars: int = 600) -> list[str]:
    """First human turns of ShareGPT (cut to max_chars); synthetic ones if it is missing."""
    prompts: list[str] = []
    try:
        from metroline.datasets import iter_sharegpt

        for rec in iter_sharegpt(limit=4 * n + 100):
            conv = rec.get("conversations") or []
            if conv and conv[0].get("from") == "human" and len(conv[0].get("value", "")) > 16:
                prompts.append(conv[0]["value"][:max_chars])
            if len(prompts) >= n:
                break
    except Exception as e:  # the dataset is optional for this script
        print(f"ShareGPT unavailable ({e}); using synthetic prompts", file=sys.stderr)
    while len(prompts) < n:
        prompts.append(f"Write a short note about topic number {len(prompts)}.")
    return prompts


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    return {"n": len(xs), "mean": statistics.fmean(xs), "p50": pct(xs, 50), "p90": pct(xs, 90),
            "p99": pct(xs, 99), "max": max(xs), "min": min(xs)}


async def one_request(http: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0.8, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    rec = {"ok": False, "error": None, "ttft": None, "e2e": None, "tokens": 0, "chunks": 0,
           "itl": []}
    t0 = time.perf_counter()
    last = None
    done = finish = False
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                rec["error"] = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    rec["error"] = f"error event: {obj['error']}"
                    return rec
                if obj.get("usage"):
                    rec["tokens"] = obj["usage"]["completion_tokens"]
                for ch in obj.get("choices", []):
                    if ch["delta"].get("content"):
                        now = time.perf_counter()
                        if rec["ttft"] is None:
                            rec["ttft"] = now - t0
                        else:
                            rec["itl"].append(now - last)
                        last = now
                        rec["chunks"] += 1
                    if ch.get("finish_reason"):
                        finish = True
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        rec["error"] = f"{type(e).__name__}: {e}"
        return rec
    rec["e2e"] = time.perf_counter() - t0
    if not done or not finish:
        rec["error"] = f"incomplete stream (done={done}, finish_reason={finish})"
    elif rec["tokens"] != max_tokens:
        rec["error"] = f"{rec['tokens']} completion tokens, expected {max_tokens}"
    else:
        rec["ok"] = True
    return rec


async def client_loop(http, model, prompts, max_tokens, out: list) -> None:
    for p in prompts:
        out.append(await one_request(http, model, p, max_tokens))


async def health_poller(url: str, samples: list, stop: asyncio.Event, t_start: float) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        while not stop.is_set():
            t = time.perf_counter()
            try:
                status = (await http.get("/health")).status_code
            except httpx.HTTPError:
                status = -1
            samples.append((t - t_start, time.perf_counter() - t, status))
            try:
                await asyncio.wait_for(stop.wait(), 0.1)
            except asyncio.TimeoutError:
                pass


async def run_load(url: str, model: str, clients: int, requests: int, max_tokens: int,
                   time_limit: float) -> dict:
    prompts = load_prompts(clients * requests)
    t_start = time.perf_counter()
    health: list = []
    stop = asyncio.Event()
    poller = asyncio.create_task(health_poller(url, health, stop, t_start))
    await asyncio.sleep(2.0)  # idle baseline for /health
    idle_until = time.perf_counter() - t_start
    records: list = []
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(time_limit),
                                 limits=limits) as http:
        tasks = [asyncio.create_task(client_loop(http, model,
                                                 prompts[i * requests:(i + 1) * requests],
                                                 max_tokens, records))
                 for i in range(clients)]
        t_load = time.perf_counter()
        _, pending = await asyncio.wait(tasks, timeout=time_limit)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - t_load
    load_until = time.perf_counter() - t_start
    stop.set()
    await poller
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        metrics_text = (await http.get("/metrics")).text

    ok = [r for r in records if r["ok"]]
    errors = [r["error"] for r in records if not r["ok"]]
    idle_h = [lat for t, lat, s in health if t < idle_until]
    load_h = [lat for t, lat, s in health if idle_until + 1.0 <= t <= load_until]
    tokens = sum(r["tokens"] for r in ok)
    res = {
        "config": {"clients": clients, "requests_per_client": requests,
                   "max_tokens": max_tokens, "time_limit_s": time_limit, "url": url,
                   "engine_mode": "thread (AsyncEngine loop thread; HTTP on the main thread)"},
        "completed": len(ok), "expected": clients * requests,
        "timed_out": bool(pending), "errors": errors[:20], "num_errors": len(errors),
        "wall_s": wall, "output_tokens_per_s": tokens / wall if wall else None,
        "requests_per_s": len(ok) / wall if wall else None,
        "ttft_s": summary([r["ttft"] for r in ok]),
        "e2e_s": summary([r["e2e"] for r in ok]),
        "tpot_s": summary([(r["e2e"] - r["ttft"]) / (r["tokens"] - 1) for r in ok
                           if r["tokens"] > 1]),
        "itl_s": summary([x for r in ok for x in r["itl"]]),
        "health_idle_s": summary(idle_h),
        "health_under_load_s": summary(load_h),
        "health_non_200": sum(1 for _, _, s in health if s != 200),
        "server_metrics": {line.split("{")[0]: float(line.rsplit(" ", 1)[1])
                           for line in metrics_text.splitlines()
                           if line.startswith(("metroline_num_preemptions_total",
                                               "metroline_generation_tokens_total",
                                               "metroline_prompt_tokens_total",
                                               "metroline_prefix_cache_hits_total",
                                               "metroline_prefix_cache_queries_total"))},
        "_raw": {"ttft": [r["ttft"] for r in ok], "e2e": [r["e2e"] for r in ok],
                 "health": health, "load_window": [idle_until, load_until]},
    }
    return res


def direct_baseline(clients: int, requests: int, max_tokens: int, time_limit: float) -> dict:
    """The same closed-loop workload on an in-process AsyncEngine, no HTTP: what the server
    layer costs in throughput. Run before the server starts, so the two never compete."""
    from metroline.config import CacheConfig, SchedulerConfig
    from metroline.engine.async_engine import AsyncEngine
    from metroline.engine.core import EngineCore
    from metroline.engine.request import SamplingParams
    from metroline.model.loader import load_model

    loaded = load_model(None, show_progress=False)
    tok = loaded.tokenizer
    ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]),
                      add_special_tokens=False) for p in load_prompts(clients * requests)]
    engine = AsyncEngine(EngineCore(loaded, CacheConfig(),
                                    SchedulerConfig(max_num_seqs=max(64, clients))))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.8, ignore_eos=True)

    async def client(mine):
        n = 0
        for p in mine:
            async for out in engine.generate(p, params):
                n += len(out.outputs[0].token_ids)
        return n

    async def all_of():
        t = time.perf_counter()
        counts = await asyncio.gather(*(client(ids[i * requests:(i + 1) * requests])
                                        for i in range(clients)))
        return sum(counts), time.perf_counter() - t

    try:
        tokens, wall = asyncio.run(asyncio.wait_for(all_of(), time_limit))
    finally:
        engine.shutdown()
    return {"requests": len(ids), "output_tokens": tokens, "wall_s": wall,
            "output_tokens_per_s": tokens / wall}


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    raw = res["_raw"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    ax.hist(raw["ttft"], bins=30, color="tab:blue")
    ax.set_title(f"TTFT ({res['config']['clients']} concurrent streams)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("requests")
    ax = axes[1]
    for key, label in (("ttft", "TTFT"), ("e2e", "end-to-end")):
        xs = sorted(raw[key])
        ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label)
    ax.set_title("latency CDF")
    ax.set_xlabel("seconds")
    ax.set_ylabel("fraction of requests")
    ax.legend()
    ax = axes[2]
    h = raw["health"]
    ax.plot([t for t, _, _ in h], [lat * 1000 for _, lat, _ in h], ".", ms=3)
    lo, hi = raw["load_window"]
    ax.axvspan(lo, hi, color="tab:orange", alpha=0.15, label="64 streams running")
    ax.set_yscale("log")
    ax.set_title("/health latency (engine in a thread)")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("ms")
    ax.legend()
    fig.suptitle(f"metroline serve load test: {res['completed']}/{res['expected']} complete, "
                 f"{res['num_errors']} errors, {res['output_tokens_per_s']:.1f} output tok/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def start_server(port: int, args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "metroline.cli", "serve", "--port", str(port),
           "--max-num-seqs", str(max(64, args.clients)), "--log-level", "warning",
           "--no-access-log", *args.server_args]
    return subprocess.Popen(cmd)


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("server did not become healthy")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default=None, help="an already running server (else one is started)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--time-limit", type=float, default=900.0)
    ap.add_argument("--out", default=os.path.join(RESULTS, "load_test"))
    ap.add_argument("--direct-baseline", action="store_true",
                    help="first run one round of the workload on an in-process engine (no HTTP)")
    ap.add_argument("server_args", nargs="*", help="extra `metroline serve` flags (after --)")
    args = ap.parse_args(argv)

    baseline = None
    if args.direct_baseline:
        baseline = direct_baseline(args.clients, args.requests, args.max_tokens, args.time_limit)
        print(f"direct engine baseline: {json.dumps(baseline)}", file=sys.stderr)
    proc = None
    url = args.url
    if url is None:
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(port, args)
    try:
        wait_healthy(url, proc)
        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        res = asyncio.run(run_load(url, model, args.clients, args.requests, args.max_tokens,
                                   args.time_limit))
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    if baseline is not None:
        res["direct_engine_baseline"] = baseline
        res["server_vs_direct_throughput"] = (res["output_tokens_per_s"]
                                              / baseline["output_tokens_per_s"])
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    plot(res, args.out + ".png")
    res["_raw"]["health"] = [[round(t, 3), round(lat, 5), s] for t, lat, s in res["_raw"]["health"]]
    with open(args.out + ".json", "w") as f:
        json.dump(res, f, indent=2)
    shown = {k: res[k] for k in ("completed", "expected", "num_errors", "timed_out", "wall_s",
                                 "output_tokens_per_s", "ttft_s", "e2e_s", "tpot_s",
                                 "health_idle_s", "health_under_load_s")}
    for k in ("direct_engine_baseline", "server_vs_direct_throughput"):
        if k in res:
            shown[k] = res[k]
    print(json.dumps(shown, indent=2))
    ok = res["completed"] == res["expected"] and not res["num_errors"] and not res["timed_out"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
