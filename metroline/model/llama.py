"""The Llama family (Llama, SmolLM2, Mistral, Qwen2) over a flat, unpadded batch of tokens.

Modules are named as in Hugging Face checkpoints. q/k/v and gate/up are fused into one matmul
each (`qkv_proj`, `gate_up_proj`); `load_weights` maps the checkpoint's separate tensors onto
their shards, so a checkpoint loads unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from metroline.attention.backend import AttentionBackend, AttentionMetadata, PagedMetadata
from metroline.kernels import fused as _fused
from metroline.kernels import layers as _layers
from metroline.quant.packed import PackedEmbedding, PackedLinear, RawWeight


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    architecture: str = "llama"
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            if x.is_cpu and _fused.available("rms_norm"):
                return _fused.rms_norm(x, self.weight, self.eps)  # one C++ call
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # = the composite below
        # Normalise in fp32 whatever the model dtype, as the reference implementation does.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(config: LlamaConfig, rope_freqs: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding, with the checkpoint's scaling applied."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope_freqs is not None:  # GGUF llama3-style models store the scaled factors directly
        return inv_freq / rope_freqs.float()
    sc = config.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind in ("default", None, "none"):
        return inv_freq
    factor = float(sc.get("factor", 1.0))
    if kind == "linear":
        return inv_freq / factor
    if kind == "llama3":
        low = float(sc.get("low_freq_factor", 1.0))
        high = float(sc.get("high_freq_factor", 4.0))
        orig = float(sc.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv_freq
        low_wl, high_wl = orig / low, orig / high
        scaled = torch.where(wavelen > low_wl, inv_freq / factor, inv_freq)
        smooth = (orig / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= high_wl) & (wavelen <= low_wl)
        return torch.where(is_mid, mid, scaled)
    raise ValueError(f"unsupported rope scaling type {kind!r}")


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position, indexed by each token's position (rotate-half form)."""

    def __init__(self, config: LlamaConfig, max_positions: int):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.max_positions = max_positions
        self._build(max_positions)

    def set_rope_freqs(self, rope_freqs: torch.Tensor) -> None:
        self.inv_freq = rope_inv_freq(self.config, rope_freqs).to(self.inv_freq.device)
        self._build(self.max_positions)

    def _build(self, n: int) -> None:
        t = torch.arange(n, dtype=torch.int64, device=self.inv_freq.device).float()
        freqs = torch.outer(t, self.inv_freq.float())
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cached", emb.cos(), persistent=False)
        self.register_buffer("sin_cached", emb.sin(), persistent=False)

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole [max_positions, D] cos/sin tables (for backends that fuse RoPE)."""
        return self.cos_cached, self.sin_cached

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, 1, D] tables for the step's positions; computed once per step, used by every layer."""
        return (self.cos_cached[positions].unsqueeze(1).to(dtype),
                self.sin_cached[positions].unsqueeze(1).to(dtype))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on [T, H, D] (q and k heads together, to halve the op count)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class MergedLinear(nn.Linear):
    """A linear layer holding several checkpoint matrices stacked along the output dimension."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool):
        super().__init__(in_features, sum(shard_sizes.values()), bias=bias)
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        off = 0
        for name, size in shard_sizes.items():
            self.shard_offsets[name] = (off, size)
            off += size

    def load_shard(self, shard: str, param_name: str, tensor: torch.Tensor) -> None:
        off, size = self.shard_offsets[shard]
        target = getattr(self, param_name)
        if tensor.shape[0] != size or tuple(tensor.shape[1:]) != tuple(target.shape[1:]):
            raise ValueError(f"shard {shard}.{param_name}: expected {(size, *target.shape[1:])}, "
                             f"got {tuple(tensor.shape)}")
        with torch.no_grad():
            target[off:off + size].copy_(tensor)


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = MergedLinear(config.hidden_size, {"q": self.q_size, "k": self.kv_size,
                                                          "v": self.kv_size}, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.o_bias)

    def forward(self, x, rope: tuple[torch.Tensor, torch.Tensor], backend: AttentionBackend,
                meta: AttentionMetadata, kv_cache):
        T = x.shape[0]
        qkv = self.qkv_proj.forward(x)
        qk = qkv[:, :self.q_size + self.kv_size].view(T, self.num_heads + self.num_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size:].view(T, self.num_kv_heads, self.head_dim)
        if backend.fuses_rope:  # RoPE, the K/V write and attention in the backend's kernels
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            out = backend.forward(q, k, v, kv_cache, meta, self.scale, rope=rope)
        else:
            qk = apply_rotary(qk, *rope)
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            out = backend.forward(q, k, v, kv_cache, meta, self.scale)
        return self.o_proj.forward(out.reshape(T, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = MergedLinear(config.hidden_size, {"gate": config.intermediate_size,
                                                              "up": config.intermediate_size},
                                         bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x):
        gate_up = self.gate_up_proj.forward(x)
        if gate_up.dtype == torch.float32 and gate_up.is_cpu and _fused.available("silu_mul"):
            return self.down_proj.forward(_fused.silu_mul(gate_up))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj.forward(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, rope, backend, meta, kv_cache):
        x = x + self.self_attn(self.input_layernorm(x), rope, backend, meta, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_fused(self, h, residual, rope, backend, meta, kv_cache):
        """The same layer on the residual stream with fused add + RMSNorm (vLLM's contract):
        `h` is this layer's normalized input, `residual` the stream; both are updated."""
        # .forward, not __call__: the hook machinery costs a few us a call, 200 calls a step.
        h = self.self_attn.forward(h, rope, backend, meta, kv_cache)
        _fused.add_rms_norm(h, residual, self.post_attention_layernorm.weight,
                            self.post_attention_layernorm.eps)
        return self.mlp.forward(h)


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig, max_positions: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config, max_positions)


# checkpoint parameter name fragment -> (fused module fragment, shard)
_FUSED = {
    ".q_proj.": (".qkv_proj.", "q"), ".k_proj.": (".qkv_proj.", "k"), ".v_proj.": (".qkv_proj.", "v"),
    ".gate_proj.": (".gate_up_proj.", "gate"), ".up_proj.": (".gate_up_proj.", "up"),
}


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: LlamaConfig, max_positions: int | None = None):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, max_positions or config.max_position_embeddings)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    @property
    def max_positions(self) -> int:
        """Positions the rotary tables cover: the model's usable context length."""
        return self.model.rotary_emb.max_positions

    def tie_weights(self) -> None:
        """Share the embedding with the output projection (again after `to_empty`, which unties).
        Packed layers share the stored bytes instead (see load_weights)."""
        if (self.config.tie_word_embeddings and isinstance(self.lm_head, nn.Linear)
                and isinstance(self.model.embed_tokens, nn.Embedding)):
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, backend: AttentionBackend,
                meta: AttentionMetadata, kv_caches: list) -> torch.Tensor:
        """Hidden states [T, hidden] of a flat batch of T tokens (no padding)."""
        x = self.model.embed_tokens(input_ids)
        rotary = self.model.rotary_emb
        rope = rotary.tables() if backend.fuses_rope else rotary.cos_sin(positions, x.dtype)
        if x.dtype == torch.float32 and x.is_cpu and _fused.available("add_rms_norm"):
            # Residual stream with one fused add + RMSNorm between sublayers.
            residual, layers = x, self.model.layers
            h = layers[0].input_layernorm(residual)
            stack = self._layer_stack(kv_caches) if isinstance(meta, PagedMetadata) else None
            if stack is not None:  # every layer in one C++ call: no Python between ops
                _layers.decode_layers(h, residual, stack, rope[0], rope[1], meta.positions, meta.slot_mapping,
                                      meta.block_tables, meta.context_lens, meta.query_start_loc,
                                      meta.block_size, layers[0].self_attn.scale, self.model.norm.eps)
                return h
            for i, (layer, kv) in enumerate(zip(layers, kv_caches)):
                h = layer.forward_fused(h, residual, rope, backend, meta, kv)
                norm = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.model.norm
                _fused.add_rms_norm(h, residual, norm.weight, norm.eps)
            return h
        for layer, kv in zip(self.model.layers, kv_caches):
            x = layer(x, rope, backend, meta, kv)
        return self.model.norm(x)

    def runs_layers_in_one_call(self, backend: AttentionBackend) -> bool:
        """Whether a CPU forward on `backend` runs every layer in one decode_layers call."""
        return backend.fuses_rope and self._layer_stack([]) is not None

    def _layer_stack(self, kv_caches: list) -> _layers.LayerStack | None:
        """decode_layers' arguments when every layer can run in it (packed linear layers without
        biases, fp32 norms, CPU), else None. The weight list is built once."""
        if not _layers.enabled():
            return None
        cached = self.__dict__.get("_stack_weights")
        if cached and cached[0][0] is not getattr(self.model.layers[0].self_attn.qkv_proj, "packed", None):
            cached = None  # the weights were moved (quant.packed.place_packed_weights)
        if cached is None:
            cached = self._stack_weights = self._collect_stack_weights()
        if not cached:
            return None
        weights, fmts = cached
        cfg = self.config
        return _layers.LayerStack(weights, fmts, [kv[0] for kv in kv_caches], [kv[1] for kv in kv_caches],
                                  cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size)

    def _collect_stack_weights(self) -> tuple[list[torch.Tensor], list[int]] | tuple[()]:
        weights: list[torch.Tensor] = []
        fmts: list[int] = []
        layers = self.model.layers
        eps = {self.model.norm.eps}
        for i, layer in enumerate(layers):
            attn, mlp = layer.self_attn, layer.mlp
            lins = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            if not all(isinstance(m, PackedLinear) and m.bias is None and m.packed.is_cpu for m in lins):
                return ()
            nxt = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.model.norm
            norms = (layer.post_attention_layernorm, nxt)
            if not all(n.weight.dtype == torch.float32 and n.weight.is_cpu for n in norms):
                return ()
            eps |= {layer.input_layernorm.eps, layer.post_attention_layernorm.eps}
            weights += [m.packed for m in lins] + [n.weight.detach() for n in norms]
            fmts += [m.fmt for m in lins]
        return (weights, fmts) if len(eps) == 1 else ()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        return logits if logits.dtype == torch.float32 else logits.float()

    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_stack_weights", None)  # .to() and friends replace the tensors
        return super()._apply(fn, *args, **kwargs)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors (HF names) into parameters; returns the names loaded."""
        self.__dict__.pop("_stack_weights", None)
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if isinstance(tensor, RawWeight):  # stored bytes for a packed layer
                loaded |= self._load_raw(name, tensor)
                continue
            if name == "rope_freqs":
                self.model.rotary_emb.set_rope_freqs(tensor)
                continue
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            for frag, (fused, shard) in _FUSED.items():
                if frag in name:
                    mod_name, pname = name.replace(frag, fused).rsplit(".", 1)
                    self.get_submodule(mod_name).load_shard(shard, pname, tensor)
                    loaded.add(f"{mod_name}.{pname}:{shard}")
                    break
            else:
                if name not in params:
                    raise KeyError(f"unexpected weight {name!r} in checkpoint")
                p = params[name]
                if tuple(p.shape) != tuple(tensor.shape):
                    raise ValueError(f"weight {name}: expected {tuple(p.shape)}, got {tuple(tensor.shape)}")
                with torch.no_grad():
                    p.copy_(tensor)
                loaded.add(name)
        return loaded

    def _load_raw(self, name: str, raw: RawWeight) -> set[str]:
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return set()
        for frag, (fused, shard) in _FUSED.items():
            if frag in name:
                mod_name = name.replace(frag, fused).rsplit(".", 1)[0]
                self.get_submodule(mod_name).load_raw(shard, raw)
                return {f"{mod_name}.weight:{shard}"}
        mod_name = name.rsplit(".", 1)[0]
        module = self.get_submodule(mod_name)
        if not hasattr(module, "load_raw"):
            raise ValueError(f"weight {name}: stored bytes given to a layer that is not packed")
        module.load_raw(None, raw)
        if (mod_name == "model.embed_tokens" and self.config.tie_word_embeddings
                and isinstance(self.lm_head, PackedLinear)):
            self.lm_head.load_raw(None, raw)  # the output layer computes on the same bytes
        return {name}

    def expected_weights(self) -> set[str]:
        names = set()
        packed = {n: m for n, m in self.named_modules() if isinstance(m, (PackedLinear, PackedEmbedding))}
        for name, m in packed.items():
            if not (name == "lm_head" and self.config.tie_word_embeddings):
                names |= m.expected_names(name)
        for name, _ in self.named_parameters():
            mod_name, pname = name.rsplit(".", 1)
            mod = self.get_submodule(mod_name)
            if mod_name in packed:
                continue
            if isinstance(mod, MergedLinear):
                names.update(f"{name}:{s}" for s in mod.shard_offsets)
            else:
                names.add(name)
        return names
