"""`metroline serve` against the same engine in-process, on the same chats: what the HTTP
front (its event loop, SSE, a second thread on the same two cores) costs.

Rounds alternate (server, in-process, x --rounds). The server side is decode_vs_llamacpp.py's
metroline round (same measurement code); the in-process side drives an EngineCore directly
with the same chats in the chat template, the same output lengths (ignore_eos), the same
--threads and the engine's own per-step thread policy:
  - one stream: the single-stream chats one at a time, tok/s = (tokens - 1) / (last - first token);
  - 16 streams: the concurrent chats submitted together, aggregate tok/s = tokens / wall time.
Writes benchmarks/results/server_vs_inprocess.json.
Usage: python benchmarks/server_vs_inprocess.py [--rounds 2] [--threads 2]
"""

from __future__ import annotations

import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import decode_vs_llamacpp as dvl  # noqa: E402  (the server-side measurement)


def inprocess_round(loaded, work: dict, threads: int) -> dict:
    import torch

    from metroline.engine.core import EngineCore
    from metroline.engine.request import SamplingParams

    torch.set_num_threads(threads)
    tok = loaded.tokenizer

    def ids_of(p):
        msgs = ([{"role": "system", "content": p.system}] if p.system else []) + [
            {"role": "user", "content": p.calls[0].content}]
        return tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True),
                          add_special_tokens=False)

    core = EngineCore(loaded)
    rates = []
    for i, p in enumerate(work["single"]):
        core.add_request(f"s{i}", ids_of(p), SamplingParams(temperature=0, ignore_eos=True,
                                                            max_tokens=p.calls[0].max_tokens))
        times = []
        while core.has_unfinished_requests():
            for out in core.step():
                if out.outputs and out.outputs[0].token_ids:
                    times.append(time.perf_counter())
        rates.append((len(times) - 1) / (times[-1] - times[0]))
    t0, total = time.perf_counter(), 0
    for i, p in enumerate(work["concurrent"]):
        core.add_request(f"c{i}", ids_of(p), SamplingParams(temperature=0, ignore_eos=True,
                                                            max_tokens=p.calls[0].max_tokens))
    while core.has_unfinished_requests():
        for out in core.step():
            total += sum(len(o.token_ids) for o in out.outputs)
    return {"decode_tok_s": statistics.median(rates),
            "concurrent_tok_s": total / (time.perf_counter() - t0)}


def main() -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", default=os.path.join(HERE, "results", "server_vs_inprocess.json"))
    own = ap.parse_args()
    args = dvl.parse_args(["--threads", str(own.threads), "--rounds", str(own.rounds)])
    from metroline.model.default import default_model_path
    from metroline.model.loader import load_model

    gguf = default_model_path()
    loaded = load_model(gguf, show_progress=False)
    work = dvl.build_workload(loaded.tokenizer, args)
    rounds = []
    for r in range(own.rounds):
        load_s = os.getloadavg()
        srv = dvl.metroline_round(args, gguf, loaded.tokenizer, work, r)
        load_i = os.getloadavg()
        inp = inprocess_round(loaded, work, own.threads)
        rounds.append({"load_before_server": load_s, "load_before_inprocess": load_i,
                       "server": {k: srv[k] for k in ("decode_tok_s", "concurrent_tok_s")},
                       "inprocess": inp})
        print(f"round {r + 1}: server {srv['decode_tok_s']:.1f} / {srv['concurrent_tok_s']:.1f} tok/s, "
              f"in-process {inp['decode_tok_s']:.1f} / {inp['concurrent_tok_s']:.1f} tok/s "
              f"(one stream / 16 streams; load {load_s[0]:.2f} / {load_i[0]:.2f})", flush=True)
    med = {side: {k: statistics.median(x[side][k] for x in rounds) for k in ("decode_tok_s", "concurrent_tok_s")}
           for side in ("server", "inprocess")}
    ratios = {k: med["server"][k] / med["inprocess"][k] for k in med["server"]}
    print(f"server / in-process: one stream {ratios['decode_tok_s']:.2f}x, "
          f"16 streams {ratios['concurrent_tok_s']:.2f}x")
    with open(own.output, "w") as f:
        json.dump({"threads": own.threads, "rounds": rounds, "medians": med,
                   "server_over_inprocess": ratios}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
