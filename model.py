"""A Llama in one file (checkpoint.py reads and writes it; kvcache.py is its decoding cache).

The numbers are those of transformers' LlamaForCausalLM (tests/test_model.py checks logits to
1e-5 in float32). Module names mirror the Hugging Face keys, minus their leading "model.", so
loading (checkpoint.py) is a strict, shape-checked copy rather than a translation table.

What differs from the usual single-sequence Llama, and why (Re-Tuning, Sec. 3):
- the KV cache is an object owned by the caller and passed to step(); it is a pool of
  independent slots, because the recursive decoder keeps one cache per open context (a parent
  is suspended, with its cache intact, while its child runs in a fresh one);
- one forward call advances a ragged batch: each row is a slot with its own position and its
  own number of new tokens (a prefill of a child prompt beside a one-token decode step).
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from kvcache import KVCache, attention_dtype


@dataclass
class ModelArgs:
    """The shape of a Llama; checkpoint.py maps it to and from a transformers config.json."""
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # grouped-query attention when < n_heads
    head_dim: Optional[int] = None  # defaults to dim // n_heads
    hidden_dim: int = 688  # SwiGLU inner size
    vocab_size: int = 1024
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # {"rope_type": "linear" | "llama3", ...}
    max_seq_len: int = 2048
    tie_word_embeddings: bool = False
    bos_id: int = 1
    eos_id: int = 2
    dtype: str = "float32"  # dtype of the stored weights

    def __post_init__(self):
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.head_dim = self.head_dim or self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"num_attention_heads={self.n_heads} is not a multiple of num_key_value_heads={self.n_kv_heads}")
        kind = (self.rope_scaling or {}).get("rope_type", "default")
        if kind not in ("default", "linear", "llama3"):
            raise ValueError(f"unsupported rope type {kind!r} (rope_scaling.rope_type); supported: default, linear, llama3")


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Rotation frequency of each pair of channels (float32), with the config's scaling applied."""
    hd = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    s = args.rope_scaling or {}
    if s.get("rope_type") == "linear":  # position interpolation: positions divided by factor
        return inv_freq / s["factor"]
    if s.get("rope_type") == "llama3":  # Llama 3.1: slow only the low frequencies, blend the middle
        old, lo, hi = s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / lo, inv_freq / s["factor"], inv_freq)
        smooth = (old / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / s["factor"] + smooth * scaled
        middle = (wavelen >= old / hi) & (wavelen <= old / lo)
        return torch.where(middle, blended, scaled)
    return inv_freq


def apply_rope(x, cos, sin):
    # Hugging Face "rotate half" layout: channel i is paired with channel i + head_dim/2, not with
    # its neighbour as in Meta's original code. HF checkpoints permuted q/k weights to match it, so
    # using the interleaved form here would silently produce gibberish after a few tokens.
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # computed in float32, cast back before the gain exactly as transformers does
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, cache=None, layer=0, step=None):
        B, T, _ = x.shape  # batch, time, model dim
        # QKV, heads into a batch dimension: (B, nh, T, hd)
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        # RoPE at each token's absolute position
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:  # whole sequences: plain causal attention
            y = attend(q, k, v)
        else:  # the step's flat tokens (B = 1): store their keys/values, attend over each row's prefix
            cache.write(layer, step, k, v)
            y = torch.empty_like(q)
            for g in step.groups:  # rows back into a batch, queries padded to the group's length
                k_g, v_g = cache.prefix(layer, g, q.dtype)
                y_g = attend(q[0][:, g.take].transpose(0, 1), k_g, v_g, g.mask)  # (rows, nh, T, hd)
                y[0][:, g.put] = y_g.transpose(0, 1)[:, g.valid]
        # heads back into the channels, final projection into the residual stream
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def attend(q, k, v, mask=None):
    """Scaled dot-product attention, causal unless a mask says which keys each query sees.

    On the CPU, PyTorch's bfloat16 attention kernel is slower than its float32 one at training
    shapes (docs/REFERENCE.md, "Training speed", has the measurement), so bf16 inputs are attended
    in float32 there: faster and more exact. Autocast is switched off around it, else it would cast
    the inputs straight back to bf16.
    """
    if attention_dtype(q.device.type, q.dtype) == q.dtype:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
    with torch.autocast("cpu", enabled=False):
        y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=True)
    return y.to(q.dtype)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=False)

    def forward(self, x):  # SwiGLU (Shazeer 2020), as in Llama
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, cache=None, layer=0, step=None, out=None):
        """`out` (the last block only): the positions the output layer reads, an index into (B, T).
        Past attention nothing mixes positions, so the MLP runs on those alone: in training only
        the tokens that carry loss, when decoding one token per row."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, step)
        if out is not None:
            x = x[out]
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:  # one matrix for input and output (Press & Wolf 2017)
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        self.gradient_checkpointing = False

    def init_weights(self, seed: int):
        """Random init for training from scratch (N(0, 0.02), the transformers default)."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                nn.init.ones_(p)
            else:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)

    def forward(self, tokens, positions=None, select=None, hidden=False):
        """Whole sequences from position 0 (training, and the naive decoder): tokens (B, T) ->
        logits (B, T, V), or (N, V) at the N positions where the boolean (B, T) `select` is True.

        Right padding is harmless under the causal mask. `select` is for training: the output
        layer costs dim x vocab per position (49k columns on SmolLM2), and only completion
        positions carry loss, so only those are projected. `positions` (B, T) replaces each
        token's position id 0, 1, 2, ... (positions.py says why). `hidden`: the final normed
        states instead of logits, for training's fused output layer and loss (loss.py).
        """
        B, T = tokens.shape
        pos = torch.arange(T, device=tokens.device)[None, :].expand(B, T) if positions is None else positions.to(tokens.device)
        return self.blocks(tokens, pos, select, hidden=hidden)

    def step(self, tokens, cache: KVCache, slots, n_new=None, last_only=False):
        """One cached step of a ragged batch (the recursive decoder's): row b appends its first
        n_new[b] tokens (default: all T) to cache slot slots[b], at that slot's next positions;
        the rest of the row is padding, neither stored nor attended to. -> logits (B, T, V), or
        (B, V) at each row's last real token."""
        B, T = tokens.shape
        n_new = list(n_new) if n_new is not None else [T] * B
        plan = cache.reserve(list(slots), n_new, T)
        flat = tokens[plan.flat][None]  # (1, N): the real tokens only
        if last_only:
            return self.blocks(flat, plan.rope, (torch.zeros_like(plan.last), plan.last), cache, plan)
        logits = self.blocks(flat, plan.rope, None, cache, plan)[0]
        out = logits.new_zeros(B, T, logits.shape[-1])  # padding positions: zeros
        out[plan.flat] = logits
        return out

    def blocks(self, tokens, pos, out, cache=None, plan=None, hidden=False):
        """Embedding, RoPE at `pos`, the blocks, the norm and the output layer where `out` says
        (all positions, a boolean mask, or (rows, times) indices): what both entry points share."""
        freqs = pos[..., None].float() * self.inv_freq  # (B, T, hd/2), float32
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd) broadcast over heads
        x = self.embed_tokens(tokens)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for i, layer in enumerate(self.layers):
            out_i = out if i == len(self.layers) - 1 else None
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, None, i, None, out_i, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cache, i, plan, out_i)
        return self.norm(x) if hidden else self.lm_head(self.norm(x)).float()

    # Hugging Face checkpoint folders, as transformers names these two (checkpoint.py does the work;
    # it builds on this file, hence the imports at call time)
    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None) -> "Llama":
        from checkpoint import load_llama
        return load_llama(path, dtype, device)

    def save_pretrained(self, path):
        from checkpoint import save_llama
        save_llama(self, path)
