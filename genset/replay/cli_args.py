"""argparse types of `genset replay`'s numeric flags: a bad value is refused by argparse, naming
the flag ("argument --workers: must be at most 1,024, got 100000"), before the trace is read.
Shared by genset.replay.__main__ and genset.replay.disagg_sim's flags."""

from __future__ import annotations

import argparse
import math


def number(kind, *, allow_zero: bool, most: float | None = None, least: float | None = None):
    """An argparse type: a finite `kind` (int or float) > 0, or >= 0 with `allow_zero`, at
    least `least` unless 0, and at most `most`."""
    def conv(text: str):
        try:
            v = kind(text)
        except ValueError:
            name = "an integer" if kind is int else f"a {kind.__name__}"
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
        if not math.isfinite(v):  # inf > 0 passed: an inf start-up or speed-up is no setting
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if not (v >= 0 if allow_zero else v > 0):
            raise argparse.ArgumentTypeError(f"must be {'>=' if allow_zero else '>'} 0, got {text}")
        if least is not None and v != 0 and v < least:
            zero = "0 or " if allow_zero else ""
            raise argparse.ArgumentTypeError(f"must be {zero}at least {least:g}, got {text}")
        if most is not None and v > most:
            raise argparse.ArgumentTypeError(f"must be at most {most:,}, got {text}")
        return v
    return conv


def positive(kind, most: float | None = None):
    return number(kind, allow_zero=False, most=most)


def non_negative(kind, most: float | None = None):
    return number(kind, allow_zero=True, most=most)


def in_range(kind, span: tuple[float, float], *, allow_zero: bool):
    """A finite value in `span` (lo, hi), or 0 too with `allow_zero`."""
    lo, hi = span
    return number(kind, allow_zero=allow_zero, least=lo, most=hi)
