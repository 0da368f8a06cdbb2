"""Session fixtures: the default model's GGUF metadata, our tokenizer, and transformers' reference tokenizer."""

from __future__ import annotations

import os

import pytest

from metroline.datasets import iter_sharegpt
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


@pytest.fixture(scope="session")
def sharegpt_prompts(default_loaded):
    """32 prompts of mixed lengths (4..~400 tokens) from real ShareGPT conversations."""
    tok = default_loaded.tokenizer
    lengths = [4, 9, 17, 33, 60, 120, 250, 400] * 4
    prompts = []
    for rec, n in zip((r for r in iter_sharegpt(limit=200) if r["conversations"]), lengths * 100):
        ids = tok.encode(rec["conversations"][0]["value"])
        if len(ids) >= n:
            prompts.append(ids[:n])
        if len(prompts) == 32:
            break
    assert len(prompts) == 32
    return prompts
