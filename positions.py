"""Position ids: the position each token of a context is given, in training and at test.

Why this is an option (measured on the embedded base): a tiny Llama fine-tuned with
contiguous positions copies a sub-problem's digits by *position offset* (one head reads exactly
2k+8 positions back for a k-digit problem) and stops by counting positions, so a call beyond the
training length is truncated to the longest length it saw. Making positions uninformative about
length is the known cure for that (Ruoss et al., ACL 2023, randomized positional encodings;
Zhu et al., ICLR 2024, PoSE position skips). The schemes, the same for every method:

- `contiguous`: 0, 1, 2, ... (the usual; the default);
- `gaps`: in training, a random gap of 0..max_gap extra positions wherever the loss mask flips
  (prompt -> completion -> returned value -> ...), so offsets across segments vary; contiguous
  at test;
- `stretched`: in training *and* at test, every step from one token to the next is 1 + a random
  0..max_gap, drawn independently: a distance in positions says only roughly how many tokens lie
  between, and the statistics are the same in a context of any length;
- `randomized`: in training *and* at test, each context's positions are a sorted random subset
  of 0..span-1 (Ruoss et al.), so no absolute or relative distance reveals a length. A context
  of n tokens is drawn as the first n of a subset of 2n + 16 (the decoder's budget for it,
  decoder.eval_limits), so ids are as dense in training as at test: measured, a model trained on
  one density and tested on a 2x denser one fails even in distribution.

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

SCHEMES = ("contiguous", "gaps", "stretched", "randomized")


@dataclass(frozen=True)
class Positions:
    scheme: str = "contiguous"
    max_gap: int = 12  # gaps: the largest extra gap at a segment boundary; stretched: between tokens
    span: int = 1024  # randomized: positions are drawn from range(span)

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown position scheme {self.scheme!r} (known: {', '.join(SCHEMES)})")

    @classmethod
    def of_run(cls, cfg: dict) -> "Positions":
        """The scheme a run was trained with, from its config.json (runs before it existed: contiguous)."""
        return cls(cfg.get("positions", "contiguous"), cfg.get("max_gap", 12), cfg.get("position_span", 1024))

    def describe(self) -> str:
        """For tables: 'contiguous', 'gaps 0-12', 'stretched 1-3', 'randomized of 1024'."""
        return {"contiguous": "contiguous", "gaps": f"gaps 0-{self.max_gap}", "stretched": f"stretched 1-{1 + self.max_gap}",
                "randomized": f"randomized of {self.span}"}[self.scheme]

    @classmethod
    def of_base(cls, folder) -> "Positions":
        """The scheme a base was pretrained with (positions.json; none: contiguous, as any HF model)."""
        path = os.path.join(folder, "positions.json")
        return cls.of_run(read_json_object(path)) if os.path.isfile(path) else cls()

    def save(self, folder):
        write_json(os.path.join(folder, "positions.json"),
                   {"positions": self.scheme, "max_gap": self.max_gap, "position_span": self.span})

    def for_batch(self, masks: list, T: int, seed: int) -> Optional[torch.Tensor]:
        """(B, T) positions of a training batch (rows' loss masks, right-padded to T); None for
        contiguous. Padding positions get values past the row's last, which nothing attends to."""
        if self.scheme == "contiguous":
            return None
        g = torch.Generator().manual_seed(seed)
        if self.scheme == "stretched":
            return torch.stack([self.stretch(T, g) for _ in masks])
        if self.scheme == "randomized":
            return torch.stack([self.subset_row(len(mask), T, g) for mask in masks])
        rows = []
        for mask in masks:
            step = torch.ones(T, dtype=torch.long)
            flips = [t for t in range(1, min(len(mask), T)) if mask[t] != mask[t - 1]]
            step[flips] += torch.randint(0, self.max_gap + 1, (len(flips),), generator=g)
            rows.append(torch.cumsum(step, 0) - 1)
        return torch.stack(rows)

    def for_context(self, problem: str, k: int, n: int) -> Optional[torch.Tensor]:
        """Positions of the first n tokens of the k-th context a problem opens, at test; None when
        test positions are contiguous. Seeded by (problem, k), so every decoder draws the same.
        n is the decoder's budget for the context (about twice its true length)."""
        if self.scheme not in ("stretched", "randomized"):
            return None
        g = torch.Generator().manual_seed(zlib.crc32(f"{problem}/{k}".encode()))
        return self.stretch(n, g) if self.scheme == "stretched" else self.subset(n, g)

    def stretch(self, n, g) -> torch.Tensor:
        """0, then steps of 1 + uniform 0..max_gap."""
        step = 1 + torch.randint(0, self.max_gap + 1, (n,), generator=g)
        return torch.cumsum(step, 0) - step[0]

    def subset(self, n, g) -> torch.Tensor:
        if n > self.span:
            raise ValueError(f"a context of up to {n} tokens cannot draw distinct positions from span {self.span}")
        return torch.randperm(self.span, generator=g)[:n].sort().values

    def subset_row(self, length, T, g) -> torch.Tensor:
        """A training row of `length` tokens in a batch of width T, drawn as the decoder would draw
        it (from a budget of 2 * length + 16); padding continues past the row's last id."""
        ids = self.subset(2 * length + 16, g)[:T]
        return torch.cat([ids, ids[-1] + 1 + torch.arange(T - len(ids))])
