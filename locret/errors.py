"""The one error type for bad input, how scripts report it, and the checks every script shares."""
import argparse
import sys
from typing import Callable


class LocretError(Exception):
    """A problem with the user's input (checkpoint, settings, prompt); scripts print one line."""


def run_script(main: Callable, parse_args: Callable) -> None:
    """Run a command-line entry point; a LocretError becomes one stderr line and exit status 1."""
    try:
        main(parse_args())
    except LocretError as e:
        sys.exit(f"error: {e}")


def seed(text: str) -> int:
    """argparse type of every --seed: an integer torch's generators accept."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, not {text!r}") from None
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**64), not {value}")
    return value
