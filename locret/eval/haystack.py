"""Natural-text haystack for the evaluation tasks: Jane Austen's six novels, read offline.

RULER hides its needles in Paul Graham's essays, which cannot be downloaded here. Debian's
`r-cran-janeaustenr` installs the novels (public domain; unlike the King James Bible, not used
for training) as an R lazy-load database: `Rdata.rdx` is a gzip-compressed R serialization of an
index {"variables": {name: [offset, length]}, "compressed": TRUE, ...}, and each object sits in
`Rdata.rdb` at its offset as a 4-byte big-endian length followed by a zlib stream of an R
serialization of a character vector, one element per line of the novel.
"""
import gzip
import struct
import zlib
from functools import lru_cache
from pathlib import Path

from ..errors import LocretError

JANEAUSTENR = Path("/usr/lib/R/site-library/janeaustenr/data")
# by date
NOVELS = ["sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey",
          "persuasion"]

# R serialization type codes (R Internals, "Serialization Formats") read here; anything else is
# refused.
SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, STRSXP, VECSXP = 1, 2, 9, 10, 13, 16, 19
NILVALUE_SXP, REFSXP = 254, 255
# flag bits; the type is the low byte, string encoding levels from bit 12
HAS_ATTR, HAS_TAG = 1 << 9, 1 << 10
LATIN1 = 1 << 2


class RUnserializer:
    """Just enough of R's XDR ('X\\n') serialization for this database: character, integer, logical
    and generic vectors, pairlists of attributes and symbols. Named vectors come back as dicts."""

    def __init__(self, data: bytes, source: str):
        if data[:2] != b"X\n":
            raise LocretError(f"{source}: not an R XDR serialization")
        self.data, self.pos, self.source, self.symbols = data, 2, source, []
        version = self.int()
        self.pos += 8  # R version that wrote it, oldest that can read it
        if version == 3:
            n = self.int()
            self.pos += n  # native encoding name

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def item(self):
        flags = self.int()
        kind = flags & 0xFF
        if kind == NILVALUE_SXP:
            return None
        if kind == REFSXP:  # a symbol seen before
            return self.symbols[(flags >> 8 or self.int()) - 1]
        if kind == SYMSXP:
            self.symbols.append(self.item())
            return self.symbols[-1]
        if kind == CHARSXP:
            n = self.int()
            if n == -1:
                return None  # NA_character_
            self.pos += n
            encoding = "latin-1" if (flags >> 12) & LATIN1 else "utf-8"
            return self.data[self.pos - n:self.pos].decode(encoding)
        if kind == LISTSXP:  # pairlist node: [attributes], [tag], value, rest of the list
            if flags & HAS_ATTR:
                self.item()
            tag = self.item() if flags & HAS_TAG else None
            value = self.item()
            return {tag: value, **(self.item() or {})}
        if kind in (LGLSXP, INTSXP):
            n = self.int()
            values = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif kind in (STRSXP, VECSXP):
            values = [self.item() for _ in range(self.int())]
        else:
            raise LocretError(f"{self.source}: R object type {kind} is not supported "
                              "by this reader")
        attributes = self.item() if flags & HAS_ATTR else {}
        return dict(zip(attributes["names"], values)) if "names" in attributes else values


def character_vector(data: bytes, source: str) -> list[str | None]:
    """An R serialization that must hold a plain character vector."""
    reader = RUnserializer(data, source)
    if reader.data[reader.pos + 3] != STRSXP:  # low byte of the first flags word
        raise LocretError(f"{source}: expected a character vector")
    return reader.item()


def read_lazyload(folder: Path) -> dict[str, list[str | None]]:
    """Every object of the lazy-load database `folder`/Rdata.{rdx,rdb}, each a character vector."""
    rdx = folder / "Rdata.rdx"
    index = RUnserializer(gzip.decompress(rdx.read_bytes()), str(rdx)).item()
    if index.get("compressed") != [1]:
        raise LocretError(f"{folder}: only zlib-compressed lazy-load databases are supported")
    db = (folder / "Rdata.rdb").read_bytes()
    objects = {}
    for name, (offset, length) in index["variables"].items():
        blob = db[offset:offset + length]
        data = zlib.decompress(blob[4:])
        if len(data) != struct.unpack(">I", blob[:4])[0]:
            raise LocretError(f"{folder / 'Rdata.rdb'}: object {name} is truncated")
        objects[name] = character_vector(data, f"{folder / 'Rdata.rdb'}:{name}")
    return objects


@lru_cache(maxsize=2)
def essays(folder: Path = JANEAUSTENR) -> str:
    """The six novels in order of publication, one text; lines joined by newlines."""
    if not (folder / "Rdata.rdb").is_file():
        raise LocretError("the essay haystack and perplexity text need Jane Austen's novels: "
                          "apt-get install r-cran-janeaustenr")
    novels = read_lazyload(folder)
    return "\n\n".join("\n".join(line or "" for line in novels[name]) for name in NOVELS)
