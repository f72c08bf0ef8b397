"""A Llama in one file: the network and its key/value cache (checkpoint.py reads and writes it).

The numbers are those of transformers' LlamaForCausalLM (tests/test_model.py checks logits to
1e-5 in float32). Module names mirror the Hugging Face keys, minus their leading "model.", so
loading (checkpoint.py) is a strict, shape-checked copy rather than a translation table.

What differs from the usual single-sequence Llama, and why (Re-Tuning, Sec. 3):
- the KV cache is an object owned by the caller and passed to forward(); it is a pool of
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
        # restore time as the batch dimension, final projection into the residual stream
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def attend(q, k, v, mask=None):
    """Scaled dot-product attention, causal unless a mask says which keys each query sees.

    On the CPU, PyTorch's bfloat16 attention kernel is slower than its float32 one at training
    shapes (docs/REFERENCE.md, "Training speed", has the measurement), so bf16 inputs are attended
    in float32 there: faster and more exact. Autocast is switched off around it, else it would cast
    the inputs straight back to bf16.
    """
    if q.device.type != "cpu" or q.dtype != torch.bfloat16:
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


@dataclass
class Group:
    """Rows of one step that attend together: their queries padded to (B, T) from the flat tokens."""
    take: torch.Tensor  # (B, T) index of each query in the step's flat tokens (padding: any index)
    put: torch.Tensor  # (N,) the flat index of each real query, row by row
    valid: torch.Tensor  # (B, T) True at real queries
    pages: torch.Tensor  # (B, n_pages) each row's pages in order, padded with the null page 0
    mask: torch.Tensor  # (B, 1, T, S) True where a query may attend to a cached key


@dataclass
class Step:
    """Where one ragged forward call reads and writes in a KVCache (built on the host). Its real
    tokens are flattened into one sequence (rows back to back, no padding), so every projection
    and MLP runs once over exactly them; only attention needs rows, and it gets them in two
    groups: one-token rows (decoding) and longer ones (prefills), else a decoding row would be
    padded to a prefill's length and attend for all of it."""
    rope: torch.Tensor  # (1, N) each flat token's RoPE position id
    write_page: torch.Tensor  # (N,) the page and offset each flat token's keys/values go to
    write_off: torch.Tensor
    last: torch.Tensor  # (B,) each row's last token in the flat sequence
    flat: tuple  # (rows, times): where the flat tokens sit in the (B, T) input
    groups: list


class KVCache:
    """Keys and values of many independent sequences ("slots"), owned by the caller, in pages.

    Storage k, v: (n_layers, n_pages, page_size, n_kv_heads, head_dim). A slot is a list of pages
    holding its tokens in order, so memory follows what each context really holds (a recursion
    opens many short contexts and few long ones) and a released slot's pages are reused at once.
    Page 0 stays zero: rows with fewer pages are padded with it, and masked keys must be finite
    (a masked-out NaN still poisons softmax @ V). Slots, pages and lengths live on the host: the
    decoder's control flow needs them anyway, so planning a step costs no device sync.
    """

    def __init__(self, args: ModelArgs, n_slots: int, max_len: int, device=None, dtype=torch.float32, page_size=16):
        self.page_size, self.max_len = page_size, max_len
        n_pages = 1 + 2 * n_slots  # n_slots only sizes the first allocation; storage doubles when full
        shape = (args.n_layers, n_pages, page_size, args.n_kv_heads, args.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.free_pages = list(range(n_pages - 1, 0, -1))
        self.length, self.pages, self.free, self.positions = [], [], [], []

    def alloc(self, positions: Optional[torch.Tensor] = None) -> int:
        """A fresh, empty slot; `positions` gives its i-th token the position id positions[i]
        instead of i (positions.py: stretched positions at test)."""
        if not self.free:
            self.free.append(len(self.length))
            self.length.append(0)
            self.pages.append([])
            self.positions.append(None)
        slot = self.free.pop()
        self.positions[slot] = positions
        return slot

    def release(self, slot: int):
        self.free_pages += self.pages[slot]
        self.pages[slot], self.length[slot], self.positions[slot] = [], 0, None
        self.free.append(slot)

    def in_use(self) -> int:
        return len(self.length) - len(self.free)

    def new_page(self) -> int:
        if not self.free_pages:
            n = self.k.shape[1]
            self.k, self.v = (torch.cat([buf, torch.zeros_like(buf)], dim=1) for buf in (self.k, self.v))
            self.free_pages = list(range(2 * n - 1, n - 1, -1))
        return self.free_pages.pop()

    def reserve(self, slots: list, n_new: list, T: int) -> Step:
        """Room for n_new[b] more tokens in slot slots[b], and where a forward call of T-token rows
        writes and reads them. The one place a slot's length grows: the tokens count as held from
        here on, so callers (the model, or a stand-in that computes nothing) never count them."""
        P = self.page_size
        if max(self.length[s] + n for s, n in zip(slots, n_new)) > self.max_len:
            raise ValueError(f"KV cache overflow: a sequence would exceed max_len={self.max_len}")
        start = torch.tensor([self.length[s] for s in slots])
        pos = start[:, None] + torch.arange(T)[None, :]  # (B, T)
        rope = self.own_positions(slots, n_new, pos)
        for s, n in zip(slots, n_new):  # pages for the new tokens, which the slot holds from now on
            while len(self.pages[s]) * P < self.length[s] + n:
                self.pages[s].append(self.new_page())
            self.length[s] += n
        n_t = torch.tensor(n_new)
        rows, ts = (torch.arange(T)[None, :] < n_t[:, None]).nonzero(as_tuple=True)  # row by row
        first = torch.cumsum(n_t, 0) - n_t  # each row's first token in the flat sequence
        wpos, dev = pos[rows, ts], self.k.device
        width = max(len(self.pages[s]) for s in slots)
        table = torch.tensor([self.pages[s] + [0] * (width - len(self.pages[s])) for s in slots])  # (B, pages)
        groups = [self.group(b, pos, n_t, first, table) for b in (n_t == 1, n_t > 1) if b.any()]
        return Step(rope[rows, ts][None].to(dev), table[rows, wpos // P].to(dev), (wpos % P).to(dev),
                    (first + n_t - 1).to(dev), (rows.to(dev), ts.to(dev)), groups)

    def group(self, which, pos, n_new, first, table) -> Group:
        """The rows `which` (a (B,) mask) as one attention call: their queries, pages and mask."""
        rows = which.nonzero().flatten()
        n, T = n_new[rows], int(n_new[rows].max())
        valid = torch.arange(T)[None, :] < n[:, None]
        take = torch.where(valid, first[rows, None] + torch.arange(T)[None, :], 0)
        p = pos[rows, :T]
        S = int(p[valid].max()) + 1
        pages = table[rows, :-(-S // self.page_size)]
        mask = torch.arange(S)[None, None, None, :] <= p[:, None, :, None]  # causal over absolute positions
        dev = self.k.device
        return Group(take.to(dev), take[valid].to(dev), valid.to(dev), pages.to(dev), mask.to(dev))

    def own_positions(self, slots, n_new, pos):
        """RoPE position ids of the new tokens: `pos` (their index) unless a slot has its own ids
        (padding keeps the index). Contiguous decoding, the usual case, copies nothing."""
        if all(self.positions[s] is None for s in slots):
            return pos
        rope = pos.clone()
        for b, (s, n) in enumerate(zip(slots, n_new)):
            own, at = self.positions[s], self.length[s]
            if own is not None:
                if at + n > len(own):
                    raise ValueError(f"slot {s} has position ids for {len(own)} tokens, not {at + n}")
                rope[b, :n] = own[at:at + n]
        return rope

    def write(self, layer: int, step: Step, k, v):
        """Store the new keys/values (1, h, N, hd) of the step's flat tokens."""
        for buf, new in ((self.k, k), (self.v, v)):
            buf[layer][step.write_page, step.write_off] = new[0].transpose(0, 1).to(buf.dtype)

    def prefix(self, layer: int, g: Group, dtype):
        """Each row of a group's full prefix of keys and values, (B, h, S, hd)."""
        (B, width), S = g.pages.shape, g.mask.shape[-1]
        out = []
        for buf in (self.k, self.v):
            pages = buf[layer]  # (n_pages, page_size, h, hd), contiguous
            prefix = pages.index_select(0, g.pages.flatten()).view(B, width * self.page_size, *pages.shape[2:])[:, :S]
            out.append(prefix.transpose(1, 2).to(dtype))
        return out


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
