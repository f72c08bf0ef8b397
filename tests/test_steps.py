"""Tests for steps.py, the per-step (teacher-forced) accuracy behind `eval.py --by-step`.

Run: python -m pytest tests/test_steps.py -q

The model is decoder.TraceModel, which predicts the true next token after any true prefix: it
must score 100% on every step, and a model made wrong at exactly one step must lose only that step.
"""
import pytest
import torch

import steps
import tasks
from checkpoint import Tokenizer
from data import eval_problems
from runs import EMBEDDED_TOKENIZER
from tracemodel import TraceModel

TOK = Tokenizer(EMBEDDED_TOKENIZER)
LENGTHS = {"addition": 4, "parity": 3, "dp": 3}


class WrongAt(torch.nn.Module):
    """TraceModel, but it predicts token 5 wherever the true next token is the first of `label`."""

    def __init__(self, inner, first_tokens):
        super().__init__()
        self.inner, self.args, self.first = inner, inner.args, first_tokens
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, tokens, select=None, positions=None):
        logits = self.inner(tokens)
        for b, t in self.first:
            logits[b, t - 1] = 0
            logits[b, t - 1, 5] = 1.0
        return logits if select is None else logits[select]


@pytest.mark.parametrize("task", list(LENGTHS))
@pytest.mark.parametrize("method", tasks.METHODS)
def test_a_perfect_model_gets_every_step_right(task, method):
    L = LENGTHS[task]
    problems = eval_problems(task, L, 4, 99)
    acc = steps.by_step(TraceModel(TOK, task, method, problems), TOK, task, method, [L], 4, 99)
    assert set(acc[str(L)].values()) == {1.0}
    expected = {"baseline": ["answer"], "retuning": ["call", "call 2", "answer"] if task == "dp" else ["call", "answer"]}
    n_lines = tasks.TASKS[task].trace(problems[0], method)[0][1].count("\n") + 1
    assert list(acc[str(L)]) == expected.get(method, [f"line {k}" for k in range(1, n_lines + 1)])


def test_a_model_wrong_at_one_step_loses_only_that_step():
    problems = eval_problems("addition", 4, 3, 7)
    contexts = [steps.top_context("addition", p, "retuning") for p in problems]
    spans = [steps.step_spans(TOK, c, "retuning")[1] for c in contexts]
    answer_starts = [(b, dict((lab, lo) for lab, lo, _ in s)["answer"]) for b, s in enumerate(spans)]
    model = WrongAt(TraceModel(TOK, "addition", "retuning", problems), answer_starts[:2])
    hits = steps.step_hits(model, TOK, contexts, "retuning")
    assert [h["call"] for h in hits] == [True, True, True]
    assert [h["answer"] for h in hits] == [False, False, True]


def test_the_step_table_has_a_row_per_length_and_a_column_per_step():
    md = steps.table("addition retuning", {"1": {"answer": 1.0}, "2": {"call": 0.5, "answer": 0.25}})
    assert md.splitlines()[0] == "| addition retuning: length | answer | call |"
    assert md.splitlines()[3] == "| 2 | 25 | 50 |"
