"""Tests for positions.py, the position-id schemes. Run: python -m pytest tests/test_positions.py -q"""
import json

import pytest
import torch

import retuning
from positions import Positions

MASKS = [[0, 0, 0, 1, 1, 1, 0, 0, 1, 1], [0, 0, 1, 1, 1]]  # prompt, completion, returned value, completion


def test_contiguous_draws_nothing_and_an_unknown_scheme_is_refused():
    assert Positions().for_batch(MASKS, 10, 0) is None and Positions().for_context("1 + 2", 0, 50) is None
    for gone in ("skips", "gaps", "randomized"):  # the two that lost are in the history only
        with pytest.raises(ValueError, match=f"unknown position scheme '{gone}'"):
            Positions(gone)


def test_stretched_steps_are_1_to_1_plus_max_gap_in_training_and_at_test_whatever_the_length():
    s = Positions("stretched", max_gap=3)
    for row in list(s.for_batch(MASKS, 10, seed=1)) + [s.for_context("12 + 34", 0, 400)]:
        step = row[1:] - row[:-1]
        assert row[0] == 0 and step.min() >= 1 and step.max() <= 4
    long = s.for_context("12 + 34", 0, 400)
    assert set((long[1:] - long[:-1]).tolist()) == {1, 2, 3, 4}
    # a context's ids do not depend on the decoder's budget for it: a longer budget extends them
    assert torch.equal(s.for_context("12 + 34", 0, 40), long[:40])
    assert not torch.equal(long, s.for_context("12 + 34", 1, 400))


def test_a_run_records_its_scheme_and_training_with_it_is_deterministic(tmp_path):
    tiny = ["train", "--task", "addition", "--base", "scratch", "--dim", "32", "--n-layers", "2", "--n-heads", "2",
            "--batch-size", "8", "--n-examples", "64", "--eval-every", "0", "--steps", "3", "--lora-dropout", "0"]
    for name, extra in [("a", ["--positions", "stretched"]), ("b", ["--positions", "stretched"]), ("c", [])]:
        retuning.main(tiny + extra + ["--out", str(tmp_path / name)])
    loss = {n: [json.loads(line)["loss"] for line in open(tmp_path / n / "metrics.jsonl")] for n in "abc"}
    assert loss["a"] == loss["b"] and loss["a"][1:] != loss["c"][1:]  # step 1's weights are equal: the same first loss
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert Positions.of_run(cfg) == Positions("stretched")


def test_a_fine_tune_inherits_its_bases_scheme_unless_told_otherwise(tmp_path):
    tiny = ["--dim", "32", "--n-layers", "1", "--n-heads", "2", "--batch-size", "8", "--n-examples", "16",
            "--eval-every", "0", "--steps", "1"]
    retuning.main(["pretrain", *tiny, "--positions", "stretched", "--max-gap", "2", "--out", str(tmp_path / "pt")])
    base = str(tmp_path / "pt" / "model")
    assert Positions.of_base(base) == Positions("stretched", max_gap=2)
    for name, extra, want in [("own", [], Positions("stretched", 2)), ("told", ["--positions", "contiguous"], Positions("contiguous", 2)),
                              ("gap", ["--max-gap", "3"], Positions("stretched", 3))]:
        retuning.main(["train", *tiny, "--base", base, "--out", str(tmp_path / name), *extra])
        assert Positions.of_run(json.loads((tmp_path / name / "config.json").read_text())) == want
