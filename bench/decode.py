"""Decoder throughput: batched recursive decoder vs one problem at a time vs the naive oracle.

    python bench/decode.py                     # Re-Tuning addition at 8, 16 and 32 digits
    python bench/decode.py --digits 16 --batch 128 --oracle-problems 2
    python bench/decode.py --shape smollm2 --bf16 --digits 16     # SmolLM2-135M's shape (or --run RUN)
    python bench/decode.py --shape smollm2 --bf16 --task dp --method scratchpad --digits 5 --batch 32

Every decoder runs the same Llama (random weights at --shape, the embedded default's unless told,
or a trained --run) on the same, realistic call trees: tracemodel.TraceModel makes the model's choices those of
the true trace, while the real model still computes every forward pass. So the decoders
differ only in how contexts are scheduled and cached:
  batched  all open contexts of all problems advance together, one KV-cache slot per context;
  gathered the same, every step's prefixes gathered from the KV cache's pages (keep_rows=False:
           the decoding rows' prefixes are not kept between steps, as before kvcache.Rows);
  single   the same decoder, one problem at a time (cached, unbatched);
  oracle   each token recomputes its whole context, one problem at a time (decoder.decode_naive);
  release  the release's harness: transformers' `generate` (with its KV cache) once per
           completion, batch 1, the parent's whole text re-encoded after each return; the same
           weights in transformers, steered along the true trace by a logits processor.
The last line is the batched decoder's speed-up over the release's harness at 16 digits (at the
last length, for another --task: the length is then the list's or the array's).
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tasks  # noqa: E402
from checkpoint import Tokenizer  # noqa: E402
from data import eval_problems  # noqa: E402
from decoder import Solve, decode, decode_naive, eval_limits  # noqa: E402
from kvcache import KVCache  # noqa: E402
from model import Llama, ModelArgs  # noqa: E402
from runs import EMBEDDED_TOKENIZER, SMOLLM2_DIR, load_run  # noqa: E402
from shapes import SHAPES  # noqa: E402
from tracemodel import TraceModel  # noqa: E402


def taking_turns(runs, rounds, task):
    """Problems/s and generated tokens/s of each decoder, all of them taking turns `rounds` times
    on their problems: a CPU's speed drifts within a minute, and taking turns makes the drift
    fall on every decoder alike instead of on one."""
    done = {name: [0, 0, 0.0] for name in runs}  # problems, tokens, seconds
    for _ in range(rounds):
        for name, (problems, fn) in runs.items():
            t0 = time.perf_counter()
            solves = fn(problems)
            done[name][2] += time.perf_counter() - t0
            assert all(s.answer == tasks.TASKS[task].answer(s.problem) for s in solves), "decoding went wrong"
            done[name][0] += len(solves)
            done[name][1] += sum(s.n_generated for s in solves)
    return {name: (n / dt, tokens / dt) for name, (n, tokens, dt) in done.items()}


def release_harness(hf, forced, tok, problems, lim, task, method):
    """Per problem, per completion: generate() on the context's full token list, then the
    state machine (decoder.Solve) reads the completion; a resumed parent is encoded again."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class FollowTrace(LogitsProcessor):  # the true next token, as TraceModel gives our decoders
        def __call__(self, input_ids, scores):
            return forced.predict(input_ids.tolist(), scores[0]).to(scores.dtype)
    steer, solves = LogitsProcessorList([FollowTrace()]), []
    for p in problems:
        s = Solve(p, task, method, tok, lim)
        while not s.done:
            ctx = s.stack[-1]
            ctx.ids += ctx.pending
            out = hf.generate(torch.tensor([ctx.ids]), max_new_tokens=lim.max_new + 1, do_sample=False,
                              logits_processor=steer, eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)
            for token in out[0, len(ctx.ids):].tolist():
                s.on_token(token)
                if s.done or s.stack[-1] is not ctx or not ctx.generated:  # the completion ended
                    break
                ctx.ids += ctx.pending
        solves.append(s)
    return solves


def hf_twin(model, device):
    """The same weights as a transformers LlamaForCausalLM, in the same dtype."""
    import tempfile
    import transformers
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        return transformers.LlamaForCausalLM.from_pretrained(d, dtype=model.embed_tokens.weight.dtype).to(device).eval()


def random_model(shape, bf16, device):
    """A Llama of a benchmark shape with random weights, and a tokenizer for its trace: SmolLM2's
    own at its shape when `convert` has written it, else the embedded one (its ids fit any vocab)."""
    tok = Tokenizer.from_folder(SMOLLM2_DIR) if shape == "smollm2" and os.path.isdir(SMOLLM2_DIR) else Tokenizer(EMBEDDED_TOKENIZER)
    args = ModelArgs(**{**SHAPES[shape], "vocab_size": max(SHAPES[shape]["vocab_size"], tok.vocab_size)},
                     bos_id=tok.bos_id, eos_id=tok.eos_id)
    torch.manual_seed(0)
    with torch.device(device):  # nn.Linear's own random init, made where it runs (fast even at 7B)
        model = Llama(args)
    return model.to(torch.bfloat16 if bf16 else torch.float32).eval(), tok


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--digits", default="8,16,32", help="problem lengths (digits, bits or elements)")
    p.add_argument("--task", choices=list(tasks.TASKS), default="addition")
    p.add_argument("--method", choices=["retuning", "baseline", "scratchpad"], default="retuning")
    p.add_argument("--batch", type=int, default=128, help="problems decoded together by the batched decoder")
    p.add_argument("--single-problems", type=int, default=8)
    p.add_argument("--oracle-problems", type=int, default=8)
    p.add_argument("--release-problems", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3, help="turns each decoder takes (the rates are over all of them)")
    p.add_argument("--run", default=None, help="a trained run folder (default: random weights at --shape)")
    p.add_argument("--shape", choices=list(SHAPES), default="embedded", help="the random model's shape")
    p.add_argument("--bf16", action="store_true", help="bfloat16 weights (always on CUDA)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    if args.run:
        model, tok, _ = load_run(args.run, args.device)
    else:
        model, tok = random_model(args.shape, args.bf16 or args.device.startswith("cuda"), args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.run or args.shape}, {n_params / 1e6:.2f}M parameters, {model.embed_tokens.weight.dtype} on "
          f"{args.device}, {torch.get_num_threads()} threads")
    hf = hf_twin(model, args.device)
    print("| length | decoder | problems | problems/s | generated tokens/s | speed-up vs oracle |")
    print("|---|---|---|---|---|---|")
    T, M, speedups, w = args.task, args.method, {}, next(model.parameters())
    for d in map(int, args.digits.split(",")):
        problems = eval_problems(T, d, args.batch, 0)
        forced = TraceModel(tok, T, M, problems, inner=model).eval()
        lim = eval_limits(T, M, tok, problems[:1])
        runs = {
            "batched": (problems, lambda ps: decode(forced, tok, T, M, ps, lim)),
            "gathered": (problems, lambda ps: decode(forced, tok, T, M, ps, lim, cache=KVCache(
                model.args, 2 * len(ps), lim.max_context_len, w.device, w.dtype, keep_rows=False))),
            "single": (problems[:args.single_problems], lambda ps: [decode(forced, tok, T, M, [q], lim)[0] for q in ps]),
            "oracle": (problems[:args.oracle_problems], lambda ps: decode_naive(forced, tok, T, M, ps, lim)),
            "release": (problems[:args.release_problems], lambda ps: release_harness(hf, forced, tok, ps, lim, T, M)),
        }
        runs = {name: run for name, run in runs.items() if run[0]}  # e.g. --oracle-problems 0: no oracle
        rates = taking_turns(runs, args.rounds, T)
        for name, (ps, _) in runs.items():
            pr, tr = rates[name]
            vs = f"{pr / rates['oracle'][0]:.1f}x" if "oracle" in rates else "-"
            print(f"| {d} | {name} | {len(ps)} x {args.rounds} | {pr:.2f} | {tr:.0f} | {vs} |")
        if "release" in rates:
            speedups[d] = rates["batched"][0] / rates["release"][0]
    if T == "addition" and 16 in speedups:
        print(f"speed-up over the release's harness at 16 digits: {speedups[16]:.2f}x")
    elif speedups:
        d = max(speedups)
        print(f"speed-up over the release's harness at length {d}: {speedups[d]:.2f}x")


if __name__ == "__main__":
    main()
