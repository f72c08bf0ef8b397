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
    """TraceModel, but it predicts token 5 at the (row, position) spots `where(tokens)` names."""

    def __init__(self, inner, where):
        super().__init__()
        self.inner, self.args, self.where = inner, inner.args, where
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, tokens, select=None, positions=None):
        logits = self.inner(tokens)
        for b, t in self.where(tokens):
            logits[b, t] = 0
            logits[b, t, 5] = 1.0
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
    wrong = [(b, t - 1) for b, t in answer_starts[:2]]  # the prediction at t - 1 is the choice of token t
    model = WrongAt(TraceModel(TOK, "addition", "retuning", problems), lambda tokens: wrong)
    hits = steps.step_hits(model, TOK, contexts, "retuning")
    assert [h["call"] for h in hits] == [True, True, True]
    assert [h["answer"] for h in hits] == [False, False, True]


def test_the_step_table_has_a_row_per_length_and_a_column_per_step():
    md = steps.table("addition retuning", {"1": {"answer": 1.0}, "2": {"call": 0.5, "answer": 0.25}})
    assert md.splitlines()[0] == "| addition retuning: length | answer | call |"
    assert md.splitlines()[3] == "| 2 | 25 | 50 |"


def in_contexts_starting(words):
    """Every position of the rows whose text starts with `words` (for WrongAt)."""
    return lambda tokens: [(b, slice(None)) for b, row in enumerate(tokens.tolist())
                           if TOK.decode(row).lstrip().startswith(words)]


def test_every_context_of_a_perfect_dp_recursion_is_right_by_kind_and_size():
    problems = eval_problems("dp", 3, 4, 99)
    acc = steps.by_context(TraceModel(TOK, "dp", "retuning", problems), TOK, "dp", [3], 4, 99)
    assert acc == {"Compute the maximum sum of nonadjacent subsequences of": {"3": 1.0},
                   "Create chosen indices array: sum array": {"1": 1.0, "2": 1.0, "3": 1.0},
                   "Create dp array": {"1": 1.0, "2": 1.0, "3": 1.0}}


def test_a_model_wrong_in_one_kind_of_sub_context_loses_only_that_kind():
    problems = eval_problems("dp", 3, 4, 99)
    model = WrongAt(TraceModel(TOK, "dp", "retuning", problems), in_contexts_starting("Create chosen"))
    acc = steps.by_context(model, TOK, "dp", [3], 4, 99)
    assert set(acc["Create chosen indices array: sum array"].values()) == {0.0}
    assert set(acc["Create dp array"].values()) == {1.0}


@pytest.mark.parametrize("task, prompt, kind", [("addition", "34 + 78\nSolution: ", "addition"),
                                                ("parity", "What is the parity of [0, 1]?\nSolution: ", "What is the parity of"),
                                                ("dp", "Create dp array [-2, 4]\nSolution: ", "Create dp array")])
def test_a_contexts_kind_is_its_prompts_words_before_the_numbers(task, prompt, kind):
    assert steps.context_kind(task, prompt) == kind


def test_the_context_table_has_a_row_per_kind_and_sizes_in_order():
    md = steps.table("dp retuning", {"a": {"2": 0.5}, "b": {"10": 1.0, "1": 1.0}}, rows="kind / size")
    assert md.splitlines()[0] == "| dp retuning: kind / size | 1 | 2 | 10 |"
    assert md.splitlines()[2] == "| a |  | 50 |  |"
