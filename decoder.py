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

`decode_naive`, first below, is the release's algorithm (every token of every context recomputed
from scratch, one problem at a time) and the test oracle; `Solve` is the state it drives, one
token at a time. `decode` is the fast version: the same Solves, batched, with cached contexts.
"""
from dataclasses import dataclass, field
from typing import Optional

import torch

from kvcache import KVCache
from positions import Positions
from tasks import TASKS, child_prompt, completion_ids, context_ids, prompt_ids, read_completion, resume_ids, resume_text


@torch.no_grad()
def decode_naive(model, tok, task, method, problems, lim=None, positions=None) -> list:
    """The oracle: one problem at a time, each token from a full recompute of its context."""
    model.eval()
    dev = next(model.parameters()).device
    solves = [Solve(p, task, method, tok, lim or Limits(), positions or Positions()) for p in problems]
    for s in solves:
        while not s.done:
            ctx = s.stack[-1]
            ctx.ids += ctx.pending
            own = None if ctx.positions is None else ctx.positions[None, :len(ctx.ids)]
            logits = model(torch.tensor([ctx.ids], device=dev), positions=own)
            s.on_token(int(logits[0, -1].argmax()))
    return solves


# ----------------------------------------------------------------------------- one problem's state
@dataclass
class Limits:
    """Guards: a problem that hits one fails with a reason instead of stalling the batch."""
    max_depth: int = 64  # open contexts on one stack
    max_contexts: int = 256  # contexts opened by one problem
    max_new: int = 256  # tokens in one completion
    max_context_len: int = 1024  # tokens in one context (also the KV cache's max_len)


def eval_limits(task, method, tok, problems) -> Limits:
    """Guards sized from the true traces: about twice the longest completion and context, and twice
    the number of contexts (which bounds the depth)."""
    comp, ctx, n_ctx = 8, 8, 1
    for p in problems:
        trace = TASKS[task].trace(p, method)
        n_ctx = max(n_ctx, len(trace))
        for segs in trace:
            comp = max([comp] + [len(completion_ids(tok, c)) for c in segs[1::2]])
            ctx = max(ctx, len(context_ids(tok, segs)[0]))
    return Limits(max_depth=2 * n_ctx + 4, max_contexts=2 * n_ctx + 4,
                  max_new=2 * comp + 8, max_context_len=2 * ctx + 16)


@dataclass(eq=False)  # contexts are compared by identity
class Context:
    prompt: str
    depth: int
    slot: int = -1  # KV-cache slot (fast decoder only)
    ids: list = field(default_factory=list)  # every token fed to this context so far
    pending: list = field(default_factory=list)  # tokens to feed at the next step
    generated: list = field(default_factory=list)  # the completion in progress
    segments: list = field(default_factory=list)  # prompt, completion, resume, ... as text
    calls: dict = field(default_factory=dict)  # index of a call's segment -> the child it opened
    positions: Optional[torch.Tensor] = None  # its tokens' position ids, when not 0, 1, 2, ... (positions.py)


@dataclass(eq=False)
class Solve:
    """One problem's state, and afterwards its result and call tree (`root`). It holds what reading
    a token takes (task, method, tokenizer, limits), so a decoder hands it only the token."""
    problem: str
    task: str
    method: str
    tok: object = field(repr=False)
    lim: Limits = field(repr=False)
    pos: Positions = field(default_factory=Positions, repr=False)  # how contexts number their tokens
    root: Context = field(init=False)
    stack: list = field(init=False, repr=False)  # the open contexts, the running one last
    answer: Optional[str] = None
    error: Optional[str] = None
    n_contexts: int = 1
    n_generated: int = 0

    def __post_init__(self):
        prompt = TASKS[self.task].prompt(self.problem, self.method)
        self.root = Context(prompt, depth=1, segments=[prompt], positions=self.positions_of(0))
        self.stack = [self.root]
        self.feed(self.root, prompt_ids(self.tok, prompt))

    def positions_of(self, k):
        """Position ids of the problem's k-th context (None: 0, 1, 2, ...), the same in every decoder."""
        return self.pos.for_context(self.problem, k, self.lim.max_context_len)

    @property
    def done(self):
        return self.answer is not None or self.error is not None

    def feed(self, ctx: Context, ids: list):
        """Queue tokens for `ctx`; the problem fails here if they would overflow the context."""
        ctx.pending = ids
        if len(ctx.ids) + len(ids) > self.lim.max_context_len:
            self.error = f"context longer than {self.lim.max_context_len} tokens"

    def on_token(self, token: int):
        """Advance by one sampled token: extend the completion, call, return or finish."""
        ctx, tok = self.stack[-1], self.tok
        self.n_generated += 1
        if token >= tok.vocab_size:  # a checkpoint's vocabulary may be padded past the tokenizer's
            self.error = f"token id {token} is outside the tokenizer"
        elif token != tok.eos_id:
            ctx.generated.append(token)
            if len(ctx.generated) > self.lim.max_new:
                self.error = f"completion longer than {self.lim.max_new} tokens"
            else:
                self.feed(ctx, [token])
        else:
            text = tok.decode(ctx.generated)
            ctx.segments.append(text)
            ctx.generated = []
            self.on_completion(text)

    def on_completion(self, text: str):
        kind, value = read_completion(text) if self.method == "retuning" else ("answer", text)
        if kind == "error":
            self.error = value
        elif kind == "call":
            self.call(value)
        elif len(self.stack) > 1:
            self.give_back(value)
        else:  # the top context answered: the problem's answer
            self.answer = TASKS[self.task].parse(self.method, text)
            if self.answer is None:
                self.error = f"unreadable answer {text!r}"

    def call(self, sub: str):
        """Suspend the top context (its EOS is fed on resume) and open a child for `sub`."""
        if len(self.stack) >= self.lim.max_depth:
            self.error = f"recursion deeper than {self.lim.max_depth}"
        elif self.n_contexts >= self.lim.max_contexts:
            self.error = f"more than {self.lim.max_contexts} contexts"
        else:
            parent, prompt = self.stack[-1], child_prompt(sub)
            child = Context(prompt, depth=len(self.stack) + 1, segments=[prompt], positions=self.positions_of(self.n_contexts))
            parent.calls[len(parent.segments) - 1] = child  # the call is the parent's last segment
            parent.pending = []
            self.stack.append(child)
            self.n_contexts += 1
            self.feed(child, prompt_ids(self.tok, prompt))

    def give_back(self, value: str):
        """Close the child and resume its parent with the returned value."""
        # A value that is empty or spans lines cannot be spliced into "Return: <value>\nAnswer: ".
        if not value.strip() or "\n" in value:
            self.error = f"child answer {value!r} cannot be returned"
            return
        self.stack.pop()
        parent = self.stack[-1]
        parent.segments.append(resume_text(value))
        # EOS ends the parent's call completion, as in training
        self.feed(parent, [self.tok.eos_id] + resume_ids(self.tok, value))


# ----------------------------------------------------------------------------- the batched decoder
@torch.no_grad()
def decode(model, tok, task, method, problems, lim=None, cache=None, positions=None) -> list:
    """Solve a batch of problems; all open contexts advance together, each in its own slot of one
    cache.

    One step feeds every problem's top context its pending tokens in one forward call: one token
    where it is decoding, a prompt or a resume where it is prefilling (step() pads them into rows,
    and Llama.step runs the model on the real tokens alone; kvcache.Step). Pass a `cache` to reuse
    one pool of slots across batches. `positions` (positions.py) numbers each context's tokens;
    default 0, 1, 2, ...
    """
    model.eval()
    lim = lim or Limits()
    solves = [Solve(p, task, method, tok, lim, positions or Positions()) for p in problems]
    w = next(model.parameters())
    if cache is None or cache.max_len < lim.max_context_len:
        cache = KVCache(model.args, 2 * len(problems), lim.max_context_len, w.device, w.dtype)
    for s in solves:
        hand_slots(cache, [], s)
    while active := [s for s in solves if not s.done]:
        step(model, cache, active)
    return solves


def step(model, cache, group):
    """Feed each problem's top context its pending tokens in one forward call; read one token each."""
    ctxs = [s.stack[-1] for s in group]
    n_new = [len(c.pending) for c in ctxs]
    pad = group[0].tok.eos_id
    rows = torch.tensor([c.pending + [pad] * (max(n_new) - len(c.pending)) for c in ctxs])  # right-padded
    for c in ctxs:
        c.ids += c.pending
    logits = model.step(rows.to(cache.k.device), cache, [c.slot for c in ctxs], n_new, last_only=True)
    for s, token in zip(group, logits.argmax(-1).tolist()):  # the one host sync of the step
        before = list(s.stack)
        s.on_token(token)
        hand_slots(cache, before, s)


def hand_slots(cache, before: list, s: Solve):
    """The one place slots change hands: a context that left the stack (it returned, or its
    problem ended) gives its slot back; a context new on it takes a fresh one."""
    after = [] if s.done else s.stack
    for ctx in before:
        if ctx not in after:
            cache.release(ctx.slot)
            ctx.slot = -1
    for ctx in after:
        if ctx.slot < 0:
            ctx.slot = cache.alloc(ctx.positions)


def format_trace(s: Solve, indent="  ") -> str:
    """The call tree as indented contexts with what each generated, then the answer. Iterative,
    so a recursion thousands of levels deep prints like a shallow one."""
    lines, todo = [], [(s.root, 0)]
    while todo:
        item, level = todo.pop()
        if isinstance(item, str):  # a segment
            lines.append(f"{indent * level}    {item!r}")
            continue
        lines.append(f"{indent * level}[{item.depth}] {item.prompt!r}")
        after = []
        for i, seg in enumerate(item.segments[1:], 1):
            after.append((seg, level))
            if i in item.calls:  # the child this call opened, printed right below it
                after.append((item.calls[i], level + 1))
        todo += reversed(after)
    lines.append(f"answer: {s.answer}" if s.error is None else f"failed: {s.error}")
    return "\n".join(lines)
