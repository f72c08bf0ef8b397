"""Memory of a LoRA fine-tune per GPU, computed from a shape by running our own training forward
on PyTorch's "meta" device (shapes only, no data, no time): every tensor autograd saves for
backward is counted, so the activation figure is what model.py + lora.py really keep.

    python bench/memory.py                          # LLaMA-7B and 13B, Re-Tuning's and the scratchpad's longest contexts
    python bench/memory.py --shape smollm2 --tokens 176 --batch 32

Frozen weights in bf16; LoRA (r, on q, k, v, o as the paper) in float32 with its gradient and
AdamW's two moments (16 bytes a parameter); activations of one micro-batch of `batch` contexts of
`tokens` tokens, all carrying loss (the output layer's logits are never held whole: loss.py).
Not counted: the CUDA context and allocator slack (typically 0.5-2 GB).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lora import apply_lora  # noqa: E402
import model as model_module  # noqa: E402
from model import Llama, ModelArgs  # noqa: E402
from shapes import SHAPES  # noqa: E402

GB = 1e9


class FlashAttention(torch.autograd.Function):
    """Stands in for attention on the meta device, which has no fused kernel (its math fallback
    would save every head's T x T scores): saves what CUDA's flash attention saves, q, k, v, the
    output and one log-sum-exp per query and head."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError


def saved_bytes(model, batch, tokens) -> int:
    """Bytes of the tensors autograd keeps between forward and backward: each once, and not the
    weights (a frozen matmul saves its weight, which is already counted as weights)."""
    weights, seen = {id(p) for p in model.parameters()}, {}

    def pack(t):
        if id(t) not in weights and id(t._base) not in weights:
            seen[id(t)] = t.numel() * t.element_size()
        return t
    model_module.attend = lambda q, k, v, mask=None: FlashAttention.apply(q, k, v)
    x = torch.zeros(batch, tokens, dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, hidden=True)  # every position carries loss
    return sum(seen.values())


def without_autocast_on_meta():
    """Autocast has no meta device; the model runs in bf16 throughout instead (LoRA too), which
    saves the tensors autocast would (its matmuls run in bf16 on bf16 inputs)."""
    known = torch.is_autocast_enabled
    torch.is_autocast_enabled = lambda *a: False if a and a[0] == "meta" else known(*a)


def estimate(shape, r, targets, batch, tokens) -> dict:
    with torch.device("meta"):
        model = Llama(ModelArgs(**SHAPES[shape])).to(torch.bfloat16)
        apply_lora(model, r, r, 0.05, targets)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    acts = saved_bytes(model.to(torch.bfloat16).train(), batch, tokens)
    return {"weights": frozen / GB, "lora": 16 * lora / GB, "activations": acts / GB,
            "total": (frozen + 16 * lora + acts) / GB, "per_token_mb": acts / (batch * tokens) / 1e6}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default=None, choices=list(SHAPES), help="one shape (default: 7b and 13b)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per context (default: 176 and 560, Re-Tuning's "
                   "and the scratchpad's longest at the paper's lengths with a Llama tokenizer: `retuning.py data --table`)")
    p.add_argument("--batch", type=int, default=8, help="contexts per micro-batch")
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    args = p.parse_args()
    without_autocast_on_meta()
    print("| shape | contexts x tokens | frozen bf16 weights | LoRA + AdamW | activations | total (GB) | activations per token (MB) |")
    print("|---|---|---|---|---|---|---|")
    for shape in [args.shape] if args.shape else ["7b", "13b"]:
        for tokens in [args.tokens] if args.tokens else [176, 560]:
            e = estimate(shape, args.r, tuple(args.targets.split(",")), args.batch, tokens)
            print(f"| {shape} | {args.batch} x {tokens} | {e['weights']:.1f} | {e['lora']:.2f} | {e['activations']:.1f} | "
                  f"{e['total']:.1f} | {e['per_token_mb']:.2f} |")


if __name__ == "__main__":
    main()
