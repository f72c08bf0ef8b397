"""Tests of tasks.py and data.py: SPEC's golden strings, properties over random problems, determinism, tokens.

Run: python -m pytest tests/test_tasks.py -q   (CPU only, a few seconds)
"""
import collections
import hashlib
import importlib.util
import itertools
import json
import os
import random

import pytest
import sentencepiece as spm

import data
import tasks
from checkpoint import Tokenizer
from tasks import METHODS, TASKS

HERE = os.path.dirname(os.path.abspath(__file__))
EMBEDDED = os.path.join(HERE, "..", "assets", "tokenizer.model")
ADD, PAR, DP = TASKS["addition"], TASKS["parity"], TASKS["dp"]


def random_problems(task, lengths=range(1, 9), per_length=15, seed=0):
    rng = random.Random(f"test/{task.name}/{seed}")
    return [task.sample(rng, n) for n in lengths for _ in range(per_length)]


def execute(task, problem):
    """Run a Re-Tuning trace as the decoder would: answer each context with its own completions,
    open the child named by each call, paste the child's value back; return the top's final text."""
    contexts = {ctx[0]: ctx for ctx in task.trace(problem, "retuning")}
    used = []

    def run(prompt):
        ctx = contexts[prompt]
        used.append(prompt)
        for i in range(1, len(ctx), 2):
            kind, value = tasks.read_completion(ctx[i])
            if kind == "answer":
                assert i == len(ctx) - 1, "an answer must end its context"
                return value
            assert kind == "call", value
            assert ctx[i + 1] == tasks.resume_text(run(tasks.child_prompt(value)))
        raise AssertionError("context ends without an answer")

    run(task.prompt(problem, "retuning"))
    assert sorted(used) == sorted(contexts) and len(contexts) == len(task.trace(problem, "retuning"))
    return contexts[task.prompt(problem, "retuning")][-1]


# ---- golden strings from SPEC.md ----

def test_addition_retuning_trace_of_1234_plus_5678_is_spec_verbatim():
    spec = [
        ("4 + 8\nSolution: ", "Carry 1, Output 2"),
        ("34 + 78\nSolution: ", "Call: 4 + 8\n"),
        ("34 + 78\nSolution: Call: 4 + 8\nReturn: Carry 1, Output 2\nAnswer: ", "Carry 1, Output 12"),
        ("234 + 678\nSolution: ", "Call: 34 + 78\n"),
        ("234 + 678\nSolution: Call: 34 + 78\nReturn: Carry 1, Output 12\nAnswer: ", "Carry 0, Output 912"),
        ("1234 + 5678\nSolution: ", "Call: 234 + 678\n"),
        ("1234 + 5678\nSolution: Call: 234 + 678\nReturn: Carry 0, Output 912\nAnswer: ", "Carry 0, Output 6912"),
    ]
    assert ADD.examples("1234 + 5678", "retuning") == spec


def test_addition_baseline_and_scratchpad_of_1234_plus_5678_are_spec_verbatim():
    assert ADD.examples("1234 + 5678", "baseline") == [("1234 + 5678\nAnswer: ", "6912")]
    assert ADD.examples("1234 + 5678", "scratchpad") == [("1234 + 5678\nSolution: ",
        "Carry 1, Output 2\nCarry 1, Output 12\nCarry 0, Output 912\nCarry 0, Output 6912")]


def test_unequal_addition_operands_are_zero_padded_before_the_first_call():
    assert ADD.examples("123 + 45678", "retuning")[-2] == ("00123 + 45678\nSolution: ", "Call: 0123 + 5678\n")


def test_parity_of_1_0_1_1_is_spec_verbatim_in_all_three_formats():
    q = "What is the parity of [1, 0, 1, 1]?\n"
    assert PAR.examples("[1, 0, 1, 1]", "baseline") == [(q + "Answer: ", "1")]
    assert PAR.examples("[1, 0, 1, 1]", "scratchpad") == [(q + "Solution: ", "Compute one element at a time. 1 1 0 1")]
    ex = PAR.examples("[1, 0, 1, 1]", "retuning")
    assert ex[:2] == [(q + "Solution: ", "Call: What is the parity of [0, 1, 1]?\n"),
                      (q + "Solution: Call: What is the parity of [0, 1, 1]?\nReturn: 0\nAnswer: ", "1")]
    assert ex[-1] == ("What is the parity of [1]?\nSolution: ", "1") and len(ex) == 7


def test_dp_of_3_minus2_4_is_spec_verbatim_in_all_three_kinds_of_context():
    assert DP.answer("[3, -2, 4]") == "[1, 2, 1]" and tasks.dp_solve([3, -2, 4])[0] == [7, 4, 4]
    assert DP.examples("[3, -2, 4]", "baseline")[0][0].endswith(
        "select the lexicographically smallest. Input = [3, -2, 4].\nAnswer: ")
    trace = DP.trace("[3, -2, 4]", "retuning")
    ch = "Create chosen indices array: sum array [7, 4, 4], item array [3, -2, 4], can use item True"
    assert trace[0] == ["Compute the maximum sum of nonadjacent subsequences of [3, -2, 4]\nSolution: ",
                        "Call: Create dp array [3, -2, 4]\n", "Return: [7, 4, 4]\nAnswer: ",
                        f"Call: {ch}\n", "Return: [1, 2, 1]\nAnswer: ", "[1, 2, 1]"]
    assert ["Create dp array [3, -2, 4]\nSolution: ",
            "Call with array minus first element. Call: Create dp array [-2, 4]\n", "Return: [4, 4]\nAnswer: ",
            "Append max(return[0], array[0] + return[1]) to return.\nAnswer: [7, 4, 4]"] in trace
    assert ["Create dp array [4]\nSolution: ", "Return [0] if negative else element.\nAnswer: [4]"] in trace
    assert [ch + "\nSolution: ",
            "If there is only 1 item, return 1 if we should use it else 2. If we should use the first item to get the "
            "sum, call False else True. Call: Create chosen indices array: sum array [4, 4], item array [-2, 4], "
            "can use item False\n",
            "Return: [2, 1]\nAnswer: ", "Append 1 if False else 2.\nAnswer: [1, 2, 1]"] in trace
    assert ["Create chosen indices array: sum array [4], item array [4], can use item True\nSolution: ",
            "If there is only 1 item, return 1 if we should use it else 2.\nAnswer: [1]"] in trace
    assert len(trace) == 7  # the top context, three dp-chain and three chosen-indices contexts


def test_dp_scratchpads_equal_the_reference_pairs_byte_for_byte():
    with open(os.path.join(HERE, "data", "scratchpad-dp-examples.jsonl")) as f:
        pairs = [json.loads(line) for line in f]
    for pair in pairs:
        problem = pair["prompt"][len("Question: Let's solve input = "):-1]
        assert DP.examples(problem, "scratchpad") == [(pair["prompt"], pair["completion"])]


# ---- properties over many random problems ----

@pytest.mark.parametrize("name", list(TASKS))
def test_executing_a_retuning_trace_returns_the_answer(name):
    task = TASKS[name]
    for problem in random_problems(task):
        assert task.parse("retuning", execute(task, problem)) == task.answer(problem), problem


@pytest.mark.parametrize("name,method", list(itertools.product(TASKS, METHODS)))
def test_parse_of_the_final_completion_gives_the_true_answer(name, method):
    task = TASKS[name]
    for problem in random_problems(task, per_length=5):
        top = [ctx for ctx in task.trace(problem, method) if ctx[0] == task.prompt(problem, method)]
        assert len(top) == 1 and task.parse(method, top[0][-1]) == task.answer(problem)


def test_addition_answers_strip_the_zeros_of_padded_operands():
    assert ADD.parse("retuning", ADD.trace("0012 + 0005", "retuning")[-1][-1]) == ADD.answer("0012 + 0005") == "17"
    assert ADD.parse("scratchpad", "Carry 1, Output 000") == "1000"
    assert ADD.parse("scratchpad", "Carry 0, Output 000") == "0"


def test_an_answer_of_more_digits_than_python_converts_is_read_not_raised():
    assert ADD.parse("scratchpad", "Carry 0, Output 0" + "7" * 5000) == "7" * 5000  # int() refuses > 4300 digits


@pytest.mark.parametrize("name,method", list(itertools.product(TASKS, METHODS)))
def test_parse_returns_none_on_garbage_and_never_raises(name, method):
    junk = ["", "\n", "Call: 1 + 2\n", "Call: 1 + 2", "Carry 2, Output 1", "[1, 3]", "[]", "Answer: ", "2.5", "x" * 300,
            "Compute one element at a time.", "Scratchpad: \n\nReconstructing all together, output=[].", "\x00\ud800"]
    assert all(TASKS[name].parse(method, text) is None for text in junk)


def brute_force(a):
    """Best sum and lexicographically smallest optimal choice over all non-adjacent subsets."""
    best = None
    for out in itertools.product((1, 2), repeat=len(a)):  # product() yields lexicographic order
        if any(out[i] == out[i + 1] == 1 for i in range(len(a) - 1)):
            continue
        total = sum(x for x, o in zip(a, out) if o == 1)
        if best is None or total > best[0]:
            best = (total, list(out))
    return best


def test_dp_reference_agrees_with_brute_force_up_to_length_10():
    rng = random.Random(0)
    arrays = [list(a) for n in (1, 2, 3) for a in itertools.product(range(-5, 6), repeat=n)]
    arrays += [[rng.randint(-5, 5) for _ in range(n)] for n in range(4, 11) for _ in range(60)]
    arrays += [[0] * 10, [-1] * 10, [5, 5, 5, 5, 5, 5, 5, 5, 5, 5]]  # ties everywhere
    for a in arrays:
        dp, out, _ = tasks.dp_solve(a)
        assert (dp[0], out) == brute_force(a), a


def test_addition_samples_have_exactly_the_requested_digits():
    rng = random.Random(1)
    for n in range(1, 20):
        for _ in range(20):
            a, b = ADD.sample(rng, n).split(" + ")
            assert len(a) == len(b) == n and (n == 1 or a[0] != "0" and b[0] != "0")


def test_user_text_is_normalised_and_malformed_text_gets_a_one_line_error():
    assert ADD.validate(" 1234+5678 ") == "1234 + 5678"
    assert PAR.validate("[1,0, 1]") == "[1, 0, 1]" and DP.validate(" [3,-2,4]") == "[3, -2, 4]"
    malformed = [(ADD, "12 +"), (ADD, "-1 + 2"), (PAR, "[1, 2]"), (PAR, "[]"), (DP, "[6]"), (DP, "3, 4"), (DP, "[1,]")]
    for task, bad in malformed:
        with pytest.raises(ValueError, match=f"^{task.name} problem must look like '.*', got .*$") as e:
            task.validate(bad)
        assert "\n" not in str(e.value) and repr(bad) in str(e.value)


def test_read_completion_follows_the_shared_rules():
    assert tasks.read_completion("Call with array minus first element. Call: Create dp array [4]\n") == \
        ("call", "Create dp array [4]")
    assert tasks.read_completion("Call: 4 + 8") == ("error", "call without its newline")
    assert tasks.read_completion("Append 1 if False else 2.\nAnswer: [2, 1]") == ("answer", "[2, 1]")
    assert tasks.read_completion("Carry 1, Output 2") == ("answer", "Carry 1, Output 2")
    assert tasks.child_prompt("4 + 8") == "4 + 8\nSolution: "
    assert tasks.resume_text("[4]") == "Return: [4]\nAnswer: "


# ---- data streams ----

def digest(obj):
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()


def test_the_same_seed_gives_byte_identical_data_on_any_machine():
    drawn = [data.training_contexts(t, m, TASKS[t].paper_train_len, 0, 20) for t, m in itertools.product(TASKS, METHODS)]
    drawn += [data.eval_problems(t, 7, 5, 0) for t in TASKS]
    assert digest(drawn) == "dcf91e97e14e078374464b13f20594a396a5558b7de1c9e622fe08c74522ab2e"


def test_training_data_is_deterministic_and_seed_dependent():
    once = data.training_contexts("parity", "retuning", 6, 3, 50)
    assert once == data.training_contexts("parity", "retuning", 6, 3, 50)
    assert once != data.training_contexts("parity", "retuning", 6, 4, 50)


def test_eval_problems_come_from_a_stream_separate_from_training():
    train = {ctx[0] for ctx in data.training_contexts("parity", "retuning", 21, 0, 2000)}
    evals = data.eval_problems("parity", 21, 200, 0)
    assert all(PAR.length(p) == 21 for p in evals) and len(set(evals)) > 190
    assert not {PAR.prompt(p, "retuning") for p in evals} & train
    assert evals != data.eval_problems("parity", 21, 200, 1)


def test_addition_training_over_weights_long_problems_and_swaps_operands():
    problems = [ctx[0] for ctx in data.training_contexts("addition", "baseline", 6, 0, 3000)]
    lengths = collections.Counter(ADD.length(p.split("\n")[0]) for p in problems)
    assert lengths[6] > lengths[5] > lengths[3] > lengths[1]
    raw = [p.split("\n")[0].split(" + ") for p in problems]
    assert sum(a[0] == "0" for a, b in raw) > 200 and sum(b[0] == "0" for a, b in raw) > 200  # both orders


def test_addition_retuning_contexts_are_deduplicated_and_balanced_over_sizes_with_short_ones_upsampled():
    contexts = data.training_contexts("addition", "retuning", 6, 0, 3000)
    counts = collections.Counter(map(tuple, contexts))
    sizes = collections.Counter(data.context_size("addition", c[0]) for c in contexts)
    assert max(k for c, k in counts.items() if data.context_size("addition", c[0]) > 2) == 1
    assert sizes[1] == sizes[2] == data.UPSAMPLE * sizes[6] and sizes[3] == sizes[6]
    assert len({c for c in counts if data.context_size("addition", c[0]) == 1}) == 100  # every 1-digit fact


def test_dp_retuning_with_upsample_one_gives_every_sub_problem_size_an_equal_share():
    def sizes(**kw):
        return collections.Counter(data.context_size("dp", c[0]) for c in data.training_contexts("dp", "retuning", 4, 0, 2000, **kw))
    assert sizes(upsample=1) == {1: 500, 2: 500, 3: 500, 4: 500}
    assert sizes() == {1: 750, 2: 750, 3: 250, 4: 250}  # the default: sizes 1-2 three times a larger one


def test_parity_retuning_trains_on_sub_lists_with_short_contexts_upsampled():
    contexts = data.training_contexts("parity", "retuning", 21, 0, 2100)
    sizes = collections.Counter(ctx[0].count(",") + 1 for ctx in contexts)
    assert max(sizes) == 21 and min(sizes) == 1
    assert sizes[1] / sizes[10] == pytest.approx(data.UPSAMPLE, rel=0.05)
    assert {len(ctx) for ctx in data.training_contexts("parity", "baseline", 21, 0, 50)} == {2}


def test_small_dp_training_uses_every_array_exactly_once_per_epoch():
    problems = [ctx[0] for ctx in data.training_contexts("dp", "scratchpad", 3, 0, 11 ** 2 + 11 ** 3)]
    assert len(set(problems)) == 11 ** 2 + 11 ** 3


def test_large_dp_training_samples_arrays_of_length_2_to_max_len():
    contexts = data.training_contexts("dp", "scratchpad", 8, 0, 300)
    problems = [ctx[0][len("Question: Let's solve input = "):-1] for ctx in contexts]
    assert {DP.length(p) for p in problems} <= set(range(2, 9)) and max(map(DP.length, problems)) == 8


# ---- tokens ----

@pytest.fixture(scope="module")
def tok():
    return Tokenizer(EMBEDDED)


def test_context_ids_are_bos_then_separately_encoded_segments_with_loss_on_completions(tok):
    segs = ADD.trace("34 + 78", "retuning")[1]
    ids, mask = tasks.context_ids(tok, segs)
    parts = [tasks.prompt_ids(tok, segs[0]), tasks.completion_ids(tok, segs[1]),
             tasks.resume_ids(tok, "Carry 1, Output 2"), tasks.completion_ids(tok, segs[3])]
    assert ids == sum(parts, []) and ids[0] == tok.bos_id and ids.count(tok.eos_id) == 2
    assert mask == [0] * len(parts[0]) + [1] * len(parts[1]) + [0] * len(parts[2]) + [1] * len(parts[3])
    with pytest.raises(ValueError):
        tasks.context_ids(tok, segs[:2] + ["Return: x\n", segs[3]])


@pytest.mark.skipif(spm.__version__ != "0.2.3", reason="the embedded tokenizer was trained by sentencepiece 0.2.3 "
                    "(requirements-dev.txt pins it); another version's trainer may write other bytes")
def test_building_the_tokenizer_twice_gives_the_committed_file(tmp_path):
    data.build_tokenizer(tmp_path / "a.model")
    data.build_tokenizer(tmp_path / "b.model")
    with open(EMBEDDED, "rb") as f:
        assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes() == f.read()


def test_every_segment_of_every_format_survives_encode_decode(tok):
    for name, method in itertools.product(TASKS, METHODS):
        for problem in random_problems(TASKS[name], lengths=(1, 2, 7, 24), per_length=2):
            for segment in itertools.chain(*TASKS[name].trace(problem, method)):
                assert tok.decode(tok.encode(segment)) == segment


def test_digits_are_single_tokens_and_numbers_are_encoded_digit_by_digit(tok):
    assert all(len(tok.encode(d)) == 2 and tok.decode(tok.encode(d)[1:]) == d for d in "0123456789")
    for text in [ADD.prompt(p, "scratchpad") + ADD.scratchpad(p) for p in random_problems(ADD, (3, 15, 40), 3)]:
        pieces = [tok.decode([i]) for i in tok.encode(text)]
        assert all(len(p) == 1 for p in pieces if any(c.isdigit() for c in p))
        assert sum(p.isdigit() for p in pieces) == sum(c.isdigit() for c in text)


def test_show_makes_newlines_visible_and_counts_tokens(tok):
    text = data.show("dp", "retuning", 2, tok)
    contexts = data.training_contexts("dp", "retuning", 5, 0, 2)
    assert "⏎" in text and text.count("== dp / retuning #") == 2
    assert f"#0: {len(tasks.context_ids(tok, contexts[0])[0])} tokens" in text


def test_token_table_shows_retuning_sequences_shorter_than_scratchpads(tok):
    toks = {"embedded": tok}
    spec = importlib.util.find_spec("mistral_common")
    if spec:  # the Llama-recipe tokenizer shipped inside mistral_common
        toks["llama-recipe"] = Tokenizer(os.path.join(spec.submodule_search_locations[0], "data", "tokenizer.model.v1"))
    table = data.token_table(toks, n=200)
    rows = {tuple(cells[:2]): cells[2:] for cells in (r.strip("| ").split(" | ") for r in table.splitlines()[2:])}
    assert len(rows) == 9 and all(len(cells) == 2 * len(toks) for cells in rows.values())
    for task in ("addition", "dp"):  # SPEC Results: far fewer tokens per example than the scratchpad
        assert float(rows[(task, "retuning")][1]) < float(rows[(task, "scratchpad")][1])


def test_the_spec_in_the_repository_is_the_shared_one():
    """docs/SPEC.md travels with a clone; it must stay identical to the project's shared SPEC."""
    here = os.path.join(HERE, "..", "docs", "SPEC.md")
    shared = os.path.join(HERE, "..", "..", "shared", "SPEC.md")
    if not os.path.exists(shared):
        pytest.skip("no ../shared/SPEC.md beside this checkout to compare with")
    with open(here, "rb") as a, open(shared, "rb") as b:
        assert a.read() == b.read()
