"""metroline: an LLM inference engine and agent runtime on PyTorch."""

__version__ = "0.1.0"
