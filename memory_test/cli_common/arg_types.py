"""argparse value types shared by the scripts (the suite's own flags have their rules in suite/flags.py)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An integer > 0 (argparse reports the rest as "argument --steps: must be a positive integer, got 0")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def names_from(choices, what: str):
    """A comma list of names, each one of ``choices`` (an iterable, or a callable returning one, read lazily)."""

    def parse(text: str) -> list[str]:
        valid = list(choices() if callable(choices) else choices)
        names = [t.strip() for t in text.split(",") if t.strip()]
        unknown = [n for n in names if n not in valid]
        if not names or unknown:
            raise argparse.ArgumentTypeError(f"unknown {what} {unknown or text!r}; choose from {', '.join(valid)}")
        return names

    return parse
