"""The long reliability run (issue 16; scripts/stress.sh calls it): a soak of `metroline serve`
on the default model, then a fault phase on a server started on the same port with faults
armed (METROLINE_FAULTS), then the figures.

1. soak: `metroline serve` (a subprocess, so its RSS is its own) under metroline.bench.soak's
   mixed load (streams, aborts, chat, structured outputs, agent runs, bad inputs of every
   kind) for --duration seconds; RSS and KV usage sampled every second. Then SIGTERM: the
   server must drain and exit 0.
2. faults: a server restarted on the same port with step, kernel and detokenizer faults armed,
   the same load for --fault-duration seconds: requests hit by a fault fail with a clear error
   (counted as faulted), nothing else fails, the KV cache drains to zero, /health is 200 and
   a good request is served afterwards.

Writes benchmarks/results/reliability.json and reliability.png (RSS and KV usage over the soak).
Usage: python benchmarks/reliability.py [--duration 300] [--fault-duration 40] [--concurrency 6]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, os.path.dirname(HERE))

FAULTS = "step:after=60:times=2,kernel:after=150:times=2,detokenize:after=400:times=2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, data_dir: str, faults: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "METROLINE_DATA_DIR": data_dir}
    env.pop("METROLINE_FAULTS", None)
    if faults:
        env["METROLINE_FAULTS"] = faults
    proc = subprocess.Popen([sys.executable, "-m", "metroline.cli", "serve", "--port", str(port),
                             "--host", "127.0.0.1"], env=env, stdout=subprocess.DEVNULL,
                            stderr=open(os.path.join(data_dir, f"server-{port}-{int(time.time())}.log"), "w"))
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited at start ({proc.returncode}); see {data_dir}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not answer /health within 180 s")


def stop_server(proc: subprocess.Popen) -> tuple[int, float]:
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    return rc, time.monotonic() - t0


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["soak"]["samples"]
    t = [s["t"] for s in samples]
    fig, ax = plt.subplots(figsize=(10, 4.2))
    ax.plot(t, [s["rss_mib"] for s in samples], color="tab:blue", label="server RSS (MiB)")
    ax.set_xlabel("seconds into the soak")
    ax.set_ylabel("resident memory (MiB)", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(t, [100 * (s["kv_usage"] or 0) for s in samples], color="tab:orange", alpha=0.8,
             label="KV blocks in use (%)")
    ax2.set_ylabel("KV cache in use (%)", color="tab:orange")
    ax2.set_ylim(0, 100)
    s = result["summary"]
    ax.set_title(f"soak: {s['requests_sent']} requests, {s['server_errors']} server errors, {s['hangs']} hangs, "
                 f"RSS growth after warm-up {s['rss_growth_mib']:.1f} MiB, KV at end {s['leaked_blocks']} blocks",
                 fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=300.0, help="soak seconds")
    ap.add_argument("--fault-duration", type=float, default=40.0, help="fault phase seconds")
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--rss-bound-mib", type=float, default=64.0,
                    help="the most RSS may grow after the warm-up (the first half)")
    ap.add_argument("--output", default=os.path.join(RESULTS, "reliability.json"))
    args = ap.parse_args(argv)

    from metroline.bench.soak import soak

    port = free_port()
    data_dir = tempfile.mkdtemp(prefix="metroline-reliability-")
    t_start = time.time()
    load_before = os.getloadavg()
    proc = start_server(port, data_dir)
    try:
        # Warm-up is the first half: the KV pool is allocated with torch.empty, so its pages are
        # committed as blocks are first written, and RSS climbs until the prefix cache has used
        # every block once (about 80 s here); growth after that would be a leak.
        report = asyncio.run(soak(f"http://127.0.0.1:{port}", args.duration, concurrency=args.concurrency,
                                  pid=proc.pid, seed=0, warmup_fraction=0.5))
        num_blocks = None
        m = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        for line in m.splitlines():
            if line.startswith("metroline_kv_cache_num_blocks"):
                num_blocks = int(float(line.rsplit(" ", 1)[1]))
    finally:
        rc, drain_s = stop_server(proc)
    print(f"soak: {report.requests} requests, {report.server_errors} server errors, {report.hangs} hangs, "
          f"RSS growth {report.rss_growth_mib} MiB, KV at end {report.kv_usage_at_end}; exit {rc}", flush=True)

    # The same port again at once (a restart), with faults armed.
    proc = start_server(port, data_dir, faults=FAULTS)
    try:
        faulted = asyncio.run(soak(f"http://127.0.0.1:{port}", args.fault_duration, concurrency=args.concurrency,
                                   pid=proc.pid, seed=1, mix={"stream": 5, "chat": 3, "abort": 1, "bad": 2}))
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code
        after = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                           json={"prompt": "Hi", "max_tokens": 2}).status_code
    finally:
        rc2, _ = stop_server(proc)
    print(f"faults: {faulted.faulted} requests hit by a fault, {faulted.server_errors} other server errors, "
          f"health {health}, a request after {after}, KV at end {faulted.kv_usage_at_end}", flush=True)

    leaked = round((report.kv_usage_at_end or 0) * (num_blocks or 0))
    summary = {
        "duration_s": round(report.duration_s + faulted.duration_s, 1),
        "requests_sent": report.requests + faulted.requests,
        "bad_inputs_tried": {k: v["sent"] for k, v in sorted(report.bad_inputs.items())},
        "bad_inputs_answered_4xx": sum(v["got_4xx"] for v in report.bad_inputs.values()),
        "faults_armed": FAULTS,
        "requests_hit_by_faults": faulted.faulted,
        "server_errors": report.server_errors + faulted.server_errors,
        "hangs": report.hangs + faulted.hangs,
        "leaked_blocks": leaked + round((faulted.kv_usage_at_end or 0) * (num_blocks or 0)),
        "rss_mib_after_warmup": report.rss_mib_after_warmup,
        "rss_mib_at_end": report.rss_mib_at_end,
        "rss_growth_mib": report.rss_growth_mib,
        "rss_bound_mib": args.rss_bound_mib,
        "rss_warmup": "the first half of the soak (the KV pool's pages are committed as its blocks are first used)",
        "kv_pool_blocks": num_blocks,
        "sigterm_exit_codes": [rc, rc2],
        "sigterm_drain_s": round(drain_s, 2),
        "restart_on_same_port": True,
        "health_after_faults": health,
        "request_after_faults": after,
    }
    ok = (summary["server_errors"] == 0 and summary["hangs"] == 0 and summary["leaked_blocks"] == 0
          and (summary["rss_growth_mib"] or 0) <= args.rss_bound_mib and rc == 0 and rc2 == 0
          and health == 200 and after == 200)
    summary["passed"] = ok
    from decode_vs_llamacpp import cpu_summary

    result = {"args": vars(args), "machine": cpu_summary(), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                                      time.gmtime(t_start)),
              "load_avg_before": load_before, "summary": summary, "soak": report.to_dict(),
              "fault_phase": faulted.to_dict()}
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.splitext(args.output)[0] + ".png")
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.output}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    sys.exit(main())
