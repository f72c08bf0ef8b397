"""The command lines' argument types and parser, shared by retuning.py and eval.py.

Every flag is checked when it is parsed, so a bad value is one line naming it (exit code 2), before
any model is loaded or any file written.
"""
import argparse
import sys

import torch


class Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (argparse prints the whole usage first); --help still has it."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def positive(text) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def non_negative(text) -> int:
    return 0 if text.strip() == "0" else positive(text)


def positive_float(text) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def non_negative_float(text) -> float:
    """A finite number >= 0 (a weight decay)."""
    return 0.0 if text.strip() in ("0", "0.0") else positive_float(text)


def fraction(text) -> float:
    """A number in [0, 1): a dropout or a share of the data."""
    value = positive_float(text) if text.strip() not in ("0", "0.0") else 0.0
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def device(text) -> str:
    """cpu, cuda or cuda:N, and CUDA only where this machine has it (else torch fails deep inside)."""
    try:
        dev = torch.device(text)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has no CUDA device (or this torch is a CPU build)")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text
