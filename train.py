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
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch
from tqdm import tqdm

import dist
import pretrain
from checkpoint import Tokenizer, check_vocabulary, tokenizer_file, write_json
from data import UPSAMPLE, batches, collate, eval_problems, training_contexts
from decoder import decode, eval_limits
from lora import TARGETS, apply_lora
from loss import linear_cross_entropy
from model import Llama, ModelArgs
from positions import Positions
from probe import quick as probe_base
from runs import EMBEDDED_BASE, EMBEDDED_TOKENIZER, claimed, export, resolve, restore, save_checkpoint, uses_bf16, write_summary
from tasks import TASKS, context_ids


@dataclass
class TrainConfig:
    """What every training run needs; config.json records it with the model's shape. These
    defaults are the only ones: retuning.py builds its flags' defaults from them (a flag whose
    default is None derives it, as its help says)."""
    run: str  # the run folder
    # the model: an HF Llama folder, or "scratch" (a tiny Llama of this shape, random init)
    base: str = "scratch"
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    gradient_checkpointing: bool = False  # recompute activations: memory for time
    positions: str = "contiguous"  # position ids in training and at test: positions.py
    max_gap: int = Positions.max_gap  # positions "stretched": the largest extra step between two tokens
    bf16: bool = False  # bfloat16 frozen weights and autocast on the CPU too (always on CUDA)
    # the budget: wall time (the LR schedule follows the clock) or steps, whichever ends first
    minutes: Optional[float] = None
    steps: Optional[int] = None  # the default budget of each kind of run (None with --minutes)
    schedule_steps: Optional[int] = None  # the steps the LR schedule spans: the first budget, kept when a run is extended
    n_examples: Optional[int] = None  # training contexts drawn, then repeated (None: steps x batch size)
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
    overwrite: bool = False  # replace the run in the folder (its outputs are removed when it is claimed)
    eval_every: int = 250  # steps between probes (0: never)
    save_every: int = 100

    @property
    def position_ids(self) -> Positions:
        return Positions(self.positions, self.max_gap)

    @property
    def use_bf16(self) -> bool:
        return uses_bf16(self.device, self.bf16)  # the rule load_run applies to the run afterwards


@dataclass
class FinetuneConfig(TrainConfig):
    base: str = EMBEDDED_BASE  # the committed tiny base (runs.py)
    steps: Optional[int] = 2500  # the README's reference run (reproduce.sh's addition budget)
    task: str = "addition"
    method: str = "retuning"
    max_len: Optional[int] = None  # longest training problem (None: the task's own, tasks.Task.train_len)
    rehearsal: float = 0.0  # pretraining items added, as a fraction of the task's contexts
    upsample: int = UPSAMPLE  # Re-Tuning data: sizes 1-2 get this many times a larger size's share (data.balance)
    full: bool = False  # every weight instead of LoRA
    lora_r: int = 64
    lora_alpha: float = 64
    lora_dropout: float = 0.05
    lora_targets: tuple = TARGETS


@dataclass
class PretrainConfig(TrainConfig):
    """The committed base's first stage (docs/EXPERIMENTS.md): stretched positions, steps of 1-3.
    Its second stage: --base <the first> --steps 20000 --lr 1e-3 --seed 1."""
    steps: Optional[int] = 16430
    n_examples: Optional[int] = 300_000
    positions: str = "stretched"
    max_gap: int = 2
    warmup: int = 200
    eval_every: int = 500
    save_every: int = 500
    export: Optional[str] = None  # also write the base here (an HF folder); assets/base only when named


# ----------------------------------------------------------------------------- the two kinds of run
def finetune(cfg: FinetuneConfig) -> str:
    """Fine-tune a base on one task and method: LoRA on a pretrained base, as the paper (Sec. 4),
    unless cfg.full; every weight of a scratch model. Returns the run folder."""
    world = dist.init(cfg.device)  # under torchrun: this process's share of the job
    cfg = replace(cfg, device=world.device(cfg.device))
    torch.manual_seed(cfg.seed)
    lora = cfg.base != "scratch" and not cfg.full
    model, tok = build_model(cfg, frozen=lora)
    if lora:
        apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    data = finetune_data(cfg, tok)
    record = {"command": "train", **asdict(cfg), "model": vars(model.args), "train_length": cfg.max_len}
    step = fit(cfg, model, data, lambda model, step: {"check_acc": quick_check(model, tok, cfg)}, record, world)
    if world.main:
        print(f"saved {cfg.run} (step {step}); evaluate with: python eval.py {cfg.run}")
    dist.finish()
    return cfg.run


def pretrain_base(cfg: PretrainConfig) -> str:
    """Pretrain every weight of a base on pretrain.py's corpus into an HF folder, <run>/model (or
    moved to cfg.export), what `train --base` fine-tunes. Returns the run folder."""
    world = dist.init(cfg.device)
    cfg = replace(cfg, device=world.device(cfg.device))
    torch.manual_seed(cfg.seed)
    model, tok = build_model(cfg)
    data = [context_ids(tok, segs) for segs in pretrain.corpus(cfg.seed, cfg.n_examples)]

    def probe(model, step):  # how well the base copies, short and long
        scores = probe_base(model, tok, cfg.position_ids)
        tqdm.write(f"step {step}: {scores}")
        return {"probe": scores}
    fit(cfg, model, data, probe, {"command": "pretrain", **asdict(cfg), "model": vars(model.args)}, world)
    if world.main:
        cfg.position_ids.save(os.path.join(cfg.run, "model"))  # its fine-tunes inherit the scheme
        if cfg.export:
            replace_folder(os.path.join(cfg.run, "model"), cfg.export)
        print(f"saved the pretrained base to {cfg.export or os.path.join(cfg.run, 'model')}")
    dist.finish()
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
    contexts = training_contexts(cfg.task, cfg.method, cfg.max_len, cfg.seed, cfg.n_examples, cfg.upsample)
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
def fit(cfg: TrainConfig, model, data, probe, record: dict, world=dist.World()) -> int:
    """Train `model` on `data` in cfg.run: its config.json (`record`), the optimizer, a resume, the
    loop, then the checkpoint, the exported model and summary.json. Returns the last step.
    Under torchrun every process trains; rank 0 alone claims the folder and writes into it."""
    if cfg.batch_size < world.size:
        raise ValueError(f"--batch-size {cfg.batch_size} is smaller than the number of processes ({world.size})")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    with claimed(cfg, model, opt, record, world) as ckpt:
        if ckpt and not world.main:  # rank 0 restored it as it read it (runs.resume)
            restore(ckpt, model, opt)
        step, elapsed = (ckpt["step"], ckpt.get("elapsed", 0.0)) if ckpt else (0, 0.0)
        if world.main:
            write_json(os.path.join(cfg.run, "config.json"), record)
            print(f"{cfg.run}: {len(data)} training contexts, {sum(p.numel() for p in params) / 1e6:.2f}M "
                  f"trainable parameters on {cfg.device}" + (f", {world.size} processes" if world.size > 1 else ""))
        step, elapsed = train_loop(cfg, dist.wrap(model, world), opt, data, probe, step, elapsed, world)
        if world.main:
            save_checkpoint(cfg.run, model, opt, step, elapsed)
            tok_path = EMBEDDED_TOKENIZER if cfg.base == "scratch" else tokenizer_file(resolve(cfg.base))
            export(cfg.run, model, tok_path, cfg.base)
            write_summary(cfg.run, data, step, cfg.batch_size, elapsed, cfg.device, world.size)
    return step


def train_loop(cfg: TrainConfig, model, opt, data, probe, step, elapsed, world=dist.World()):
    """Steps until the budget is spent, the probe every cfg.eval_every. Ctrl-C (or SIGTERM) stops
    it after the step in flight, so what is saved is the state as of a completed step; every
    process stops at the same step, since each step starts by agreeing whether to. Returns
    (step, seconds)."""
    core = getattr(model, "module", model)  # under DDP, the model itself
    stream = batches(data, cfg.batch_size, cfg.seed)
    for _ in range(step):  # same data order as an uninterrupted run
        next(stream)
    t0 = time.time() - elapsed
    with Progress(cfg, step, probe, world) as progress, stop_requests() as stop:
        while True:
            stopping, seconds = agree(stop, time.time() - t0, world)
            if stopping or not budget_left(cfg, step, seconds):
                break
            lr = get_lr(step, cfg, seconds)
            for g in opt.param_groups:
                g["lr"] = lr
            if world.size > 1:  # dropout masks: each process its own, a function of (seed, step, rank)
                torch.manual_seed((cfg.seed * 100_003 + step) * 1009 + world.rank)
            t1 = time.time()
            loss, _, n_tokens = train_step(model, opt, [data[i] for i in next(stream)], cfg, step, world)
            step += 1
            if world.main:
                progress.record(core, step, loss, lr, n_tokens / (time.time() - t1), time.time() - t0)
                if step % cfg.save_every == 0:
                    save_checkpoint(cfg.run, core, opt, step, time.time() - t0)
        if stopping and world.main:
            tqdm.write(f"stopped at step {step}; saving so that --resume continues from here")
    return step, time.time() - t0


class Progress:
    """What rank 0 shows and keeps of each step: metrics.jsonl, the progress bar, the probe."""

    def __init__(self, cfg: TrainConfig, step, probe, world):
        self.cfg, self.probe, self.last_check = cfg, probe, {}
        self.log = open(os.path.join(cfg.run, "metrics.jsonl"), "a") if world.main else None
        self.bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
                        disable=not world.main)  # total None: minutes

    def __enter__(self):
        return self

    def __exit__(self, *exc):  # after a failed save too: the bar ends its line before the error is printed
        self.bar.close()
        if self.log:
            self.log.close()

    def record(self, model, step, loss, lr, tok_s, seconds):
        rec = {"step": step, "loss": round(loss, 7), "lr": lr, "tok_s": round(tok_s), "time": round(seconds, 2)}
        if self.cfg.eval_every and (step % self.cfg.eval_every == 0 or step == self.cfg.steps):
            self.last_check = self.probe(model, step)
            rec.update(self.last_check)
            tqdm.write(f"step {step}: " + ", ".join(f"{k} {v}" for k, v in self.last_check.items()))
        self.log.write(json.dumps(rec) + "\n")
        self.log.flush()
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=rec["tok_s"], **self.last_check, refresh=False)  # the last check stays shown
        self.bar.update(1)


def agree(stop, seconds, world):
    """(whether any process was asked to stop, rank 0's clock): one small all-reduce a step, so
    every process stops at the same step and a budget in minutes ends on the same one."""
    asked, clock = dist.total([float(bool(stop)), seconds if world.main else 0.0], world)
    return asked > 0, clock


@contextlib.contextmanager
def stop_requests():
    """Turn Ctrl-C and SIGTERM into a request to stop after the current step. Stopping inside a
    step would save an RNG state past the dropout noise that step drew, and a resumed run would
    diverge from an uninterrupted one. A second signal stops at once (from the last checkpoint),
    unless it comes within a second of the first: Ctrl-C under torchrun reaches each process twice,
    from the terminal and forwarded by torchrun."""
    stop = []  # (signal, when) once a signal arrived; the loop checks it between steps

    def handler(signum, frame):
        if stop and time.monotonic() - stop[0][1] > 1.0:
            raise KeyboardInterrupt
        if stop:
            return
        stop.append((signum, time.monotonic()))
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
    # steps or, with --minutes, over the wall time (a budget in minutes, not in steps). A run
    # extended past its first budget (--resume --steps N) goes on at the final 10%: its schedule
    # spans the first budget, so the extension neither restarts nor rescales what was done (a
    # --minutes budget changed on resume does rescale it: the wall time has no first budget kept).
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    span = cfg.schedule_steps or cfg.steps
    progress = 0.0 if span is None else (step - cfg.warmup) / max(1, span - cfg.warmup)
    if cfg.minutes:
        progress = max(progress, elapsed / (60 * cfg.minutes))
    progress = min(1.0, progress)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train_step(model, opt, items, cfg: TrainConfig, step=0, world=dist.World()):
    """One optimizer step over a batch, in micro-batches; returns (loss, target tokens, tokens).
    Under torchrun `items` is still the whole batch: each process takes its share, and the loss is
    normalised by the whole batch's target tokens, so the step is the single process's."""
    n_targets = sum(sum(mask) for _, mask in items)  # normalise per target token of the whole batch
    positions = batch_positions(items, cfg, step)
    core = getattr(model, "module", model)
    mine = world.share(list(zip(items, positions)))
    parts = [mine[m:m + cfg.micro_batch_size] for m in range(0, len(mine), cfg.micro_batch_size)]
    total, n_tokens = 0.0, 0
    for i, part in enumerate(parts):
        x, y = collate([item for item, _ in part], core.args.eos_id, cfg.device)
        pos = pad_positions([p for _, p in part], x.shape[1], cfg.device)
        with model.no_sync() if world.size > 1 and i < len(parts) - 1 else contextlib.nullcontext():  # sync once
            with torch.autocast(cfg.device.split(":")[0], torch.bfloat16, enabled=cfg.use_bf16):
                h = model(x, select=y != -100, positions=pos, hidden=True)  # only where there is loss
            # x world.size: DDP averages the processes' gradients, and the step needs their sum
            loss = linear_cross_entropy(h, core.lm_head.weight, y[y != -100], world.size / n_targets)
            loss.backward()
        total += loss.item() / world.size
        n_tokens += x.numel()
    total, n_tokens = dist.total([total, n_tokens], world)
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total, n_targets, int(n_tokens)


def batch_positions(items, cfg: TrainConfig, step) -> list:
    """Each context's position ids (None: contiguous), drawn per micro-batch of the whole batch
    from a generator seeded by (seed, step, micro-batch): the same whichever process trains it."""
    if cfg.position_ids.scheme == "contiguous":
        return [None] * len(items)
    rows = []
    for m in range(0, len(items), cfg.micro_batch_size):
        part = items[m:m + cfg.micro_batch_size]
        T = max(len(ids) for ids, _ in part) - 1
        rows += list(cfg.position_ids.for_batch([mask for _, mask in part], T, (cfg.seed * 100_003 + step) * 1009 + m))
    return rows


def pad_positions(rows, T, device):
    """Rows of position ids cut or extended to width T (past a row's end nothing attends to them)."""
    if rows[0] is None:
        return None
    return torch.stack([torch.cat([r[:T], r[-1] + 1 + torch.arange(max(0, T - len(r)))]) for r in rows]).to(device)
