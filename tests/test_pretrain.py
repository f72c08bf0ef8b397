"""The pretraining corpus of the embedded base. Run: python -m pytest tests/test_pretrain.py -q"""
import ast
import re


import pretrain
from checkpoint import Tokenizer
from runs import EMBEDDED_BASE, resolve


def test_the_corpus_is_deterministic_and_seed_dependent():
    assert pretrain.corpus(0, 200) == pretrain.corpus(0, 200)
    assert pretrain.corpus(0, 200) != pretrain.corpus(1, 200)


def test_every_edit_and_recall_completion_follows_from_its_prompt():
    for prompt, completion in pretrain.corpus(3, 3000):
        body = prompt.removesuffix("\nAnswer: ").rsplit("\nWhat was the ", 1)[0]  # spans may hold newlines
        if body.startswith("Copy "):
            assert completion == body[len("Copy "):]
        elif body.startswith("Drop the first element of "):
            x = body[len("Drop the first element of "):]
            if x.startswith("["):
                assert ast.literal_eval(completion) == ast.literal_eval(x)[1:]
            else:
                assert completion.split(" + ") == [n[1:] for n in x.split(" + ")]
        elif body.startswith("Remember "):
            spans = re.findall(r"Remember (.*?)\.(?= Remember|$)", body, re.S)
            which = ["first", "second", "third"].index(prompt.split("What was the ")[1].split("?")[0])
            assert completion == spans[which]


def test_the_corpus_holds_no_multi_step_algorithm():
    """Only single facts: no multi-digit sums, no parity of a list, no dp arrays or chosen indices."""
    for prompt, completion in pretrain.corpus(4, 5000):
        # the tasks' words do occur (in random order, so that the base can write them), their sentences never
        assert not re.search(r"Carry \d|Output \d|parity of \[|dp array \[|indices array: sum \[",
                             prompt + completion)
        facts = re.fullmatch(r"(-?\d+) \+ (-?\d+)(?: \+ (\d))?\nAnswer: ", prompt)
        if facts:  # one column of an addition, or a small number plus a small number
            a, b = int(facts.group(1)), int(facts.group(2))
            assert (0 <= a <= 9 and 0 <= b <= 9) or (-5 <= a <= 5 and 0 <= b <= 60)


def test_word_items_carry_no_digits_and_cover_every_word():
    vocab = set(pretrain.WORDS)
    words = [c for p, c in pretrain.corpus(6, 3000) if p.startswith("Copy ") and set(c.split(" ")) <= vocab]
    assert len(words) > 50 and not any(re.search(r"\d", w) for w in words)
    assert set(" ".join(words).split(" ")) == vocab  # every word written at least once, newline included


def test_the_committed_base_loads_and_copies_what_it_was_pretrained_on():
    """assets/base, the default --base of `train`: fresh copies and drop-firsts, in its own positions."""
    import probe
    from model import Llama
    from positions import Positions
    base = resolve(EMBEDDED_BASE)
    model = Llama.from_pretrained(base)
    scores = probe.quick(model, Tokenizer(f"{base}/tokenizer.model"), Positions.of_base(base), count=30, seed=11)
    assert min(scores["copy 16"], scores["drop 8+8"]) >= 0.9, scores


def test_pretrain_probes_with_its_own_positions_and_exports_a_loadable_base(tmp_path):
    import json

    import retuning
    from model import Llama
    retuning.main(["pretrain", "--dim", "32", "--n-layers", "1", "--n-heads", "2", "--n-examples", "64",
                   "--batch-size", "8", "--steps", "2", "--eval-every", "2", "--positions", "stretched", "--max-gap", "2",
                   "--out", str(tmp_path / "run"), "--export", str(tmp_path / "base")])
    probes = [r["probe"] for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl")) if "probe" in r]
    assert probes and set(probes[0]) >= {"copy 16", "drop 8+8", "drop 8+8 gap 1"}
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (cfg["positions"], cfg["max_gap"]) == ("stretched", 2)
    assert Llama.from_pretrained(str(tmp_path / "base")).args.dim == 32
