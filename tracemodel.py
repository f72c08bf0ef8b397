"""A stand-in model that emits the true trace, to drive the recursive decoder in tests and benchmarks.

After any prefix of a true context (tasks.context_ids of the task's trace) it puts all its
logit mass on that context's next token, and on EOS off the true trace. It keeps each cache
slot's token history itself, so decoding with it checks that every context is fed exactly the
tokens training builds. Wrapping a real Llama (`inner`) runs that model on the same tokens, so a
benchmark (bench/decode.py) pays a real model's cost for a realistic call tree, whatever the
model's weights.
"""
import torch

from model import ModelArgs
from tasks import TASKS, context_ids


class TraceModel(torch.nn.Module):
    def __init__(self, tok, task, method, problems, inner=None):
        super().__init__()
        self.tok, self.inner, self.next, self.history = tok, inner, {}, {}
        self.args = inner.args if inner is not None else ModelArgs(dim=8, n_layers=1, n_heads=1, vocab_size=tok.vocab_size)
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        for p in problems:
            for segs in TASKS[task].trace(p, method):
                ids, mask = context_ids(tok, segs)
                for t in range(len(ids) - 1):
                    if mask[t + 1]:
                        self.next[tuple(ids[:t + 1])] = ids[t + 1]

    def predict(self, histories, like):
        """One-hot logits on the next true token of each history (EOS off the true trace)."""
        logits = torch.zeros(len(histories), *like.shape[-1:], dtype=like.dtype, device=like.device)
        nxt = [self.next.get(tuple(h), self.tok.eos_id) for h in histories]
        logits[torch.arange(len(histories)), torch.tensor(nxt)] = 1.0
        return logits

    def forward(self, tokens, positions=None, select=None, hidden=False):
        like = torch.zeros(self.args.vocab_size)
        if self.inner is not None:
            self.inner(tokens, select=select)
        logits = torch.stack([self.predict([r[:t + 1] for t in range(len(r))], like) for r in tokens.tolist()])
        return logits if select is None else logits[select]  # as Llama.forward: only the selected positions

    def step(self, tokens, cache, slots, n_new=None, last_only=False):
        n_new = list(n_new) if n_new is not None else [tokens.shape[1]] * len(slots)
        for row, slot, n in zip(tokens.tolist(), slots, n_new):  # an empty slot starts a new history
            self.history[slot] = (self.history.get(slot, []) if cache.length[slot] else []) + row[:n]
        if self.inner is not None:
            like = self.inner.step(tokens, cache, slots, n_new, last_only)
        else:  # hold the tokens in the cache, as the model would; nothing is computed
            like = torch.zeros(self.args.vocab_size)
            cache.reserve(slots, n_new, tokens.shape[1])
        return self.predict([self.history[s] for s in slots], like)
