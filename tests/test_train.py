"""Training loop: loss, loss mask, exact resume, atomic checkpoints. Run: python -m pytest tests/test_train.py -q"""
import copy
import dataclasses
import json
import os
import shutil
import signal

import pytest
import torch

import retuning
import tasks
import train
from checkpoint import Tokenizer
from data import batches, collate, training_contexts
from lora import TARGETS, apply_lora, lora_layers
from model import Llama, ModelArgs
from runs import EMBEDDED_TOKENIZER, save_checkpoint

TOK = Tokenizer(EMBEDDED_TOKENIZER)
TINY = ["--base", "scratch", "--dim", "32", "--n-layers", "2", "--n-heads", "2", "--batch-size", "8", "--micro-batch-size", "4",
        "--n-examples", "400", "--eval-every", "0", "--warmup", "2"]


def losses(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_loss_goes_down_on_a_tiny_model_in_a_few_seconds(tmp_path):
    retuning.main(["train", "--task", "parity", "--steps", "40", "--lr", "1e-2", "--out", str(tmp_path / "r"), *TINY])
    curve = losses(tmp_path / "r")
    assert len(curve) == 40 and sum(curve[-5:]) / 5 < 0.5 * curve[0]


def test_the_loss_mask_covers_exactly_the_completions_and_their_eos():
    segs = tasks.TASKS["dp"].trace("[3, -2, 4]", "retuning")[0]  # top context: two calls and an answer
    ids, mask = tasks.context_ids(TOK, segs)
    x, y = collate([(ids, mask)], TOK.eos_id, "cpu")
    targets = [t for t in y[0].tolist() if t != -100]
    expected = sum((tasks.completion_ids(TOK, c) for c in segs[1::2]), [])
    assert targets == expected
    assert torch.equal(x[0], torch.tensor(ids[:-1]))


@pytest.fixture
def lora_base(tmp_path):
    """A small HF-layout base with the embedded tokenizer, to train LoRA (with dropout) on."""
    args = ModelArgs(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=TOK.vocab_size)
    model = Llama(args)
    model.init_weights(0)
    model.save_pretrained(tmp_path / "base")
    shutil.copy(EMBEDDED_TOKENIZER, tmp_path / "base" / "tokenizer.model")
    return str(tmp_path / "base")


def test_ctrl_c_in_the_middle_of_a_step_then_resume_gives_the_uninterrupted_adapter_bitwise(tmp_path, lora_base, monkeypatch):
    common = ["train", *TINY, "--task", "addition", "--base", lora_base, "--lora-r", "4", "--lora-dropout", "0.1",
              "--steps", "12", "--save-every", "4", "--lr", "5e-3"]  # --base after TINY's "scratch": LoRA it is
    retuning.main(common + ["--out", str(tmp_path / "whole")])
    real_step, calls = train.train_step, []

    def interrupted(model, *a, **k):  # a real SIGINT during step 7's forward, after dropout drew noise
        calls.append(1)
        if len(calls) == 7:
            def once(*_):
                hook.remove()
                os.kill(os.getpid(), signal.SIGINT)
            hook = model.layers[0].mlp.register_forward_hook(once)
        return real_step(model, *a, **k)
    monkeypatch.setattr(train, "train_step", interrupted)
    retuning.main(common + ["--out", str(tmp_path / "split")])
    assert len(losses(tmp_path / "split")) == 7  # step 7 completed, then the run stopped and saved
    monkeypatch.setattr(train, "train_step", real_step)
    retuning.main(common + ["--out", str(tmp_path / "split"), "--resume"])
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    adapter = "adapter/adapter_model.safetensors"
    assert (tmp_path / "split" / adapter).read_bytes() == (tmp_path / "whole" / adapter).read_bytes()


def test_a_half_written_checkpoint_never_replaces_a_good_one(tmp_path, monkeypatch):
    run = tmp_path / "r"
    retuning.main(["train", "--task", "parity", "--steps", "3", "--out", str(run), *TINY])
    good = (run / "checkpoint.pt").read_bytes()

    def crash(obj, f):  # the disk fills up half way through the write
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("No space left on device")
    monkeypatch.setattr(torch, "save", crash)
    model, _ = train.build_model(train.TrainConfig(run=str(run), dim=32, n_layers=2, n_heads=2))
    with pytest.raises(OSError):
        save_checkpoint(str(run), model, torch.optim.AdamW(model.parameters()), 99, 1.0)
    assert (run / "checkpoint.pt").read_bytes() == good
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 3


def error_of(argv, capsys) -> str:
    """The one-line error of a refused command (exit code 2, no traceback)."""
    capsys.readouterr()  # what earlier commands printed
    with pytest.raises(SystemExit) as e:
        retuning.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_an_existing_run_is_not_overwritten_without_resume_or_overwrite(tmp_path, capsys):
    run = str(tmp_path / "r")
    retuning.main(["train", "--task", "parity", "--steps", "1", "--out", run, *TINY])
    assert "--resume" in error_of(["train", "--task", "parity", "--steps", "1", "--out", run, *TINY], capsys)


def test_overwrite_removes_the_previous_runs_outputs_first(tmp_path):
    run = tmp_path / "r"
    retuning.main(["train", "--task", "parity", "--steps", "2", "--out", str(run), *TINY])
    (run / "adapter").mkdir()  # as if a LoRA run had been here before
    retuning.main(["train", "--task", "parity", "--steps", "1", "--out", str(run), "--overwrite", *TINY])
    assert not (run / "adapter").exists() and len(losses(run)) == 1


def test_bad_run_folders_and_flags_are_one_line_errors_and_change_nothing(tmp_path, capsys, lora_base):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    before = sorted(os.listdir(lora_base))
    cases = {
        "not a run folder": ["train", *TINY, "--steps", "1", "--out", str(tmp_path / "notes"), "--overwrite"],
        "base model": ["train", *TINY, "--base", lora_base, "--steps", "1", "--out", lora_base, "--overwrite"],
        "nothing to resume": ["train", *TINY, "--steps", "1", "--out", str(tmp_path / "new"), "--resume"],
        "smaller than one batch": ["train", *TINY, "--n-examples", "3", "--out", str(tmp_path / "x")],
        "is a base model, not a run": ["solve", "--run", lora_base, "1 + 2"],
        "no such run folder": ["solve", "--run", str(tmp_path / "missing"), "1 + 2"],
    }
    for want, argv in cases.items():
        assert want in error_of(argv, capsys), want
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine" and sorted(os.listdir(lora_base)) == before
    assert not (tmp_path / "new").exists() and not (tmp_path / "x").exists()
    for flag, value in [("--steps", "0"), ("--save-every", "0"), ("--max-len", "-2"), ("--lora-r", "0"),
                        ("--lora-targets", "qproj"), ("--lr", "abc"), ("--weight-decay", "nan"), ("--weight-decay", "-1")]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            retuning.main(["train", *TINY, flag, value, "--out", str(tmp_path / "y")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and value in err and len(err.strip().splitlines()) == 1, err


def test_resume_refuses_a_different_config_before_writing_anything(tmp_path, capsys):
    run = tmp_path / "r"
    retuning.main(["train", "--task", "parity", "--steps", "2", "--out", str(run), *TINY])
    config = (run / "config.json").read_bytes()
    assert "--task ('parity' in the run, 'addition' now)" in error_of(
        ["train", "--task", "addition", "--steps", "4", "--out", str(run), "--resume", *TINY], capsys)
    assert "--lr (0.002 in the run, 0.5 now)" in error_of(
        ["train", "--task", "parity", "--steps", "4", "--lr", "0.5", "--out", str(run), "--resume", *TINY], capsys)
    assert (run / "config.json").read_bytes() == config


def test_resume_with_more_steps_extends_a_finished_run_at_its_final_learning_rate(tmp_path):
    """--resume --steps N on a finished run (no --n-examples: the run's own is kept) continues it;
    the cosine still spans the first budget, so the extension runs at its final 10% of --lr."""
    run = tmp_path / "r"
    flags = ["train", "--task", "parity", "--base", "scratch", "--dim", "32", "--n-layers", "2", "--n-heads", "2",
             "--batch-size", "8", "--eval-every", "0", "--warmup", "2", "--lr", "0.002", "--out", str(run)]
    retuning.main([*flags, "--steps", "6"])
    first = [json.loads(line) for line in open(run / "metrics.jsonl")]
    retuning.main([*flags, "--steps", "10", "--resume"])
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    config = json.loads((run / "config.json").read_text())
    assert [r["step"] for r in rows] == list(range(1, 11)) and rows[:6] == first
    assert [r["lr"] for r in rows[6:]] == pytest.approx([0.0002] * 4)
    assert (config["steps"], config["schedule_steps"], config["n_examples"]) == (10, 6, 48)


def test_a_malformed_problem_is_a_one_line_error(tmp_path, capsys):
    run = str(tmp_path / "r")
    retuning.main(["train", "--task", "addition", "--steps", "1", "--out", run, *TINY])
    assert "addition" in error_of(["solve", "--run", run, "12 plus 3"], capsys)


def test_solve_prints_the_call_tree_and_the_answer(tmp_path, capsys):
    run = str(tmp_path / "r")
    retuning.main(["train", "--task", "addition", "--steps", "1", "--out", run, *TINY])
    retuning.main(["solve", "--run", run, "12 + 34"])
    out = capsys.readouterr().out
    assert "'12 + 34\\nSolution: '" in out and "true answer: 46" in out


def test_fifty_training_steps_give_the_losses_of_a_plain_reference_that_computes_every_logit():
    """train_step (bucketed batches, micro-batches, the output layer only where there is loss) is an
    optimisation of the textbook step: full logits of the padded batch, mean cross-entropy over
    the -100-masked labels, one backward. Same batches, same start: same 50 losses."""
    data = [tasks.context_ids(TOK, segs) for segs in training_contexts("addition", "retuning", 4, 0, 400)]
    cfg = train.TrainConfig(run="unused", batch_size=8, micro_batch_size=3, lr=3e-3)
    ours = Llama(ModelArgs(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=TOK.vocab_size)).train()
    ours.init_weights(0)
    ref = copy.deepcopy(ours)
    opts = [torch.optim.AdamW(m.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
            for m in (ours, ref)]
    stream = batches(data, cfg.batch_size, 0)
    for step in range(50):
        items = [data[i] for i in next(stream)]
        loss, _, _ = train.train_step(ours, opts[0], items, cfg, step)
        x, y = collate(items, TOK.eos_id, "cpu")
        ref_loss = torch.nn.functional.cross_entropy(ref(x).flatten(0, 1), y.flatten(), ignore_index=-100)
        ref_loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.clip)
        opts[1].step()
        opts[1].zero_grad()
        assert loss == pytest.approx(ref_loss.item(), rel=1e-4), step


def tiny_model():
    model = Llama(ModelArgs(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=TOK.vocab_size)).train()
    model.init_weights(0)
    return model


def assert_checkpointing_changes_no_gradient(model):
    """Gradients of the trainable weights with and without gradient checkpointing, from the same
    RNG state (dropout draws), must agree."""
    x = torch.randint(0, TOK.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = []
    for flag in (False, True):
        model.gradient_checkpointing = flag
        model.zero_grad()
        torch.manual_seed(1)
        model(x).logsumexp(-1).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    assert_checkpointing_changes_no_gradient(tiny_model())


def test_gradient_checkpointing_redraws_the_same_lora_dropout_masks():
    """The recomputation must see the masks the forward drew (one per input tensor, lora.Dropout)."""
    model = apply_lora(tiny_model(), r=4, alpha=8, dropout=0.3, targets=TARGETS)
    for m in lora_layers(model):
        torch.nn.init.normal_(m.lora_B.weight, std=0.1)
    assert_checkpointing_changes_no_gradient(model)


def test_eval_writes_results_json_a_table_and_one_plot_per_task(tmp_path, capsys):
    import eval as evaluation
    run = str(tmp_path / "r")
    retuning.main(["train", "--task", "parity", "--steps", "2", "--out", run, *TINY])
    evaluation.main([run, "--lengths", "1-3", "--per-length", "2", "--out", str(tmp_path / "res")])
    results = json.loads((tmp_path / "res" / "results.json").read_text())["runs"]
    assert [(r["task"], r["method"], r["train_length"]) for r in results] == [("parity", "retuning", 6)]
    assert set(results[0]["accuracy"]) == {"1", "2", "3"} and results[0]["count"] == {"1": 2, "2": 2, "3": 2}
    assert (tmp_path / "res" / "parity.png").stat().st_size > 1000
    assert "| parity | retuning | contiguous | 6 |" in (tmp_path / "res" / "results.md").read_text()
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())  # what training cost
    assert summary["steps"] == 2 and summary["examples_seen"] == 16 and summary["peak_rss_mib"] > 50
    assert results[0]["training"] == summary and results[0]["out_of_distribution"] is None  # 1-3 <= 6
    # as if a second run had been evaluated before position schemes existed
    other = {**{k: v for k, v in results[0].items() if k != "positions"}, "method": "baseline"}
    (tmp_path / "other.json").write_text(json.dumps({"runs": [other]}))
    evaluation.main(["--combine", str(tmp_path / "res" / "results.json"), str(tmp_path / "other.json"), "--out", str(tmp_path / "both")])
    md = (tmp_path / "both" / "results.md").read_text()
    assert "| parity | retuning | contiguous | 6 |" in md and "| parity | baseline | contiguous | 6 |" in md and (tmp_path / "both" / "parity.png").exists()


def test_combine_joins_one_runs_lengths_from_two_evaluations_and_recomputes_its_means(tmp_path, capsys):
    import eval as evaluation

    def record(method, acc, by_step=None):  # as evaluate writes it, one record per run
        return {"run": f"runs/dp-{method}", "task": "dp", "method": method, "train_length": 5, "positions": "contiguous",
                "accuracy": acc, "count": {L: 50 for L in acc}, "by_step": by_step, "seconds": 10.0,
                "generated_tokens": 100, **evaluation.means(acc, 5), "training": None}
    inside = record("retuning", {"4": 1.0, "5": 0.9}, {"4": {"call": 1.0}, "5": {"call": 0.9}})
    beyond = record("retuning", {"6": 0.6, "7": 0.4}, {"6": {"call": 0.7}, "7": {"call": 0.5}})
    files = []
    for name, runs in [("in", [inside]), ("beyond", [beyond, record("baseline", {"6": 0.1, "7": 0.0})])]:
        files.append(str(tmp_path / f"{name}.json"))
        (tmp_path / f"{name}.json").write_text(json.dumps({"runs": runs}))
    evaluation.main(["--combine", *files, "--out", str(tmp_path / "all")])
    rt, base = json.loads((tmp_path / "all" / "results.json").read_text())["runs"]
    assert list(rt["accuracy"]) == ["4", "5", "6", "7"] and list(rt["by_step"]) == ["4", "5", "6", "7"]
    assert rt["in_distribution"] == pytest.approx(0.95) and rt["out_of_distribution"] == pytest.approx(0.5)
    assert rt["seconds"] == 20.0 and rt["generated_tokens"] == 200 and base["method"] == "baseline"
    assert "| dp | baseline | contiguous |  | 5.0 | +45.0 |" in (tmp_path / "all" / "results.md").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # the same length twice: which result would the table show?
        evaluation.main(["--combine", files[1], files[1], "--out", str(tmp_path / "twice")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "runs/dp-retuning is evaluated at length 6 in two" in err and len(err.strip().splitlines()) == 1


def test_eval_goes_on_past_a_bad_run_and_refuses_bad_lengths_in_one_line(tmp_path, capsys):
    import eval as evaluation
    run = str(tmp_path / "r")
    retuning.main(["train", "--task", "parity", "--steps", "1", "--out", run, *TINY])
    with pytest.raises(SystemExit) as e:
        evaluation.main([str(tmp_path / "missing"), run, "--lengths", "1-2", "--per-length", "1", "--out", str(tmp_path / "res")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # beside the good run's progress bar
    assert e.value.code == 2 and len(errors) == 1 and "missing" in errors[0], err
    assert json.loads((tmp_path / "res" / "results.json").read_text())["runs"][0]["run"] == run  # the good run is kept
    for bad in ["abc", "-3", "1-2-3", "5-1", "1--3", "0", "", "4400"]:
        with pytest.raises(SystemExit) as e:
            evaluation.main([run, "--lengths", bad])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "lengths must look like" in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit):
        evaluation.main([run, "--per-length", "0"])


def test_eval_writes_a_new_folder_per_evaluation_by_default(tmp_path, monkeypatch):
    import eval as evaluation
    monkeypatch.chdir(tmp_path)
    retuning.main(["train", "--task", "parity", "--steps", "1", "--out", "runs/p", *TINY])
    for second in ("2026-01-01_000000", "2026-01-01_000001"):
        monkeypatch.setattr(evaluation.time, "strftime", lambda fmt: second)
        evaluation.main(["--lengths", "1", "--per-length", "1"])
    assert sorted(os.listdir(tmp_path / "runs" / "eval")) == ["2026-01-01_000000", "2026-01-01_000001"]


def test_the_comparison_gives_re_tunings_margin_beyond_the_training_lengths():
    import eval as evaluation
    acc = {"baseline": [1.0, 1.0, 0.2, 0.0], "scratchpad": [1.0, 1.0, 0.4, 0.2], "retuning": [1.0, 1.0, 1.0, 0.6]}
    results = [{"task": "parity", "method": m, "train_length": 2, "in_distribution": 1.0, "training": None,
                "out_of_distribution": (a[2] + a[3]) / 2} for m, a in acc.items()]
    md = evaluation.comparison(results)
    assert "| parity | baseline | contiguous | 100.0 | 10.0 | +70.0 |" in md
    assert "| parity | scratchpad | contiguous | 100.0 | 30.0 | +50.0 |" in md
    assert "Re-Tuning over baseline, out of distribution, mean over 1 task(s): +70.0 points" in md


def test_with_a_budget_in_minutes_the_learning_rate_follows_the_clock():
    cfg = train.TrainConfig(run="", lr=1.0, warmup=0, schedule="cosine", steps=10**6, minutes=10)
    assert train.get_lr(5, cfg, elapsed=0) == pytest.approx(1.0, abs=1e-3)
    assert train.get_lr(5, cfg, elapsed=300) == pytest.approx(0.55)
    assert train.get_lr(5, cfg, elapsed=600) == pytest.approx(0.1)


def test_eval_points_at_the_first_context_where_the_call_tree_goes_wrong():
    import eval as evaluation
    from decoder import Context
    true = {segs[0]: segs for segs in tasks.TASKS["addition"].trace("34 + 78", "retuning")}
    child = Context("4 + 8\nSolution: ", 2, segments=["4 + 8\nSolution: ", "Carry 1, Output 3"])
    root = Context("34 + 78\nSolution: ", 1, calls={1: child},
                   segments=["34 + 78\nSolution: ", "Call: 4 + 8\n", "Return: Carry 1, Output 3\nAnswer: ", "Carry 1, Output 13"])
    where, want, got = evaluation.first_error(root, true)
    assert (where, want, got) == ("4 + 8\nSolution: ", "Carry 1, Output 2", "Carry 1, Output 3")


def test_rehearsal_mixes_the_bases_pretraining_items_into_the_task_data():
    cfg = train.FinetuneConfig(run="", task="parity", method="retuning", max_len=3, seed=0, n_examples=40, rehearsal=0.5)
    data = train.finetune_data(cfg, TOK)
    plain = train.finetune_data(dataclasses.replace(cfg, rehearsal=0.0), TOK)
    assert len(data) == 60 and len(plain) == 40
    assert [d for d in data if d in plain] == plain  # the task's contexts, in order, plus 20 others
    import pretrain
    assert [d for d in data if d not in plain] == [tasks.context_ids(TOK, c) for c in pretrain.corpus(1, 20)]


def test_every_flags_default_is_its_configs_and_config_json_records_the_config(tmp_path):
    """One home for every training default: the dataclasses in train.py. A flag whose default is
    None derives its value (its help says from what); every other shows the config's own."""
    commands = retuning.parser()._subparsers._group_actions[0].choices
    for name, cls in (("train", train.FinetuneConfig), ("pretrain", train.PretrainConfig)):
        fields = {f.name: f.default for f in dataclasses.fields(cls)}
        checked = 0
        for action in commands[name]._actions:
            if action.dest in fields and action.default is not None:
                want = fields[action.dest]
                assert action.default == (",".join(want) if action.dest == "lora_targets" else want), (name, action.dest)
                checked += 1
        assert checked >= 15
    run = tmp_path / "r"
    retuning.main(["train", "--task", "parity", "--steps", "1", "--out", str(run), *TINY])
    stored = json.loads((run / "config.json").read_text())
    fields = {f.name for f in dataclasses.fields(train.FinetuneConfig)}
    assert fields <= set(stored) and set(stored) - fields == {"command", "model", "train_length"}
