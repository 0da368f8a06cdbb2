"""metroline's server against llama.cpp's (llama-cpp-python) on the same GGUF and the same prompts.

One run, on this machine, one server at a time on loopback:
  1. wait until the machine is quiet (1-minute load below --max-load, up to --max-wait s);
  2. start `metroline serve`, run `metroline bench serve` (ShareGPT, a concurrency sweep), stop it;
  3. start `python -m llama_cpp.server` on the same file, run the same benchmark, stop it;
  4. `metroline bench compare` (table, ratios, plot) and `metroline bench roofline --result`.

Writes benchmarks/results/serve_{metroline,llamacpp}_sharegpt.json (+ _cdf.png, _sweep.png),
serve_vs_llamacpp.{json,png} and serve_roofline.json.
Usage: python benchmarks/serve_vs_llamacpp.py [--num-prompts 16] [--max-output-len 64]
       [--max-concurrency 1,4,16] [--skip-llamacpp]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load1() -> float:
    return os.getloadavg()[0]


def wait_for_quiet(max_load: float, max_wait: float, step: float = 60.0) -> list[dict]:
    """Sleep until the 1-minute load average is below `max_load` (at most `max_wait` s)."""
    samples = [{"t": time.strftime("%H:%M:%S"), "load": [round(x, 2) for x in os.getloadavg()]}]
    deadline = time.monotonic() + max_wait
    while load1() > max_load and time.monotonic() < deadline:
        print(f"load {load1():.2f} > {max_load}: waiting {step:.0f} s", file=sys.stderr)
        time.sleep(step)
        samples.append({"t": time.strftime("%H:%M:%S"), "load": [round(x, 2) for x in os.getloadavg()]})
    return samples


class Server:
    """A server subprocess in its own process group; ready when /v1/models answers."""

    def __init__(self, name: str, cmd: list[str], port: int, log_path: str, ready_timeout: float = 300):
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        self.log = open(log_path, "w")
        print(f"starting {name}: {' '.join(cmd)}", file=sys.stderr)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {self.proc.returncode}; see {log_path}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{name} not ready after {ready_timeout} s; see {log_path}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


def bench(url: str, label: str, out: str, args) -> None:
    cmd = [PY, "-m", "metroline.cli", "bench", "serve", "--base-url", url, "--label", label,
           "--dataset", "sharegpt", "--num-prompts", str(args.num_prompts), "--seed", str(args.seed),
           "--max-output-len", str(args.max_output_len), "--max-input-len", str(args.max_input_len),
           "--max-concurrency", args.max_concurrency, "--goodput", *args.goodput,
           "--output", out, "--disable-tqdm"]
    if args.price_per_hour:
        cmd += ["--price-per-hour", str(args.price_per_hour)]
    subprocess.run(cmd, check=True)


def probe_concurrency(url: str, n: int = 3, max_tokens: int = 24) -> dict:
    """What a server does with `n` streams sent at once: tokens each got, and when each
    started and ended (s). Serialized: each starts when the previous ends; interrupted: the
    earlier ones end short."""
    import asyncio
    import math

    from metroline.bench.client import StreamingClient
    from metroline.bench.serve import bench
    from metroline.bench.workloads import Call, Program

    progs = [Program(i, [Call(f"Count from 1 to 100, request {i}.", max_tokens)]) for i in range(n)]
    client = StreamingClient(url, "", "chat")
    (run,) = asyncio.run(bench(client, progs, [(None, math.inf)], warmup_calls=0, progress=False,
                               fresh_prefix=False, with_chunks=True))
    return {"max_tokens": max_tokens, "requests": [
        {"chunks": len(r["chunk_times"]), "sent_s": round(r["start"], 2),
         "first_chunk_s": round(r["start"] + r["ttft"], 2) if r["ttft"] is not None else None,
         "last_chunk_s": round(r["start"] + r["chunk_times"][-1], 2) if r["chunk_times"] else None,
         "error": r["error"]} for r in run["requests"]]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--max-output-len", type=int, default=64)
    ap.add_argument("--max-input-len", type=int, default=512)
    ap.add_argument("--max-concurrency", default="1,4,16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--goodput", nargs="+", default=["ttft:2000", "tpot:200"])
    ap.add_argument("--price-per-hour", type=float, default=None)
    ap.add_argument("--max-load", type=float, default=0.7)
    ap.add_argument("--max-wait", type=float, default=900)
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--skip-metroline", action="store_true")
    args = ap.parse_args(argv)

    from metroline.model.default import default_model_path

    gguf = default_model_path()
    os.makedirs(RESULTS, exist_ok=True)
    summary: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "model_file": os.path.basename(gguf),
                     "workload": {k: getattr(args, k) for k in ("num_prompts", "max_output_len",
                                                                 "max_input_len", "max_concurrency", "seed")},
                     "threads": args.threads, "engines": {}}
    summary["load_wait"] = wait_for_quiet(args.max_load, args.max_wait)
    outs = []
    engines = []
    if not args.skip_metroline:
        engines.append(("metroline", [PY, "-m", "metroline.cli", "serve", "--model", gguf,
                                      "--threads", str(args.threads), "--no-access-log",
                                      "--log-level", "warning"]))
    if not args.skip_llamacpp:
        engines.append(("llamacpp", [PY, "-m", "llama_cpp.server", "--model", gguf,
                                     "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
                                     "--n_ctx", "4096", "--verbose", "False",
                                     # by default a new request cuts the running stream short
                                     # (see probe_concurrency); measured: queued one by one
                                     "--interrupt_requests", "False"]))
    if not args.skip_llamacpp:  # its default setting, before the measured runs
        port = free_port()
        cmd = engines[-1][1]
        cmd = cmd[:cmd.index("--interrupt_requests")] + ["--port", str(port)]
        server = Server("llamacpp-default", cmd, port, "/tmp/serve_llamacpp_default.log")
        try:
            summary["llamacpp_default_concurrency_probe"] = probe_concurrency(server.url)
        finally:
            server.stop()
        print(json.dumps(summary["llamacpp_default_concurrency_probe"]), file=sys.stderr)
    for name, cmd in engines:
        port = free_port()
        out = os.path.join(RESULTS, f"serve_{name}_sharegpt.json")
        summary["engines"][name] = {"command": " ".join(cmd[1:] + ["--port", str(port)]),
                                    "load_before": [round(x, 2) for x in os.getloadavg()]}
        server = Server(name, cmd + ["--port", str(port)], port, os.path.join("/tmp", f"serve_{name}.log"))
        try:
            bench(server.url, name, out, args)
        finally:
            server.stop()
        summary["engines"][name]["load_after"] = [round(x, 2) for x in os.getloadavg()]
        outs.append(out)
        time.sleep(5)  # let the stopped server's threads go before the next one starts

    if len(outs) > 1:
        subprocess.run([PY, "-m", "metroline.cli", "bench", "compare", *outs,
                        "--output", os.path.join(RESULTS, "serve_vs_llamacpp.png"),
                        "--json", os.path.join(RESULTS, "serve_vs_llamacpp_table.json")], check=True)
    subprocess.run([PY, "-m", "metroline.cli", "bench", "roofline", "--weight-format", "fp32,file",
                    "--result", *outs, "--output", os.path.join(RESULTS, "serve_roofline.json")], check=True)
    with open(os.path.join(RESULTS, "serve_vs_llamacpp.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
