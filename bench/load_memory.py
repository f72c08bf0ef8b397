"""Host memory of Llama.from_pretrained: it should hold about one copy of the weights.

    python bench/load_memory.py          # writes a 170M-parameter fp32 checkpoint to a temp dir,
                                          # then loads it in fresh processes as fp32 and as bf16

Anonymous memory is what loading allocates; mapped file pages (counted in peak RSS) are the
page cache of the safetensors file, which the kernel can drop.
"""
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import Llama, ModelArgs  # noqa: E402


def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) / 1024 for k in ("RssAnon", "VmHWM")}  # MiB


def load(path, dtype):
    before = status()
    model = Llama.from_pretrained(path, dtype=getattr(torch, dtype))
    after = status()
    size = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    print(f"| {dtype} | {size:.0f} | {after['RssAnon'] - before['RssAnon']:.0f} | {after['VmHWM'] - before['VmHWM']:.0f} |")


if __name__ == "__main__":
    if len(sys.argv) == 3:  # child process: load and report
        load(sys.argv[1], sys.argv[2])
        sys.exit()
    with tempfile.TemporaryDirectory() as d:
        Llama(ModelArgs(dim=1024, n_layers=8, n_heads=16, hidden_dim=2816, vocab_size=32000)).save_pretrained(d)
        print(f"checkpoint: {os.path.getsize(os.path.join(d, 'model.safetensors')) / 2**20:.0f} MiB (float32)")
        print("| load as | weights MiB | anonymous memory added, MiB | peak RSS added (with file pages), MiB |")
        print("|---|---|---|---|")
        for dtype in ("float32", "bfloat16"):
            subprocess.run([sys.executable, __file__, d, dtype], check=True)
