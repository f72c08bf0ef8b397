"""Tests for probe.py, the base's copy and gap test. Run: python -m pytest tests/test_probe.py -q"""
import re

import torch

import probe
from checkpoint import Tokenizer
from positions import Positions
from runs import EMBEDDED_TOKENIZER
from tasks import context_ids

TOK = Tokenizer(EMBEDDED_TOKENIZER)


class Copier(torch.nn.Module):
    """Knows every answer of the given items; `by_position` copies the way we found the tiny
    base does: right only while the position ids are 0, 1, 2, ... (any shift sends it off)."""

    def __init__(self, pairs, by_position):
        super().__init__()
        self.by_position, self.next = by_position, {}
        self.dummy = torch.nn.Parameter(torch.zeros(1))  # where the caller looks for the device
        for pair in pairs:
            ids, mask = context_ids(TOK, list(pair))
            self.next |= {tuple(ids[:t + 1]): ids[t + 1] for t in range(len(ids) - 1) if mask[t + 1]}

    def forward(self, x, select=None, positions=None):
        logits = torch.zeros(*x.shape, TOK.vocab_size)
        for b, row in enumerate(x.tolist()):
            for t in range(len(row)):
                shifted = positions is not None and not torch.equal(positions[b, :t + 1], torch.arange(t + 1))
                nxt = TOK.eos_id if self.by_position and shifted else self.next.get(tuple(row[:t + 1]), TOK.eos_id)
                logits[b, t, nxt] = 1.0
        return logits[select]


def test_items_are_deterministic_and_their_answers_right():
    copies, drops = probe.items("copy", 12, 5, seed=1), probe.items("drop", 6, 5, seed=1)
    assert copies == probe.items("copy", 12, 5, seed=1) != probe.items("copy", 12, 5, seed=2)
    for prompt, want in copies:
        assert prompt == f"Copy {want}\nAnswer: " and len(want) == 12
    for prompt, want in probe.items("repeats", 20, 5, seed=1):
        assert prompt == f"Copy {want}\nAnswer: " and len(want) == 20 and re.fullmatch(r"((\d)\2+)+\d?", want)
    for prompt, want in drops:
        a, b = prompt[len("Drop the first element of "):-len("\nAnswer: ")].split(" + ")
        assert want == f"{a[1:]} + {b[1:]}" and len(a) == len(b) == 6


def test_the_gap_test_tells_a_positional_copy_from_a_copy_by_content():
    pairs = probe.items("drop", 8, 6, seed=0)
    content, positional = Copier(pairs, by_position=False), Copier(pairs, by_position=True)
    for g in (0, 1, 4):
        assert probe.exact(content, TOK, pairs, Positions(), g) == 1.0
    assert probe.exact(positional, TOK, pairs, Positions(), 0) == 1.0
    assert probe.exact(positional, TOK, pairs, Positions(), 1) == 0.0
    # an answer wrong in one token of one item is one item wrong
    wrong = Copier(pairs, by_position=False)
    ids = context_ids(TOK, list(pairs[2]))[0]
    key = tuple(ids[:-2])  # the prefix before its last digit
    wrong.next[key] = TOK.bos_id
    assert probe.exact(wrong, TOK, pairs, Positions()) == 5 / 6
