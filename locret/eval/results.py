"""An eval --out folder: settings.json records what changes results (a rerun with others is
refused); results.jsonl grows a JSON line per finished run, so an interrupted run resumes."""
import hashlib
import json
import sys
from pathlib import Path
from typing import TextIO

from ..errors import LocretError


def result_key(row: dict) -> tuple:
    return row["task"], row["length"], row["index"], row["policy"], row["budget"], row.get("mode")


def read_results(path: Path) -> dict[tuple, dict]:
    """Rows written so far, by result_key. A last line cut short by a kill is dropped (and said so
    on stderr): its run is done again on resume."""
    rows = []
    lines = path.read_text().splitlines() if path.is_file() else []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise LocretError(f"{path}: line {i + 1} is not JSON") from None
            print(f"{path}: dropped line {i + 1}, cut short by a kill: its run is done again",
                  file=sys.stderr)
    if len(rows) < len(lines):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {result_key(r): r for r in rows}


def append(log: TextIO, row: dict) -> None:
    """One finished run, on disk at once (a kill loses at most the line being written)."""
    log.write(json.dumps(row) + "\n")
    log.flush()


def check_out_folder(out: Path, record: dict) -> None:
    """Results in `out` must come from the same settings: `record` them first, refuse others."""
    if out.exists() and not out.is_dir():
        raise LocretError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LocretError(f"cannot create --out {out}: {e.strerror}") from None
    path = out / "settings.json"
    if path.is_file():
        theirs = read_settings(path)
        if changed := [k for k in record if theirs.get(k) != record[k]]:
            raise LocretError(f"{out} holds results of other settings ({', '.join(changed)} "
                              "differ): choose another --out or remove it")
    elif (out / "results.jsonl").is_file():
        raise LocretError(f"{out} holds results of unknown settings: choose another --out or "
                          "remove it")
    else:
        try:
            path.write_text(json.dumps(record, indent=1) + "\n")
        except OSError as e:
            raise LocretError(f"cannot write {path}: {e.strerror}") from None


def read_settings(path: Path) -> dict:
    """The settings an --out folder's results were made with, or one clear error."""
    try:
        theirs = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise LocretError(f"{path} is unreadable ({type(e).__name__}): remove it, or choose "
                          "another --out") from None
    if not isinstance(theirs, dict):
        raise LocretError(f"{path} is not a settings object: remove it, or choose another --out")
    return theirs


def heads_identity(path: str | Path | None) -> str | None:
    """A heads file by name and content: new heads at the same path are not taken for old ones."""
    if path is None:
        return None
    return f"{Path(path).name}:{hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]}"
