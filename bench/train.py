"""One LoRA training step, ours vs transformers + peft, on the batches `train` really draws.

    python bench/train.py --shape embedded --data addition-retuning     # the default fine-tune
    python bench/train.py --shape smollm2 --data addition-retuning --bf16
    python bench/train.py --shape 7b --device cuda --batch 4 --seq 256  # LLaMA-7B, dense 4 x 256

With --data TASK-METHOD each step is a batch of real training contexts (data.training_contexts
at the task's training length, `train`'s length bucketing; SmolLM2's tokenizer at its shape when
converted, else the embedded one): ragged,
loss on the completions only. Ours runs train.train_step (logits only where there is loss);
transformers + peft get the same contexts as a transformers user would write them: right-padded
input_ids, an attention_mask and -100 labels. Without --data both get a dense random batch.
Both models have the same random weights (ours saved in the HF layout, loaded by transformers)
and the same adapter config; speed does not depend on the weights' values. The two take turns
step by step (both are held at once: bench/memory.py says how much that is at 7B). Reported: seconds
per step, useful (loss-carrying) tokens/s, `speed-up: N.NNx` of ours over transformers + peft, and
last `of peak: NN%`, the step's matrix FLOPs over the CPU's own matmul rate.
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from checkpoint import Tokenizer  # noqa: E402
from data import batches, training_contexts  # noqa: E402
from lora import TARGETS, apply_lora  # noqa: E402
from model import Llama, ModelArgs  # noqa: E402
from runs import EMBEDDED_TOKENIZER, SMOLLM2_DIR  # noqa: E402
from shapes import SHAPES  # noqa: E402
from tasks import TASKS, context_ids  # noqa: E402

WARMUP = 3  # steps each side runs before the clock counts (allocator, caches, lazy init)


def bench_tokenizer(shape):
    """SmolLM2's own tokenizer at its shape when `convert` has written it (its contexts are longer
    than the embedded tokenizer's, which was trained on the task strings), else the embedded one."""
    if shape == "smollm2" and os.path.isdir(SMOLLM2_DIR):
        return Tokenizer.from_folder(SMOLLM2_DIR), "SmolLM2's tokenizer"
    return Tokenizer(EMBEDDED_TOKENIZER), "the embedded tokenizer"


def real_batches(spec, batch, steps, tok, max_len=None):
    """`steps` (+ warm-up) batches of (ids, loss mask) as `train` draws them for TASK-METHOD."""
    task, method = spec.split("-")
    contexts = training_contexts(task, method, max_len or TASKS[task].train_len, 0, 16 * batch * (steps + WARMUP))
    data = [context_ids(tok, segs) for segs in contexts]
    stream = batches(data, batch, 0)
    return [[data[i] for i in next(stream)] for _ in range(steps + WARMUP)], tok.eos_id


def dense_batches(vocab, batch, seq, steps):
    g = torch.Generator().manual_seed(0)
    return [[(torch.randint(0, vocab, (seq,), generator=g).tolist(), [0] + [1] * (seq - 1)) for _ in range(batch)]
            for _ in range(steps + WARMUP)], 2


def clock(step, items, device) -> float:
    """Seconds one step takes (CUDA work included)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    step(items)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def interleaved(steps, batches, device):
    """Seconds per step of each implementation, taking turns on each batch, after WARMUP
    batches. Turns, not one run after the other: a CPU's speed drifts within a minute, and the
    drift then falls on both sides alike instead of on one."""
    total = [0.0] * len(steps)
    for i, items in enumerate(batches):
        for k, step in enumerate(steps):
            t = clock(step, items, device)
            total[k] += t if i >= WARMUP else 0.0
    return [t / (len(batches) - WARMUP) for t in total]


def step_flops(a: ModelArgs, r: int, targets, batch) -> float:
    """Matrix FLOPs one LoRA step must do on `batch` (real tokens only, padding is overhead):
    per token and projection (in -> out) the frozen GEMM forward and its input gradient (2 x 2 in
    out) and LoRA's A, B forward, input and weight gradients (3 x 2 r (in + out)); attention's two
    products over the causal half of each context, forward and backward (3 x 2 x 2 hd heads T^2 / 2);
    the last block's MLP and the output layer (4 dim vocab) only at loss positions, as ours does."""
    q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    shapes = {"q_proj": (a.dim, q), "k_proj": (a.dim, kv), "v_proj": (a.dim, kv), "o_proj": (q, a.dim),
              "gate_proj": (a.dim, a.hidden_dim), "up_proj": (a.dim, a.hidden_dim), "down_proj": (a.hidden_dim, a.dim)}
    attn = sum(4 * i * o + (6 * r * (i + o) if name in targets else 0) for name, (i, o) in shapes.items() if name[0] in "qkvo")
    mlp = sum(4 * i * o + (6 * r * (i + o) if name in targets else 0) for name, (i, o) in shapes.items() if name[0] not in "qkvo")
    total = 0.0
    for ids, mask in batch:
        T, n_loss = len(ids) - 1, sum(mask[1:])
        total += a.n_layers * (T * attn + 6 * a.head_dim * a.n_heads * T * T) + (a.n_layers - 1) * T * mlp
        total += n_loss * (mlp + 4 * a.dim * a.vocab_size)
    return total


def matmul_peak(a: ModelArgs, tokens: int, dtype, device) -> float:
    """FLOP/s of this machine's plain `x @ w` at the model's own GEMM shapes (`tokens` rows): the
    limit a step's matrix work could run at."""
    q = a.n_heads * a.head_dim
    shapes = [(a.dim, q), (a.dim, a.n_kv_heads * a.head_dim), (q, a.dim), (a.dim, a.hidden_dim), (a.hidden_dim, a.dim)]
    flops, seconds = 0.0, 0.0
    for i, o in shapes:
        x, w = torch.randn(tokens, i, dtype=dtype, device=device), torch.randn(i, o, dtype=dtype, device=device)
        for _ in range(3):
            x @ w
        seconds += clock(lambda _: [x @ w for _ in range(10)], None, device)
        flops += 10 * 2 * tokens * i * o
    return flops / seconds


def ours_step(model, cfg):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return lambda items: train.train_step(model, opt, items, cfg)


def hf_step(hf, pad_id, device, bf16):
    """What a transformers + peft user writes: padded ids, attention mask, -100 labels, .loss."""
    opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-4)

    def step(items):
        T = max(len(ids) for ids, _ in items)
        x = torch.full((len(items), T), pad_id)
        labels = torch.full((len(items), T), -100)
        attn = torch.zeros((len(items), T), dtype=torch.long)
        for i, (ids, mask) in enumerate(items):
            x[i, :len(ids)], attn[i, :len(ids)] = torch.tensor(ids), 1
            labels[i, :len(ids)] = torch.where(torch.tensor(mask, dtype=torch.bool), torch.tensor(ids), -100)
        with torch.autocast(device.split(":")[0], torch.bfloat16, enabled=bf16):
            loss = hf(input_ids=x.to(device), attention_mask=attn.to(device), labels=labels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in hf.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=list(SHAPES), default="embedded")
    p.add_argument("--data", default=None, help="TASK-METHOD, e.g. addition-retuning (default: dense random tokens)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 frozen weights and autocast (always on CUDA)")
    p.add_argument("--batch", type=int, default=32, help="contexts per step (--data) or sequences (dense)")
    p.add_argument("--seq", type=int, default=256, help="dense batches only")
    p.add_argument("--steps", type=int, default=20, help="timed steps of each, after %d warm-up steps" % WARMUP)
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout, both sides (the paper: 0.05)")
    p.add_argument("--max-len", type=int, default=None, help="--data: longest problem (default: the task's training length)")
    args = p.parse_args()
    bf16 = args.bf16 or args.device.startswith("cuda")
    dtype, targets = torch.bfloat16 if bf16 else torch.float32, tuple(args.targets.split(","))
    shape = ModelArgs(**SHAPES[args.shape])
    tok, tok_name = bench_tokenizer(args.shape)
    batches, pad = (real_batches(args.data, args.batch, args.steps, tok, args.max_len) if args.data
                    else dense_batches(shape.vocab_size, args.batch, args.seq, args.steps))
    torch.manual_seed(0)
    with torch.device(args.device):
        ours = Llama(shape).to(dtype)
    print(f"shape {args.shape}, {sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M parameters, {dtype}, "
          f"LoRA r={args.r} (dropout {args.dropout}) on {args.targets}, {args.data + ' (' + tok_name + ')' if args.data else 'dense random'} "
          f"batches of {args.batch}, {args.device}, "
          f"{torch.get_num_threads()} threads")
    print("| implementation | s/step | useful tokens/s |\n|---|---|---|")
    cfg = train.TrainConfig(run="", device=args.device, bf16=bf16, batch_size=args.batch, micro_batch_size=args.batch)
    import peft
    import transformers
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        hf = transformers.LlamaForCausalLM.from_pretrained(d, dtype=dtype).to(args.device)
    apply_lora(ours, args.r, args.r, args.dropout, targets)
    hf = peft.get_peft_model(hf, peft.LoraConfig(r=args.r, lora_alpha=args.r, lora_dropout=args.dropout, target_modules=list(targets)))
    s_ours, s_hf = interleaved([ours_step(ours.train(), cfg), hf_step(hf.train(), pad, args.device, bf16)],
                               batches, args.device)
    useful = sum(sum(mask) - mask[0] for items in batches[WARMUP:] for _, mask in items) / (len(batches) - WARMUP)
    print(f"| ours (model.py + lora.py + train.train_step) | {s_ours:.3f} | {useful / s_ours:.0f} |")
    print(f"| transformers + peft | {s_hf:.3f} | {useful / s_hf:.0f} |")
    timed = batches[WARMUP:]
    flops = sum(step_flops(shape, args.r, targets, b) for b in timed) / len(timed)
    tokens = round(sum(len(ids) - 1 for b in timed for ids, _ in b) / len(timed))
    peak = matmul_peak(shape, tokens, dtype, args.device)
    print(f"matrix work: {flops / 1e9:.0f} GFLOP a step ({tokens} tokens); {dtype} x @ w at the model's GEMM shapes "
          f"here: {peak / 1e9:.0f} GFLOP/s; ours {flops / s_ours / 1e9:.0f} GFLOP/s, transformers + peft {flops / s_hf / 1e9:.0f}")
    print(f"speed-up: {s_hf / s_ours:.2f}x")
    print(f"of peak: {100 * flops / s_ours / peak:.0f}% (transformers + peft: {100 * flops / s_hf / peak:.0f}%)")


if __name__ == "__main__":
    main()
