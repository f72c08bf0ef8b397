"""A generic corpus for the embedded base: what a pretrained LLM plausibly knows before fine-tuning.

Re-Tuning (paper Sec. 3) assumes a *pretrained* LLaMA: it can already copy long digit strings and
lists, read a value back from its context and add two digits; LoRA only teaches it the recursion.
A tiny model trained from scratch has none of that, so the embedded base is pretrained on this
corpus first (`python retuning.py pretrain`). Every item is a (prompt, completion) pair in the
tasks' alphabet and words ("Answer: ", digits, " + ", Python lists), one of:

  copy          "Copy 93048 + 62687\\nAnswer: "                -> "93048 + 62687"  (also words: "Copy item Carry dp")
  drop first    "Drop the first element of [1, 0, 1]\\nAnswer: " -> "[0, 1]"   (numbers: first digit of each)
  first         "First element of 4821 + 0937\\nAnswer: "      -> "4 + 0"
  prepend       "Put 7 in front of [4, 4]\\nAnswer: "           -> "[7, 4, 4]"
  recall        "Remember [2, 1]. Remember 905.\\nWhat was the first?\\nAnswer: " -> "[2, 1]"
  facts         "7 + 8 + 1\\nAnswer: " -> "16";  "max(4, 17)\\nAnswer: " -> "17";  "-3 + 12\\nAnswer: " -> "9";
                "Is 4 equal to 4?\\nAnswer: " -> "True"

at lengths up to MAX_DIGITS digits / MAX_ITEMS elements, far beyond the fine-tuning lengths. It
contains none of the tasks' multi-step algorithms: no multi-digit sum, no parity of a list, no dp
array or chosen indices; single facts only (one digit plus one digit plus a carry; a small number
plus a small number; the larger of two numbers; whether two are equal).
"""
import random

MAX_DIGITS = 24  # digit strings; a pair has two operands of up to 12 (fine-tuning: 4, evaluation: 8)
MAX_ITEMS = 16  # list items (fine-tuning: at most 6, evaluation: at most 12)


# The words of the tasks' prompts and completions. A pretrained LLM can write all of them; a tiny
# base that never wrote "Carry" or "Call" has untrained output embeddings for them, and LoRA (which
# leaves lm_head frozen) then cannot make them likely (docs/EXPERIMENTS.md).
WORDS = ("Carry Output Call: Return: Answer: Solution: Question: What is the parity of Compute one element "
         "at a time. Create dp array chosen indices sum item can use True False Append max return. If there "
         "only we should it else call with minus first to get Reconstructing all together, output input "
         "Let's solve Given sequence integers find subsequence highest such that no two numbers are adjacent "
         "in original list for unchosen ones multiple solutions exist select lexicographically smallest "
         "array: Output, = ( ) [ ] \n").split(" ")


def obj(rng: random.Random):
    """A random object of one of the tasks' shapes: a number, a pair of numbers, a list, words."""
    kind = rng.choice(["digits", "pair", "bits", "small", "sums", "words"])
    if kind == "words":  # words in random order: no digits, no sentence of any task
        return kind, " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
    if kind == "digits":
        return kind, "".join(rng.choice("0123456789") for _ in range(rng.randint(1, MAX_DIGITS)))
    if kind == "pair":
        n = rng.randint(1, MAX_DIGITS // 2)
        return kind, tuple("".join(rng.choice("0123456789") for _ in range(n)) for _ in range(2))
    n = rng.randint(1, MAX_ITEMS)
    lo, hi = {"bits": (0, 1), "small": (-5, 5), "sums": (0, 60)}[kind]
    return kind, [rng.randint(lo, hi) for _ in range(n)]


def text(kind, x) -> str:
    return f"{x[0]} + {x[1]}" if kind == "pair" else str(x)


def drop_first(kind, x):
    return (x[0][1:], x[1][1:]) if kind == "pair" else x[1:]


def first(kind, x) -> str:
    return f"{x[0][0]} + {x[1][0]}" if kind == "pair" else str(x[0])


def edit_item(rng):
    """copy / drop first / first / prepend on a random object."""
    kind, x = obj(rng)
    op = rng.choice(["copy", "drop", "first", "prepend"])
    if op == "copy" or kind == "words":
        return f"Copy {text(kind, x)}\nAnswer: ", text(kind, x)
    if op == "first":
        return f"First element of {text(kind, x)}\nAnswer: ", first(kind, x)
    if op == "drop" and len(x[0] if kind == "pair" else x) > 1:
        return f"Drop the first element of {text(kind, x)}\nAnswer: ", text(kind, drop_first(kind, x))
    if kind in ("pair", "digits"):  # prepend a digit (to both numbers of a pair)
        d = rng.choice("0123456789"), rng.choice("0123456789")
        y = (d[0] + x[0], d[1] + x[1]) if kind == "pair" else d[0] + x
        return f"Put {d[0] + ' + ' + d[1] if kind == 'pair' else d[0]} in front of {text(kind, x)}\nAnswer: ", text(kind, y)
    v = rng.randint(min(x), max(x))
    return f"Put {v} in front of {text(kind, x)}\nAnswer: ", text(kind, [v] + x)


def recall_item(rng):
    """Read one of two or three earlier spans back out of the context."""
    spans = [text(*obj(rng)) for _ in range(rng.randint(2, 3))]
    i = rng.randrange(len(spans))
    which = ["first", "second", "third"][i]
    return " ".join(f"Remember {s}." for s in spans) + f"\nWhat was the {which}?\nAnswer: ", spans[i]


def fact_item(rng):
    """One arithmetic or comparison fact on small numbers."""
    op = rng.choice(["digits", "plus", "max", "equal"])
    if op == "digits":  # one column of an addition: two digits and a carry
        a, b, c = rng.randint(0, 9), rng.randint(0, 9), rng.randint(0, 1)
        return (f"{a} + {b} + {c}\nAnswer: " if c or rng.random() < 0.5 else f"{a} + {b}\nAnswer: "), str(a + b + c)
    if op == "plus":
        a, b = rng.randint(-5, 5), rng.randint(0, 60)
        return f"{a} + {b}\nAnswer: ", str(a + b)
    a, b = rng.randint(-5, 60), rng.randint(-5, 60)
    if op == "max":
        return f"max({a}, {b})\nAnswer: ", str(max(a, b))
    b = a if rng.random() < 0.5 else b
    return f"Is {a} equal to {b}?\nAnswer: ", str(a == b)


def corpus(seed: int, n: int) -> list:
    """n (prompt, completion) items as contexts [prompt, completion]: 5/8 edits, 1/8 recall, 1/4 facts."""
    rng = random.Random(f"pretrain/{seed}")
    make = [edit_item] * 5 + [recall_item] + [fact_item] * 2
    return [list(rng.choice(make)(rng)) for _ in range(n)]
