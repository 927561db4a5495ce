import sys
from typing import Callable


class LocretError(Exception):
    """A problem with the user's input (checkpoint, settings, prompt). Scripts print it as one line."""


def run_script(main: Callable, parse_args: Callable) -> None:
    """Run a command-line entry point; a LocretError becomes one line on stderr and exit status 1."""
    try:
        main(parse_args())
    except LocretError as e:
        sys.exit(f"error: {e}")
