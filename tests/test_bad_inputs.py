"""Every bad input a user (or attacker) can hand the CLI is one line on stderr, exit code 2, no
traceback, and changes no file. Run: python -m pytest tests/test_bad_inputs.py -q

Each case copies a good run (or base) folder, breaks one thing in the copy, runs one command on
it, and checks the message names the problem and every file under tmp_path is as it was.
"""
import hashlib
import json
import os
import shutil

import pytest
import torch

import eval as evaluation
import retuning
from checkpoint import CheckpointError, read_safetensors
from model import Llama, ModelArgs
from runs import EMBEDDED_TOKENIZER
from checkpoint import Tokenizer

TINY = ["--dim", "32", "--n-layers", "2", "--n-heads", "2", "--batch-size", "4", "--n-examples", "8",
        "--eval-every", "0", "--steps", "1"]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A LoRA run on a small HF-layout base, and a fully fine-tuned scratch run: (lora run, full run)."""
    root = tmp_path_factory.mktemp("good")
    small_base(root / "base", Tokenizer(EMBEDDED_TOKENIZER).vocab_size)
    retuning.main(["train", "--task", "addition", *TINY, "--base", str(root / "base"), "--lora-r", "2", "--out", str(root / "lora")])
    retuning.main(["train", "--task", "parity", *TINY, "--base", "scratch", "--out", str(root / "full")])
    return root


def small_base(path, vocab_size):
    model = Llama(ModelArgs(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=vocab_size))
    model.init_weights(0)
    model.save_pretrained(path)
    shutil.copy(EMBEDDED_TOKENIZER, os.path.join(path, "tokenizer.model"))


def edit_json(path, change):
    with open(path) as f:
        cfg = json.load(f)
    change(cfg)
    with open(path, "w") as f:
        json.dump(cfg, f)


def add_weight(path, name):
    """A checkpoint that also holds a weight `name` its model does not have."""
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"][name] = torch.ones(1)
    torch.save(ckpt, path)


def write(path, data: bytes):
    with open(path, "wb") as f:
        f.write(data)


def truncate(path, n):
    data = open(path, "rb").read()
    write(path, data[:n])


# name -> (what to break in the copied folder tmp/{base,lora,full}, the command, a word the error names)
CASES = {
    "solve on a file": (lambda t: write(t / "afile", b"x"), ["solve", "--run", "{t}/afile", "1 + 2"], "not a folder"),
    "solve --device cuda without CUDA": (None, ["solve", "--run", "{t}/lora", "1 + 2", "--device", "cuda"], "cuda"),
    "train --device cuda without CUDA": (None, ["train", *TINY, "--base", "scratch", "--device", "cuda", "--out", "{t}/new"], "cuda"),
    "solve --device nonsense": (None, ["solve", "--run", "{t}/lora", "1 + 2", "--device", "tpu7"], "tpu7"),
    "truncated adapter": (lambda t: truncate(t / "lora/adapter/adapter_model.safetensors", 100),
                          ["solve", "--run", "{t}/lora", "1 + 2"], "adapter_model.safetensors"),
    "empty adapter": (lambda t: write(t / "lora/adapter/adapter_model.safetensors", b""),
                      ["solve", "--run", "{t}/lora", "1 + 2"], "adapter_model.safetensors"),
    "adapter_config.json without r": (lambda t: edit_json(t / "lora/adapter/adapter_config.json", lambda c: c.pop("r")),
                                      ["solve", "--run", "{t}/lora", "1 + 2"], "'r'"),
    "adapter_config.json not JSON": (lambda t: write(t / "lora/adapter/adapter_config.json", b"{r: 2"),
                                     ["solve", "--run", "{t}/lora", "1 + 2"], "adapter_config.json"),
    "run config without task": (lambda t: edit_json(t / "lora/config.json", lambda c: c.pop("task")),
                                ["solve", "--run", "{t}/lora", "1 + 2"], "task"),
    "run config without method": (lambda t: edit_json(t / "lora/config.json", lambda c: c.pop("method")),
                                  ["solve", "--run", "{t}/lora", "1 + 2"], "method"),
    "run config without base": (lambda t: edit_json(t / "lora/config.json", lambda c: c.pop("base")),
                                ["solve", "--run", "{t}/lora", "1 + 2"], "base"),
    "run config without positions": (lambda t: edit_json(t / "lora/config.json", lambda c: c.pop("positions")),
                                     ["solve", "--run", "{t}/lora", "1 + 2"], "positions"),
    "base positions.json without max_gap": (lambda t: write(t / "base/positions.json", b'{"positions": "stretched"}'),
                                            ["train", *TINY, "--base", "{t}/base", "--out", "{t}/new"], "max_gap"),
    "run config with an unknown task": (lambda t: edit_json(t / "lora/config.json", lambda c: c.update(task="sorting")),
                                        ["solve", "--run", "{t}/lora", "1 + 2"], "sorting"),
    "run config with an unknown method": (lambda t: edit_json(t / "lora/config.json", lambda c: c.update(method="cot")),
                                          ["solve", "--run", "{t}/lora", "1 + 2"], "cot"),
    "run config naming a missing base": (lambda t: edit_json(t / "lora/config.json", lambda c: c.update(base=str(t / "gone"))),
                                         ["solve", "--run", "{t}/lora", "1 + 2"], "gone"),
    "run config not JSON": (lambda t: write(t / "lora/config.json", b"\x00\x01"), ["solve", "--run", "{t}/lora", "1 + 2"], "JSON"),
    "run config a JSON list": (lambda t: write(t / "lora/config.json", b"[1, 2]"), ["solve", "--run", "{t}/lora", "1 + 2"], "object"),
    "base dtype int8": (lambda t: edit_json(t / "base/config.json", lambda c: c.update(dtype="int8", torch_dtype="int8")),
                        ["solve", "--run", "{t}/lora", "1 + 2"], "int8"),
    "base dtype float8": (lambda t: edit_json(t / "full/model/config.json", lambda c: c.update(dtype="float8_e4m3fn", torch_dtype="float8_e4m3fn")),
                          ["solve", "--run", "{t}/full", "[1, 0]"], "float8_e4m3fn"),
    "base dtype not a torch name": (lambda t: edit_json(t / "base/config.json", lambda c: c.update(dtype="Tensor", torch_dtype="Tensor")),
                                    ["solve", "--run", "{t}/lora", "1 + 2"], "Tensor"),
    "string hidden_size": (lambda t: edit_json(t / "base/config.json", lambda c: c.update(hidden_size="32")),
                           ["solve", "--run", "{t}/lora", "1 + 2"], "hidden_size"),
    "negative num_hidden_layers": (lambda t: edit_json(t / "full/model/config.json", lambda c: c.update(num_hidden_layers=-1)),
                                   ["solve", "--run", "{t}/full", "[1, 0]"], "num_hidden_layers"),
    "garbage tokenizer.model": (lambda t: write(t / "base/tokenizer.model", b"not a model"),
                                ["solve", "--run", "{t}/lora", "1 + 2"], "tokenizer.model"),
    "shard index pointing outside": (lambda t: write(t / "full/model/model.safetensors.index.json",
                                                     json.dumps({"weight_map": {"lm_head.weight": "../../x.safetensors"}}).encode()),
                                     ["solve", "--run", "{t}/full", "[1, 0]"], "outside"),
    "resume from a crafted pickle": (lambda t: torch.save({"step": 1, "args": ModelArgs}, t / "full" / "checkpoint.pt"),
                                     ["train", "--task", "parity", *TINY, "--base", "scratch", "--steps", "2", "--resume", "--out", "{t}/full"],
                                     "checkpoint.pt"),
    "resume from a checkpoint with a weight the model lacks": (
        lambda t: add_weight(t / "full" / "checkpoint.pt", "bogus"),
        ["train", "--task", "parity", *TINY, "--base", "scratch", "--steps", "2", "--resume", "--out", "{t}/full"], "bogus"),
    "train --out a file": (lambda t: write(t / "afile", b"x"), ["train", *TINY, "--base", "scratch", "--out", "{t}/afile"], "afile"),
    "train --base a missing folder": (None, ["train", *TINY, "--base", "{t}/nothing", "--out", "{t}/new"], "nothing"),
    "train on a base whose vocabulary is smaller than its tokenizer's": (
        lambda t: small_base(t / "small", 100), ["train", *TINY, "--base", "{t}/small", "--out", "{t}/new"], "pieces"),
    "train --base a run": (None, ["train", *TINY, "--base", "{t}/lora", "--out", "{t}/new"], "run"),
    "data --tokenizer garbage": (lambda t: write(t / "afile", b"x"), ["data", "--tokenizer", "{t}/afile"], "afile"),
    "eval on an empty folder": (lambda t: (t / "empty").mkdir(), ["eval", "{t}/empty", "--out", "{t}/res"], "config.json"),
    "eval on a missing folder": (None, ["eval", "{t}/missing", "--out", "{t}/res"], "missing"),
    "eval --out a file": (lambda t: write(t / "afile", b"x"), ["eval", "{t}/lora", "--out", "{t}/afile"], "afile"),
    "eval --batch-size 0": (None, ["eval", "{t}/lora", "--batch-size", "0", "--out", "{t}/res"], "'0'"),
    "eval --per-length 0": (None, ["eval", "{t}/lora", "--per-length", "0", "--out", "{t}/res"], "'0'"),
    "eval --lengths 0": (None, ["eval", "{t}/lora", "--lengths", "0", "--out", "{t}/res"], "'0'"),
    "eval --device cuda without CUDA": (None, ["eval", "{t}/lora", "--device", "cuda", "--out", "{t}/res"], "cuda"),
}


def snapshot(root) -> dict:
    """{relative path: sha256} of every file under root."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


@pytest.mark.parametrize("name", CASES)
def test_a_bad_input_is_one_line_exit_2_and_changes_nothing(name, good, tmp_path, capsys):
    if "without CUDA" in name and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    shutil.copytree(good, tmp_path, dirs_exist_ok=True)
    edit_json(tmp_path / "lora" / "config.json", lambda c: c.update(base=str(tmp_path / "base")))  # the copy's own base
    breaks, argv, word = CASES[name]
    if breaks:
        breaks(tmp_path)
    argv = [a.replace("{t}", str(tmp_path)) for a in argv]
    before = snapshot(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        evaluation.main(argv[1:]) if argv[0] == "eval" else retuning.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert word in err, err
    assert snapshot(tmp_path) == before


def test_a_crafted_pickle_in_a_run_folder_executes_nothing(good, tmp_path, capsys):
    shutil.copytree(good / "full", tmp_path / "full")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    torch.save({"step": 1, "model": Payload()}, tmp_path / "full" / "checkpoint.pt")
    with pytest.raises(SystemExit):
        retuning.main(["train", "--task", "parity", *TINY, "--base", "scratch", "--steps", "2", "--resume",
                       "--out", str(tmp_path / "full")])
    assert not marker.exists()


def test_a_shard_index_cannot_name_a_file_outside_its_folder(good, tmp_path):
    shutil.copytree(good / "base", tmp_path / "base")
    shutil.copy(tmp_path / "base" / "model.safetensors", tmp_path / "outside.safetensors")
    (tmp_path / "base" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../outside.safetensors"}}))
    with pytest.raises(CheckpointError, match="outside"):
        read_safetensors(str(tmp_path / "base"), "cpu", torch.float32)


def test_a_partial_last_line_of_metrics_does_not_block_resume(good, tmp_path):
    shutil.copytree(good / "full", tmp_path / "full")
    with open(tmp_path / "full" / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "lo')  # killed in the middle of a write
    retuning.main(["train", "--task", "parity", *TINY, "--base", "scratch", "--steps", "2", "--resume", "--out", str(tmp_path / "full")])
    steps = [json.loads(line)["step"] for line in open(tmp_path / "full" / "metrics.jsonl")]
    assert steps == [1, 2]


def test_an_orphan_temporary_checkpoint_is_removed_on_the_next_save(good, tmp_path):
    shutil.copytree(good / "full", tmp_path / "full")
    (tmp_path / "full" / "checkpoint.pt.tmp99999").write_bytes(b"half")  # a kill during a save
    retuning.main(["train", "--task", "parity", *TINY, "--base", "scratch", "--steps", "2", "--resume", "--out", str(tmp_path / "full")])
    assert not [n for n in os.listdir(tmp_path / "full") if ".tmp" in n]
