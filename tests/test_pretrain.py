"""The pretraining corpus of the embedded base. Run: python -m pytest tests/test_pretrain.py -q"""
import ast
import re

import pretrain


def test_the_corpus_is_deterministic_and_seed_dependent():
    assert pretrain.corpus(0, 200) == pretrain.corpus(0, 200)
    assert pretrain.corpus(0, 200) != pretrain.corpus(1, 200)


def test_every_edit_and_recall_completion_follows_from_its_prompt():
    for prompt, completion in pretrain.corpus(3, 3000):
        body = prompt.split("\n")[0]
        if body.startswith("Copy "):
            assert completion == body[len("Copy "):]
        elif body.startswith("Drop the first element of "):
            x = body[len("Drop the first element of "):]
            if x.startswith("["):
                assert ast.literal_eval(completion) == ast.literal_eval(x)[1:]
            else:
                assert completion.split(" + ") == [n[1:] for n in x.split(" + ")]
        elif body.startswith("Remember "):
            spans = re.findall(r"Remember (.*?)\.(?= Remember|$)", body)
            which = ["first", "second", "third"].index(prompt.split("What was the ")[1].split("?")[0])
            assert completion == spans[which]


def test_the_corpus_holds_no_multi_step_algorithm():
    """Only single facts: no multi-digit sums, no parity of a list, no dp arrays or chosen indices."""
    for prompt, completion in pretrain.corpus(4, 5000):
        assert not re.search(r"Carry|Output|parity|dp|chosen|Solution", prompt + completion)
        facts = re.fullmatch(r"(-?\d+) \+ (-?\d+)(?: \+ (\d))?\nAnswer: ", prompt)
        if facts:  # one column of an addition, or a small number plus a small number
            a, b = int(facts.group(1)), int(facts.group(2))
            assert (0 <= a <= 9 and 0 <= b <= 9) or (-5 <= a <= 5 and 0 <= b <= 60)
