"""metroline's server against llama.cpp's own `llama-server` (C++), decode-focused, A/B rounds.

Both servers on 127.0.0.1 with the same GGUF, the same ShareGPT chats, streaming, greedy,
fixed output lengths (ignore_eos), and the same thread count (`metroline serve --threads 2`,
`llama-server -t 2`). Never both at once: llama-server's threads spin while they wait, so each
round starts one server, measures it, and stops it before the other starts. Rounds alternate
(llama-server, metroline, llama-server, metroline, ...); before each round the script waits
(up to --max-wait s) for the 1-minute load average to drop below --max-load and records it.

Per round and engine:
  1. prefill: TTFT of a ~500-token prompt (a ShareGPT conversation cut to --prefill-tokens
     with the model's tokenizer), max_tokens 1, median of --num-prefill different prompts
     (different so that metroline's prefix cache cannot help; llama-server also gets
     `cache_prompt: false`; only the chat template's opening, under one 16-token KV block,
     is common to them). Lower is better.
  2. single-stream decode: --num-chats ShareGPT chats one at a time, --decode-tokens (128)
     output tokens each; a chat's rate is (tokens - 1) / (last chunk time - first chunk
     time), the tokens after the first over the time they took; median over chats.
     llama-server runs with `-np 1 -c 4096`.
  3. --concurrency (16) ShareGPT chats at once, --concurrent-tokens (64) output tokens each:
     aggregate output tok/s = all output tokens / wall time (first sent to last finished).
     llama-server is restarted with `-np 16 -c 16384`; metroline serve runs as it is.
  4. resident memory: VmRSS (/proc/PID/status) of the server process and its children,
     after load and after the loads; the figure compared is the one after the loads (for
     llama-server: of the -np 16 server, after the concurrent streams).
llama-server's own log timings ('eval time') of the single-stream chats are kept in the JSON
as a cross-check of the client-side rate (`single.server_eval_tok_s`).

Also: CPU model and SIMD flags; the read bandwidth (a torch sum over 1 GiB with --threads
threads, metroline.bench.hardware.measure_bandwidth) at the start and again just before each
metroline round, since on this shared machine it drifts by 1.5x within minutes (29-50 GB/s
in one session); the bandwidth roofline fraction of a round = metroline's batch-1 decode
tok/s x bytes read per token / the bandwidth measured before it, the bytes from the server's
start-up banner ("NN MB read per token"), else the GGUF's size; overall, the median over rounds.

Targets (metroline / llama-server): single-stream >= 1.0x, 16 streams >= 2.0x, prefill TTFT
<= 1.0x (lower is better), RSS <= 1.5x; roofline fraction >= 60%.

Writes benchmarks/results/decode_vs_llamacpp[_LABEL].{json,png} (or under --out-dir).

Usage:
  python benchmarks/decode_vs_llamacpp.py                    # 3 rounds, default model
  python benchmarks/decode_vs_llamacpp.py --make-q4_0        # a Q4_0 copy (/tmp), label q4_0
  python benchmarks/decode_vs_llamacpp.py --quick --num-chats 2 --out-dir /tmp   # smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import ctypes
import json
import os
import random
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
PY = sys.executable
PEERS = os.environ.get("METROLINE_PEERS", os.path.join(os.path.dirname(ROOT), "shared", "peers"))
LLAMA_DIR = os.path.join(PEERS, "llama.cpp")
if not os.path.isdir(LLAMA_DIR):
    LLAMA_DIR = "/work/shared/peers/llama.cpp"
LLAMA_SERVER = os.path.join(LLAMA_DIR, "llama-server")
LLAMA_QUANTIZE = os.path.join(LLAMA_DIR, "llama-quantize")
HOST = "127.0.0.1"

LLAMA, METRO = "llama-server", "metroline"
ENGINES = (LLAMA, METRO)
# figure key: (title, unit, higher is better, target ratio metroline / llama-server)
FIGURES = {
    "decode_tok_s": ("single-stream decode", "tok/s", True, 1.0),
    "concurrent_tok_s": ("16 concurrent streams", "tok/s (aggregate)", True, 2.0),
    "prefill_ttft_ms": ("prefill TTFT", "ms", False, 1.0),
    "rss_mib": ("resident memory after the loads", "MiB", False, 1.5),
}
ROOFLINE_TARGET = 0.60

# Loopback only: never let an HTTP(S)_PROXY in the environment see these requests.
_no_proxy = {h for h in os.environ.get("NO_PROXY", os.environ.get("no_proxy", "")).split(",") if h}
os.environ["NO_PROXY"] = os.environ["no_proxy"] = ",".join(sorted(_no_proxy | {HOST, "localhost"}))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ servers

_LIVE: list["Server"] = []


def _stop_all() -> None:
    for s in list(_LIVE):
        s.stop()


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the benchmark dies, even by SIGKILL."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _on_signal(signum, frame):  # SIGTERM/SIGHUP: unwind through the finally blocks
    raise SystemExit(128 + signum)


atexit.register(_stop_all)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """One server subprocess in its own process group (session), its output in a log file.
    `stop` ends the whole group: SIGTERM, then SIGKILL; atexit stops any left running."""

    def __init__(self, name: str, cmd: list[str], port: int, log_path: str):
        self.name, self.cmd, self.port, self.log_path = name, cmd, port, log_path
        self.url = f"http://{HOST}:{port}"
        self.model = ""
        self._log = open(log_path, "w")
        log(f"starting {name}: {shlex.join(cmd)}")
        self.t_start = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=_die_with_parent, cwd=ROOT)
        _LIVE.append(self)

    def wait_ready(self, timeout: float = 300.0) -> float:
        """Until /health and /v1/models answer 200; returns the seconds it took."""
        import httpx

        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=5.0, trust_env=False) as http:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; "
                                       f"see {self.log_path}:\n{self.log_tail()}")
                try:
                    if http.get(self.url + "/health").status_code == 200:
                        r = http.get(self.url + "/v1/models")
                        if r.status_code == 200:
                            data = r.json().get("data") or []
                            self.model = (data[0].get("id") if data else "") or ""
                            return time.monotonic() - self.t_start
                except (httpx.HTTPError, ValueError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s; see {self.log_path}")
                time.sleep(0.25)

    def log_text(self) -> str:
        self._log.flush()
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def log_tail(self, n: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def rss_mib(self) -> float | None:
        return tree_rss_mib(self.proc.pid) if self.proc.poll() is None else None

    def stop(self) -> None:
        if self in _LIVE:
            _LIVE.remove(self)
        pgid = self.proc.pid  # start_new_session: the group id is the child's pid
        if self.proc.poll() is None:
            try:
                os.killpg(pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                log(f"{self.name} still running 30 s after SIGTERM: SIGKILL")
        try:  # whatever is left of the group (children that outlived the leader)
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            log(f"warning: {self.name} (pid {pgid}) did not exit after SIGKILL")
        if not self._log.closed:
            self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def tree_rss_mib(pid: int) -> float | None:
    """VmRSS of `pid` and all its descendants (MiB), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        todo.extend(children.get(p, []))
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            if p == pid:
                return None
    return total / 1024


# ------------------------------------------------------------------------------ machine

SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl",
              "avx512dq", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")


def cpu_summary() -> dict:
    from metroline.bench.hardware import machine_info

    info = machine_info()
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    info["simd_flags"] = [f for f in SIMD_FLAGS if f in flags]
    return info


def wait_for_quiet(max_load: float, max_wait: float, step: float = 10.0) -> dict:
    """Sleep until the 1-minute load average is below `max_load`, at most `max_wait` s;
    returns the load record (metroline.bench.noise) at the end, with the wait."""
    from metroline.bench.noise import load_record

    t0 = time.monotonic()
    rec = load_record()
    while rec["load_avg"] and rec["load_avg"][0] >= max_load and time.monotonic() - t0 < max_wait:
        log(f"load average {rec['load_avg'][0]:.2f} >= {max_load}: waiting "
            f"({time.monotonic() - t0:.0f}/{max_wait:.0f} s)")
        time.sleep(min(step, max(0.0, max_wait - (time.monotonic() - t0))) or 0.1)
        rec = load_record()
    rec["waited_s"] = round(time.monotonic() - t0, 1)
    rec["quiet"] = bool(rec["load_avg"]) and rec["load_avg"][0] < max_load
    if not rec["quiet"]:
        log(f"warning: load average still {rec['load_avg'][0]:.2f} after {max_wait:.0f} s: measuring anyway")
    return rec


def measure_bandwidth(threads: int) -> float:
    import torch

    from metroline.bench.hardware import measure_bandwidth as mb

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return mb("cpu")
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------ workload

def build_workload(tok, args) -> dict:
    """The single-stream chats, the concurrent chats, and the prefill prompts (fixed for all
    rounds: the same requests to both engines)."""
    from metroline.bench.workloads import _truncate, sharegpt_programs

    progs = sharegpt_programs(tok, args.num_chats + args.concurrency, seed=args.seed,
                              max_output_len=None, max_input_len=args.max_input_len)
    single, conc = progs[:args.num_chats], progs[args.num_chats:]
    for p in single:
        p.calls[0].max_tokens = args.decode_tokens
    for p in conc:
        p.calls[0].max_tokens = args.concurrent_tokens

    from metroline.datasets import iter_sharegpt

    used = {p.calls[0].content for p in progs}
    texts, firsts = [], set()
    for rec in iter_sharegpt(limit=args.scan):
        turns = [t["value"] for t in rec.get("conversations") or []
                 if isinstance(t.get("value"), str) and t["value"].strip()]
        if not turns or turns[0] in used or turns[0][:200] in firsts:
            continue
        text = "\n\n".join(turns)
        if len(text) < 2 * args.prefill_tokens:  # too short for the cut, by any tokenizer
            continue
        firsts.add(turns[0][:200])
        texts.append(text[:12 * args.prefill_tokens])  # enough characters for the cut
    random.Random(args.seed).shuffle(texts)
    prefill = []
    for text in texts:
        cut, n = _truncate(tok, text, args.prefill_tokens)
        if n >= args.prefill_tokens:
            prefill.append({"text": cut, "tokens": n})
        if len(prefill) == args.num_prefill:
            break
    if len(prefill) < args.num_prefill:
        raise SystemExit(f"only {len(prefill)} ShareGPT conversations of >= {args.prefill_tokens} tokens")
    return {"single": single, "concurrent": conc, "prefill": prefill}


def make_client(server: Server, tok, extra_body: dict | None = None, max_connections: int = 64):
    from metroline.bench.client import StreamingClient, TokenCounter

    return StreamingClient(server.url, server.model, "chat", temperature=0.0, fixed_length=True,
                           include_usage=True, extra_body=extra_body, token_counter=TokenCounter(tok),
                           max_connections=max_connections)


async def warm_up(server: Server, tok, work: dict, concurrent: int) -> None:
    """A few short calls (serve.warmup: '[warmup]'-prefixed prompts, 8 tokens), then
    `concurrent` such calls at once, so that first-batch costs fall outside the figures."""
    from metroline.bench.metrics import RequestRecord
    from metroline.bench.serve import warmup

    client = make_client(server, tok)
    try:
        errors = await warmup(client, work["single"] + work["concurrent"], 2)
        if errors:
            raise RuntimeError(f"{server.name}: warm-up call failed: {errors[0]}")
        if concurrent > 1:
            progs = work["concurrent"]
            recs = [RequestRecord(-1, 0) for _ in range(concurrent)]
            await asyncio.gather(*(client.call(
                [{"role": "user", "content": f"[warmup {i}] " + progs[i % len(progs)].calls[0].content}],
                8, rec) for i, rec in enumerate(recs)))
            bad = [r.error for r in recs if not r.success]
            if bad:
                raise RuntimeError(f"{server.name}: concurrent warm-up failed: {bad[0]}")
    finally:
        await client.aclose()


def _short(rec) -> dict:
    span = rec.chunk_times[-1] - rec.chunk_times[0] if len(rec.chunk_times) >= 2 else None
    return {"ok": rec.success, "error": rec.error or None, "prompt_tokens": rec.prompt_tokens,
            "output_tokens": rec.output_tokens, "expected": rec.expected_output_tokens,
            "token_source": rec.token_source, "chunks": len(rec.chunk_times),
            "ttft_ms": None if rec.ttft is None else round(rec.ttft * 1000, 2),
            "decode_span_s": None if span is None else round(span, 4),
            "e2e_s": None if rec.latency is None else round(rec.latency, 4)}


def _check(records, what: str, engine: str) -> None:
    bad = [r for r in records if not r.success]
    if bad:
        raise RuntimeError(f"{engine} {what}: {len(bad)} of {len(records)} requests failed: {bad[0].error}")
    short = [r for r in records if r.output_tokens != r.expected_output_tokens]
    if short:
        log(f"warning: {engine} {what}: {len(short)} requests returned other than the asked number "
            f"of tokens (e.g. {short[0].output_tokens} of {short[0].expected_output_tokens})")


async def measure_prefill(server: Server, tok, work: dict, extra_body: dict | None) -> dict:
    from metroline.bench.metrics import RequestRecord

    client = make_client(server, tok, extra_body)
    recs = []
    try:
        for i, p in enumerate(work["prefill"]):
            rec = RequestRecord(i, 0)
            await client.call([{"role": "user", "content": p["text"]}], 1, rec)
            recs.append(rec)
    finally:
        await client.aclose()
    _check(recs, "prefill", server.name)
    ttfts = [r.ttft * 1000 for r in recs]
    return {"prefill_ttft_ms": statistics.median(ttfts), "load_at_end": _load(),
            "requests": [_short(r) for r in recs]}


async def measure_single(server: Server, tok, work: dict) -> dict:
    from metroline.bench.serve import RunConfig, run_programs

    client = make_client(server, tok)
    try:
        run = await run_programs(client, work["single"], RunConfig(max_concurrency=1, progress=False))
    finally:
        await client.aclose()
    _check(run.records, "single-stream decode", server.name)
    rates = []
    for r in run.records:
        span = r.chunk_times[-1] - r.chunk_times[0] if len(r.chunk_times) >= 2 else 0.0
        if span <= 0 or r.output_tokens < 2:
            raise RuntimeError(f"{server.name}: a chat streamed its {r.output_tokens} tokens in "
                               f"{len(r.chunk_times)} chunk(s): no decode rate")
        rates.append((r.output_tokens - 1) / span)
    return {"decode_tok_s": statistics.median(rates), "per_chat_tok_s": [round(x, 3) for x in rates],
            "load": run.load_avg, "requests": [_short(r) for r in run.records]}


async def measure_concurrent(server: Server, tok, work: dict) -> dict:
    from metroline.bench.metrics import compute_metrics
    from metroline.bench.serve import RunConfig, run_programs

    client = make_client(server, tok, max_connections=len(work["concurrent"]) + 4)
    try:
        run = await run_programs(client, work["concurrent"], RunConfig(max_concurrency=None, progress=False))
    finally:
        await client.aclose()
    _check(run.records, "concurrent", server.name)
    m = compute_metrics(run.records, run.duration, None)
    total = sum(r.output_tokens for r in run.records)
    return {"concurrent_tok_s": total / run.duration, "output_tokens": total,
            "wall_s": round(run.duration, 3),
            "ttft_ms_p50": m["ttft_ms"]["p50"], "tpot_ms_p50": m["tpot_ms"]["p50"],
            "itl_ms_p50": m["itl_ms"]["p50"], "load": run.load_avg,
            "requests": [_short(r) for r in run.records]}


# ------------------------------------------------------------------------------ rounds

def _rss(server: Server) -> float | None:
    v = server.rss_mib()
    return None if v is None else round(v, 1)


MB_PER_TOKEN = re.compile(r"([\d.]+)\s*MB read per token")


def metroline_round(args, gguf: str, tok, work: dict, r: int) -> dict:
    port = free_port()
    cmd = [PY, "-m", "metroline.cli", "serve", "--model", gguf, "--threads", str(args.threads),
           "--host", HOST, "--port", str(port), "--no-access-log", "--log-level", "warning",
           *shlex.split(args.extra_metroline_args)]
    out: dict = {"command": shlex.join(cmd[1:])}
    with Server(METRO, cmd, port, os.path.join(args.log_dir, f"decode_vs_llamacpp_metroline_r{r}.log")) as s:
        out["ready_s"] = round(s.wait_ready(args.ready_timeout), 2)
        time.sleep(1.0)
        out["rss_after_load_mib"] = _rss(s)
        banner = [ln for ln in s.log_text().splitlines() if ln.startswith("metroline serve")
                  or ln.startswith("  ")][:8]
        out["banner"] = banner
        m = MB_PER_TOKEN.search(s.log_text())
        out["mb_read_per_token"] = float(m.group(1)) if m else None

        async def go():
            await warm_up(s, tok, work, args.concurrency)
            pre = await measure_prefill(s, tok, work, None)
            single = await measure_single(s, tok, work)
            out["rss_after_single_mib"] = _rss(s)
            conc = await measure_concurrent(s, tok, work)
            return pre, single, conc

        pre, single, conc = asyncio.run(go())
        out["rss_after_loads_mib"] = _rss(s)
    out["prefill_ttft_ms"] = pre["prefill_ttft_ms"]
    out["prefill_requests"] = pre["requests"]
    out["decode_tok_s"] = single.pop("decode_tok_s")
    out["single"] = single
    out["concurrent_tok_s"] = conc.pop("concurrent_tok_s")
    out["concurrent"] = conc
    out["rss_mib"] = out["rss_after_loads_mib"]
    return out


LLAMA_EVAL = re.compile(r"(?<!prompt )eval time =\s*([\d.]+) ms /\s*(\d+) tokens")


def llama_version() -> str | None:
    try:
        p = subprocess.run([LLAMA_SERVER, "--version"], capture_output=True, text=True, timeout=30)
        return " ".join((p.stdout + p.stderr).split()) or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def llama_eval_rates(text: str, n_tokens: int) -> list[float]:
    """llama-server's own decode rate (its 'eval time' log lines) of requests of n_tokens."""
    return [int(n) / (float(ms) / 1000) for ms, n in LLAMA_EVAL.findall(text)
            if int(n) == n_tokens and float(ms) > 0]


def llama_round(args, gguf: str, tok, work: dict, r: int) -> dict:
    out: dict = {}

    def start(np_: int, ctx: int) -> tuple[Server, dict]:
        port = free_port()
        cmd = [LLAMA_SERVER, "-m", gguf, "--host", HOST, "--port", str(port), "-t", str(args.threads),
               "-np", str(np_), "-c", str(ctx), *shlex.split(args.extra_llama_args)]
        s = Server(f"{LLAMA} -np {np_}", cmd, port,
                   os.path.join(args.log_dir, f"decode_vs_llamacpp_llama_np{np_}_r{r}.log"))
        info = {"command": shlex.join(cmd), "load_before": _load()}
        try:
            info["ready_s"] = round(s.wait_ready(args.ready_timeout), 2)
            time.sleep(1.0)
            info["rss_after_load_mib"] = _rss(s)
        except BaseException:
            s.stop()
            raise
        return s, info

    # load 1 (one slot): prefill and single-stream decode
    s, info = start(1, args.single_ctx)
    with s:
        async def go1():
            await warm_up(s, tok, work, 1)
            pre = await measure_prefill(s, tok, work, {"cache_prompt": False})
            single = await measure_single(s, tok, work)
            return pre, single

        pre, single = asyncio.run(go1())
        info["rss_after_loads_mib"] = _rss(s)
        evals = llama_eval_rates(s.log_text(), args.decode_tokens)
        single["server_eval_tok_s"] = [round(x, 2) for x in evals]  # its own timings, a cross-check
        single["server_eval_tok_s_median"] = statistics.median(evals) if evals else None
    out["np1"] = info
    out["prefill_ttft_ms"] = pre["prefill_ttft_ms"]
    out["prefill_requests"] = pre["requests"]
    out["decode_tok_s"] = single.pop("decode_tok_s")
    out["single"] = single
    time.sleep(3.0)  # let its threads go

    # load 2 (16 slots): the concurrent streams
    s, info = start(args.concurrency, args.concurrency * args.slot_ctx)
    with s:
        conc = asyncio.run(_warm_and(s, tok, work, args.concurrency, measure_concurrent))
        info["rss_after_loads_mib"] = _rss(s)
    out[f"np{args.concurrency}"] = info
    out["concurrent_tok_s"] = conc.pop("concurrent_tok_s")
    out["concurrent"] = conc
    out["rss_after_load_mib"] = info["rss_after_load_mib"]
    out["rss_mib"] = info["rss_after_loads_mib"]
    return out


async def _warm_and(s, tok, work, concurrent, fn):
    await warm_up(s, tok, work, concurrent)
    return await fn(s, tok, work)


def _load() -> list[float] | None:
    from metroline.bench.noise import load_record

    return load_record()["load_avg"]


# ------------------------------------------------------------------------------ report

def ratio(key: str, metro: dict | None, llama: dict | None) -> float | None:
    if not metro or not llama or metro.get(key) is None or not llama.get(key):
        return None
    return metro[key] / llama[key]


def meets(key: str, rat: float | None) -> bool | None:
    if rat is None:
        return None
    _, _, higher, target = FIGURES[key]
    return rat >= target if higher else rat <= target


def target_text(key: str) -> str:
    _, _, higher, target = FIGURES[key]
    return f"{'>=' if higher else '<='} {target:.1f}x" + ("" if higher else " (lower is better)")


def fmt_val(key: str, v: float | None) -> str:
    if v is None:
        return "-"
    unit = FIGURES[key][1].split()[0]
    return f"{v:,.1f} {unit}" if key != "prefill_ttft_ms" else f"{v:,.0f} {unit}"


def table(figs: dict, rats: dict, roof: float | None, head: str) -> str:
    lines = [head, f"  {'':34} {LLAMA:>16} {METRO:>16} {'ratio':>8}  target (metroline / llama-server)"]
    for key, (title, unit, higher, target) in FIGURES.items():
        rat, ok = rats.get(key), meets(key, rats.get(key))
        mark = "" if ok is None else ("  met" if ok else "  MISSED")
        lines.append(f"  {title:34} {fmt_val(key, (figs.get(LLAMA) or {}).get(key)):>16} "
                     f"{fmt_val(key, (figs.get(METRO) or {}).get(key)):>16} "
                     f"{'-' if rat is None else f'{rat:.2f}x':>8}  {target_text(key)}{mark}")
    if roof is not None:
        lines.append(f"  {'bandwidth roofline (metroline b=1)':34} {'':>16} {roof:>15.0%} {'':>8}  "
                     f">= {ROOFLINE_TARGET:.0%}{'  met' if roof >= ROOFLINE_TARGET else '  MISSED'}")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    overall = result["overall"]
    engines = [e for e in ENGINES if overall["figures"].get(e)]
    colors = {LLAMA: "#8c8c8c", METRO: "#1f77b4"}
    fig, axes = plt.subplots(1, len(FIGURES), figsize=(4.2 * len(FIGURES), 4.8))
    for ax, (key, (title, unit, higher, target)) in zip(axes, FIGURES.items()):
        for x, e in enumerate(engines):
            v = overall["figures"][e].get(key)
            if v is not None:
                ax.bar(x, v, color=colors[e], width=0.6, alpha=0.85)
                ax.text(x + 0.32, v, f"{v:,.0f}" if v >= 100 else f"{v:.1f}", ha="left", va="center", fontsize=9)
            pts = [rd[e][key] for rd in result["rounds"] if rd.get(e) and rd[e].get(key) is not None]
            if pts:
                jit = [x + 0.12 * (i - (len(pts) - 1) / 2) / max(1, len(pts)) for i in range(len(pts))]
                ax.scatter(jit, pts, color="black", s=14, zorder=3, label="per round" if x == 0 else None)
        ax.set_xticks(range(len(engines)), engines)
        ax.set_xlim(-0.6, len(engines) - 0.1)
        ax.set_title(f"{title}\n({unit}, {'higher' if higher else 'lower'} is better)", fontsize=10)
        ax.margins(y=0.25)
        rat = overall["ratios"].get(key)
        if rat is not None:
            ok = meets(key, rat)
            ax.text(0.5, 0.97, f"metroline / llama-server = {rat:.2f}x\ntarget {target_text(key).split(' (')[0]}"
                    f" ({'met' if ok else 'missed'})", transform=ax.transAxes, ha="center", va="top",
                    fontsize=9, color="green" if ok else "red")
    roof = overall.get("roofline_fraction")
    m = result["machine"]
    fig.suptitle(f"{result['model_file']}, {result['threads']} threads, {m['cpu']} -- "
                 f"{len(result['rounds'])} A/B round(s), medians"
                 + (f"; metroline batch-1 decode at {roof:.0%} of the bandwidth roofline "
                    f"(target {ROOFLINE_TARGET:.0%})" if roof is not None else "")
                 + "\n1-min load average before each round: " + "; ".join(
                     f"{rd['round']}: " + ", ".join(f"{e} {rd[e]['load_before']['load_avg'][0]:.2f}"
                                                   for e in engines if rd[e]['load_before']['load_avg'])
                     for rd in result["rounds"]), fontsize=10)
    axes[0].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarize(result: dict) -> None:
    rounds = result["rounds"]
    figs: dict = {}
    for e in ENGINES:
        vals = {k: [rd[e][k] for rd in rounds if rd.get(e) and rd[e].get(k) is not None] for k in FIGURES}
        figs[e] = {k: statistics.median(v) for k, v in vals.items() if v} or None
    bpt = result["bytes_per_token"]["value"]
    # Every bandwidth measurement of the run (start, and before each metroline round).
    bws = [result["bandwidth_bytes_s"]] + [rd[METRO]["bandwidth_bytes_s"] for rd in rounds
                                           if rd.get(METRO) and rd[METRO].get("bandwidth_bytes_s")]
    bw = statistics.median(bws)
    result["bandwidth_bytes_s_measured"] = bws
    fracs = [rd["roofline_fraction"] for rd in rounds if rd.get("roofline_fraction")]
    roof = statistics.median(fracs) if fracs else None
    rats = {k: ratio(k, figs.get(METRO), figs.get(LLAMA)) for k in FIGURES}
    result["overall"] = {
        "how": "median over rounds of each round's figure; ratios are metroline / llama-server; "
               "roofline: median over rounds of decode tok/s x bytes per token / the bandwidth "
               "measured just before that round",
        "figures": figs, "ratios": rats,
        "roofline_fraction": roof,
        "llama_roofline_fraction_same_bytes": (figs[LLAMA]["decode_tok_s"] * bpt / bw
                                               if figs.get(LLAMA) and bpt and bw else None),
        "targets": {**{k: target_text(k) for k in FIGURES}, "roofline_fraction": f">= {ROOFLINE_TARGET:.0%}"},
        "met": {**{k: meets(k, rats[k]) for k in FIGURES},
                "roofline_fraction": None if roof is None else roof >= ROOFLINE_TARGET},
    }


# ------------------------------------------------------------------------------ main

def make_q4_0(src: str, threads: int) -> str:
    stem = os.path.basename(src)[:-5] if src.endswith(".gguf") else os.path.basename(src)
    dst = os.path.join("/tmp", f"{stem}.requant-Q4_0.gguf")
    if os.path.isfile(dst) and os.path.getsize(dst) > 0:
        log(f"Q4_0 copy already there: {dst}")
        return dst
    tmp = dst + f".tmp{os.getpid()}"
    cmd = [LLAMA_QUANTIZE, "--allow-requantize", src, tmp, "Q4_0", str(threads)]
    log("quantizing: " + shlex.join(cmd))
    try:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"llama-quantize failed ({e.returncode}):\n{e.stderr[-2000:]}") from None
    finally:
        if not os.path.isfile(tmp) or os.path.getsize(tmp) == 0:
            try:
                os.remove(tmp)
            except OSError:
                pass
    os.replace(tmp, dst)
    return dst


def tensor_types(gguf: str) -> dict:
    try:
        from gguf import GGUFReader

        counts: dict = {}
        for t in GGUFReader(gguf).tensors:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        return counts
    except Exception as e:  # noqa: BLE001 - informative only
        return {"error": f"{type(e).__name__}: {e}"}


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file (default: metroline's default model)")
    ap.add_argument("--rounds", type=int, default=3, help="A/B rounds (default: 3)")
    ap.add_argument("--num-chats", type=int, default=None,
                    help="single-stream chats per round (default: 8; 4 with --quick)")
    ap.add_argument("--num-prefill", type=int, default=None,
                    help="prefill prompts per round (default: 5; 3 with --quick)")
    ap.add_argument("--prefill-tokens", type=int, default=500, help="prefill prompt length (default: 500)")
    ap.add_argument("--decode-tokens", type=int, default=128,
                    help="output tokens per single-stream chat (default: 128)")
    ap.add_argument("--concurrency", type=int, default=16, help="concurrent streams (default: 16)")
    ap.add_argument("--concurrent-tokens", type=int, default=64,
                    help="output tokens per concurrent stream (default: 64)")
    ap.add_argument("--max-input-len", type=int, default=512,
                    help="longest ShareGPT chat prompt in tokens (default: 512)")
    ap.add_argument("--single-ctx", type=int, default=4096, help="llama-server -c for one slot (default: 4096)")
    ap.add_argument("--slot-ctx", type=int, default=1024,
                    help="llama-server context per slot with -np 16 (default: 1024)")
    ap.add_argument("--threads", type=int, default=2, help="threads of both servers (default: 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scan", type=int, default=5000, help="ShareGPT records to draw from (default: 5000)")
    ap.add_argument("--skip-llamacpp", action="store_true", help="measure metroline alone")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 round, fewer chats and prompts")
    ap.add_argument("--max-load", type=float, default=1.5,
                    help="before each round, wait for the 1-minute load average to drop below this (default: 1.5)")
    ap.add_argument("--max-wait", type=float, default=120, help="longest wait for --max-load, s (default: 120)")
    ap.add_argument("--ready-timeout", type=float, default=300, help="server start-up limit, s (default: 300)")
    ap.add_argument("--label", default=None, help="suffix of the output files (default: none; q4_0 with --make-q4_0)")
    ap.add_argument("--make-q4_0", action="store_true",
                    help="benchmark a Q4_0 copy of --model made by llama-quantize into /tmp (label q4_0)")
    ap.add_argument("--extra-metroline-args", default="", help="extra `metroline serve` arguments, one string")
    ap.add_argument("--extra-llama-args", default="", help="extra `llama-server` arguments, one string")
    ap.add_argument("--out-dir", default=RESULTS, help="where the JSON and PNG go (default: benchmarks/results)")
    ap.add_argument("--log-dir", default="/tmp", help="server logs (default: /tmp)")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds = 1
    args.num_chats = args.num_chats or (4 if args.quick else 8)
    args.num_prefill = args.num_prefill or (3 if args.quick else 5)
    if args.make_q4_0 and args.label is None:
        args.label = "q4_0"
    if args.rounds < 1 or args.num_chats < 1 or args.num_prefill < 1 or args.concurrency < 1:
        ap.error("--rounds, --num-chats, --num-prefill and --concurrency must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    from metroline.bench.cli import load_tokenizer
    from metroline.model.default import default_model_path

    src = os.path.abspath(os.path.expanduser(args.model or default_model_path()))
    if not os.path.isfile(src):
        raise SystemExit(f"no such GGUF: {src}")
    if not args.skip_llamacpp and not os.access(LLAMA_SERVER, os.X_OK):
        raise SystemExit(f"llama-server not found at {LLAMA_SERVER} (or pass --skip-llamacpp)")
    gguf = make_q4_0(src, args.threads) if args.make_q4_0 else src
    suffix = f"_{args.label}" if args.label else ""
    os.makedirs(args.out_dir, exist_ok=True)
    os.makedirs(args.log_dir, exist_ok=True)
    out_json = os.path.join(args.out_dir, f"decode_vs_llamacpp{suffix}.json")
    out_png = os.path.join(args.out_dir, f"decode_vs_llamacpp{suffix}.png")

    t = time.perf_counter()
    tok = load_tokenizer(gguf)
    work = build_workload(tok, args)
    log(f"workload: {len(work['single'])} single-stream chats x {args.decode_tokens} tokens, "
        f"{len(work['concurrent'])} concurrent x {args.concurrent_tokens}, "
        f"{len(work['prefill'])} prefill prompts of {args.prefill_tokens} tokens "
        f"(built in {time.perf_counter() - t:.1f} s)")

    machine = cpu_summary()
    log(f"CPU: {machine['cpu']}, {machine['cores']} cores, SIMD: {' '.join(machine['simd_flags'])}")
    if "avx512f" in machine["simd_flags"] and "METROLINE_PEERS" not in os.environ:
        log("note: the llama.cpp build in shared/peers is AVX2-only (see its README); on this "
            "AVX-512 machine it under-serves llama.cpp unless rebuilt with build-llama-cpp.sh")
    quiet0 = wait_for_quiet(args.max_load, args.max_wait)
    bw = measure_bandwidth(args.threads)
    log(f"read bandwidth ({args.threads} threads): {bw / 1e9:.1f} GB/s (load {quiet0['load_avg']})")

    result: dict = {
        "kind": "metroline-decode-vs-llamacpp", "version": 1,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:] if argv is None else argv,
        "label": args.label, "model_file": os.path.basename(gguf), "model_path": gguf,
        "model_bytes": os.path.getsize(gguf), "model_tensor_types": tensor_types(gguf),
        "source_model": os.path.basename(src) if args.make_q4_0 else None,
        "threads": args.threads, "machine": machine,
        "llama_server": None if args.skip_llamacpp else {"path": LLAMA_SERVER, "version": llama_version()},
        "extra_args": {"metroline": args.extra_metroline_args, "llama_server": args.extra_llama_args},
        "bandwidth_bytes_s": bw, "bandwidth_load": quiet0,
        "bytes_per_token": {"value": None, "source": None},
        "workload": {"seed": args.seed, "num_chats": args.num_chats, "decode_tokens": args.decode_tokens,
                     "concurrency": args.concurrency, "concurrent_tokens": args.concurrent_tokens,
                     "max_input_len": args.max_input_len, "num_prefill": args.num_prefill,
                     "prefill_tokens": args.prefill_tokens,
                     "single_prompt_tokens": [p.calls[0].content_tokens for p in work["single"]],
                     "concurrent_prompt_tokens": [p.calls[0].content_tokens for p in work["concurrent"]],
                     "prefill_prompt_tokens": [p["tokens"] for p in work["prefill"]],
                     "decode_rate": "(output tokens - 1) / (last chunk time - first chunk time), "
                                    "median over chats",
                     "llama_server": f"-np 1 -c {args.single_ctx} (prefill, single stream); "
                                     f"-np {args.concurrency} -c {args.concurrency * args.slot_ctx} "
                                     "(concurrent); cache_prompt false for prefill",
                     "rss": "VmRSS of the server and its children; llama-server: the "
                            f"-np {args.concurrency} server"},
        "targets": {**{k: target_text(k) for k in FIGURES}, "roofline_fraction": f">= {ROOFLINE_TARGET:.0%}"},
        "rounds": [],
    }
    engines = [METRO] if args.skip_llamacpp else [LLAMA, METRO]
    try:
        for r in range(1, args.rounds + 1):
            rd: dict = {"round": r}
            result["rounds"].append(rd)
            for e in engines:
                log(f"--- round {r}/{args.rounds}: {e}")
                load = wait_for_quiet(args.max_load, args.max_wait)
                log(f"load average before: {load['load_avg']} (waited {load['waited_s']} s)")
                fn = llama_round if e == LLAMA else metroline_round
                # The read bandwidth drifts by 1.5x over minutes on this shared machine: the
                # roofline of a round is taken against what was measured just before it.
                round_bw = measure_bandwidth(args.threads) if e == METRO else None
                rd[e] = {"load_before": load, **fn(args, gguf, tok, work, r)}
                if round_bw:
                    rd[e]["bandwidth_bytes_s"] = round_bw
                    log(f"read bandwidth before this round: {round_bw / 1e9:.1f} GB/s")
                rd[e]["load_after"] = _load()
                if e == METRO and result["bytes_per_token"]["value"] is None:
                    mb = rd[e].get("mb_read_per_token")
                    result["bytes_per_token"] = ({"value": mb * 1e6, "source": "metroline serve banner"}
                                                 if mb else {"value": os.path.getsize(gguf),
                                                             "source": "GGUF file size"})
                time.sleep(3.0)  # the stopped server's threads gone before the next starts
            rd["ratios"] = {k: ratio(k, rd.get(METRO), rd.get(LLAMA)) for k in FIGURES}
            bpt = result["bytes_per_token"]["value"]
            rd["roofline_fraction"] = (rd[METRO]["decode_tok_s"] * bpt / rd[METRO].get("bandwidth_bytes_s", bw)
                                       if bpt else None)
            loads = "  ".join(f"{e} {rd[e]['load_before']['load_avg'][0]:.2f}" for e in engines
                              if rd[e]["load_before"]["load_avg"])
            log(table({e: rd.get(e) for e in ENGINES}, rd["ratios"], rd["roofline_fraction"],
                      f"round {r}: medians (1-min load average before: {loads})"))
            noisy = [e for e in engines if not rd[e]["load_before"].get("quiet")]
            if noisy:
                log(f"warning: round {r} started above --max-load {args.max_load} for {', '.join(noisy)}: "
                    "its figures are suspect")
            summarize(result)
            with open(out_json, "w") as f:  # after every round: a partial result survives
                json.dump(result, f, indent=1)
    finally:
        _stop_all()

    summarize(result)
    ov = result["overall"]
    bpt = result["bytes_per_token"]
    print(f"\n{result['model_file']} ({result['model_bytes'] / 1e6:.1f} MB), {args.threads} threads, "
          f"{machine['cpu']} [{' '.join(machine['simd_flags'])}]")
    print(f"read bandwidth {bw / 1e9:.1f} GB/s; {(bpt['value'] or 0) / 1e6:.0f} MB read per token "
          f"({bpt['source']})")
    for rd in result["rounds"]:
        print(f"round {rd['round']}: load before " + ", ".join(
            f"{e} {rd[e]['load_before']['load_avg']}" for e in engines) + "; " + ", ".join(
            f"{FIGURES[k][0]} {v:.2f}x" for k, v in rd["ratios"].items() if v is not None)
            + (f"; roofline {rd['roofline_fraction']:.0%}" if rd.get("roofline_fraction") else ""))
    print(table(ov["figures"], ov["ratios"], ov["roofline_fraction"],
                f"overall: median over {len(result['rounds'])} round(s)"))
    with open(out_json, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, out_png)
    print(f"wrote {out_json}\nwrote {out_png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
