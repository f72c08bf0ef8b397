"""The recursive decoder against its oracles. Run: python -m pytest tests/test_decoder.py -q

Three kinds of model drive it: tracemodel.TraceModel, a "perfect" model that emits the true trace (checks the
control flow: calls, resumes, DP's two calls, the final answer), a briefly trained tiny Llama
(checks the fast decoder against the naive full-recompute oracle token for token) and random
models (garbage must end in failures with reasons, never an exception or a hang).
"""
import random

import pytest
import torch

import data
import retuning
import tasks
from checkpoint import Tokenizer
from decoder import Limits, decode, decode_naive, format_trace
from kvcache import KVCache
from model import Llama, ModelArgs
from positions import Positions
from runs import EMBEDDED_TOKENIZER, load_run
from tracemodel import TraceModel

TOK = Tokenizer(EMBEDDED_TOKENIZER)


def flatten(ctx):
    """Every context of a call tree, depth first, as (prompt, fed ids, segments)."""
    out = [(ctx.prompt, ctx.ids, ctx.segments)]
    for child in ctx.calls.values():
        out += flatten(child)
    return out


@pytest.mark.parametrize("task", list(tasks.TASKS))
@pytest.mark.parametrize("method", tasks.METHODS)
def test_a_perfect_model_solves_every_task_and_its_call_tree_is_the_true_trace(task, method):
    low = tasks.TASKS[task].min_len
    problems = [data.eval_problems(task, L, 2, 5)[i] for L in range(low, low + 5) for i in range(2)]
    model = TraceModel(TOK, task, method, problems)
    solves = decode(model, TOK, task, method, problems, Limits(max_context_len=4096, max_new=4096))
    for s in solves:
        assert s.error is None and s.answer == tasks.TASKS[task].answer(s.problem), format_trace(s)
        true = {segs[0]: segs for segs in tasks.TASKS[task].trace(s.problem, method)}
        tree = flatten(s.root)
        assert len(tree) == len(true)
        for prompt, ids, segments in tree:
            assert segments == true[prompt]
            assert ids == tasks.context_ids(TOK, segments)[0][:-1]  # all but the final EOS were fed


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Llama trained for ~150 steps on 1-3 digit Re-Tuning addition: it calls and answers,
    often wrongly, which is what an oracle comparison needs."""
    out = tmp_path_factory.mktemp("run") / "addition"
    retuning.main(["train", "--task", "addition", "--max-len", "3", "--steps", "150", "--base", "scratch", "--dim", "64",
                   "--n-layers", "2", "--n-examples", "4000", "--eval-every", "0", "--lr", "1e-2",
                   "--out", str(out), "--save-every", "1000"])
    model, tok, _ = load_run(str(out))
    return model


def mixed_problems():
    rng = random.Random(0)
    return [tasks.TASKS["addition"].sample(rng, L) for L in (1, 2, 3, 4, 6, 2, 3, 1, 5, 3)]


def assert_same(fast, slow):
    for a, b in zip(fast, slow):
        assert (a.answer, a.error, a.n_contexts) == (b.answer, b.error, b.n_contexts)
        assert [(p, i) for p, i, _ in flatten(a.root)] == [(p, i) for p, i, _ in flatten(b.root)]


def test_the_batched_decoder_and_the_naive_oracle_produce_identical_tokens(trained):
    problems = mixed_problems()
    lim = Limits(max_new=24, max_context_len=96, max_depth=8, max_contexts=10)
    fast = decode(trained, TOK, "addition", "retuning", problems, lim)
    assert_same(fast, decode_naive(trained, TOK, "addition", "retuning", problems, lim))
    assert any(s.n_contexts > 1 for s in fast), "the trained model should make calls"
    assert len({s.n_contexts for s in fast}) > 1, "problems should finish at different steps"


@pytest.mark.parametrize("pos", [Positions("stretched", max_gap=1), Positions("stretched", max_gap=3)])
def test_with_drawn_position_ids_the_batched_decoder_still_equals_the_oracle(trained, pos):
    problems = mixed_problems()[:6]
    lim = Limits(max_new=24, max_context_len=96, max_depth=8, max_contexts=10)
    fast = decode(trained, TOK, "addition", "retuning", problems, lim, positions=pos)
    assert_same(fast, decode_naive(trained, TOK, "addition", "retuning", problems, lim, positions=pos))
    assert torch.equal(fast[0].root.positions, pos.for_context(problems[0], 0, 96))  # one draw per (problem, context)


def test_every_guard_fails_its_problem_with_a_reason_in_both_decoders(trained):
    problems = mixed_problems()
    for lim, reason in [(Limits(max_depth=1), "recursion deeper than 1"),
                        (Limits(max_contexts=1), "more than 1 contexts"),
                        (Limits(max_new=2), "completion longer than 2 tokens"),
                        (Limits(max_context_len=12), "context longer than 12 tokens")]:
        fast = decode(trained, TOK, "addition", "retuning", problems, lim)
        assert_same(fast, decode_naive(trained, TOK, "addition", "retuning", problems, lim))
        assert any(s.error == reason for s in fast), (reason, [s.error for s in fast])


def test_a_batch_gives_the_same_results_as_each_problem_alone(trained):
    problems = mixed_problems()
    lim = Limits(max_new=24, max_context_len=96)
    batch = decode(trained, TOK, "addition", "retuning", problems, lim)
    alone = [decode(trained, TOK, "addition", "retuning", [p], lim)[0] for p in problems]
    assert_same(batch, alone)


def test_cache_slots_are_released_and_the_pool_does_not_grow_across_batches(trained):
    cache = KVCache(trained.args, 4, 96)
    sizes = []
    for _ in range(3):
        decode(trained, TOK, "addition", "retuning", mixed_problems(), Limits(max_new=24, max_context_len=96), cache=cache)
        assert cache.in_use() == 0
        sizes.append(cache.k.shape[1])
    assert sizes[0] == sizes[1] == sizes[2]


@pytest.mark.parametrize("task", list(tasks.TASKS))
@pytest.mark.parametrize("method", tasks.METHODS)
def test_a_model_emitting_random_tokens_yields_failures_with_reasons(task, method):
    torch.manual_seed(1)
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, hidden_dim=64, vocab_size=TOK.vocab_size)
    model = Llama(args)
    model.init_weights(1)
    with torch.no_grad():  # make EOS and the call/answer words frequent, so every path is taken
        for word in ("Call: 1 + 2\n", "Answer: ", "[1, 0]", "Return"):
            model.lm_head.weight[TOK.encode(word)] += torch.randn(len(TOK.encode(word)), args.dim) * 0.5
        model.lm_head.weight[TOK.eos_id] += 0.3 * model.embed_tokens.weight.mean(0)
    problems = data.eval_problems(task, 3, 6, 0)
    lim = Limits(max_new=12, max_context_len=64, max_depth=4, max_contexts=6)
    cache = KVCache(args, 2, 64)  # fewer slots than problems: slots must be handed back and reused
    solves = decode(model, TOK, task, method, problems, lim, cache=cache)
    assert cache.in_use() == 0  # every exit path released its slot
    assert_same(solves, decode_naive(model, TOK, task, method, problems, lim))
    reasons = ("recursion deeper", "token id", "more than 6 contexts", "completion longer", "context longer",
               "call without its newline", "text after the call", "unreadable answer", "cannot be returned")
    for s in solves:
        assert s.done and (s.error is None) == (s.answer is not None)
        assert s.error is None or s.error.startswith(reasons), s.error
    assert any(s.error for s in solves)


def test_baseline_and_scratchpad_decode_as_one_context_that_never_calls(trained):
    problems = mixed_problems()[:4]
    for method in ("baseline", "scratchpad"):
        lim = Limits(max_new=16, max_context_len=64)
        fast = decode(trained, TOK, "addition", method, problems, lim)
        assert_same(fast, decode_naive(trained, TOK, "addition", method, problems, lim))
        assert all(s.n_contexts == 1 and not s.root.calls for s in fast)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_decoder_on_cuda_matches_the_cpu_oracle(trained):
    problems = mixed_problems()
    lim = Limits(max_new=24, max_context_len=96)
    gpu = decode(trained.to("cuda"), TOK, "addition", "retuning", problems, lim)
    assert_same(gpu, decode_naive(trained.to("cpu"), TOK, "addition", "retuning", problems, lim))


def test_a_token_outside_the_tokenizer_fails_the_problem_instead_of_crashing():
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, hidden_dim=64, vocab_size=TOK.vocab_size + 8)
    model = Llama(args)
    model.init_weights(0)
    with torch.no_grad():
        model.lm_head.weight[-1] += 5 * model.embed_tokens.weight.mean(0).sign()  # padded id always wins
        model.embed_tokens.weight[:] = model.embed_tokens.weight.mean(0)
    s = decode(model, TOK, "parity", "retuning", ["[1, 0]"], Limits(max_new=8, max_context_len=64))[0]
    assert s.error == f"token id {TOK.vocab_size + 7} is outside the tokenizer"


def test_a_trace_thousands_of_levels_deep_formats_without_recursion():
    from decoder import Context, Solve
    s = Solve("[1]", "parity", "retuning", TOK, Limits())
    ctx = s.root
    for depth in range(2, 3002):  # a chain of 3000 calls, deeper than Python's recursion limit
        child = Context(f"level {depth}", depth=depth, segments=[f"level {depth}"])
        ctx.segments.append("Call: x\n")
        ctx.calls[len(ctx.segments) - 1] = child
        ctx = child
    lines = format_trace(s).splitlines()
    assert len(lines) == 2 * 3000 + 2 and lines[-2].startswith("  " * 3000 + "[3001]")


def test_problems_longer_than_the_documented_maximum_are_refused():
    for task, too_long in [("addition", "1" * 1001 + " + 1"), ("parity", str([1] * 1001))]:
        with pytest.raises(ValueError, match="limited to 1000"):
            tasks.TASKS[task].validate(too_long)
    assert tasks.TASKS["addition"].validate("9" * 1000 + " + 1")
