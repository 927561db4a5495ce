"""Text that arrives over time: read in blocks as it comes, and tokenized incrementally into
exactly the ids that tokenizing the whole text at once gives, without ever holding the whole text
or its ids."""
import codecs
import sys
from typing import Iterator

from ..errors import LocretError
from .tokenizer import Tokenizer

BLOCK = 1 << 16  # bytes read at a time


def read_blocks(source: str, what: str = "prompt") -> Iterator[str]:
    """The UTF-8 text of file `source` (or "-": standard input) in pieces as it arrives; a
    character split across reads waits for its last byte. Undecodable bytes are a LocretError
    naming `what` and their offset."""
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    try:
        stream = sys.stdin.buffer if source == "-" else open(source, "rb")
    except OSError as e:
        raise LocretError(f"cannot read {what} {source}: {e.strerror}") from None
    with stream:
        while True:
            try:
                block = stream.read1(BLOCK)  # what is there now: do not wait for a whole block
            except OSError as e:
                raise LocretError(f"cannot read {what} {source}: {e.strerror}") from None
            held = len(decoder.getstate()[0])  # bytes of a character the last block left unfinished
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise LocretError(f"{what} {source} is not UTF-8 text "
                                  f"(byte {offset - held + e.start})") from None
            if text:
                yield text
            if not block:
                return
            offset += len(block)


class StreamEncoder:
    """Token ids of text given piece by piece, equal to `tokenizer.encode_plain(whole text)`.

    Tokenization is local: a token depends on the text a few characters around it. So the encoder
    tokenizes a window (`margin` characters already decided, for context, then the undecided
    text) and makes final only the tokens that end at least `margin` characters before the
    window's end, at a boundary that re-tokenizing the text up to it confirms. The rest waits for
    more text or `finish()`."""

    def __init__(self, tokenizer: Tokenizer, margin: int = 512):
        self.tokenizer, self.margin = tokenizer, margin
        self.window = ""  # context, then the undecided text
        self.decided = 0  # characters of the window already turned into ids

    def push(self, text: str) -> list[int]:
        """Add `text`; return the ids now final (often none until the window reaches 4 margins)."""
        self.window += text
        if len(self.window) - self.decided < 4 * self.margin:
            return []
        return self.take(final=False)

    def finish(self) -> list[int]:
        """The end of the text: the remaining ids."""
        ids = self.take(final=True)
        self.window, self.decided = "", 0
        return ids

    def take(self, final: bool) -> list[int]:
        ids, offsets = self.tokenizer.encode_plain_with_offsets(self.window)
        first = next((i for i, (start, _) in enumerate(offsets) if start >= self.decided), len(ids))
        if self.tokenizer.encode_plain(self.window[:self.decided]) != ids[:first]:
            raise LocretError("this text cannot be tokenized incrementally here (a token spans "
                              f"more than {self.margin} characters): give it whole, "
                              "without --question")
        if final:
            return ids[first:]
        # the latest boundary the margin allows and a re-tokenization confirms
        for cut in range(len(ids) - 1, first, -1):
            start = offsets[cut][0]
            if start <= len(self.window) - self.margin and offsets[cut - 1][1] <= start and \
                    self.tokenizer.encode_plain(self.window[:start]) == ids[:cut]:
                return self.advance(ids[first:cut], offsets, cut)
            if start < len(self.window) - 2 * self.margin:
                break
        return []

    def advance(self, out: list[int], offsets: list[tuple[int, int]], cut: int) -> list[int]:
        """Decide up to token `cut`, keeping about `margin` characters before it as context."""
        boundary = offsets[cut][0]
        keep = next(start for start, _ in offsets if start >= boundary - self.margin)
        self.window, self.decided = self.window[keep:], boundary - keep
        return out
