"""The held-out suite's haystack: R's own documentation, technical prose no part of training reads.

Debian's `r-base-core` (installed with `r-cran-janeaustenr`, the RULER haystack) ships R's NEWS
files and manuals. The validation split hides its needles in the NEWS files (release notes); the
test split in the manuals and FAQ, so choices made on validation never see a test document.
corpora.py refuses to read any of it for training.
"""
import html
import re
from functools import lru_cache
from pathlib import Path

from .errors import LocretError

R_DOC = Path("/usr/share/R/doc")
SOURCES = {"val": ["NEWS", "NEWS.0", "NEWS.1", "NEWS.2", "NEWS.3"],
           "test": ["FAQ", "manual/R-intro.html", "manual/R-lang.html", "manual/R-data.html",
                    "manual/R-admin.html", "manual/R-ints.html"]}
NAVIGATION = re.compile(r"^(Next|Previous|Up):")  # the manuals' page links


def plain_text(raw: str, is_html: bool) -> str:
    if not is_html:
        return raw
    raw = re.sub(r"(?s)<(script|style|pre)\b.*?</\1>", "\n\n", raw)
    return html.unescape(re.sub(r"<[^>]+>", " ", raw))


@lru_cache(maxsize=2)
def paragraphs(split: str) -> list[str]:
    """The split's documents as paragraphs of running text (whitespace collapsed), in reading order."""
    if split not in SOURCES:
        raise LocretError(f"unknown held-out split {split!r} (choose val or test)")
    out = []
    for name in SOURCES[split]:
        path = R_DOC / name
        if not path.is_file():
            raise LocretError(f"the held-out suite needs R's documentation ({path} is missing): "
                              "apt-get install r-cran-janeaustenr (it brings r-base-core)")
        text = plain_text(path.read_text(encoding="utf-8", errors="replace"), name.endswith(".html"))
        for block in re.split(r"\n\s*\n", text):
            block = " ".join(block.split()).lstrip("• ")
            if len(block) >= 60 and not NAVIGATION.match(block):
                out.append(block)
    return out


@lru_cache(maxsize=2)
def text(split: str) -> str:
    return "\n\n".join(paragraphs(split))
