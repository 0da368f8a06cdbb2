"""Session fixtures: the default model's GGUF metadata, our tokenizer, and transformers' reference tokenizer."""

from __future__ import annotations

import os

import pytest

from metroline.model.default import default_model_path
from metroline.model.gguf_meta import open_gguf, read_gguf_metadata
from metroline.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def gguf_path() -> str:
    return default_model_path()


@pytest.fixture(scope="session")
def gguf_meta(gguf_path: str) -> dict:
    return read_gguf_metadata(open_gguf(gguf_path))


@pytest.fixture(scope="session")
def tokenizer(gguf_meta: dict) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(gguf_meta)


@pytest.fixture(scope="session")
def hf_tokenizer(gguf_path: str):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))
