"""Position ids: the position each token of a context is given, in training and at test.

Why this is an option (measured on the embedded base, docs/EXPERIMENTS.md): a tiny Llama
pretrained and fine-tuned with contiguous positions copies a sub-problem's digits by *position
offset* (one head reads exactly 2k+8 positions back for a k-digit problem) and stops by counting
positions, so a call beyond the training length is truncated to the longest length it saw.
Positions that do not count are the known cure (Ruoss et al., ACL 2023, randomized positional
encodings; Zhu et al., ICLR 2024, PoSE position skips). The two schemes, the same for every method:

- `contiguous`: 0, 1, 2, ... (the usual; every pretrained LM, SmolLM2 included);
- `stretched`: in training *and* at test, every step from one token to the next is 1 + a random
  0..max_gap, drawn independently: a distance in positions says only roughly how many tokens lie
  between, and the statistics are the same in a context of any length.

Two more lost and live in the history and in docs/EXPERIMENTS.md: random gaps only where the loss
mask flips (training only), and Ruoss-style sorted random subsets of a span.

A base pretrained with a scheme keeps it in its folder (positions.json), and a fine-tune of that
base uses it unless told otherwise: a base that never saw contiguous ids should not meet them.
Draws come from generators seeded by the training step or by the problem, never from the global
RNG: a resumed run draws what an uninterrupted one would, and both decoders agree.
"""
import os
import zlib
from dataclasses import dataclass
from typing import Optional

import torch

from checkpoint import read_json_object, write_json

SCHEMES = ("contiguous", "stretched")


@dataclass(frozen=True)
class Positions:
    scheme: str = "contiguous"
    max_gap: int = 12  # stretched: the largest extra step between two tokens

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown position scheme {self.scheme!r} (known: {', '.join(SCHEMES)})")

    @classmethod
    def of_run(cls, cfg: dict) -> "Positions":
        """The scheme a run (config.json) or a base (positions.json) was trained with."""
        return cls(cfg["positions"], cfg["max_gap"])

    def describe(self) -> str:
        """For tables: 'contiguous', 'stretched 1-3'."""
        return "contiguous" if self.scheme == "contiguous" else f"stretched 1-{1 + self.max_gap}"

    @classmethod
    def of_base(cls, folder) -> "Positions":
        """The scheme a base was pretrained with (positions.json; none: contiguous, as any HF model)."""
        path = os.path.join(folder, "positions.json")
        if not os.path.isfile(path):
            return cls()
        saved = read_json_object(path)
        missing = [k for k in ("positions", "max_gap") if k not in saved]
        if missing:
            raise ValueError(f"{path}: missing {', '.join(missing)}")
        return cls.of_run(saved)

    def save(self, folder):
        write_json(os.path.join(folder, "positions.json"), {"positions": self.scheme, "max_gap": self.max_gap})

    def for_batch(self, masks: list, T: int, seed: int) -> Optional[torch.Tensor]:
        """(B, T) positions of a training batch (rows right-padded to T); None for contiguous.
        Padding positions get values past the row's last, which nothing attends to."""
        if self.scheme == "contiguous":
            return None
        g = torch.Generator().manual_seed(seed)
        return torch.stack([self.stretch(T, g) for _ in masks])

    def for_context(self, problem: str, k: int, n: int) -> Optional[torch.Tensor]:
        """Positions of the first n tokens of the k-th context a problem opens, at test; None when
        test positions are contiguous. Seeded by (problem, k), so every decoder draws the same.
        n is the decoder's budget for the context (about twice its true length)."""
        if self.scheme == "contiguous":
            return None
        return self.stretch(n, torch.Generator().manual_seed(zlib.crc32(f"{problem}/{k}".encode())))

    def stretch(self, n, g) -> torch.Tensor:
        """0, then steps of 1 + uniform 0..max_gap."""
        step = 1 + torch.randint(0, self.max_gap + 1, (n,), generator=g)
        return torch.cumsum(step, 0) - step[0]
