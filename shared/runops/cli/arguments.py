"""Argument types the `runops` verbs share: a bad value is argparse's usage and one error line,
exit 2, before anything runs."""

from __future__ import annotations

import argparse


def at_least_one(value: str) -> int:
    """A whole number >= 1 (replicas, a count, callers at once)."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value!r}")
    return number
