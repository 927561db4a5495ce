import os
import sys
from pathlib import Path
from typing import Callable


class LocretError(Exception):
    """A problem with the user's input (checkpoint, settings, prompt). Scripts print it as one line."""


def run_script(main: Callable, parse_args: Callable) -> None:
    """Run a command-line entry point; a LocretError becomes one line on stderr and exit status 1."""
    try:
        main(parse_args())
    except LocretError as e:
        sys.exit(f"error: {e}")


def writable_file_path(path: str | Path) -> bool:
    """Whether a file can be written at `path`: not a folder, in an existing folder we may write to."""
    path = Path(path)
    return not path.is_dir() and path.parent.is_dir() and os.access(path.parent, os.W_OK)
