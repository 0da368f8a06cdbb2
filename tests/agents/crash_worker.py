"""A process that runs one agent run and kills itself (SIGKILL) at a chosen point, or resumes
the runs it left: for tests/agents/test_resume.py.

    python -m tests.agents.crash_worker STORE SIDE_EFFECTS start CRASH_POINT
    python -m tests.agents.crash_worker STORE SIDE_EFFECTS resume -
"""

import asyncio
import os
import signal
import sys

from metroline.agents import AgentRuntime, ModelTurn, ModelCall, SQLiteRunStore, ToolRegistry


def main(store_path: str, effects: str, mode: str, crash: str) -> None:
    def die(point: str) -> None:
        if mode == "start" and crash == point:
            os.kill(os.getpid(), signal.SIGKILL)

    reg = ToolRegistry()

    @reg.tool
    def append_line(text: str) -> str:
        """Append a line to the side-effect file (not idempotent)."""
        with open(effects, "a") as f:
            f.write(text + "\n")
        die(f"in:{text}")
        return f"appended {text}"

    @reg.tool(idempotent=True)
    def set_flag(text: str) -> str:
        """Write a flag line (idempotent: writing it twice means the same)."""
        with open(effects, "a") as f:
            f.write(f"flag {text}\n")
        die(f"in:flag {text}")
        return f"flag {text} set"

    plan = [("append_line", "a"), ("set_flag", "x"), ("append_line", "b"), ("append_line", "c")]

    class PlanModel:
        """Acts on how many tool results the conversation holds, so a resumed process picks
        up the plan where the transcript says it is."""
        name = "plan"

        async def complete(self, messages, tools, *, max_tokens, hints=None):
            n = sum(m["role"] == "tool" for m in messages)
            die(f"model:{n}")
            if n >= len(plan):
                return ModelTurn("done", [], 10, 1)
            name, text = plan[n]
            return ModelTurn(None, [ModelCall(f"call-{n}", name, {"text": text})], 10, 5, "tool_calls")

    async def go():
        rt = AgentRuntime(PlanModel(), reg, SQLiteRunStore(store_path))
        if mode == "start":
            run_id = await rt.start("do the plan", run_id="run-crash")
            res = await rt.wait(run_id)
        else:
            ids = await rt.resume_unfinished()
            assert ids == ["run-crash"], ids
            res = await rt.wait(ids[0])
        print(res.status, res.output)

    asyncio.run(go())


if __name__ == "__main__":
    main(*sys.argv[1:5])
