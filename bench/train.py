"""One LoRA training step, ours vs transformers + peft: tokens/s and peak memory, side by side.

    python bench/train.py --shape 7b --device cuda      # LLaMA-7B shape, bf16, LoRA r=64 on q,k,v,o
    python bench/train.py --shape small                  # a CPU-sized check of the same code path

Both models get the same random weights (ours saved in the HF layout, loaded by transformers),
the same adapter config and the same micro-batch (default 4 x 256 tokens). Weights are random:
the speed and memory of a step do not depend on their values.
"""
import argparse
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lora import apply_lora  # noqa: E402
from model import Llama, ModelArgs  # noqa: E402

SHAPES = {  # LLaMA-7B (Touvron et al. 2023, Table 2) and a small one for CPUs
    "7b": dict(dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, vocab_size=32000),
    "small": dict(dim=512, n_layers=4, n_heads=8, hidden_dim=1376, vocab_size=32000),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def step_stats(model, forward, x, device, steps):
    """Mean seconds per step (after one warm-up) and peak memory of forward + backward + AdamW."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for i in range(steps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device, torch.bfloat16, enabled=device == "cuda"):
            logits = forward(x)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if device == "cuda" else "n/a on CPU"
    return sum(times[1:]) / steps, peak


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=list(SHAPES), default="small")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--r", type=int, default=64)
    args = p.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(args.device):
        ours = Llama(ModelArgs(**SHAPES[args.shape])).to(dtype)
    x = torch.randint(0, ours.args.vocab_size, (args.batch, args.seq), device=args.device)
    print(f"shape {args.shape}, {sum(p.numel() for p in ours.parameters()) / 1e9:.2f}B parameters, "
          f"{dtype}, LoRA r={args.r} on {','.join(TARGETS)}, micro-batch {args.batch}x{args.seq}, {args.device}")
    print("| implementation | s/step | tokens/s | peak GiB |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        apply_lora(ours, args.r, args.r, 0.05, tuple(TARGETS))
        s, peak = step_stats(ours.train(), ours, x, args.device, args.steps)
        print(f"| ours (model.py + lora.py) | {s:.3f} | {x.numel() / s:.0f} | {peak} |")
        del ours
        if args.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        import peft
        import transformers
        hf = transformers.LlamaForCausalLM.from_pretrained(d, dtype=dtype).to(args.device)
        hf = peft.get_peft_model(hf, peft.LoraConfig(r=args.r, lora_alpha=args.r, lora_dropout=0.05, target_modules=TARGETS))
        s, peak = step_stats(hf.train(), lambda t: hf(t).logits, x, args.device, args.steps)
        print(f"| transformers + peft | {s:.3f} | {x.numel() / s:.0f} | {peak} |")


if __name__ == "__main__":
    main()
