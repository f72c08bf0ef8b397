"""The recursive decoder of Re-Tuning (paper Sec. 3, Fig. 2): a call stack per problem, a KV cache
per context, every open context of every problem advanced together.

A problem starts as one context holding its prompt. Greedy decoding runs until EOS; the
completion is then read with the rules of tasks.read_completion:
  - a call ("... Call: <sub-problem>\\n"): the context is suspended with its cache intact and a
    child context is pushed, prefilled with "<sub-problem>\\nSolution: ";
  - an answer: the child is popped, its cache slot released, and the parent's cache is extended
    with only the resume tokens "Return: <value>\\nAnswer: " (never re-encoding its prefix);
    the top context's answer is the problem's answer.
Tokens are built exactly as training builds them (tasks.prompt_ids / resume_ids, EOS after every
completion), so the model sees at inference what it saw in training.

`decode` is the fast version; `decode_naive` is the release's algorithm (every token of every
context recomputed from scratch, one problem at a time), kept as the test oracle.
"""
from dataclasses import dataclass, field
from typing import Optional

import torch

from model import KVCache, ModelArgs
from tasks import TASKS, child_prompt, completion_ids, context_ids, prompt_ids, read_completion, resume_ids, resume_text


@dataclass
class Limits:
    """Guards: a problem that hits one fails with a reason instead of stalling the batch."""
    max_depth: int = 64  # open contexts on one stack
    max_contexts: int = 256  # contexts opened by one problem
    max_new: int = 256  # tokens in one completion
    max_context_len: int = 1024  # tokens in one context (also the KV cache's max_len)


def eval_limits(task, method, tok, problems) -> Limits:
    """Guards sized from the true traces: about twice the longest completion, context and depth."""
    comp, ctx, n_ctx = 8, 8, 1
    for p in problems:
        trace = TASKS[task].trace(p, method)
        n_ctx = max(n_ctx, len(trace))
        for segs in trace:
            comp = max([comp] + [len(completion_ids(tok, c)) for c in segs[1::2]])
            ctx = max(ctx, len(context_ids(tok, segs)[0]))
    return Limits(max_depth=2 * n_ctx + 4, max_contexts=2 * n_ctx + 4,
                  max_new=2 * comp + 8, max_context_len=2 * ctx + 16)


@dataclass
class Context:
    prompt: str
    depth: int
    slot: int = -1  # KV-cache slot (fast decoder only)
    ids: list = field(default_factory=list)  # every token fed to this context so far
    pending: list = field(default_factory=list)  # tokens to feed at the next step
    generated: list = field(default_factory=list)  # the completion in progress
    segments: list = field(default_factory=list)  # prompt, completion, resume, ... as text
    children: list = field(default_factory=list)


@dataclass
class Solve:
    """One problem's state, and afterwards its result and call tree."""
    problem: str
    root: Context
    stack: list
    answer: Optional[str] = None
    error: Optional[str] = None
    n_contexts: int = 1
    n_generated: int = 0

    @property
    def done(self):
        return self.answer is not None or self.error is not None


def start(task, problem, method, tok) -> Solve:
    prompt = TASKS[task].prompt(problem, method)
    root = Context(prompt, depth=1, pending=prompt_ids(tok, prompt), segments=[prompt])
    return Solve(problem, root, [root])


def on_token(s: Solve, token: int, task, method, tok, lim: Limits):
    """Advance problem `s` by one sampled token: extend, call, return or finish.

    Returns ("push", child) or ("pop", child) so the caller can manage cache slots, else None.
    """
    ctx = s.stack[-1]
    s.n_generated += 1
    if token >= tok.vocab_size:  # a checkpoint's vocabulary may be padded past the tokenizer's
        s.error = f"token id {token} is outside the tokenizer"
        return None
    if token != tok.eos_id:
        ctx.generated.append(token)
        ctx.pending = [token]
        if len(ctx.generated) > lim.max_new:
            s.error = f"completion longer than {lim.max_new} tokens"
        return None
    text = tok.decode(ctx.generated)
    ctx.segments.append(text)
    ctx.generated = []
    kind, value = read_completion(text) if method == "retuning" else ("answer", text)
    if kind == "error":
        s.error = value
    elif kind == "call":
        return push_call(s, value, tok, lim)
    elif len(s.stack) == 1:  # the top context answered: the problem's answer
        s.answer = TASKS[task].parse(method, text)
        if s.answer is None:
            s.error = f"unreadable answer {text!r}"
    else:
        return pop_return(s, value, tok)
    return None


def fits(s: Solve, lim: Limits) -> bool:
    """False (and the problem failed) when feeding the pending tokens would overflow the context."""
    ctx = s.stack[-1]
    if len(ctx.ids) + len(ctx.pending) > lim.max_context_len:
        s.error = f"context longer than {lim.max_context_len} tokens"
    return s.error is None


def push_call(s: Solve, sub: str, tok, lim: Limits):
    if len(s.stack) >= lim.max_depth:
        s.error = f"recursion deeper than {lim.max_depth}"
        return None
    if s.n_contexts >= lim.max_contexts:
        s.error = f"more than {lim.max_contexts} contexts"
        return None
    prompt = child_prompt(sub)
    child = Context(prompt, depth=len(s.stack) + 1, pending=prompt_ids(tok, prompt), segments=[prompt])
    s.stack[-1].children.append(child)
    s.stack[-1].pending = []  # suspended; its EOS is fed on resume
    s.stack.append(child)
    s.n_contexts += 1
    return ("push", child)


def pop_return(s: Solve, value: str, tok):
    # A value that is empty or spans lines cannot be spliced into "Return: <value>\nAnswer: ".
    if not value.strip() or "\n" in value:
        s.error = f"child answer {value!r} cannot be returned"
        return None
    child = s.stack.pop()
    parent = s.stack[-1]
    resume = resume_ids(tok, value)
    parent.segments.append(resume_text(value))
    parent.pending = [tok.eos_id] + resume  # EOS ends the parent's call completion, as in training
    return ("pop", child)


@torch.no_grad()
def decode(model, tok, task, method, problems, lim=Limits(), cache=None) -> list:
    """Solve a batch of problems; all open contexts advance together, each with its own cache.

    One step feeds every active context its pending tokens. Rows decoding one token and rows
    prefilling a prompt or a resume go in two forward calls: padding a one-token row to a
    40-token prefill would multiply its cost by 40. Pass a `cache` to reuse one pool of slots
    across batches.
    """
    model.eval()
    solves = [start(task, p, method, tok) for p in problems]
    w = next(model.parameters())
    if cache is None or cache.max_len < lim.max_context_len:
        cache = KVCache(model.args, 2 * len(problems), lim.max_context_len, w.device, w.dtype)
    for s in solves:
        s.root.slot = cache.alloc()
    while True:
        active = [s for s in solves if not s.done and fits(s, lim)]
        if not active:
            break
        decoding = [s for s in active if len(s.stack[-1].pending) == 1]
        prefilling = [s for s in active if len(s.stack[-1].pending) > 1]
        for group in (decoding, prefilling):
            if group:
                advance(model, tok, task, method, cache, group, lim)
        for s in solves:  # failed or finished problems give back every slot they hold
            if s.done:
                for ctx in s.stack:
                    cache.release(ctx.slot)
                s.stack = []
    return solves


def advance(model, tok, task, method, cache, group, lim):
    ctxs = [s.stack[-1] for s in group]
    n_new = [len(c.pending) for c in ctxs]
    T = max(n_new)
    rows = torch.tensor([c.pending + [tok.eos_id] * (T - len(c.pending)) for c in ctxs])  # right-padded
    for c in ctxs:
        c.ids += c.pending
    logits = model(rows.to(cache.k.device), cache, [c.slot for c in ctxs], n_new, last_only=True)
    for s, token in zip(group, logits.argmax(-1).tolist()):  # the one host sync of the step
        event = on_token(s, token, task, method, tok, lim)
        if event and event[0] == "push":
            event[1].slot = cache.alloc()
        elif event and event[0] == "pop":
            cache.release(event[1].slot)


@torch.no_grad()
def decode_naive(model, tok, task, method, problems, lim=Limits()) -> list:
    """The oracle: one problem at a time, each token from a full recompute of its context."""
    model.eval()
    dev = next(model.parameters()).device
    solves = []
    for p in problems:
        s = start(task, p, method, tok)
        while not s.done and fits(s, lim):
            ctx = s.stack[-1]
            ctx.ids += ctx.pending
            logits = model(torch.tensor([ctx.ids], device=dev))
            on_token(s, int(logits[0, -1].argmax()), task, method, tok, lim)
        solves.append(s)
    return solves


class TraceModel(torch.nn.Module):
    """A stand-in that emits the true trace: after any prefix of a true context, its next token.

    It keeps each cache slot's token history itself, so decoding with it checks that every context
    is fed exactly the tokens training builds (tasks.context_ids). Wrapping a real Llama (`inner`)
    runs that model on the same tokens, so a benchmark pays a real model's cost for a realistic
    call tree, whatever the model's weights.
    """

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

    def forward(self, tokens, cache=None, slots=None, n_new=None, last_only=False):
        like = torch.zeros(self.args.vocab_size)
        if cache is None:
            if self.inner is not None:
                self.inner(tokens)
            return torch.stack([self.predict([r[:t + 1] for t in range(len(r))], like) for r in tokens.tolist()])
        for row, slot, n in zip(tokens.tolist(), slots, n_new):
            self.history[slot] = (self.history.get(slot, []) if cache.length[slot] else []) + row[:n]
        if self.inner is not None:  # advances the cache lengths itself
            like = self.inner(tokens, cache, slots, n_new, last_only)
        else:
            for slot, n in zip(slots, n_new):
                cache.length[slot] += n
        return self.predict([self.history[s] for s in slots], like)


def format_trace(s: Solve, indent="  ") -> str:
    """The call tree as indented contexts with what each generated, then the answer."""
    lines = []

    def walk(ctx, level):
        children = iter(ctx.children)
        lines.append(f"{indent * level}[{ctx.depth}] {ctx.prompt!r}")
        for seg in ctx.segments[1:]:
            lines.append(f"{indent * level}    {seg!r}")
            if seg.endswith("\n") and "Call: " in seg:
                child = next(children, None)
                if child is not None:
                    walk(child, level + 1)
    walk(s.root, 0)
    lines.append(f"answer: {s.answer}" if s.error is None else f"failed: {s.error}")
    return "\n".join(lines)
