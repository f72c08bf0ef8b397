"""Training: one loop for fine-tuning a base on a task (`finetune`) and for pretraining the
embedded base on pretrain.py's generic corpus (`pretrain_base`).

Fine-tuning data are all contexts of random problems' recursion traces (data.py); the loss is on
completion tokens + EOS only, so returned values are read, never learned (paper Sec. 3). Each
entry point builds its own model, data and probe and records only its own config; `fit` does the
rest: the optimizer, an exact resume (same data order, same RNG state), the loop with its
metrics.jsonl, and at the end the checkpoint, the exported model and summary.json (runs.py).
The command line (retuning.py) builds the configs.
"""
import contextlib
import json
import math
import os
import random
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from tqdm import tqdm

import pretrain
from checkpoint import Tokenizer, check_vocabulary, tokenizer_file, write_json
from data import eval_problems, training_contexts
from decoder import decode, eval_limits
from lora import TARGETS, apply_lora
from loss import linear_cross_entropy
from model import Llama, ModelArgs
from positions import Positions
from probe import quick as probe_base
from runs import EMBEDDED_TOKENIZER, check_resume, export, resolve, resume, save_checkpoint, uses_bf16, write_summary
from tasks import TASKS, context_ids


@dataclass
class TrainConfig:
    """What every training run needs; config.json records it with the model's shape."""
    run: str  # the run folder
    # the model: an HF Llama folder, or "scratch" (a tiny Llama of this shape, random init)
    base: str = "scratch"
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    gradient_checkpointing: bool = False  # recompute activations: memory for time
    positions: str = "contiguous"  # position ids in training (and at test for "randomized"): positions.py
    max_gap: int = 12  # positions "gaps": the largest extra gap at a segment boundary
    position_span: int = 1024  # positions "randomized": ids drawn from range(position_span)
    bf16: bool = False  # bfloat16 frozen weights and autocast on the CPU too (always on CUDA)
    # the budget: wall time (the LR schedule follows the clock) or steps, whichever ends first
    minutes: Optional[float] = None
    steps: Optional[int] = None
    n_examples: int = 100_000  # training contexts drawn, then repeated
    # optimisation
    batch_size: int = 32
    micro_batch_size: int = 32
    lr: float = 2e-3
    schedule: str = "cosine"  # or "constant", the paper's
    warmup: int = 50
    weight_decay: float = 0.01
    clip: float = 1.0
    # bookkeeping
    device: str = "cpu"
    seed: int = 0
    resume: bool = False
    eval_every: int = 250  # steps between probes (0: never)
    save_every: int = 100

    @property
    def position_ids(self) -> Positions:
        return Positions(self.positions, self.max_gap, self.position_span)

    @property
    def use_bf16(self) -> bool:
        return uses_bf16(self.device, self.bf16)  # the rule load_run applies to the run afterwards


@dataclass
class FinetuneConfig(TrainConfig):
    task: str = "addition"
    method: str = "retuning"
    max_len: int = 4  # longest training problem
    rehearsal: float = 0.0  # pretraining items added, as a fraction of the task's contexts
    full: bool = False  # every weight instead of LoRA
    lora_r: int = 64
    lora_alpha: float = 64
    lora_dropout: float = 0.05
    lora_targets: tuple = TARGETS


@dataclass
class PretrainConfig(TrainConfig):
    export: Optional[str] = None  # also write the base here (an HF folder); assets/base only when named


# ----------------------------------------------------------------------------- the two kinds of run
def finetune(cfg: FinetuneConfig) -> str:
    """Fine-tune a base on one task and method: LoRA on a pretrained base, as the paper (Sec. 4),
    unless cfg.full; every weight of a scratch model. Returns the run folder."""
    torch.manual_seed(cfg.seed)
    lora = cfg.base != "scratch" and not cfg.full
    model, tok = build_model(cfg, frozen=lora)
    if lora:
        apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    data = finetune_data(cfg, tok)
    record = {"command": "train", **asdict(cfg), "model": vars(model.args), "train_length": cfg.max_len}
    step = fit(cfg, model, data, lambda model, step: {"check_acc": quick_check(model, tok, cfg)}, record)
    print(f"saved {cfg.run} (step {step}); evaluate with: python eval.py {cfg.run}")
    return cfg.run


def pretrain_base(cfg: PretrainConfig) -> str:
    """Pretrain every weight of a base on pretrain.py's corpus, then write it as an HF folder to
    cfg.export, what `train --base` fine-tunes. Returns the run folder."""
    torch.manual_seed(cfg.seed)
    model, tok = build_model(cfg)
    data = [context_ids(tok, segs) for segs in pretrain.corpus(cfg.seed, cfg.n_examples)]

    def probe(model, step):  # how well the base copies, short and long
        scores = probe_base(model, tok, cfg.position_ids)
        tqdm.write(f"step {step}: {scores}")
        return {"probe": scores}
    fit(cfg, model, data, probe, {"command": "pretrain", **asdict(cfg), "model": vars(model.args)})
    cfg.position_ids.save(os.path.join(cfg.run, "model"))  # its fine-tunes inherit the scheme
    if cfg.export:
        replace_folder(os.path.join(cfg.run, "model"), cfg.export)
    print(f"saved the pretrained base to {cfg.export or os.path.join(cfg.run, 'model')}")
    return cfg.run


def replace_folder(src, dst):
    """Copy src to dst atomically: a complete copy beside dst, then two renames, so dst is never
    half old, half new (a kill in between leaves dst.old, the previous base, intact)."""
    tmp, old = f"{dst}.tmp{os.getpid()}", f"{dst}.old"
    shutil.copytree(src, tmp)
    if os.path.exists(dst):
        os.replace(dst, old)
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)


def build_model(cfg: TrainConfig, frozen=False):
    """A fresh tiny Llama ("scratch") or an HF checkpoint folder, with its tokenizer. A frozen base
    (LoRA trains beside it) is loaded in bfloat16 when bf16 is on."""
    if cfg.base == "scratch":
        tok = Tokenizer(EMBEDDED_TOKENIZER)
        margs = ModelArgs(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                          hidden_dim=cfg.dim * 8 // 3, vocab_size=tok.vocab_size,
                          bos_id=tok.bos_id, eos_id=tok.eos_id, max_seq_len=4096)
        model = Llama(margs)
        model.init_weights(cfg.seed)
        model.to(cfg.device)
    else:
        tok = Tokenizer.from_folder(resolve(cfg.base))
        dtype = torch.bfloat16 if frozen and cfg.use_bf16 else torch.float32
        model = Llama.from_pretrained(resolve(cfg.base), dtype=dtype, device=cfg.device)
        check_vocabulary(tok, model.args, cfg.base)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    return model, tok


def finetune_data(cfg: FinetuneConfig, tok) -> list:
    """(ids, loss mask) of each training context of the task, pretraining items mixed in on request."""
    contexts = training_contexts(cfg.task, cfg.method, cfg.max_len, cfg.seed, cfg.n_examples)
    if cfg.rehearsal:  # keep the base's skills alive: mix in its pretraining items (pretrain.py)
        extra = pretrain.corpus(cfg.seed + 1, int(cfg.rehearsal * len(contexts)))
        contexts = [c for pair in zip(contexts, extra) for c in pair] + contexts[len(extra):]
    return [context_ids(tok, segs) for segs in contexts]


def quick_check(model, tok, cfg: FinetuneConfig, n=32):
    """Exact match with the recursive decoder on held-out problems of the trained lengths."""
    rng = random.Random(cfg.seed + 1)
    lengths = [rng.randint(TASKS[cfg.task].min_len, cfg.max_len) for _ in range(n)]
    problems = [eval_problems(cfg.task, L, 1, cfg.seed + 7 + i)[0] for i, L in enumerate(lengths)]
    solves = decode(model, tok, cfg.task, cfg.method, problems, eval_limits(cfg.task, cfg.method, tok, problems),
                    positions=cfg.position_ids)
    model.train()
    return sum(s.answer == TASKS[cfg.task].answer(p) for s, p in zip(solves, problems)) / n


# ----------------------------------------------------------------------------- what both share
def fit(cfg: TrainConfig, model, data, probe, record: dict) -> int:
    """Train `model` on `data` in cfg.run: its config.json (`record`), the optimizer, a resume, the
    loop, then the checkpoint, the exported model and summary.json. Returns the last step."""
    if cfg.resume:
        check_resume(cfg.run, record)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    step, elapsed = resume(cfg.run, model, opt) if cfg.resume else (0, 0.0)  # before any write: it may refuse
    os.makedirs(cfg.run, exist_ok=True)
    write_json(os.path.join(cfg.run, "config.json"), record)
    print(f"{cfg.run}: {len(data)} training contexts, {sum(p.numel() for p in params) / 1e6:.2f}M "
          f"trainable parameters on {cfg.device}")
    step, elapsed = train_loop(cfg, model, opt, data, probe, step, elapsed)
    save_checkpoint(cfg.run, model, opt, step, elapsed)
    tok_path = EMBEDDED_TOKENIZER if cfg.base == "scratch" else tokenizer_file(resolve(cfg.base))
    export(cfg.run, model, tok_path, cfg.base)
    write_summary(cfg.run, data, step, cfg.batch_size, elapsed, cfg.device)
    return step


def train_loop(cfg: TrainConfig, model, opt, data, probe, step, elapsed):
    """Steps until the budget is spent, the probe every cfg.eval_every. Ctrl-C (or SIGTERM) stops
    it after the step in flight, so what is saved is the state as of a completed step. Returns
    (step, seconds)."""
    log = open(os.path.join(cfg.run, "metrics.jsonl"), "a")
    stream = batches(data, cfg.batch_size, cfg.seed)
    for _ in range(step):  # same data order as an uninterrupted run
        next(stream)
    t0, last_check = time.time() - elapsed, {}
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", dynamic_ncols=True)  # total None: minutes
    with stop_requests() as stop:
        while budget_left(cfg, step, time.time() - t0) and not stop:
            lr = get_lr(step, cfg, time.time() - t0)
            for g in opt.param_groups:
                g["lr"] = lr
            t1 = time.time()
            loss, _, n_tokens = train_step(model, opt, [data[i] for i in next(stream)], cfg, step)
            step += 1
            rec = {"step": step, "loss": round(loss, 5), "lr": lr,
                   "tok_s": round(n_tokens / (time.time() - t1)), "time": round(time.time() - t0, 2)}
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                last_check = probe(model, step)
                rec.update(last_check)
                tqdm.write(f"step {step}: " + ", ".join(f"{k} {v}" for k, v in last_check.items()))
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=rec["tok_s"], **last_check, refresh=False)  # the last check stays shown
            bar.update(1)
            if step % cfg.save_every == 0:
                save_checkpoint(cfg.run, model, opt, step, time.time() - t0)
        if stop:
            tqdm.write(f"stopped at step {step}; saving so that --resume continues from here")
    bar.close()
    log.close()
    return step, time.time() - t0


@contextlib.contextmanager
def stop_requests():
    """Turn Ctrl-C and SIGTERM into a request to stop after the current step. Stopping inside a
    step would save an RNG state past the dropout noise that step drew, and a resumed run would
    diverge from an uninterrupted one. A second signal stops at once (from the last checkpoint)."""
    stop = []  # truthy once a signal arrived; the loop checks it between steps

    def handler(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)
        tqdm.write(f"\n{signal.Signals(signum).name}: stopping after this step (again to stop at once)")
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def budget_left(cfg: TrainConfig, step, seconds) -> bool:
    return (cfg.steps is None or step < cfg.steps) and (cfg.minutes is None or seconds < 60 * cfg.minutes)


def get_lr(step, cfg: TrainConfig, elapsed=0.0):
    # 1) linear warm-up, 2) constant (the paper's schedule) or 3) cosine decay to 10%, over the
    # steps or, with --minutes, over the wall time (a budget in minutes, not in steps)
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    progress = 0.0 if cfg.steps is None else (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    if cfg.minutes:
        progress = max(progress, elapsed / (60 * cfg.minutes))
    progress = min(1.0, progress)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train_step(model, opt, items, cfg: TrainConfig, step=0):
    """One optimizer step over a batch, in micro-batches; returns (loss, target tokens, tokens).
    Position ids, unless contiguous, are drawn from a generator seeded by (seed, step, micro-batch)."""
    n_targets = sum(sum(mask) for _, mask in items)  # normalise per target token of the whole batch
    total, n_tokens = 0.0, 0
    for m in range(0, len(items), cfg.micro_batch_size):
        part = items[m:m + cfg.micro_batch_size]
        x, y = collate(part, model.args.eos_id, cfg.device)
        pos = cfg.position_ids.for_batch([mask for _, mask in part], x.shape[1], (cfg.seed * 100_003 + step) * 1009 + m)
        with torch.autocast(cfg.device.split(":")[0], torch.bfloat16, enabled=cfg.use_bf16):
            h = model(x, select=y != -100, positions=pos, hidden=True)  # only where there is loss
        loss = linear_cross_entropy(h, model.lm_head.weight, y[y != -100], 1 / n_targets)
        loss.backward()
        total += loss.item()
        n_tokens += x.numel()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total, n_targets, n_tokens


def batches(data, batch_size, seed):
    """Endless, deterministic stream of index lists; similar lengths share a batch (bucketing).

    Each epoch: shuffle, cut into chunks of 16 batches, sort each chunk by length, slice it into
    batches, shuffle those. Padding stays small and the order depends only on (seed, epoch).
    """
    for epoch in range(10**9):
        rng = random.Random(seed * 100_003 + epoch)
        order = list(range(len(data)))
        rng.shuffle(order)
        chunk = 16 * batch_size
        for c in range(0, len(order) - batch_size + 1, chunk):
            part = sorted(order[c:c + chunk], key=lambda i: len(data[i][0]))
            group = [part[i:i + batch_size] for i in range(0, len(part) - batch_size + 1, batch_size)]
            rng.shuffle(group)
            yield from group


def collate(items, pad_id, device):
    """Right-pad; the target at t is token t+1 where it is a completion token or EOS, else -100."""
    T = max(len(ids) for ids, _ in items) - 1
    x = torch.full((len(items), T), pad_id, dtype=torch.long)
    y = torch.full((len(items), T), -100, dtype=torch.long)
    for i, (ids, mask) in enumerate(items):
        ids_t, mask_t = torch.tensor(ids), torch.tensor(mask, dtype=torch.bool)
        x[i, :len(ids) - 1] = ids_t[:-1]
        y[i, :len(ids) - 1] = torch.where(mask_t[1:], ids_t[1:], -100)
    return x.to(device), y.to(device)
