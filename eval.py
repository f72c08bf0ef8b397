"""Exact-match accuracy per problem length, in distribution and beyond (paper Sec. 5, Fig. 3).

    python eval.py                                  # every run under runs/
    python eval.py runs/addition-retuning --lengths 1-20 --per-length 50 --by-step
    python eval.py runs/dp-retuning --lengths 2-5 --per-length 50 --by-context   # which sub-call breaks
    python eval.py --combine A/results.json B/results.json --out C   # one table from two evaluations

Writes, into a new folder per evaluation (runs/eval/<date-time>/ unless --out names one),
results.json, results.md and one plot per task (accuracy against length, one line per method,
the longest training length marked), and prints the first failures with the context where each
went wrong. Results are written after each run, and a run that cannot be evaluated is reported
and skipped, so one bad folder never loses the others.
"""
import argparse
import glob
import json
import os
import re
import sys
import time

import torch
from tqdm import tqdm

import dist
import steps
from data import eval_problems
from decoder import decode, eval_limits
from flags import Parser, device, positive
from positions import Positions
from runs import load_run, read_run_config
from tasks import TASKS


MAX_LENGTH = max(task.max_len for task in TASKS.values())  # longer problems are refused (tasks.Task.max_len)


def parse_lengths(text: str) -> list:
    """"1-8,12,16" -> [1, ..., 8, 12, 16]; anything else is an argparse error naming the text."""
    out = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?", part)
        lo, hi = (int(m[1]), int(m[2] or m[1])) if m else (0, 0)
        if not m or not 1 <= lo <= hi <= MAX_LENGTH:
            raise argparse.ArgumentTypeError(f"lengths must look like 1-8,12 with 1 <= a <= b <= {MAX_LENGTH}, got {text!r}")
        out += list(range(lo, hi + 1))
    return out


def first_error(ctx, truth: dict):
    """(context text, expected, got) at the first place the model's call tree leaves the true one.

    `truth` maps each true context's prompt to its true segments. A wrong resume means a child
    returned a wrong value, so the search descends into that child, the one the call before opened.
    """
    true = truth.get(ctx.prompt)
    if true is None:
        return ctx.prompt, "(a sub-problem of the true trace)", "this sub-problem"
    for i, seg in enumerate(ctx.segments[1:], 1):
        if i >= len(true) or seg != true[i]:
            if i % 2 == 0 and i - 1 in ctx.calls:
                return first_error(ctx.calls[i - 1], truth)
            return "".join(ctx.segments[:i]), true[i] if i < len(true) else "(nothing)", seg
    return "".join(ctx.segments), true[len(ctx.segments)] if len(ctx.segments) < len(true) else "", "(stopped)"


def describe(task, method, s) -> str:
    truth = {segs[0]: segs for segs in TASKS[task].trace(s.problem, method)}
    where, want, got = first_error(s.root, truth)
    reason = f" [{s.error}]" if s.error else ""
    return (f"  {s.problem} -> {s.answer!r}, true {TASKS[task].answer(s.problem)!r}{reason}\n"
            f"    in context {where[-120:]!r}\n    expected {clip(want, got)!r}\n    got      {clip(got, want)!r}")


def clip(text, other, width=120) -> str:
    """`text` cut to `width` around where it first differs from `other`, so the two shown differ."""
    i = next((k for k, (a, b) in enumerate(zip(text, other)) if a != b), min(len(text), len(other)))
    start = max(0, i - width // 2)
    return ("..." if start else "") + text[start:start + width]


def evaluate(run, lengths, per_length, seed, batch_size, device, n_failures=3, by_step=False, by_context=False,
             world=dist.World()):
    """One run's accuracy per length. Under torchrun each process decodes its share of every
    length's problems (its own model and KV cache) and rank 0 gets all outcomes, in problem
    order, so the tables are the single process's."""
    model, tok, cfg = load_run(run, device)
    task, method, pos = cfg["task"], cfg["method"], Positions.of_run(cfg)
    acc, count, failures, n_tokens = {}, {}, [], 0
    t0 = time.time()
    bar = tqdm(total=len(lengths) * per_length, desc=os.path.basename(run.rstrip("/")), dynamic_ncols=True,
               disable=not world.main)
    for L in lengths:
        problems = eval_problems(task, L, per_length, seed)
        outcomes = decode_length(model, tok, cfg, problems, pos, batch_size, n_failures - len(failures), bar, world)
        failures += [o[3] for o in outcomes if o[3]][:n_failures - len(failures)]
        n_tokens += sum(o[2] for o in outcomes)
        acc[str(L)], count[str(L)] = sum(o[1] for o in outcomes) / len(problems), len(problems)
    bar.close()
    dt = time.time() - t0
    if world.main:
        print(f"{run}: {len(lengths) * per_length / dt:.1f} problems/s, {n_tokens / dt:.0f} generated tokens/s")
        if failures:
            print("first failures:\n" + "\n".join(failures))
    summary = os.path.join(run, "summary.json")  # what training cost (runs.write_summary)
    if by_step and world.main:  # where it breaks: each step teacher-forced (steps.py); rank 0 alone
        by_step = steps.by_step(model, tok, task, method, lengths, per_length, seed, batch_size, pos)
        print(steps.table(f"{task} {method}", by_step))
    if by_context and method == "retuning" and world.main:  # deeper: every context of the recursions
        by_context = steps.by_context(model, tok, task, lengths, per_length, seed, batch_size, pos)
        print(steps.table(f"{task} {method}, every context", by_context, rows="kind / size"))
    return {"by_step": by_step or None, "by_context": by_context or None, "run": run, "task": task, "method": method,
            "train_length": cfg["train_length"],
            "positions": pos.describe(),
            "accuracy": acc, "count": count, "seconds": round(dt, 1), "generated_tokens": n_tokens,
            **means(acc, cfg["train_length"]),
            "training": json.load(open(summary)) if os.path.exists(summary) else None}


def means(acc, train_length) -> dict:
    """Mean accuracy over the lengths in distribution (<= the longest trained on) and beyond it."""
    ind = [a for L, a in acc.items() if int(L) <= train_length]
    ood = [a for L, a in acc.items() if int(L) > train_length]
    return {"in_distribution": sum(ind) / len(ind) if ind else None,
            "out_of_distribution": sum(ood) / len(ood) if ood else None}


def decode_length(model, tok, cfg, problems, pos, batch_size, wanted, bar, world):
    """One length's problems, each process its share -> every outcome, in problem order: (index,
    right, generated tokens, the failure described or None). Only the first `wanted` failures of
    each share are described: the first failures overall are among them."""
    task, method = cfg["task"], cfg["method"]
    lim = eval_limits(task, method, tok, problems[:1])
    mine, outcomes = world.share(list(enumerate(problems))), []
    for b in range(0, len(mine), batch_size):
        part = mine[b:b + batch_size]
        for (i, _), s in zip(part, decode(model, tok, task, method, [p for _, p in part], lim, positions=pos)):
            ok = s.answer == TASKS[task].answer(s.problem)
            words = None if ok or wanted <= 0 else describe(task, method, s)
            wanted -= words is not None
            outcomes.append((i, ok, s.n_generated, words))
        bar.update(len(part) * world.size)
    return sorted(o for share in dist.gather(outcomes, world) for o in share)


def table(results) -> str:
    lengths = sorted({int(L) for r in results for L in r["accuracy"]})
    head = "| task | method | positions | train ≤ | " + " | ".join(map(str, lengths)) + " | run |"
    rows = [head, "|" + "---|" * (5 + len(lengths))]
    for r in results:  # the run's folder last: a fresh run and the committed ones it is compared with
        cells = [f"{100 * r['accuracy'][str(L)]:.0f}" if str(L) in r["accuracy"] else "" for L in lengths]
        rows.append(f"| {r['task']} | {r['method']} | {positions(r)} | {r['train_length']} | " + " | ".join(cells)
                    + f" | {r['run']} |")
    return "\n".join(rows)


def positions(r) -> str:
    return r.get("positions", "contiguous")  # evaluations from before position schemes: contiguous


def pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def comparison(results) -> str:
    """Mean accuracy in and beyond the training lengths, what training cost, and Re-Tuning's
    out-of-distribution margin over each other method (the paper reports +37.4 over the baseline
    and +34.5 over the scratchpad for LLaMA 7B, averaged over the three tasks)."""
    rows = ["| task | method | positions | in distribution | out of distribution | Re-Tuning margin (OOD) | "
            "training minutes | steps | tokens per training sequence (mean / max) | peak RSS (MiB) |",
            "|" + "---|" * 10]
    margins = {}
    for r in results:  # the margin is over the Re-Tuning run of the same task and position scheme
        rt = [x for x in results if (x["task"], x["method"], positions(x)) == (r["task"], "retuning", positions(r))]
        margin = None
        if rt and r["method"] != "retuning" and r["out_of_distribution"] is not None:
            margin = rt[0]["out_of_distribution"] - r["out_of_distribution"]
            margins.setdefault(r["method"], []).append(margin)
        t = r.get("training") or {}
        tps = t.get("tokens_per_sequence", {})
        rows.append(f"| {r['task']} | {r['method']} | {positions(r)} | {pct(r['in_distribution'])} | {pct(r['out_of_distribution'])} | "
                    f"{'' if margin is None else f'{100 * margin:+.1f}'} | {t.get('minutes', '')} | {t.get('steps', '')} | "
                    f"{tps.get('mean', '')} / {tps.get('max', '')} | {t.get('peak_rss_mib', '')} |")
    for method, m in sorted(margins.items()):
        rows.append(f"\nRe-Tuning over {method}, out of distribution, mean over {len(m)} task(s): "
                    f"{100 * sum(m) / len(m):+.1f} points")
    return "\n".join(rows)


def plot(results, out):
    """One figure per task, like the poster's: accuracy (%) against length, one line per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    for task in sorted({r["task"] for r in results}):
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for r, marker in zip([r for r in results if r["task"] == task], "osD^v<>"):
            xs = sorted(int(L) for L in r["accuracy"])  # distinct markers: curves at 0% stay visible
            ax.plot(xs, [100 * r["accuracy"][str(L)] for L in xs], marker=marker, ms=5, mfc="none", label=r["method"])
            ax.axvline(r["train_length"] + 0.5, color="gray", ls="--", lw=1)
        if TASKS[task].chance is not None:
            ax.axhline(100 * TASKS[task].chance, color="gray", ls=":", lw=1, label="chance")
        ax.set(title=f"{task} (dashed: longest training length)", xlabel=f"problem length ({TASKS[task].unit})",
               ylabel="accuracy (%)", ylim=(-3, 103))
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"{task}.png"), dpi=120)
        plt.close(fig)


def write(results, out):
    """results.json, results.md and the plots, as they stand."""
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"runs": results}, f, indent=1)
    md = table(results) + "\n\n" + comparison(results)
    md += "".join("\n\n" + steps.table(f"{r['task']} {r['method']} ({positions(r)})", r["by_step"])
                  for r in results if r["by_step"])
    md += "".join("\n\n" + steps.table(f"{r['task']} {r['method']}, every context", r["by_context"], rows="kind / size")
                  for r in results if r.get("by_context"))
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md + "\n")
    plot(results, out)
    return md


def lengths_of(run, args) -> list:
    cfg = read_run_config(run)
    task = TASKS[cfg["task"]]
    if args.lengths or args.paper_lengths:
        return args.lengths or parse_lengths(task.paper_eval_lengths)
    return list(range(task.min_len, 2 * cfg["train_length"] + 1))


def parser():
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", help="run folders (default: every run under runs/); with --combine, results.json files")
    p.add_argument("--lengths", type=parse_lengths, default=None, help="e.g. 1-32 or 2,4,8 (default: the task's shortest to 2x the training length)")
    p.add_argument("--paper-lengths", action="store_true", help="the paper's ranges: %s"
                   % {name: task.paper_eval_lengths for name, task in TASKS.items()})
    p.add_argument("--per-length", type=positive, default=20, help="fresh problems per length (default 20)")
    p.add_argument("--by-step", action="store_true", help="also each step's teacher-forced accuracy (steps.py): where a method breaks")
    p.add_argument("--by-context", action="store_true", help="Re-Tuning: also every context of the recursions, "
                   "teacher-forced, by kind and sub-problem size (steps.by_context): which sub-call breaks")
    p.add_argument("--seed", type=int, default=1234, help="which problems (a separate stream from training's)")
    p.add_argument("--batch-size", type=positive, default=64, help="problems decoded together (default 64)")
    p.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--combine", action="store_true", help="the positional arguments are results.json files of earlier "
                   "evaluations: write them as one table and plot into --out, evaluating nothing")
    p.add_argument("--out", default=None, help="the folder to write (default: a new runs/eval/<date-time>/; reproduce.sh: results/)")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    if args.combine:
        return combine(args.runs, args.out)
    world = dist.init(args.device)  # under torchrun: the problems are shared out (evaluate)
    try:
        evaluate_all(args, world)
    finally:
        dist.finish()


def evaluate_all(args, world):
    """Each run in turn, results written after each (rank 0 writes and prints)."""
    runs = args.runs or sorted(os.path.dirname(c) for c in glob.glob("runs/*/config.json") if is_finetune(c))
    out = args.out or os.path.join("runs", "eval", time.strftime("%Y-%m-%d_%H%M%S"))
    if not runs:
        fail("no runs found under runs/: train one first (python retuning.py train --task addition)")
    if os.path.exists(out) and not os.path.isdir(out):
        fail(f"--out {out} is a file, not a folder")
    results, failed = [], []
    for run in runs:
        try:
            results.append(evaluate(run, lengths_of(run, args), args.per_length, args.seed, args.batch_size,
                                    world.device(args.device), by_step=args.by_step, by_context=args.by_context, world=world))
        except (ValueError, OSError, KeyError) as e:  # a bad run folder: say so, go on with the others
            failed.append(run)
            if world.main:
                print(f"error: {e}" if str(run) in str(e) else f"error: {run}: {e}", file=sys.stderr)
            continue
        if world.main:
            os.makedirs(out, exist_ok=True)  # only once there is something to write
            md = write(results, out)
    if results and world.main:
        print(md)
        print(f"wrote {out}/results.json, results.md and " + ", ".join(f"{t}.png" for t in sorted({r['task'] for r in results})))
    if failed:
        sys.exit(2)  # each failure was reported on its own line above


def combine(files, out):
    """One table and plot from evaluations made separately (their results.json), nothing decoded
    again. A run evaluated at some lengths in one file and at others in another becomes one row."""
    if not files or not out:
        fail("--combine needs results.json files and --out")
    results = []
    for path in files:
        try:
            with open(path) as f:
                for r in json.load(f)["runs"]:
                    same = [x for x in results if key(x) == key(r)]
                    if same:
                        merge(same[0], r)
                    else:
                        results.append(r)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            fail(f"{path}: not a results.json written by eval.py ({e})")
    if os.path.exists(out) and not os.path.isdir(out):
        fail(f"--out {out} is a file, not a folder")
    os.makedirs(out, exist_ok=True)
    print(write(results, out))
    print(f"wrote {out}/results.json, results.md and the plots")


def key(r) -> tuple:
    return r["run"], r["task"], r["method"], positions(r)


def merge(into, r):
    """Add r's lengths to the same run's record `into` (refused where both hold a length: which
    would be the table's?), and recompute its means."""
    both = sorted(set(into["accuracy"]) & set(r["accuracy"]), key=int)
    if both:
        fail(f"{r['run']} is evaluated at length {both[0]} in two of the files; combine evaluations of different lengths")
    if into.get("by_context") and r.get("by_context"):  # counted over all of an evaluation's lengths
        fail(f"{r['run']} has --by-context tables in two of the files, which cannot be merged")
    for name in ("accuracy", "count", "by_step", "by_context"):
        if into.get(name) is not None or r.get(name) is not None:
            into[name] = {**(into.get(name) or {}), **(r.get(name) or {})}
    into["seconds"] = round(into.get("seconds", 0) + r.get("seconds", 0), 1)
    into["generated_tokens"] = into.get("generated_tokens", 0) + r.get("generated_tokens", 0)
    into.update(means(into["accuracy"], into["train_length"]))


def is_finetune(config_path) -> bool:
    """Whether runs/*/config.json is a fine-tuning run's (eval skips pretraining runs and odd files)."""
    try:
        with open(config_path) as f:
            return json.load(f).get("command") == "train"
    except (ValueError, OSError, AttributeError):
        return False


def fail(message):
    if os.environ.get("RANK", "0") == "0":  # under torchrun every process fails alike; one says so
        print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
