"""The model computes what Hugging Face transformers computes, and loading fails cleanly.

Every metroline forward here is the real inference path: a paged KV cache from the attention
backend (scattered, out-of-order blocks, unused slots filled with NaN so a stray read shows),
metadata from `build_metadata`, the flat-batch forward, `compute_logits`. References are
transformers models holding the very same weights, in fp32.

* default model (SmolLM2-135M, Q4_1 GGUF): logits of 1..300-token prompts, the same prompt in
  prefill chunks plus decode steps over cached context, and 32-token greedy continuations
  through the `LLM` engine (three prompts batched together).
* tiny HF-format checkpoints written by the test (Llama tied/untied/biased/odd head_dim, Qwen2,
  Mistral with and without a sliding window, llama3 and linear RoPE scaling): logits and greedy
  tokens.
* tiny GGUF files, one per quantization type gguf can dequantize in numpy (the K- and IQ4 types,
  which gguf cannot quantize, are written as random blocks with sane fp16 scales): every
  parameter equals gguf's dequantization of the bytes written (q/k rows un-permuted for llama),
  and logits equal a transformers model built from those weights.
* bad input: ModelLoadError with a clear one-line message.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from metroline.attention.backend import SeqInfo, TorchAttentionBackend
from metroline.engine.request import SamplingParams
from metroline.errors import ModelLoadError
from metroline.model.llama import MergedLinear
from metroline.model.loader import load_model

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

LONG_TEXT = (
    "The history of the railway begins long before the steam locomotive. Wagonways with wooden rails "
    "carried coal from the mines of northern England to the rivers as early as the sixteenth century, "
    "and horses pulled the wagons along gentle slopes. When Richard Trevithick built the first working "
    "railway locomotive in 1804, few people believed that iron wheels on iron rails could grip well "
    "enough to haul a useful load. George Stephenson proved them wrong: the Stockton and Darlington "
    "Railway opened in 1825, and the Liverpool and Manchester Railway followed five years later, with "
    "timetables, tickets, signals and stations much like those we know today. Within two decades a "
    "network of lines covered Britain, and engineers carried the idea to Belgium, France, Germany and "
    "the United States. Cities grew along the tracks, standard time was adopted so that timetables "
    "would agree, and fresh food could travel hundreds of miles overnight. Underground lines came next: "
    "London's Metropolitan Railway opened in 1863 with steam trains running through shallow tunnels, "
    "and electric traction arrived at the end of the century, making deep tube lines practical. Today "
    "metro systems carry billions of passengers each year in cities such as Tokyo, Seoul, Shanghai, "
    "Moscow, Paris and New York. Each line is drawn on the map in its own colour, and a passenger who "
    "changes trains at an interchange follows the colour of the next line to the right platform. "
    "Modern signalling lets trains run ninety seconds apart, automatic doors line the platforms, and "
    "driverless trains glide through the tunnels while the passengers read, sleep or stare at their "
    "phones, rarely thinking about the two centuries of invention beneath their feet."
)


# ------------------------------------------------------------------------------------ helpers

@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread for this module. On a small shared machine two OpenMP threads spin
    against other processes: measured 4x slower here (and 80x for the tiny models)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _params_of(loaded) -> torch.Tensor:
    return next(loaded.model.parameters())


@torch.inference_mode()
def paged_logits(loaded, ids: list[int], chunks: list[int] | None = None, block_size: int = 16,
                 seed: int = 0, backend=None) -> torch.Tensor:
    """Logits [len(ids), vocab] through the paged path: one step per entry of `chunks` (a
    1-token step after the first is a decode step; longer ones are prefill chunks over cached
    context). The torch attention backend unless `backend` is given."""
    model, cfg, p = loaded.model, loaded.config, _params_of(loaded)
    chunks = list(chunks or [len(ids)])
    assert sum(chunks) == len(ids)
    backend = backend or TorchAttentionBackend()
    need = -(-len(ids) // block_size)
    num_blocks = 2 * need + 1
    # Out-of-order blocks with free ones between them: a wrong slot mapping cannot go unnoticed.
    block_ids = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))[:need].tolist()
    kv = backend.allocate_kv_cache(cfg.num_hidden_layers, num_blocks, block_size,
                                   cfg.num_key_value_heads, cfg.head_dim, p.dtype, p.device)
    for k, v in kv:  # a slot read before it is written poisons the output
        if k.dtype == torch.int8:  # bytes 0x7e: every row's fp16 scale is a NaN
            k.fill_(0x7E)
            v.fill_(0x7E)
        else:
            k.fill_(float("nan"))
            v.fill_(float("nan"))
    out, start = [], 0
    for n in chunks:
        meta = backend.build_metadata([SeqInfo(n, start, block_ids)], block_size, p.device)
        hidden = model(torch.tensor(ids[start:start + n], dtype=torch.int64, device=p.device),
                       torch.arange(start, start + n, dtype=torch.int64, device=p.device),
                       backend, meta, kv)
        out.append(model.compute_logits(hidden).float().cpu())
        start += n
    return torch.cat(out)


@torch.inference_mode()
def hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    return hf_model(torch.tensor([ids]), use_cache=False).logits[0].float()


def hf_greedy(hf_model, ids: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of exactly n tokens: generate(do_sample=False,
    min_new_tokens=n, max_new_tokens=n), which bans the model's eos tokens throughout."""
    with torch.inference_mode():
        out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                do_sample=False, min_new_tokens=n, max_new_tokens=n,
                                pad_token_id=hf_model.generation_config.eos_token_id)
    return out[0, len(ids):].tolist()


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, atol: float, what: str) -> float:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert torch.isfinite(ours).all(), f"{what}: non-finite logits"
    diff = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    print(f"{what}: max |logit diff| {diff:.2e} (max |logit| {scale:.1f})")
    assert diff <= atol, f"{what}: max |logit diff| {diff:.3g} > {atol:g} (logits up to {scale:.1f})"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1)), f"{what}: argmax differs"
    return diff


def require_fp32(loaded) -> None:
    if _params_of(loaded).dtype != torch.float32:
        pytest.skip("tight fp32 comparison needs the fp32 model (the default dtype on CPU)")


# ------------------------------------------------------------------------ the default model

@pytest.fixture(scope="module")
def default_prompts(default_loaded) -> dict[str, list[int]]:
    tok = default_loaded.tokenizer
    chat = tok.apply_chat_template(
        [{"role": "system", "content": "You are a concise assistant who answers in one sentence."},
         {"role": "user", "content": "Why do metro maps draw every line in its own colour, and why are "
                                     "the distances between stations on them usually not to scale?"}],
        add_generation_prompt=True)
    long_ids = tok.encode(LONG_TEXT)
    assert len(long_ids) >= 300
    prompts = {"1 token": tok.encode("Hello"), "7 tokens": tok.encode("The quick brown fox jumps over the"),
               "chat": tok.encode(chat, add_special_tokens=False), "300 tokens": long_ids[:300]}
    assert len(prompts["1 token"]) == 1 and len(prompts["7 tokens"]) == 7
    assert 40 <= len(prompts["chat"]) <= 80
    return prompts


@pytest.fixture(scope="module")
def default_logits(default_loaded_fp32, hf_default_model, default_prompts):
    """(ours, transformers') whole-prompt logits per prompt, computed once (300 tokens take seconds)."""
    default_loaded = default_loaded_fp32
    require_fp32(default_loaded)
    cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(name: str):
        if name not in cache:
            ids = default_prompts[name]
            cache[name] = paged_logits(default_loaded, ids), hf_logits(hf_default_model, ids)
        return cache[name]

    return get


@pytest.mark.parametrize("name", ["1 token", "7 tokens", "chat", "300 tokens"])
def test_default_model_logits_match_transformers(default_logits, default_prompts, name):
    ours, ref = default_logits(name)
    assert_logits_close(ours, ref, 1e-3, f"default model, {name} ({len(default_prompts[name])} tokens)")


def test_default_model_chunked_prefill_and_decode_match(default_loaded_fp32, default_logits,
                                                       default_prompts):
    """Three prefill chunks over cached context, then three decode steps: every position's logits
    equal transformers' one-shot logits, and the last equals metroline's own one-shot last."""
    ids = default_prompts["300 tokens"]
    whole, ref = default_logits("300 tokens")
    chunked = paged_logits(default_loaded_fp32, ids, chunks=[100, 117, 80, 1, 1, 1], block_size=16,
                           seed=1)
    assert_logits_close(chunked, ref, 1e-3, "default model, chunked")
    torch.testing.assert_close(chunked[-1], whole[-1], rtol=0, atol=1e-4)


def test_default_model_greedy_matches_transformers(default_llm_fp32, hf_default_model, default_prompts):
    """32 greedy tokens for three prompts, scheduled together (batched decode steps).

    transformers' generate(min_new_tokens=32) bans eos until 32 tokens; its twin here is
    min_tokens=32. With ignore_eos=True the model may emit eos and go on, which no generate call
    reproduces: that run is checked token by token against transformers' argmax over the prompt
    plus our continuation (teacher forcing). Both runs share one batch of six requests."""
    default_llm = default_llm_fp32
    require_fp32(default_llm.loaded)
    tok = default_llm.tokenizer
    prompts = [tok.encode("The capital of France is"), tok.encode("def fibonacci(n):\n"),
               default_prompts["chat"]]
    twin = SamplingParams(temperature=0, max_tokens=32, min_tokens=32)
    free = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outs = default_llm.generate(prompts * 2, [twin] * 3 + [free] * 3, use_tqdm=False)
    for ids, twin_out, free_out in zip(prompts, outs[:3], outs[3:]):
        ours = twin_out.outputs[0].token_ids
        ref = hf_greedy(hf_default_model, ids, 32)
        assert len(ours) == 32
        assert ours == ref, f"greedy continuation of {tok.decode(ids)!r} differs:\n{tok.decode(ours)!r}\n{tok.decode(ref)!r}"
        ours = free_out.outputs[0].token_ids
        assert len(ours) == 32
        forced = hf_logits(hf_default_model, ids + ours)[len(ids) - 1:-1].argmax(-1).tolist()
        assert ours == forced, f"ignore_eos continuation of {tok.decode(ids)!r} is not transformers' argmax"


# --------------------------------------------------------------- tiny HF-format checkpoints

TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog. A lazy dog sleeps in the sun.",
    "Paged attention stores keys and values in fixed size blocks of the cache.",
    "Hello world, hello metroline! Trains run on time: 0123456789.",
    "def add(a, b):\n    return a + b\n",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    """A byte-level BPE (300 tokens) trained here; saved as transformers saves a real one.
    Returns (folder, tokenizers.Tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TINY_CORPUS * 3, trainer)
    folder = tmp_path_factory.mktemp("tiny-tokenizer")
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        unk_token="<|endoftext|>").save_pretrained(folder)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(folder))
    return folder, tok


def _tiny_prompt(tok, n: int = 40) -> list[int]:
    ids = tok.encode(" ".join(TINY_CORPUS) + " Where does the lazy fox keep its blocks?").ids
    assert len(ids) >= n
    return ids[:n]


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough for decisive logits; norms and biases away from 1 and 0 so a
    missing one shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


HF_VARIANTS = {
    "llama": ("LlamaConfig", {}),
    "llama-tied": ("LlamaConfig", {"tie_word_embeddings": True}),
    "llama-bias-headdim": ("LlamaConfig", {"attention_bias": True, "mlp_bias": True, "head_dim": 32}),
    "llama3-rope": ("LlamaConfig", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "linear-rope": ("LlamaConfig", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0,
                                                        "factor": 4.0}}),
    "qwen2": ("Qwen2Config", {}),
    "qwen2-tied": ("Qwen2Config", {"tie_word_embeddings": True, "rope_parameters": {
        "rope_type": "default", "rope_theta": 1000000.0}}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "mistral-window": ("MistralConfig", {"sliding_window": 32}),
}


@pytest.fixture(scope="module", params=list(HF_VARIANTS))
def tiny_hf(request, tiny_tokenizer, tmp_path_factory):
    """(variant name, transformers model, metroline LoadedModel) of a tiny checkpoint saved in
    HF format (config.json, model.safetensors, tokenizer files) and loaded back by metroline."""
    name = request.param
    cls_name, kw = HF_VARIANTS[name]
    tok_dir, tok = tiny_tokenizer
    cfg = getattr(transformers, cls_name)(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=0, eos_token_id=0, **kw)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _randomize(model, seed=sorted(HF_VARIANTS).index(name))
    model.eval()
    folder = tmp_path_factory.mktemp(f"tiny-{name}")
    model.save_pretrained(folder)  # safetensors: the only format transformers 5 writes
    assert "model.safetensors" in os.listdir(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (folder / f).write_bytes((tok_dir / f).read_bytes())
    loaded = load_model(str(folder), dtype="float32", device="cpu", show_progress=False)
    return name, model, loaded


def test_tiny_hf_config_mapping(tiny_hf):
    name, hf, loaded = tiny_hf
    c, hc = loaded.config, hf.config
    assert loaded.source.kind == "hf"
    assert c.architecture == hc.model_type
    assert (c.vocab_size, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (
        hc.vocab_size, hc.hidden_size, hc.num_attention_heads, hc.num_key_value_heads, hf.model.layers[0].self_attn.head_dim)
    assert c.tie_word_embeddings == bool(hc.tie_word_embeddings)
    assert (loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight) == c.tie_word_embeddings
    torch.testing.assert_close(loaded.model.model.rotary_emb.inv_freq, hf.model.rotary_emb.inv_freq,
                               rtol=1e-6, atol=0)
    if name == "mistral-window":  # attention has no sliding window: the context stops at it
        assert loaded.model.model.rotary_emb.max_positions == 32


def test_tiny_hf_logits_match_transformers(tiny_hf, tiny_tokenizer):
    name, hf, loaded = tiny_hf
    n = min(40, loaded.model.model.rotary_emb.max_positions)
    ids = _tiny_prompt(tiny_tokenizer[1], n)
    ref = hf_logits(hf, ids)
    assert_logits_close(paged_logits(loaded, ids, block_size=4), ref, 1e-4, f"tiny {name}")
    chunks = [n - 3 - 12 - 10, 12, 10, 1, 1, 1]
    assert_logits_close(paged_logits(loaded, ids, chunks, block_size=4, seed=3), ref, 1e-4,
                        f"tiny {name}, chunked")


def test_tiny_hf_greedy_matches_transformers(tiny_hf, tiny_tokenizer):
    from metroline.engine.llm import LLM

    name, hf, loaded = tiny_hf
    llm = LLM(loaded=loaded, num_blocks=64, block_size=4, show_progress=False)
    prompts = [_tiny_prompt(tiny_tokenizer[1], 9), _tiny_prompt(tiny_tokenizer[1], 2)[::-1]]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, min_tokens=16),
                        use_tqdm=False)
    for ids, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, ids, 16), f"tiny {name}: greedy tokens differ"


# ------------------------------------------------------------------------------ tiny GGUFs

# Dimensions: every matrix row a multiple of 256 elements (the K-quant super-block).
G_HIDDEN, G_FFN, G_HEADS, G_KV_HEADS, G_LAYERS = 256, 512, 4, 2, 2

# Byte offsets of the fp16 scale fields in a block, for types gguf can dequantize but not
# quantize: random bytes with sane scales are valid blocks.
_F16_FIELDS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
               "IQ4_NL": (0,), "IQ4_XS": (0,)}

GGUF_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K",
              "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "MXFP4"]


def _encode(w: np.ndarray, qtype: Q, rng: np.random.Generator):
    """(bytes or float array to write, what gguf dequantizes it to) for an fp32 matrix."""
    if qtype == Q.F32:
        return w, w
    if qtype == Q.F16:
        return w.astype(np.float16), w.astype(np.float16).astype(np.float32)
    try:
        raw = quantize(w, qtype)
    except NotImplementedError:
        if qtype.name not in _F16_FIELDS:
            pytest.skip(f"gguf cannot quantize {qtype.name} and the test cannot craft its blocks")
        raw = _random_blocks(w.shape[0], w.shape[1], qtype, rng, std=float(w.std()))
    try:
        return raw, dequantize(raw, qtype).reshape(w.shape).astype(np.float32)
    except NotImplementedError:
        pytest.skip(f"gguf cannot dequantize {qtype.name} in numpy")


def _random_blocks(rows: int, cols: int, qtype: Q, rng, std: float) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    nb = rows * cols // block
    raw = rng.integers(0, 256, (nb, size), dtype=np.uint8)

    def set_scales(values):
        half = values.astype(np.float16).view(np.uint8).reshape(nb, 2)
        for off in _F16_FIELDS[qtype.name]:
            raw[:, off:off + 2] = half

    set_scales(np.ones(nb))
    unit = dequantize(raw.reshape(rows, -1), qtype)
    set_scales(std / unit.std() * rng.uniform(0.5, 1.5, nb))
    return raw.reshape(rows, cols // block * size)


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute): HF rotate-half rows to
    interleaved pairs. Rows only, so it commutes with row-wise quantization (works on bytes)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_HF_TO_GGUF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.o_proj.bias": "attn_output.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_HF_TO_GGUF_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                   "lm_head.weight": "output.weight"}


def _gguf_name(hf_name: str) -> str:
    if hf_name in _HF_TO_GGUF_TOP:
        return _HF_TO_GGUF_TOP[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_HF_TO_GGUF_LAYER[rest]}"


def _tokenizer_metadata(writer, tok) -> None:
    """A minimal llama.cpp 'gpt2' (byte-level BPE) tokenizer from the tiny tokenizer."""
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab["<|endoftext|>"])
    writer.add_eos_token_id(vocab["<|endoftext|>"])


def write_tiny_gguf(path, tok, qtype: Q, arch: str = "llama", tied: bool = False,
                    bias: bool = False, head_dim: int = 64, seed: int = 0,
                    encode=None) -> dict[str, np.ndarray]:
    """Write a random tiny model as llama.cpp would; returns its weights in HF layout, as fp32
    after the quantization round trip (what a correct loader must produce)."""
    rng = np.random.default_rng(seed)
    vocab, H, F, L = tok.get_vocab_size(), G_HIDDEN, G_FFN, G_LAYERS
    q, kv = G_HEADS * head_dim, G_KV_HEADS * head_dim
    shapes = {"model.embed_tokens.weight": (vocab, H), "model.norm.weight": (H,)}
    if not tied:
        shapes["lm_head.weight"] = (vocab, H)
    for i in range(L):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                       p + "self_attn.q_proj.weight": (q, H), p + "self_attn.k_proj.weight": (kv, H),
                       p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, q),
                       p + "mlp.gate_proj.weight": (F, H), p + "mlp.up_proj.weight": (F, H),
                       p + "mlp.down_proj.weight": (H, F)})
        if bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
            if arch == "llama":
                shapes[p + "self_attn.o_proj.bias"] = (H,)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny {arch}")
    writer.add_context_length(512)
    writer.add_embedding_length(H)
    writer.add_block_count(L)
    writer.add_feed_forward_length(F)
    writer.add_head_count(G_HEADS)
    writer.add_head_count_kv(G_KV_HEADS)
    writer.add_rope_dimension_count(head_dim)  # no key_length: head_dim comes from here
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    _tokenizer_metadata(writer, tok)
    expected = {}
    for name, shape in shapes.items():
        if len(shape) == 1:  # norms and biases stay F32, as llama.cpp keeps them
            w = (1 + 0.2 * rng.standard_normal(shape) if "norm" in name
                 else 0.2 * rng.standard_normal(shape)).astype(np.float32)
            raw, expected[name] = w, w
        else:
            w = (0.05 * rng.standard_normal(shape)).astype(np.float32)
            raw, expected[name] = (encode or _encode)(w, qtype, rng)
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            raw = _llama_permute(raw, G_HEADS if ".q_proj." in name else G_KV_HEADS)
        if raw.dtype == np.uint8:
            writer.add_tensor(_gguf_name(name), raw, raw_dtype=qtype)
        else:
            writer.add_tensor(_gguf_name(name), raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def reference_model(weights: dict[str, np.ndarray], arch: str, tied: bool, head_dim: int, bias: bool):
    """A transformers model holding exactly `weights` (the ground truth, not read from the GGUF)."""
    cls = transformers.Qwen2Config if arch == "qwen2" else transformers.LlamaConfig
    kw = {} if arch == "qwen2" else {"attention_bias": bias, "head_dim": head_dim}
    cfg = cls(vocab_size=weights["model.embed_tokens.weight"].shape[0], hidden_size=G_HIDDEN,
              intermediate_size=G_FFN, num_hidden_layers=G_LAYERS, num_attention_heads=G_HEADS,
              num_key_value_heads=G_KV_HEADS, rms_norm_eps=1e-5, max_position_embeddings=512,
              tie_word_embeddings=tied, **kw)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    state = {k: torch.from_numpy(v) for k, v in weights.items()}
    if tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    return model


def metroline_weight(model, hf_name: str) -> torch.Tensor:
    """The slice of metroline's (possibly fused) parameter holding checkpoint tensor `hf_name`."""
    for frag, fused, shard in ((".q_proj.", ".qkv_proj.", "q"), (".k_proj.", ".qkv_proj.", "k"),
                               (".v_proj.", ".qkv_proj.", "v"), (".gate_proj.", ".gate_up_proj.", "gate"),
                               (".up_proj.", ".gate_up_proj.", "up")):
        if frag in hf_name:
            mod_name, pname = hf_name.replace(frag, fused).rsplit(".", 1)
            mod = model.get_submodule(mod_name)
            assert isinstance(mod, MergedLinear)
            off, size = mod.shard_offsets[shard]
            return getattr(mod, pname)[off:off + size]
    return model.get_parameter(hf_name)


def check_gguf(loaded, expected, ref, tok, what: str) -> None:
    for name, want in expected.items():
        got = metroline_weight(loaded.model, name)
        assert torch.equal(got, torch.from_numpy(want)), f"{what}: {name} differs from gguf's dequantization"
    ids = _tiny_prompt(tok, 40)
    ours = paged_logits(loaded, ids, block_size=8)
    assert_logits_close(ours, hf_logits(ref, ids), 1e-4, what)
    chunked = paged_logits(loaded, ids, [20, 17, 1, 1, 1], block_size=8, seed=2)
    torch.testing.assert_close(chunked, ours, rtol=0, atol=1e-4)


@pytest.mark.parametrize("qtype", GGUF_TYPES)
def test_tiny_gguf_quant_types(qtype, tiny_tokenizer, tmp_path):
    qt = Q[qtype]
    tok = tiny_tokenizer[1]
    path = tmp_path / f"tiny-{qtype}.gguf"
    expected = write_tiny_gguf(path, tok, qt, seed=GGUF_TYPES.index(qtype))
    loaded = load_model(str(path), dtype="float32", device="cpu", show_progress=False,
                        weights="fp32")
    assert loaded.source.kind == "gguf" and loaded.weight_format == qtype
    assert loaded.config.head_dim == 64 and not loaded.config.tie_word_embeddings
    assert loaded.tokenizer.encode("hello world") == tok.encode("hello world").ids
    check_gguf(loaded, expected, reference_model(expected, "llama", False, 64, False), tok, f"GGUF {qtype}")


GGUF_VARIANTS = {  # name: (qtype, arch, tied, bias, head_dim)
    "llama-tied-Q4_K": ("Q4_K", "llama", True, False, 64),
    "llama-bias-headdim32": ("Q8_0", "llama", False, True, 32),
    "qwen2-Q8_0": ("Q8_0", "qwen2", False, True, 64),
    "qwen2-tied-F16": ("F16", "qwen2", True, True, 64),
}


@pytest.mark.parametrize("variant", list(GGUF_VARIANTS))
def test_tiny_gguf_variants(variant, tiny_tokenizer, tmp_path):
    qtype, arch, tied, bias, head_dim = GGUF_VARIANTS[variant]
    tok = tiny_tokenizer[1]
    path = tmp_path / f"{variant}.gguf"
    expected = write_tiny_gguf(path, tok, Q[qtype], arch=arch, tied=tied, bias=bias, head_dim=head_dim, seed=7)
    loaded = load_model(str(path), dtype="float32", device="cpu", show_progress=False,
                        weights="fp32")
    c = loaded.config
    assert (c.architecture, c.tie_word_embeddings, c.head_dim) == (arch, tied, head_dim)
    check_gguf(loaded, expected, reference_model(expected, arch, tied, head_dim, bias), tok, f"GGUF {variant}")


def test_tiny_gguf_reads_the_same_in_transformers(tiny_tokenizer, tmp_path):
    """The writer above lays tensors out as llama.cpp does: transformers' own GGUF loader (with
    its own q/k un-permutation) reads back exactly the weights we meant."""
    tok = tiny_tokenizer[1]
    path = tmp_path / "tiny.gguf"
    expected = write_tiny_gguf(path, tok, Q.Q8_0, seed=11)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                           dtype=torch.float32)
    state = hf.state_dict()
    for name, want in expected.items():
        assert torch.equal(state[name], torch.from_numpy(want)), name


# ------------------------------------------------------------------------------ bad input

def assert_load_error(path, *fragments: str) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_model(str(path), dtype="float32", device="cpu", show_progress=False,
                        weights="fp32")
    msg = str(info.value)
    assert "\n" not in msg and msg.strip() == msg and msg, repr(msg)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"
    return msg


def _write_hf_folder(folder, config: dict, tiny_tokenizer=None, weights: dict | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if tiny_tokenizer is not None:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (folder / f).write_bytes((tiny_tokenizer[0] / f).read_bytes())
    if weights is not None:
        from safetensors.torch import save_file

        save_file(weights, str(folder / "model.safetensors"))
    return folder


_TINY_LLAMA_CFG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 300,
                   "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                   "num_attention_heads": 4, "num_key_value_heads": 2}


def test_missing_paths(tmp_path):
    assert_load_error(tmp_path / "missing.gguf", "not found", "missing.gguf")
    assert_load_error(tmp_path / "no" / "such" / "folder", "not found")
    (tmp_path / "empty").mkdir()
    assert_load_error(tmp_path / "empty", "not a model folder")


def test_files_that_are_not_models(tiny_tokenizer, tmp_path):
    junk = tmp_path / "weights.bin"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert_load_error(junk, "not a GGUF file", "weights.bin")
    text = tmp_path / "x.gguf"
    text.write_text("this is a text file,\nnot a model\n")
    assert_load_error(text, "not a GGUF file", "x.gguf")
    garbage = tmp_path / "garbage.gguf"  # the magic, then noise
    garbage.write_bytes(b"GGUF" + np.random.default_rng(1).integers(0, 256, 64, dtype=np.uint8).tobytes())
    assert_load_error(garbage, "garbage.gguf")
    whole = tmp_path / "whole.gguf"
    write_tiny_gguf(whole, tiny_tokenizer[1], Q.Q8_0)
    truncated = tmp_path / "truncated.gguf"  # an interrupted download
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert_load_error(truncated, "truncated", "truncated.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    assert_load_error(tmp_path / "empty.gguf", "not a GGUF file")


def test_gguf_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_embedding_length(64)
    w.add_tensor("token_embd.weight", np.zeros((8, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_load_error(path, "unsupported architecture", "'gpt2'", "llama")


def test_gguf_unsupported_quantization(tiny_tokenizer, tmp_path):
    """A tensor type gguf cannot dequantize (Q8_1, an activation-only type) fails by name."""
    path = tmp_path / "q81.gguf"
    block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]

    def zero_blocks(w, qtype, rng):  # valid-looking Q8_1 bytes: nothing can read them anyway
        return np.zeros((w.shape[0], w.shape[1] // block * size), np.uint8), w

    write_tiny_gguf(path, tiny_tokenizer[1], Q.Q8_1, encode=zero_blocks)
    with pytest.raises(NotImplementedError):
        dequantize(np.zeros((1, size), np.uint8), Q.Q8_1)
    assert_load_error(path, "unsupported quantization type Q8_1")


def test_hf_unsupported_architecture(tiny_tokenizer, tmp_path):
    folder = _write_hf_folder(tmp_path / "gpt2", {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 300, "n_embd": 64,
        "n_layer": 1, "n_head": 4}, tiny_tokenizer)
    assert_load_error(folder, "unsupported architecture", "GPT2LMHeadModel", "LlamaForCausalLM")


def test_hf_bad_configs_and_checkpoints(tiny_tokenizer, tmp_path):
    bad_json = tmp_path / "bad-json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    assert_load_error(bad_json, "config.json")

    no_size = {k: v for k, v in _TINY_LLAMA_CFG.items() if k != "hidden_size"}
    assert_load_error(_write_hf_folder(tmp_path / "no-size", no_size, tiny_tokenizer), "hidden_size")

    yarn = dict(_TINY_LLAMA_CFG, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    assert_load_error(_write_hf_folder(tmp_path / "yarn", yarn, tiny_tokenizer), "yarn")

    no_weights = _write_hf_folder(tmp_path / "no-weights", _TINY_LLAMA_CFG, tiny_tokenizer)
    assert_load_error(no_weights, ".safetensors")

    wrong = _write_hf_folder(tmp_path / "wrong-shape", _TINY_LLAMA_CFG, tiny_tokenizer,
                             {"model.embed_tokens.weight": torch.zeros(300, 32)})
    assert_load_error(wrong, "model.embed_tokens.weight", "(300, 64)", "(300, 32)")

    extra = _write_hf_folder(tmp_path / "unexpected", _TINY_LLAMA_CFG, tiny_tokenizer,
                             {"model.vision_tower.weight": torch.zeros(2, 2)})
    assert_load_error(extra, "model.vision_tower.weight")

    partial = _write_hf_folder(tmp_path / "partial", _TINY_LLAMA_CFG, tiny_tokenizer,
                               {"model.embed_tokens.weight": torch.zeros(300, 64)})
    assert_load_error(partial, "missing")


def test_hub_errors_are_one_line(monkeypatch):
    """A hub id that cannot be fetched (offline here) reports the hub's multi-line error on one line."""
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def offline(*a, **kw):
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection\n\nor try later.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert_load_error("no-such-org/no-such-model", "no-such-org/no-such-model", "connect")
