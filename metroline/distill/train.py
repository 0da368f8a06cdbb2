"""Train a student with fewer layers to match the teacher's next-token distributions.

- Student: the teacher's architecture with `layers` decoder layers (and `hidden` width, by
  default the teacher's). With the teacher's width it starts from the teacher: its
  embedding, final norm and head, and `layers` of its decoder layers spread evenly from the
  first to the last; with another width it starts at random.
- Data: ShareGPT conversations in the teacher's chat template (records 200..1999: the
  held-out evaluation slice is 2000..2199), cut into `seq_len`-token pieces.
- Loss: KL(teacher || student) over every position, the teacher's distribution computed
  (without gradients) by metroline's own forward on its served weights.
- The embedding and head stay frozen (tied, the largest matrix): only the layers and norms
  learn, which also keeps the student's vocabulary rows identical to the teacher's.
- Checkpoints (student, optimizer, step, losses) every `save_every` steps in `out/`; a run
  pointed at a folder with a checkpoint resumes from it. At the end the student is written
  as a Hugging Face folder (config.json, model.safetensors, tokenizer.json,
  tokenizer_config.json with the chat template) and the loss curve as loss.png.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metroline.errors import MetrolineError
from metroline.progress import progress as progress_bar

CHECKPOINT = "checkpoint.pt"


@dataclass
class DistillConfig:
    layers: int
    hidden: int | None = None  # None: the teacher's
    steps: int = 200
    seq_len: int = 128
    batch: int = 4
    lr: float = 3e-4
    warmup: int = 10
    save_every: int = 50
    seed: int = 0

    def check(self, teacher_layers: int) -> None:
        if not 1 <= self.layers <= teacher_layers:
            raise MetrolineError(f"--layers must be in 1..{teacher_layers} (the teacher's layers)")
        for name in ("steps", "seq_len", "batch"):
            if getattr(self, name) < 1:
                raise MetrolineError(f"--{name.replace('_', '-')} must be >= 1")
        if self.hidden is not None and (self.hidden < 32 or self.hidden % 32):
            raise MetrolineError("--hidden must be a multiple of 32 (at least 32)")
        if not self.lr > 0:
            raise MetrolineError("--lr must be > 0")


def student_config(teacher_cfg, cfg: DistillConfig):
    hidden = cfg.hidden or teacher_cfg.hidden_size
    scale = hidden / teacher_cfg.hidden_size
    heads = max(1, round(teacher_cfg.num_attention_heads * scale))
    kv = max(1, min(heads, round(teacher_cfg.num_key_value_heads * scale)))
    while heads % kv:
        kv -= 1
    return dataclasses.replace(
        teacher_cfg, num_hidden_layers=cfg.layers, hidden_size=hidden,
        intermediate_size=int(teacher_cfg.intermediate_size * scale) // 32 * 32 or 32,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads,
        tie_word_embeddings=True)


def make_student(teacher_fp32, cfg: DistillConfig):
    """The student module (fp32, trainable), initialised from the teacher where shapes allow."""
    from metroline.model.llama import LlamaForCausalLM

    tcfg = teacher_fp32.config
    scfg = student_config(tcfg, cfg)
    torch.manual_seed(cfg.seed)
    student = LlamaForCausalLM(scfg, max_positions=max(cfg.seq_len, 256))
    if scfg.hidden_size == tcfg.hidden_size:
        t = teacher_fp32.model
        n = tcfg.num_hidden_layers
        picks = [round(i * (n - 1) / max(1, cfg.layers - 1)) for i in range(cfg.layers)] if cfg.layers > 1 else [0]
        with torch.no_grad():
            student.model.embed_tokens.weight.copy_(t.embed_tokens.weight)
            student.model.norm.weight.copy_(t.norm.weight)
            for i, j in enumerate(picks):
                student.model.layers[i].load_state_dict(t.layers[j].state_dict())
        student.picked_layers = picks
    else:
        with torch.no_grad():
            for name, p in student.named_parameters():
                if "norm" in name:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02)
    student.tie_weights()
    student.model.embed_tokens.weight.requires_grad_(False)  # frozen (and tied to the head)
    return student


def train_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """[B, T, vocab] logits of a batch of sequences, differentiable (plain torch ops: causal
    SDPA, RoPE, RMSNorm, SiLU), for training; the engine's paged forward is for serving."""
    from metroline.model.llama import apply_rotary

    B, T = ids.shape
    cfg = model.config
    x = model.model.embed_tokens(ids)
    cos, sin = model.model.rotary_emb.cos_sin(torch.arange(T).repeat(B), x.dtype)
    H, KV, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

    def norm(h, mod):
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + mod.eps) * mod.weight

    for layer in model.model.layers:
        a = layer.self_attn
        h = norm(x, layer.input_layernorm)
        qkv = F.linear(h, a.qkv_proj.weight, a.qkv_proj.bias).reshape(B * T, H + 2 * KV, D)
        qk = apply_rotary(qkv[:, :H + KV], cos, sin)
        q = qk[:, :H].reshape(B, T, H, D).transpose(1, 2)
        k = qk[:, H:].reshape(B, T, KV, D).transpose(1, 2)
        v = qkv[:, H + KV:].reshape(B, T, KV, D).transpose(1, 2)
        if KV != H:
            k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, H * D)
        x = x + F.linear(o, a.o_proj.weight, a.o_proj.bias)
        m = layer.mlp
        gate, up = F.linear(norm(x, layer.post_attention_layernorm), m.gate_up_proj.weight,
                            m.gate_up_proj.bias).split(m.intermediate_size, dim=-1)
        x = x + F.linear(F.silu(gate) * up, m.down_proj.weight, m.down_proj.bias)
    return F.linear(norm(x, model.model.norm), model.lm_head.weight)


def training_pieces(tok, seq_len: int, count: int, first: int = 200, last: int = 2000) -> list[list[int]]:
    from metroline.quant.evaluate import sharegpt_chat_ids

    out: list[list[int]] = []
    for ids in sharegpt_chat_ids(tok, first, last):
        for s in range(0, len(ids) - seq_len + 1, seq_len):
            out.append(ids[s:s + seq_len])
            if len(out) == count:
                return out
    if not out:
        raise MetrolineError("no training text: the ShareGPT records gave no piece of that length")
    return out


def distill(teacher: str | None, out: str, cfg: DistillConfig, progress: bool = True) -> dict:
    """Train (or resume) a student of `teacher` into folder `out`; returns a summary."""
    from metroline.model.loader import load_model
    from metroline.quant.evaluate import logits_of

    served = load_model(teacher, show_progress=progress)  # the teacher as served: its targets
    fp32 = load_model(teacher, weights="fp32", show_progress=False)  # where the student starts
    cfg.check(served.config.num_hidden_layers)
    os.makedirs(out, exist_ok=True)
    student = make_student(fp32.model, cfg)
    del fp32
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    step, losses = 0, []
    ckpt_path = os.path.join(out, CHECKPOINT)
    if os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, weights_only=False)
        if ck["config"]["layers"] != cfg.layers or ck["config"].get("hidden") != cfg.hidden:
            raise MetrolineError(f"{ckpt_path} is a run with other --layers/--hidden; use another -o")
        student.load_state_dict(ck["student"])
        opt.load_state_dict(ck["optimizer"])
        step, losses = ck["step"], ck["losses"]
    pieces = training_pieces(served.tokenizer, cfg.seq_len, cfg.steps * cfg.batch)
    bar = progress_bar(cfg.steps, "distilling", progress, unit="step", initial=step)
    student.train()
    while step < cfg.steps:
        batch = [pieces[(step * cfg.batch + b) % len(pieces)] for b in range(cfg.batch)]
        with torch.no_grad():
            target = torch.stack([logits_of(served, ids + [ids[-1]]).float() for ids in batch])  # log-probs
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup)) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        logp = torch.log_softmax(train_logits(student, torch.tensor(batch)), -1)
        loss = (target.exp() * (target - logp)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(kl=f"{losses[-1]:.3f}")
        if step % cfg.save_every == 0 or step == cfg.steps:
            torch.save({"student": student.state_dict(), "optimizer": opt.state_dict(), "step": step,
                        "losses": losses, "config": dataclasses.asdict(cfg)}, ckpt_path)
    bar.close()
    student.eval()
    save_student(student, served.tokenizer, out)
    _plot_losses(losses, os.path.join(out, "loss.png"))
    return {"output": out, "steps": step, "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "parameters": sum(p.numel() for p in student.parameters()),
            "picked_layers": getattr(student, "picked_layers", None)}


def save_student(model, tokenizer, out: str) -> None:
    """`model` as a Hugging Face Llama folder (q/k/v and gate/up split back into their
    checkpoint names), with the teacher's tokenizer and chat template."""
    from safetensors.torch import save_file

    cfg = model.config
    tensors = {"model.embed_tokens.weight": model.model.embed_tokens.weight, "model.norm.weight": model.model.norm.weight}
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}."
        a, m = layer.self_attn, layer.mlp
        for shard, (off, size) in a.qkv_proj.shard_offsets.items():
            tensors[f"{p}self_attn.{shard}_proj.weight"] = a.qkv_proj.weight[off:off + size]
        tensors[f"{p}self_attn.o_proj.weight"] = a.o_proj.weight
        for shard, (off, size) in m.gate_up_proj.shard_offsets.items():
            tensors[f"{p}mlp.{shard}_proj.weight"] = m.gate_up_proj.weight[off:off + size]
        tensors[f"{p}mlp.down_proj.weight"] = m.down_proj.weight
        tensors[f"{p}input_layernorm.weight"] = layer.input_layernorm.weight
        tensors[f"{p}post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
    save_file({k: v.detach().contiguous().float() for k, v in tensors.items()}, os.path.join(out, "model.safetensors"))
    eos = sorted(tokenizer.stop_token_ids)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
              "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
              "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
              "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
              "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling,
              "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": True,
              "torch_dtype": "float32", "eos_token_id": eos[0] if eos else None,
              "bos_token_id": tokenizer.bos_token_id}
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    with open(os.path.join(out, "tokenizer.json"), "w") as f:
        f.write(tokenizer.backend.to_str())
    tk = {"chat_template": tokenizer.chat_template, "add_bos_token": False, "add_eos_token": False}
    eos_text = tokenizer.backend.id_to_token(eos[0]) if eos else None
    if eos_text:
        tk["eos_token"] = eos_text
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(tk, f, indent=1)


def _plot_losses(losses: list[float], path: str) -> None:
    if not losses:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set_xlabel("step")
    ax.set_ylabel("KL(teacher || student), nats per token")
    ax.set_yscale("log")
    ax.set_title("distillation loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
