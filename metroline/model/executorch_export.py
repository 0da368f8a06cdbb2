"""`metroline quantize MODEL --to executorch`: a `.pte` for ExecuTorch's runtime, XNNPACK-delegated.

The engine's model runs over a paged KV cache with metroline's own kernels; neither exports. So
the export builds `ExportLlama`, a plain-torch copy of the same network made for torch.export:

* one method, `forward(tokens[T], input_pos[T]) -> logits[T, vocab]`, T dynamic in
  1..max_seq_len (prefill a prompt in one call, then decode one token a call);
* a static KV cache: one [kv_heads, max_seq_len, head_dim] buffer pair per layer, written in
  place with index_put at `input_pos` (ExecuTorch keeps mutable buffers between calls), and
  attention over the whole cache with a causal mask `key_pos <= query_pos` (which also hides
  the slots not written yet, whose initial bytes the .pte does not fix);
* RoPE (rotate-half, the HF layout the loader produces), RMSNorm and GQA written as plain ops.

Weights (`bits`): 4 = int8 dynamic activations x int4 weights, symmetric, one scale per
`group_size` inputs of a row, scales fitted by HQQ ("8da4w", torchao's
Int8DynamicActivationIntxWeightConfig, the path ExecuTorch's own Llama export takes for
XNNPACK); 8 = the same with int8 weights, one min/max scale per row ("8da8w"); 32 = fp32 linears (a check of the graph itself). Under 4 bits the
output projection stays 8-bit, as metroline's and llama.cpp's 4-bit formats keep it. The
embedding table is stored int8 with one fp32 scale per row (a gather and a multiply: portable
ops, no custom kernel) under 4 and 8 bits. XNNPACK takes the linears (and what else it can);
the cache writes, gathers and masking run on ExecuTorch's portable kernels.

`executorch` (and the torchao it pins) is an optional extra: `pip install metroline[executorch]`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metroline.errors import MetrolineError

BITS = (4, 8, 32)
INSTALL_HINT = "pip install 'metroline[executorch]'"


def require_executorch():
    """Import executorch or raise a one-line MetrolineError naming the extra to install."""
    try:
        import executorch  # noqa: F401
        from executorch.exir import to_edge_transform_and_lower  # noqa: F401
    except ImportError as e:
        raise MetrolineError(f"--to executorch needs the optional executorch package ({e}): "
                             f"{INSTALL_HINT}") from None
    except Exception as e:  # a broken install (e.g. built against another torch): say which
        msg = " ".join(str(e).split())[:200]
        raise MetrolineError(f"executorch is installed but does not import with torch "
                             f"{torch.__version__} ({type(e).__name__}: {msg})") from None


# ------------------------------------------------------------------------------ the model

class _Norm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float().clone(), requires_grad=False)
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _linear(src: nn.Linear) -> nn.Linear:
    out = nn.Linear(src.in_features, src.out_features, bias=src.bias is not None)
    with torch.no_grad():
        out.weight.copy_(src.weight.float())
        if src.bias is not None:
            out.bias.copy_(src.bias.float())
    return out.requires_grad_(False)


class _QuantEmbedding(nn.Module):
    """int8 rows with one fp32 scale each (symmetric): lookup = gather, then scale."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        w = weight.detach().float()
        scale = (w.abs().amax(1, keepdim=True) / 127).clamp(min=1e-12)
        self.register_buffer("q", torch.round(w / scale).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)

    def forward(self, tokens):
        return self.q[tokens].float() * self.scale[tokens]


class _Layer(nn.Module):
    def __init__(self, src, cfg, max_seq_len: int):
        super().__init__()
        attn, mlp = src.self_attn, src.mlp
        self.input_norm = _Norm(src.input_layernorm.weight, src.input_layernorm.eps)
        self.post_norm = _Norm(src.post_attention_layernorm.weight, src.post_attention_layernorm.eps)
        self.qkv = _linear(attn.qkv_proj)
        self.o = _linear(attn.o_proj)
        self.gate_up = _linear(mlp.gate_up_proj)
        self.down = _linear(mlp.down_proj)
        self.h, self.kvh, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.ffn = cfg.intermediate_size
        self.scale = self.d ** -0.5
        self.register_buffer("k_cache", torch.zeros(self.kvh, max_seq_len, self.d))
        self.register_buffer("v_cache", torch.zeros(self.kvh, max_seq_len, self.d))

    def forward(self, x, cos, sin, input_pos, mask, written):
        T = x.shape[0]
        h, kvh, d = self.h, self.kvh, self.d
        qkv = self.qkv(self.input_norm(x))
        q, k, v = qkv.split([h * d, kvh * d, kvh * d], dim=-1)
        q, k, v = (t.contiguous().view(T, -1, d) for t in (q, k, v))
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        # The cache [kvh, S, d]: rows input_pos of each head written in place.
        self.k_cache.index_put_([torch.arange(kvh).unsqueeze(1), input_pos.unsqueeze(0)], k.transpose(0, 1))
        self.v_cache.index_put_([torch.arange(kvh).unsqueeze(1), input_pos.unsqueeze(0)], v.transpose(0, 1))
        g = h // kvh  # q head i reads kv head i // g (HF's repeat_kv order)
        qg = q.view(T, kvh, g, d).permute(1, 2, 0, 3)  # [kvh, g, T, d]
        scores = torch.matmul(qg, self.k_cache.unsqueeze(1).transpose(2, 3)) * self.scale  # [kvh, g, T, S]
        # The cache's initial state is not in the file (ExecuTorch plans mutable buffers with no
        # stored contents): slots not written yet are selected away, never added to, so that
        # whatever bytes they hold (even NaN) cannot reach the output.
        probs = torch.softmax(torch.where(mask, scores, float("-inf")), dim=-1)  # mask [T, S]
        v_cache = torch.where(written, self.v_cache, 0.0)  # written [S, 1]
        out = torch.matmul(probs, v_cache.unsqueeze(1))  # [kvh, g, T, d]
        out = out.permute(2, 0, 1, 3).reshape(T, h * d)
        x = x + self.o(out)
        gu = self.gate_up(self.post_norm(x))
        return x + self.down(F.silu(gu[:, :self.ffn]) * gu[:, self.ffn:])


def _rope(x, cos, sin):  # x [T, H, D]; cos/sin [T, 1, D]
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class ExportLlama(nn.Module):
    """metroline's Llama as plain torch ops with a static KV cache (see the module docstring)."""

    def __init__(self, model, max_seq_len: int, quant_embedding: bool = False):
        super().__init__()
        cfg = model.config
        if cfg.extra.get("sliding_window"):
            raise MetrolineError("--to executorch: sliding-window attention is not exported")
        self.config, self.max_seq_len = cfg, max_seq_len
        emb = model.model.embed_tokens.weight
        self.embed = _QuantEmbedding(emb) if quant_embedding else nn.Embedding.from_pretrained(emb.detach().float().clone())
        self.layers = nn.ModuleList(_Layer(layer, cfg, max_seq_len) for layer in model.model.layers)
        self.norm = _Norm(model.model.norm.weight, model.model.norm.eps)
        self.lm_head = _linear(model.lm_head)  # tied: a copy, quantized on its own
        cos, sin = model.model.rotary_emb.tables()
        if cos.shape[0] < max_seq_len:
            raise MetrolineError(f"--max-seq-len {max_seq_len} exceeds the model's {cos.shape[0]} positions")
        self.register_buffer("cos", cos[:max_seq_len].float().clone(), persistent=False)
        self.register_buffer("sin", sin[:max_seq_len].float().clone(), persistent=False)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        cos, sin = self.cos[input_pos].unsqueeze(1), self.sin[input_pos].unsqueeze(1)
        key_pos = torch.arange(self.max_seq_len)
        mask = key_pos.unsqueeze(0) <= input_pos.unsqueeze(1)  # [T, S]: causal, and written
        written = (key_pos <= input_pos.max()).unsqueeze(1)  # [S, 1]: slots written by now
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos, mask, written)
        return self.lm_head(self.norm(x))


def quantize_linears(net: ExportLlama, bits: int, group_size: int) -> dict[str, str]:
    """torchao weight quantization of every linear layer for XNNPACK; returns layer -> scheme."""
    if bits == 32:
        return {n: "fp32" for n, m in net.named_modules() if isinstance(m, nn.Linear)}
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    schemes: dict[str, str] = {}
    for name, m in net.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        if bits == 4 and name != "lm_head" and m.in_features % group_size == 0:
            schemes[name] = f"8da4w g{group_size}"
        else:  # 8 bits, the output projection under 4 bits, or rows the group does not divide
            schemes[name] = "8da8w per-row"
    for scheme, config in (
            (f"8da4w g{group_size}", Int8DynamicActivationIntxWeightConfig(
                weight_dtype=torch.int4, weight_granularity=PerGroup(group_size),
                # scales fitted by HQQ (as ExecuTorch's Llama export does by default): on the
                # default model +2.5 points of top-1 agreement over min/max scales
                intx_choose_qparams_algorithm="hqq_scale_only")),
            ("8da8w per-row", Int8DynamicActivationIntxWeightConfig(
                weight_dtype=torch.int8, weight_granularity=PerAxis(0)))):
        names = {n for n, s in schemes.items() if s == scheme}
        if names:
            quantize_(net, config, filter_fn=lambda m, fqn, names=names: fqn in names)
    return schemes


# ------------------------------------------------------------------------------- export

@dataclass
class ExportResult:
    output: str
    bytes: int
    bits: int
    group_size: int
    max_seq_len: int
    schemes: dict
    delegated: int  # XNNPACK delegate calls in the program
    seconds: float


def check_options(bits: int, group_size: int, max_seq_len: int) -> None:
    if bits not in BITS:
        raise MetrolineError(f"--executorch-bits must be one of {', '.join(map(str, BITS))}")
    if group_size < 1 or max_seq_len < 2:
        raise MetrolineError("--executorch-group-size must be >= 1 and --executorch-max-seq-len >= 2")


def build(model, bits: int = 4, group_size: int = 32, max_seq_len: int = 512) -> ExportLlama:
    check_options(bits, group_size, max_seq_len)
    net = ExportLlama(model, max_seq_len, quant_embedding=bits != 32).eval()
    net.schemes = quantize_linears(net, bits, group_size)
    return net


def export_pte(model, output: str, bits: int = 4, group_size: int = 32, max_seq_len: int = 512) -> ExportResult:
    """Build, quantize, torch.export (T dynamic), lower to XNNPACK and write `output` (.pte)."""
    require_executorch()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    t0 = time.perf_counter()
    net = build(model, bits, group_size, max_seq_len)
    n = min(4, max_seq_len)
    example = (torch.zeros(n, dtype=torch.long), torch.arange(n))
    T = torch.export.Dim("T", min=1, max=max_seq_len)
    with torch.no_grad():
        ep = torch.export.export(net, example, dynamic_shapes=({0: T}, {0: T}), strict=False)
        edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()],
                                           compile_config=EdgeCompileConfig(_check_ir_validity=False))
        prog = edge.to_executorch(ExecutorchBackendConfig(
            extract_delegate_segments=True,
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
            sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass()))
    delegated = sum(len(plan.delegates) for plan in prog.executorch_program.execution_plan)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "wb") as f:
        prog.write_to_file(f)
    return ExportResult(output, os.path.getsize(output), bits, group_size, max_seq_len,
                        net.schemes, delegated, time.perf_counter() - t0)


# ------------------------------------------------------------------------------- running

class PteRunner:
    """A .pte loaded in ExecuTorch's Python runtime (`executorch.runtime`): prefill + decode."""

    def __init__(self, path: str):
        require_executorch()
        from executorch.runtime import Runtime

        self.program = Runtime.get().load_program(path)
        self.path = path
        self.reset()

    def reset(self) -> None:
        """A fresh method: its mutable buffers (the KV cache) start again from zeros."""
        self.method = self.program.load_method("forward")

    def forward(self, tokens: list[int], start: int) -> torch.Tensor:
        ids = torch.tensor(tokens, dtype=torch.long)
        pos = torch.arange(start, start + len(tokens), dtype=torch.long)
        return self.method.execute([ids, pos])[0]

    def logprobs(self, ids: list[int]) -> torch.Tensor:
        """[len(ids) - 1, vocab] float64 log-probabilities, teacher-forced (as evaluate.logits_of)."""
        self.reset()
        return torch.log_softmax(self.forward(ids, 0)[:-1].double(), -1)

    def greedy(self, prompt: list[int], max_tokens: int) -> tuple[list[int], float, float]:
        """Greedy decode; returns (tokens, prefill seconds, decode seconds for all but the first)."""
        self.reset()
        t0 = time.perf_counter()
        nxt = int(self.forward(prompt, 0)[-1].argmax())
        t1 = time.perf_counter()
        out = [nxt]
        for i in range(max_tokens - 1):
            nxt = int(self.forward([nxt], len(prompt) + i)[-1].argmax())
            out.append(nxt)
        return out, t1 - t0, time.perf_counter() - t1


def compare(runner: PteRunner, reference, seqs: list[list[int]], attention: str = "auto") -> dict:
    """Teacher-forced agreement of the .pte with metroline's own forward of `reference`
    (a LoadedModel) on `attention` ("auto": what the engine serves; on a CPU with the kernels
    built, a K/V cache in fp16): max |logprob diff|, top-1 agreement, mean KL(reference || pte)."""
    from metroline.quant.evaluate import logits_of

    same, kl, n, worst = 0, 0.0, 0, 0.0
    for ids in seqs:
        p, q = logits_of(reference, ids, attention=attention), runner.logprobs(ids)
        same += int((p.argmax(-1) == q.argmax(-1)).sum())
        kl += float((p.exp() * (p - q)).sum())
        worst = max(worst, float((p - q).abs().max()))
        n += p.shape[0]
    return {"top1_agreement": same / n, "mean_kl": kl / n, "max_abs_logprob_diff": worst, "positions": n}
