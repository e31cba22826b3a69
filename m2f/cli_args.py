"""argparse value types shared by the m2f command lines."""
from __future__ import annotations

import argparse
from typing import Callable, Union


def at_least(minimum: Union[int, float], kind: type = int) -> Callable[[str], Union[int, float]]:
    """An argparse ``type``: ``kind(text)``, refused unless it is ``>= minimum`` (argparse then
    prints ``argument --flag: must be an integer >= 1, got '0'`` and exits 2)."""
    what = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what} >= {minimum}, got {text!r}") from None
        if not value >= minimum:  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be {what} >= {minimum}, got {text!r}")
        return value

    return parse
