"""Where a method breaks: teacher-forced accuracy of each step, per problem length.

    python eval.py runs/addition-retuning --by-step

End-to-end accuracy says *that* a method fails at 6 digits, not *where*. Here each problem's
top-level context is fed its true text, and a step counts as right when the model's greedy
choice equals the true token at every position of that step (its EOS included). This is exactly
"greedy decoding from the true prefix reproduces the step", computed in one forward pass.
The steps, per method (paper Sec. 3):
- Re-Tuning: `call` (the sub-problem it writes; `call 2` for DP's second call), and `answer`
  after the true return, i.e. the one combining step; a base-case context has only `answer`;
- baseline: `answer`;
- scratchpad: `line 1`, `line 2`, ... each given the true lines before it.
Returned values are never steps: they are read, not written (the loss mask of training).

`eval.py --by-context` (Re-Tuning) goes below the top: every distinct context of the problems'
recursions, teacher-forced whole, grouped by its kind (DP has three chains) and sub-problem size,
so a miss deep in the recursion is seen at the size where it happens, on many contexts.
"""
import collections
import re

import torch

import tasks
from data import context_size, eval_problems
from decoder import eval_limits
from positions import Positions


def step_spans(tok, segments, method):
    """[(label, first, last)] token positions of each step of a context (token ids as context_ids)."""
    ids, mask = tasks.context_ids(tok, segments)
    spans, t, n_calls = [], 0, 0
    for i, seg in enumerate(segments[1::2]):  # the completions, in order
        while not mask[t]:
            t += 1
        end = t
        while end + 1 < len(mask) and mask[end + 1]:
            end += 1
        if method == "scratchpad":
            spans += line_spans(tok, ids[t:end + 1], t)
        else:
            kind, _ = tasks.read_completion(seg) if method == "retuning" else ("answer", seg)
            n_calls += kind == "call"
            label = "call" if kind == "call" and n_calls == 1 else f"call {n_calls}" if kind == "call" else "answer"
            spans.append((label, t, end))
        t = end + 1
    return ids, spans


def line_spans(tok, comp_ids, offset):
    """Split one completion's tokens into lines: a token belongs to the line its text starts in."""
    spans, start, line = [], 0, 0
    for j in range(1, len(comp_ids) + 1):
        n_lines = tok.decode(comp_ids[:j]).count("\n")
        if n_lines > line or j == len(comp_ids):  # token j - 1 ends this line (or the completion)
            spans.append((f"line {line + 1}", offset + start, offset + j - 1))
            start, line = j, n_lines
    return spans


@torch.no_grad()
def step_hits(model, tok, contexts, method, own=None):
    """For each context (list of segments): {label: right?} under teacher forcing. `own`: each
    context's position ids as the decoder gives them (positions.py), or None for 0, 1, 2, ..."""
    rows = [step_spans(tok, segs, method) for segs in contexts]
    T = max(len(ids) for ids, _ in rows)
    pos = None if own is None or own[0] is None else torch.stack([p[:T - 1] for p in own])
    x = torch.full((len(rows), T), tok.eos_id, dtype=torch.long)
    for b, (ids, _) in enumerate(rows):
        x[b, :len(ids)] = torch.tensor(ids)
    # the prediction at position t - 1 is the model's choice for token t; the output layer runs
    # only where a step's token is predicted (a 49k vocabulary makes the rest the bulk of the work)
    sel = torch.zeros(len(rows), T - 1, dtype=torch.bool)
    for b, (_, spans) in enumerate(rows):
        for _, lo, hi in spans:
            sel[b, lo - 1:hi] = True
    dev = next(model.parameters()).device
    right = torch.zeros_like(sel)
    right[sel] = model(x[:, :-1].to(dev), select=sel.to(dev), positions=pos).argmax(-1).cpu() == x[:, 1:][sel]
    return [{label: bool(right[b, lo - 1:hi].all()) for label, lo, hi in spans} for b, (_, spans) in enumerate(rows)]


def top_context(task, problem, method):
    """The context that opens with the problem's own prompt (the others are its sub-calls)."""
    prompt = tasks.TASKS[task].prompt(problem, method)
    return next(segs for segs in tasks.TASKS[task].trace(problem, method) if segs[0] == prompt)


def by_step(model, tok, task, method, lengths, per_length, seed, batch_size=32, positions=None):
    """{length: {step label: accuracy}} over fresh problems' top-level contexts, with the position
    ids the decoder would give them (eval.py sizes its limits from each length's first problem)."""
    out = {}
    for L in lengths:
        problems = eval_problems(task, L, per_length, seed)
        contexts = [top_context(task, p, method) for p in problems]
        budget = eval_limits(task, method, tok, problems[:1]).max_context_len
        own = [(positions or Positions()).for_context(p, 0, budget) for p in problems]
        hits = []
        for b in range(0, len(contexts), batch_size):
            hits += step_hits(model, tok, contexts[b:b + batch_size], method, own[b:b + batch_size])
        labels = list(dict.fromkeys(k for h in hits for k in h))
        out[str(L)] = {k: sum(h.get(k, False) for h in hits) / len(hits) for k in labels}
    return out


def context_kind(task, prompt):
    """A context's kind: its prompt's words before the first number or list (DP: three kinds)."""
    return re.split(r"[-\d\[]", prompt, maxsplit=1)[0].rstrip(" :") or task


def by_context(model, tok, task, lengths, per_length, seed, batch_size=32, positions=None):
    """{kind: {size: accuracy}} over the distinct contexts of fresh problems' Re-Tuning traces; a
    context is right when greedy decoding from the true prefix reproduces all it writes. Positions
    (a stretched scheme only) are drawn per context, seeded by its prompt, one budget for all."""
    budget = max(eval_limits(task, "retuning", tok, eval_problems(task, L, 1, seed)).max_context_len for L in lengths)
    own, positions = {}, positions or Positions()
    for L in lengths:
        for p in eval_problems(task, L, per_length, seed):
            for segs in tasks.TASKS[task].trace(p, "retuning"):
                own.setdefault(tuple(segs), positions.for_context(segs[0], 0, budget))
    keys, right, count = list(own), collections.Counter(), collections.Counter()
    for b in range(0, len(keys), batch_size):
        part = keys[b:b + batch_size]
        for segs, h in zip(part, step_hits(model, tok, [list(k) for k in part], "retuning", [own[k] for k in part])):
            key = context_kind(task, segs[0]), str(context_size(task, segs[0]))
            right[key], count[key] = right[key] + all(h.values()), count[key] + 1
    out = {}
    for kind, size in sorted(count, key=lambda k: (k[0], int(k[1]))):
        out.setdefault(kind, {})[size] = right[kind, size] / count[kind, size]
    return out


def table(label, acc: dict, rows="length") -> str:
    """Markdown: one row per length (or kind), one column per step (or size); label: e.g. the run."""
    labels = list(dict.fromkeys(k for row in acc.values() for k in row))
    labels = sorted(labels, key=int) if all(k.isdigit() for k in labels) else labels  # sizes in order
    lines = [f"| {label}: {rows} | " + " | ".join(labels) + " |", "|" + "---|" * (1 + len(labels))]
    for L, row in acc.items():
        lines.append(f"| {L} | " + " | ".join(f"{100 * row[k]:.0f}" if k in row else "" for k in labels) + " |")
    return "\n".join(lines)
