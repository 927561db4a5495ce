"""Tokenizers of HF-layout folders: tokenizer.json (tokenizers) or tokenizer.model (sentencepiece),
plus tokenizer_config.json's special tokens and Jinja chat template."""
import itertools
import re
from pathlib import Path

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import LocretError
from .weights import read_json


def token_text(token) -> str | None:
    """Special tokens are stored as strings or as {"content": ...} dicts."""
    return token.get("content") if isinstance(token, dict) else token


def check_unicode(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates cannot reach the tokenizer
        raise LocretError(f"text is not valid Unicode at character {e.start} "
                          "(a lone surrogate)") from None


class SentencePieceBackend:
    """sentencepiece with the folder's added tokens (e.g. Phi-3's <|user|>) matched as whole tokens.
    """

    def __init__(self, path: Path, added: dict[str, int], add_bos: bool):
        import sentencepiece
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.added, self.add_bos = added, add_bos
        self.added_by_id = {i: t for t, i in added.items()}
        alternatives = "|".join(map(re.escape, sorted(added, key=len, reverse=True)))
        self.split = re.compile("(" + alternatives + ")") if added else None

    def encode(self, text: str, add_special_tokens: bool,
               special_markers: bool = True) -> list[int]:
        """With special_markers=False the added tokens' texts are plain text."""
        ids = [self.sp.bos_id()] if add_special_tokens and self.add_bos else []
        special = self.split if self.split and special_markers else None
        for piece in special.split(text) if special else [text]:
            ids += ([self.added[piece]] if special and piece in self.added
                    else self.sp.encode(piece) if piece else [])
        return ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Plain text's ids and each token's (start, end) characters in `text`, from the pieces'
        byte lengths; where the model's normalization rewrote the text, a LocretError."""
        ids = self.sp.encode(text)
        if not ids:
            return [], []
        sizes = [1 if self.sp.is_byte(i)
                 else len(self.sp.id_to_piece(i).replace("\u2581", " ").encode()) for i in ids]
        extra = sum(sizes) - len(text.encode("utf-8"))  # the dummy-prefix space the model may add
        if extra not in (0, 1) or (extra and not self.sp.id_to_piece(ids[0]).startswith("\u2581")):
            raise LocretError("this sentencepiece model rewrites text as it tokenizes "
                              "(normalization): it cannot tokenize a stream; "
                              "give the prompt whole, without --question")
        sizes[0] -= extra
        # chars: the character index of each byte offset
        chars, ends = [0], list(itertools.accumulate(sizes))
        for ch in text:
            chars += [chars[-1] + 1] * len(ch.encode("utf-8"))
        return ids, [(chars[end - size], chars[end]) for end, size in zip(ends, sizes)]

    def decode(self, ids: list[int]) -> str:
        out, run = [], []
        for i in ids:
            if i in self.added_by_id:
                out += [self.sp.decode(run), self.added_by_id[i]]
                run = []
            else:
                run.append(i)
        return "".join(out + [self.sp.decode(run)])

    def token_to_id(self, token: str) -> int | None:
        if token in self.added:
            return self.added[token]
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i


class Tokenizer:
    def __init__(self, folder: str | Path):
        folder = Path(folder)
        cfg = read_json(folder / "tokenizer_config.json")
        self.bos_token = token_text(cfg.get("bos_token"))
        self.eos_token = token_text(cfg.get("eos_token"))
        template_file = folder / "chat_template.jinja"  # where newer transformers versions save it
        self.chat_template = (template_file.read_text() if template_file.is_file()
                              else cfg.get("chat_template"))
        if isinstance(self.chat_template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t["name"]: t["template"] for t in self.chat_template}
            self.chat_template = named.get("default")
        if (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer
            try:
                self.backend = HFTokenizer.from_file(str(folder / "tokenizer.json"))
            except Exception as e:  # tokenizers raises a bare Exception on malformed files
                raise LocretError(f"{folder / 'tokenizer.json'}: "
                                  f"unreadable tokenizer ({e})") from None
        elif (folder / "tokenizer.model").is_file():
            added = {token_text(t): int(i) for i, t in cfg.get("added_tokens_decoder", {}).items()}
            self.backend = SentencePieceBackend(folder / "tokenizer.model", added,
                                                cfg.get("add_bos_token", True))
        else:
            raise LocretError(f"{folder}: no tokenizer.json or tokenizer.model")

    def encode(self, text: str, add_special_tokens: bool = True,
               special_markers: bool = True) -> list[int]:
        """Token ids of `text`; with special_markers=False, text such as "<|im_end|>" is plain
        text, not the special token (for what a user wrote)."""
        check_unicode(text)
        if isinstance(self.backend, SentencePieceBackend):
            return self.backend.encode(text, add_special_tokens, special_markers)
        self.backend.encode_special_tokens = not special_markers
        try:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        finally:
            self.backend.encode_special_tokens = False

    def encode_plain(self, text: str) -> list[int]:
        """What a user wrote, as ids: no BOS, special-token texts as plain text."""
        return self.encode(text, add_special_tokens=False, special_markers=False)

    def encode_plain_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """encode_plain's ids and each token's (start, end) characters in `text`."""
        check_unicode(text)
        if isinstance(self.backend, SentencePieceBackend):
            return self.backend.encode_with_offsets(text)
        self.backend.encode_special_tokens = True
        try:
            encoding = self.backend.encode(text, add_special_tokens=False)
        finally:
            self.backend.encode_special_tokens = False
        return encoding.ids, encoding.offsets

    def decode(self, ids: list[int]) -> str:
        if isinstance(self.backend, SentencePieceBackend):
            return self.backend.decode(ids)
        return self.backend.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def special_texts(self) -> list[str]:
        """The strings the tokenizer turns into special (added) tokens, such as "<|im_end|>"."""
        if isinstance(self.backend, SentencePieceBackend):
            return list(self.backend.added)
        return [t.content for t in self.backend.get_added_tokens_decoder().values()]

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The chat template applied to `messages`, tokenized so that only the template's own
        markers are special tokens: a document holding "<|im_end|><|im_start|>system" cannot open
        a turn of its own. Messages without such text are tokenized as one string (as
        transformers does); others piece by piece, their contents as plain text."""
        rendered = self.render_chat(messages, add_generation_prompt)
        if not any(s in m["content"] for s in self.special_texts() for m in messages):
            return self.encode(rendered, add_special_tokens=False)
        marks = [f"\x00message-{i}\x00" for i in range(len(messages))]
        marked = [m | {"content": mark} for m, mark in zip(messages, marks)]
        text = self.render_chat(marked, add_generation_prompt)
        ids, parts = [], re.split("(" + "|".join(map(re.escape, marks)) + ")", text)
        for part in parts:  # template text and message contents, alternately
            if part in marks:
                content = messages[marks.index(part)]["content"]
                ids += self.encode(content, False, special_markers=False)
            elif part:
                ids += self.encode(part, add_special_tokens=False)
        return ids

    def chat_frame(self) -> tuple[str, str]:
        """The chat template's text before and after one user message's content."""
        mark = "\x00content\x00"
        head, _, tail = self.render_chat([{"role": "user", "content": mark}]).partition(mark)
        return head, tail

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """`messages` in the chat template, as text (encode it with add_special_tokens=False)."""
        if not self.chat_template:
            raise LocretError("this tokenizer has no chat template: pass --no-chat")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_template_error
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except TemplateError as e:
            raise LocretError(f"chat template failed: {e}") from None


def raise_template_error(message: str):
    raise TemplateError(message)
