"""metroline: an LLM inference engine and agent runtime on PyTorch."""

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "AsyncEngine", "EngineCore"]


def __getattr__(name):
    # Lazy, so that `import metroline` stays light (no torch import) for the CLI's --help.
    if name == "LLM":
        from metroline.engine.llm import LLM
        return LLM
    if name == "SamplingParams":
        from metroline.engine.request import SamplingParams
        return SamplingParams
    if name == "AsyncEngine":
        from metroline.engine.async_engine import AsyncEngine
        return AsyncEngine
    if name == "EngineCore":
        from metroline.engine.core import EngineCore
        return EngineCore
    raise AttributeError(name)
