"""Text in and out of a context: a prompt read whole or streamed as a document with its question
after it, in chat form (the model's template) or plain completion; the answer printed as decoded."""
import sys

from .context import Context
from .errors import LocretError
from .loading.text_stream import read_blocks
from .loading.tokenizer import Tokenizer


def read_prompt(source: str, what: str = "prompt") -> str:
    """The whole text of file `source` (or "-": standard input), or one clear error."""
    text = "".join(read_blocks(source, what))
    if not text.strip():
        raise LocretError(f"{what} {source} is empty")
    return text.removesuffix("\n")  # the file's final newline; everything else is kept exactly


def prompt_ids(tokenizer: Tokenizer, text: str, chat: bool) -> list[int]:
    """A whole prompt: one user turn of the chat template, or the text as is."""
    if chat:
        return tokenizer.encode_chat([{"role": "user", "content": text.strip()}])
    return tokenizer.encode(text)


def document_head(tokenizer: Tokenizer, chat: bool) -> list[int]:
    """What comes before a streamed document: the chat template up to the user's content, or BOS."""
    if chat:
        return tokenizer.encode(tokenizer.chat_frame()[0], add_special_tokens=False)
    return tokenizer.encode("")


def question_ids(tokenizer: Tokenizer, question: str, chat: bool) -> list[int]:
    """The uncompressed tail after a streamed document: the question, then (chat) the template's
    end of turn."""
    if not chat:
        return tokenizer.encode_plain(question)
    end_of_turn = tokenizer.encode(tokenizer.chat_frame()[1], add_special_tokens=False)
    return tokenizer.encode_plain("\n\n" + question.strip()) + end_of_turn


def stream_document(context: Context, source: str, chat: bool) -> None:
    """Feed the document from `source` as it arrives (in chat form, without leading whitespace)."""
    started = False
    for text in read_blocks(source):
        text = text if started or not chat else text.lstrip()
        started = started or bool(text.strip())
        if started:
            context.feed_text(text)
    if not started:
        raise LocretError(f"prompt {source} is empty")


class Streamer:
    """Print tokens as text as soon as they decode to whole characters."""

    def __init__(self, tokenizer: Tokenizer, stop_ids: set[int]):
        self.tokenizer, self.stop_ids, self.ids, self.printed = tokenizer, stop_ids, [], 0

    def __call__(self, token: int):
        if token in self.stop_ids:
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            sys.stdout.write(text[self.printed:])
            sys.stdout.flush()
            self.printed = len(text)
