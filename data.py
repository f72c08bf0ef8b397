"""Data drawn from the tasks (tasks.py): training contexts, evaluation problems, the embedded
tokenizer trained on their strings, and the views `python retuning.py data` prints.

Training follows the release's problem distributions (SPEC "Data and training in the release"),
scaled to a longest length max_len. Train/eval overlap: the two come from separate seed streams
("train/..." vs "eval/..."). Above the training length they cannot overlap (the sizes differ), and
that is where the paper's claims live. At or below it overlap is possible and harmless to those
claims: small spaces are covered by training on purpose (every DP array up to length 5, as in the
release; 1-2 digit additions; short parity lists), and in large ones (e.g. 15-digit additions,
10^30 pairs) a collision is vanishingly rare. Everything is a pure function of its arguments.
"""
import collections
import io
import itertools
import random

import sentencepiece as spm
import torch

from tasks import METHODS, TASKS, Addition, context_ids

UPSAMPLE = 3  # default weight of each short Re-Tuning sub-problem size: this many times a larger size's share;
# the release up-samples short contexts, the factor is ours
DP_EXHAUSTIVE_LIMIT = 200_000  # enumerate all DP arrays when there are at most this many


# ---- training and evaluation problems ----
def train_problems(task, method, max_len, rng):
    """An endless stream of training problems for one task."""
    if task == "addition":  # operand lengths i <= j, weighted by j so longer ones dominate; swapped half the time
        pairs = [(i, j) for j in range(1, max_len + 1) for i in range(1, j + 1)]
        while True:
            i, j = rng.choices(pairs, weights=[j for _, j in pairs])[0]
            a, b = Addition.number(rng, i), Addition.number(rng, j)
            yield f"{b} + {a}" if rng.random() < 0.5 else f"{a} + {b}"
    elif task == "parity":  # Re-Tuning: full-length lists (its sub-lists come from the trace); others: 1..max_len
        while True:
            yield TASKS[task].sample(rng, max_len if method == "retuning" else rng.randint(1, max_len))
    else:  # dp: uniform over all arrays of length 2..max_len, enumerated when few (every array, as the release)
        lengths = range(min(TASKS[task].min_len, max_len), max_len + 1)
        if sum(11 ** n for n in lengths) <= DP_EXHAUSTIVE_LIMIT:
            pool = [str(list(a)) for n in lengths for a in itertools.product(range(-5, 6), repeat=n)]
            while True:  # epochs of fresh permutations
                rng.shuffle(pool)
                yield from pool
        while True:
            yield TASKS[task].sample(rng, rng.choices(lengths, weights=[11 ** n for n in lengths])[0])


def context_size(task, prompt):
    """Size of the sub-problem a Re-Tuning context solves: operand digits, or elements of its first list."""
    if task == "addition":
        return len(prompt.split(" + ")[0])
    return prompt[prompt.index("["):prompt.index("]")].count(",") + 1


def balance(task, contexts, n, rng, upsample=UPSAMPLE):
    """n contexts with an equal share per sub-problem size, `upsample` times that for sizes 1-2.

    De-duplication leaves only 100 distinct 1-digit additions among thousands of long contexts; the
    release up-samples short contexts to compensate. Without it a small model never learns the
    base case, and every recursion ends in it. Within a size, every distinct context comes once
    before any comes twice. DP's sizes 1-2 have only 33 and 368 distinct contexts, so a factor of 3
    gives them two thirds of the data, each repeated 20-230 times, and starves sizes 3-5, where its
    Re-Tuning fails (docs/EXPERIMENTS.md): `train --upsample 1` gives every size an equal share.
    """
    groups = collections.defaultdict(list)
    for ctx in contexts:
        groups[context_size(task, ctx[0])].append(ctx)
    weight = {k: upsample if k <= 2 else 1 for k in groups}
    out = []
    for k in sorted(groups):
        m = -(-n * weight[k] // sum(weight.values()))  # ceil, so the sizes add up to at least n
        out += (groups[k] * (m // len(groups[k]) + 1))[:m]
    rng.shuffle(out)
    return out[:n]


def training_contexts(task, method, max_len, seed, n, upsample=UPSAMPLE):
    """n training contexts (segment lists), a pure function of the arguments. Baseline and scratchpad:
    one per problem. Re-Tuning: the distinct contexts of the problems' traces (de-duplicated for
    addition and DP, as the release), balanced over sub-problem sizes by `balance`, shuffled."""
    rng = random.Random(f"train/{task}/{method}/{max_len}/{seed}")  # str seeds hash the same on every machine
    problems, t = train_problems(task, method, max_len, rng), TASKS[task]
    if method != "retuning":
        return [t.trace(next(problems), method)[0] for _ in range(n)]
    out, seen = [], set()
    for _ in range(100 * n + 1000):  # bounded: a tiny space can run out of distinct contexts
        for ctx in t.trace(next(problems), method):
            if not (t.dedup and tuple(ctx) in seen):
                seen.add(tuple(ctx))
                out.append(ctx)
        if len(out) >= n:
            break
    return balance(task, out, n, rng, upsample)


def eval_problems(task, length, n, seed):
    """n random problems of one size from a seed stream disjoint from training's (see the docstring)."""
    rng = random.Random(f"eval/{task}/{length}/{seed}")
    return [TASKS[task].sample(rng, length) for _ in range(n)]


# ---- the embedded task tokenizer: SentencePiece BPE, Llama recipe, trained on our own strings ----
def tokenizer_corpus():
    """Every line of every segment of a few problems per task, method and length (fixed seed)."""
    rng, lines = random.Random("tokenizer"), []
    for t in TASKS.values():
        for method, length, _ in itertools.product(METHODS, (1, 2, 3, 5, 8), range(3)):
            for ctx in t.trace(t.sample(rng, length), method):
                lines += [line for seg in ctx for line in seg.split("\n") if line]  # "\n" stays a byte token
    return lines


def build_tokenizer(path):
    """Write the task tokenizer to `path`; the bytes depend on nothing but this code (no file paths inside)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_corpus()), model_writer=model, model_type="bpe", vocab_size=768,
        split_digits=True, byte_fallback=True, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, shuffle_input_sentence=False,
        input_sentence_size=0, hard_vocab_limit=False, minloglevel=2)
    with open(path, "wb") as f:
        f.write(model.getvalue())


# ---- looking at the data ----
def show(task, method, n, tok, seed=0, max_len=None):
    """The first n training contexts, one segment per line, newlines shown as ⏎, with token counts."""
    rows = []
    for k, ctx in enumerate(training_contexts(task, method, max_len or TASKS[task].paper_train_len, seed, n)):
        ids, mask = context_ids(tok, ctx)
        rows.append(f"== {task} / {method} #{k}: {len(ids)} tokens, {sum(mask)} trained on")
        for i, seg in enumerate(ctx):
            label = "prompt" if i == 0 else "completion" if i % 2 else "resume"
            rows.append(f"{label:>10} | " + seg.replace("\n", "⏎\n" + " " * 11 + "| "))
    return "\n".join(rows)


def token_table(tokenizers, seed=0, n=1000):
    """Markdown table of longest / mean tokens per training sequence at the paper's lengths."""
    head = "| task | method | " + " | ".join(f"{k} longest | {k} mean" for k in tokenizers) + " |"
    rows = [head, "|" + "---|" * (2 + 2 * len(tokenizers))]
    for task, method in itertools.product(TASKS, METHODS):
        contexts, cells = training_contexts(task, method, TASKS[task].paper_train_len, seed, n), []
        for tok in tokenizers.values():
            lengths = [len(context_ids(tok, ctx)[0]) for ctx in contexts]
            cells += [str(max(lengths)), f"{sum(lengths) / len(lengths):.1f}"]
        rows.append(f"| {task} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


# ---- training batches ----
def batches(data, batch_size, seed):
    """Endless, deterministic stream of index lists; similar lengths share a batch (bucketing).

    Each epoch: shuffle, cut into chunks of 16 batches, sort each chunk by length, slice it into
    batches, shuffle those. Padding stays small and the order depends only on (seed, epoch).
    """
    for epoch in range(10**9):
        rng = random.Random(seed * 100_003 + epoch)
        order = list(range(len(data)))
        rng.shuffle(order)
        chunk = 16 * batch_size
        for c in range(0, len(order) - batch_size + 1, chunk):
            part = sorted(order[c:c + chunk], key=lambda i: len(data[i][0]))
            group = [part[i:i + batch_size] for i in range(0, len(part) - batch_size + 1, batch_size)]
            rng.shuffle(group)
            yield from group


def collate(items, pad_id, device):
    """Right-pad; the target at t is token t+1 where it is a completion token or EOS, else -100."""
    T = max(len(ids) for ids, _ in items) - 1
    x = torch.full((len(items), T), pad_id, dtype=torch.long)
    y = torch.full((len(items), T), -100, dtype=torch.long)
    for i, (ids, mask) in enumerate(items):
        ids_t, mask_t = torch.tensor(ids), torch.tensor(mask, dtype=torch.bool)
        x[i, :len(ids) - 1] = ids_t[:-1]
        y[i, :len(ids) - 1] = torch.where(mask_t[1:], ids_t[1:], -100)
    return x.to(device), y.to(device)
