"""Position ids: the position each token of a context is given, in training and at test.

Why this is an option (issue 10, measured on the embedded base): a tiny Llama fine-tuned with
contiguous positions copies a sub-problem's digits by *position offset* (one head reads exactly
2k+8 positions back for a k-digit problem) and stops by counting positions, so a call beyond the
training length is truncated to the longest length it saw. Making positions uninformative about
length is the known cure for that (Ruoss et al., ACL 2023, randomized positional encodings;
Zhu et al., ICLR 2024, PoSE position skips). The schemes, the same for every method:

- `contiguous`: 0, 1, 2, ... (the usual; the default);
- `gaps`: in training, a random gap of 0..max_gap extra positions wherever the loss mask flips
  (prompt -> completion -> returned value -> ...), so offsets across segments vary; contiguous
  at test;
- `randomized`: in training *and* at test, each context's positions are a sorted random subset
  of 0..span-1 (Ruoss et al.), so no absolute or relative distance reveals a length.

Draws come from generators seeded by the training step or by the problem, never from the global
RNG: a resumed run draws what an uninterrupted one would, and both decoders agree.
"""
import zlib
from dataclasses import dataclass
from typing import Optional

import torch

SCHEMES = ("contiguous", "gaps", "randomized")


@dataclass(frozen=True)
class Positions:
    scheme: str = "contiguous"
    max_gap: int = 12  # gaps: the largest extra gap at a segment boundary
    span: int = 1024  # randomized: positions are drawn from range(span)

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown position scheme {self.scheme!r} (known: {', '.join(SCHEMES)})")

    @classmethod
    def of_run(cls, cfg: dict) -> "Positions":
        """The scheme a run was trained with, from its config.json (runs before it existed: contiguous)."""
        return cls(cfg.get("positions", "contiguous"), cfg.get("max_gap", 12), cfg.get("position_span", 1024))

    def for_batch(self, masks: list, T: int, seed: int) -> Optional[torch.Tensor]:
        """(B, T) positions of a training batch (rows' loss masks, right-padded to T); None for
        contiguous. Padding positions get values past the row's last, which nothing attends to."""
        if self.scheme == "contiguous":
            return None
        g = torch.Generator().manual_seed(seed)
        if self.scheme == "randomized":
            if T > self.span:
                raise ValueError(f"a {T}-token training context cannot draw distinct positions from span {self.span}")
            return torch.stack([self.draw(T, g) for _ in masks])
        rows = []
        for mask in masks:
            step = torch.ones(T, dtype=torch.long)
            flips = [t for t in range(1, min(len(mask), T)) if mask[t] != mask[t - 1]]
            step[flips] += torch.randint(0, self.max_gap + 1, (len(flips),), generator=g)
            rows.append(torch.cumsum(step, 0) - 1)
        return torch.stack(rows)

    def for_context(self, problem: str, k: int, n: int) -> Optional[torch.Tensor]:
        """Positions of the first n tokens of the k-th context a problem opens, at test; None when
        test positions are contiguous. Seeded by (problem, k), so every decoder draws the same."""
        if self.scheme != "randomized":
            return None
        if n > self.span:
            raise ValueError(f"a context of up to {n} tokens cannot draw distinct positions from span {self.span}")
        return self.draw(n, torch.Generator().manual_seed(zlib.crc32(f"{problem}/{k}".encode())))

    def draw(self, n, g) -> torch.Tensor:
        return torch.randperm(self.span, generator=g)[:n].sort().values
