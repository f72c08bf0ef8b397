"""The recursive decoder's key/value cache: many independent contexts ("slots") in one pool of
pages, and the plan of one ragged forward call over them (model.Llama.step reads and writes it;
decoder.py decides which context owns which slot).

A recursion opens many short contexts and few long ones, and a parent waits, its cache intact,
while its child runs (Re-Tuning, Sec. 3), so the pool hands out pages as contexts grow and takes
them back when they close. Attention needs each row's prefix as one batch; gathering it from the
pages every step costs more than attention itself once contexts are long (a scratchpad's), so
the decoding rows' prefixes are also kept as one batch between steps (`Rows`).
"""
from dataclasses import dataclass
from typing import Optional

import torch


def attention_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """What model.attend computes in: float32 for bf16 on the CPU (PyTorch's bf16 kernel is slower
    there), else the inputs' own dtype."""
    return torch.float32 if device_type == "cpu" and dtype == torch.bfloat16 else dtype


@dataclass
class Group:
    """Rows of one step that attend together: their queries padded to (B, T) from the flat tokens."""
    take: torch.Tensor  # (B, T) index of each query in the step's flat tokens (padding: any index)
    put: torch.Tensor  # (N,) the flat index of each real query, row by row
    valid: torch.Tensor  # (B, T) True at real queries
    pages: torch.Tensor  # (B, n_pages) each row's pages in order, padded with the null page 0
    mask: torch.Tensor  # (B, 1, T, S) True where a query may attend to a cached key
    # None: read from the pages. One-token rows kept in KVCache.rows: True, gather them there
    # afresh; False, copy in only each row's new key/value, from (page, offset) to position `at`
    fresh: Optional[bool] = None
    new: tuple = ()  # (page, offset, at, row), each (B,)


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


@dataclass
class Rows:
    """The last step's one-token rows with their prefixes as one batch, in the dtype attention
    computes in: k, v (n_layers, B, h, cap, hd). While the same contexts decode step after step
    (a scratchpad's hundreds of tokens; a batch of problems in lockstep), each step appends one
    key and value per row and attends over views of these, instead of gathering and casting
    every cached row again. A row that joins or leaves (its context opens, prefills, calls or
    returns) changes the rows."""
    key: tuple  # (slot, generation) of each row in order: a reused slot is another context
    length: list  # each row's tokens held
    cap: int = 0  # positions the storage holds per row
    k: Optional[torch.Tensor] = None  # None until attention first reads the same rows twice
    v: Optional[torch.Tensor] = None


class KVCache:
    """Keys and values of many independent sequences ("slots"), owned by the caller, in pages.

    Storage k, v: (n_layers, n_pages, page_size, n_kv_heads, head_dim). A slot is a list of pages
    holding its tokens in order, so memory follows what each context really holds (a recursion
    opens many short contexts and few long ones) and a released slot's pages are reused at once.
    Page 0 stays zero: rows with fewer pages are padded with it, and masked keys must be finite
    (a masked-out NaN still poisons softmax @ V). Slots, pages and lengths live on the host: the
    decoder's control flow needs them anyway, so planning a step costs no device sync.
    `keep_rows=False` gathers every step (the reference the kept rows are tested against); the
    default keeps rows on the CPU only: they hold the decoding rows' prefixes a second time (in
    float32 for a bf16 model) for the cache's life, and on a GPU that memory is dearer and the
    gain unmeasured.
    """
    room = 256  # positions the kept rows can grow by before they are gathered into larger storage

    def __init__(self, args, n_slots: int, max_len: int, device=None, dtype=torch.float32, page_size=16,
                 keep_rows=None):
        self.page_size, self.max_len = page_size, max_len
        n_pages = 1 + 2 * n_slots  # n_slots only sizes the first allocation; storage doubles when full
        shape = (args.n_layers, n_pages, page_size, args.n_kv_heads, args.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.keep_rows = self.k.device.type == "cpu" if keep_rows is None else keep_rows
        self.free_pages = list(range(n_pages - 1, 0, -1))
        self.length, self.pages, self.free, self.positions, self.generation = [], [], [], [], []
        self.rows, self.row_store = None, None

    def alloc(self, positions: Optional[torch.Tensor] = None) -> int:
        """A fresh, empty slot; `positions` gives its i-th token the position id positions[i]
        instead of i (positions.py: stretched positions at test)."""
        if not self.free:
            self.free.append(len(self.length))
            self.length.append(0)
            self.pages.append([])
            self.positions.append(None)
            self.generation.append(0)
        slot = self.free.pop()
        self.positions[slot] = positions
        self.generation[slot] += 1
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
        one = n_t == 1
        groups = [self.group(b, pos, n_t, first, table) for b in (one, n_t > 1) if b.any()]
        if self.keep_rows and one.any():
            self.plan_rows(groups[0], one, slots, n_new, table, pos)
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

    def plan_rows(self, g: Group, one, slots, n_new, table, pos):
        """Keep the one-token rows' prefixes (`one`, a (B,) mask) in self.rows once the same rows
        decode a second step in a row (same contexts, same order, one token longer each): gathered
        then, with `room` to grow, and from there on only their new keys and values copied in.
        Rows that change every step (a recursion's contexts open and close) are gathered as
        usual: keeping them would only add a copy."""
        mine = [s for s, n in zip(slots, n_new) if n == 1]
        key, held, S = tuple((s, self.generation[s]) for s in mine), [self.length[s] for s in mine], g.mask.shape[-1]
        old = self.rows
        if not (old is not None and old.key == key and old.length == [n - 1 for n in held]):
            self.rows = Rows(key, held)
            return
        rows = one.nonzero().flatten()
        g.fresh = old.k is None or old.cap < S  # None: never read (a stand-in model that computes nothing)
        if g.fresh:  # prefix() gathers them, into storage for `room` more positions
            self.rows = Rows(key, held, min(self.max_len, S + self.room))
        self.rows.length = held
        at, dev = pos[rows, 0], self.k.device  # each row's new token
        g.new = (table[rows, at // self.page_size].to(dev), (at % self.page_size).to(dev), at.to(dev),
                 torch.arange(len(mine), device=dev))

    def row_buffers(self, B: int, cap: int, dtype) -> list:
        """Views (n_layers, B, h, cap, hd) of the rows' key and value storage, in `dtype`, grown
        when too small and zero at first (masked positions must hold finite numbers, as page 0 does)."""
        L, _, _, h, hd = self.k.shape
        n = L * B * h * cap * hd
        if self.row_store is None or self.row_store[0].numel() < n or self.row_store[0].dtype != dtype:
            self.row_store = None
            self.row_store = [torch.zeros(n, device=self.k.device, dtype=dtype) for _ in range(2)]
        return [buf[:n].view(L, B, h, cap, hd) for buf in self.row_store]

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

    def prefix(self, layer: int, g: Group, dtype) -> list:
        """Each row of a group's full prefix of keys and values, (B, h, S, hd): gathered from the
        pages in `dtype`, or (kept rows) views of self.rows in the dtype attention computes in."""
        if g.fresh is None:
            return [self.gathered(buf, layer, g).to(dtype) for buf in (self.k, self.v)]
        S, (page, off, at, b), rows = g.mask.shape[-1], g.new, self.rows
        if rows.k is None:  # the first layer of a fresh gather
            rows.k, rows.v = self.row_buffers(len(at), rows.cap, attention_dtype(self.k.device.type, dtype))
        for buf, kept in ((self.k, rows.k[layer]), (self.v, rows.v[layer])):
            if g.fresh:
                kept[:, :, :S] = self.gathered(buf, layer, g)
            else:  # after write(): the new tokens' keys/values are in their pages
                kept[b, :, at] = buf[layer][page, off].to(kept.dtype)
        return [rows.k[layer][:, :, :S], rows.v[layer][:, :, :S]]

    def gathered(self, buf, layer: int, g: Group):
        """One layer's keys or values of the group's rows, read from their pages: (B, h, S, hd)."""
        (B, width), S = g.pages.shape, g.mask.shape[-1]
        pages = buf[layer]  # (n_pages, page_size, h, hd), contiguous
        return pages.index_select(0, g.pages.flatten()).view(B, width * self.page_size, *pages.shape[2:])[:, :S].transpose(1, 2)
