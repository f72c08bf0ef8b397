"""What a base can do before fine-tuning: copy and drop-first by length, and the gap test.

    python probe.py assets/base                          # the committed base, in its own positions
    python probe.py assets/base --positions contiguous   # ... in positions it never saw

Re-Tuning's call step is a copy (paper Sec. 3: the sub-problem is the problem with its first
digit dropped), so a base whose copy works only by *position offset* cannot write calls longer
than those it was fine-tuned on (README, Results). Two measurements show which kind of copy a base has:

- by length: exact copy of an n-digit string and exact drop-first of a k + k digit pair, on
  pretraining-style prompts (pretrain.py), from well inside to far beyond pretraining's lengths;
- the gap test: the same items with g extra position ids inserted between prompt and answer
  (same tokens). A copy that reads "the token d positions back" breaks at g = 1; a copy that
  finds its source by content does not care.

An item counts as right when greedy decoding reproduces the answer exactly, computed in one
teacher-forced pass (steps.step_hits: right at every answer token, EOS included).
"""
import argparse
import random

import torch

from positions import SCHEMES, Positions
from steps import step_hits
from tasks import context_ids, prompt_ids

COPY_LENGTHS = (8, 16, 24, 28, 32, 40, 48)  # pretraining copies strings of up to 24 digits
PAIR_LENGTHS = (4, 8, 12, 13, 16, 20, 24)  # ... and pairs of up to 12 + 12
GAPS = (0, 1, 2, 4, 8)


def digits(rng, n):
    return "".join(rng.choice("0123456789") for _ in range(n))


def runs_of_digits(rng, n):
    """n digits in runs of 2-5 equal ones ("7777300555..."): the hard case for a copy by content,
    whose "the token after the one I just wrote" is ambiguous inside a run."""
    out = ""
    while len(out) < n:
        out += rng.choice("0123456789") * rng.randint(2, 5)
    return out[:n]


def items(op, n, count, seed):
    """`count` (prompt, answer) pairs of one operation at size n, as pretrain.py words them."""
    rng, out = random.Random(f"probe/{op}/{n}/{seed}"), []
    for _ in range(count):
        if op in ("copy", "repeats"):
            x = digits(rng, n) if op == "copy" else runs_of_digits(rng, n)
            out.append((f"Copy {x}\nAnswer: ", x))
        else:
            a, b = digits(rng, n), digits(rng, n)
            out.append((f"Drop the first element of {a} + {b}\nAnswer: ", f"{a[1:]} + {b[1:]}"))
    return out


def position_ids(pos: Positions, prompt, n_prompt, T, gap):
    """(T,) ids of one item: the scheme's test positions (contiguous, or drawn as the decoder draws
    a context's), with `gap` added from the first answer token on."""
    p = pos.for_context(prompt, 0, 2 * T + 16)
    p = torch.arange(T) if p is None else p[:T].clone()
    p[n_prompt:] += gap
    return p


def exact(model, tok, pairs, pos: Positions, gap=0) -> float:
    """Fraction of (prompt, answer) pairs the model completes exactly under greedy decoding: the
    answer is one step, teacher-forced as steps.py does it."""
    T = max(len(context_ids(tok, list(p))[0]) for p in pairs)
    own = [position_ids(pos, prompt, len(prompt_ids(tok, prompt)), T, gap) for prompt, _ in pairs]
    hits = step_hits(model, tok, [list(p) for p in pairs], "baseline", own)
    return sum(h["answer"] for h in hits) / len(hits)


def report(model, tok, pos: Positions, count=50, seed=0) -> dict:
    """{"copy": {n: acc}, "drop first": {k: acc}, "copy, runs of ...": {n: acc}, "gap: ...": {g: acc}}
    (the gap test: 8 + 8 drop-first and 16-digit copy, where an unshifted base is right)."""
    out = {"copy": {n: exact(model, tok, items("copy", n, count, seed), pos) for n in COPY_LENGTHS},
           "drop first": {k: exact(model, tok, items("drop", k, count, seed), pos) for k in PAIR_LENGTHS},
           "copy, runs of repeated digits": {n: exact(model, tok, items("repeats", n, count, seed), pos) for n in COPY_LENGTHS}}
    for op, n in (("drop", 8), ("copy", 16)):
        name = f"gap: {'drop first 8 + 8' if op == 'drop' else 'copy 16'}"
        out[name] = {g: exact(model, tok, items(op, n, count, seed), pos, g) for g in GAPS}
    return out


def quick(model, tok, pos: Positions, count=30, seed=0) -> dict:
    """The pretraining run's periodic check: a few sizes of each operation, within and beyond."""
    was_training = model.training
    model.eval()
    out = {f"copy {n}": exact(model, tok, items("copy", n, count, seed), pos) for n in (16, 24, 32)}
    out |= {f"drop {k}+{k}": exact(model, tok, items("drop", k, count, seed), pos) for k in (8, 12, 16)}
    out["drop 8+8 gap 1"] = exact(model, tok, items("drop", 8, count, seed), pos, 1)
    model.train(was_training)
    return {k: round(v, 3) for k, v in out.items()}


def markdown(out: dict) -> str:
    lines = []
    for name, row in out.items():
        lines += [f"| {name} | " + " | ".join(map(str, row)) + " |", "|---" * (len(row) + 1) + "|",
                  "| exact % | " + " | ".join(f"{100 * v:.0f}" for v in row.values()) + " |", ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("base", help="an HF Llama folder with tokenizer.model (e.g. assets/base)")
    ap.add_argument("--positions", choices=SCHEMES, default=None,
                    help="test positions (default: the base's own, positions.json; else contiguous)")
    ap.add_argument("--per-length", type=int, default=50)
    args = ap.parse_args(argv)
    from checkpoint import Tokenizer
    from model import Llama
    model, tok = Llama.from_pretrained(args.base).eval(), Tokenizer(f"{args.base}/tokenizer.model")
    own = Positions.of_base(args.base)
    pos = own if args.positions in (None, own.scheme) else Positions(args.positions, own.max_gap)
    print(f"{args.base}, positions: {pos.describe()}\n")
    print(markdown(report(model, tok, pos, args.per_length)))


if __name__ == "__main__":
    main()
