"""Tokenizers behind one small interface, and chat templates that say which tokens are the model's.

Three kinds, chosen by the `data.tokenizer` block:

    {type: byte}                                   # built in: UTF-8 bytes + 3 specials, no file, no network
    {type: huggingface, path: tokenizer.json}      # a `tokenizers` file, a local directory or a hub id
    {type: tiktoken, path: gpt2}                   # a tiktoken encoding by name (cl100k_base, o200k_base, ...)

Every tokenizer has `encode`, `encode_batch`, `decode`, `eos_id`, `pad_id`, `vocab_size`, `name`,
`fingerprint` (a hash of everything that decides the ids, stored in shard metadata) and
`chat_template` (the tokenizer's own when it has one and `chat_template: auto`, else ChatML).

`tokenize_chat(tokenizer, messages)` renders a conversation into token ids together with a mask of
the tokens the model should learn (assistant content and its end marker). The template is rendered
piece by piece so the mask is exact: markup segments may contain special tokens, message content
is encoded as ordinary text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np

from src.utils.config import ConfigError

logger = logging.getLogger(__name__)

Message = dict[str, str]


@dataclass
class TokenizerConfig:
    type: Literal["byte", "huggingface", "tiktoken"] = "byte"
    # huggingface: a tokenizer.json file, a local directory or a hub id; tiktoken: an encoding name.
    path: str | None = None
    # The end-of-document token, for tokenizers that do not declare one (e.g. a bare tokenizer.json).
    eos_token: str | None = None
    # auto: the tokenizer's own chat template when it has one, else ChatML; chatml: always ChatML.
    chat_template: Literal["auto", "chatml"] = "auto"

    def __post_init__(self):
        if self.type == "byte" and self.path is not None:
            raise ConfigError(f"tokenizer.type 'byte' needs no file; remove tokenizer.path ({self.path!r})")
        if self.type == "byte" and self.eos_token is not None:
            raise ConfigError("tokenizer.type 'byte' has a fixed EOS ('<|endoftext|>'); remove tokenizer.eos_token")
        if self.type in ("huggingface", "tiktoken") and not self.path:
            example = "tokenizer.json, a directory or a hub id" if self.type == "huggingface" else "an encoding name like gpt2"
            raise ConfigError(f"tokenizer.type '{self.type}' needs tokenizer.path ({example})")


# ----------------------------------------------------------------------------------------------
# Chat templates: a conversation becomes (text, trainable, allow_special) segments.


@dataclass
class Segment:
    text: str
    trainable: bool  # the model learns these tokens (assistant content and its end marker)
    special: bool  # markup: special-token strings in it become their ids


class ChatTemplateError(ValueError):
    """The tokenizer's chat template refused one conversation (e.g. a role it does not support);
    the datasets turn it into a counted skip of that row."""


def check_messages(messages: Any, where: str = "messages") -> list[Message]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of {{role, content}} messages, got {messages!r:.80}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}[{i}]: each message needs string 'role' and 'content', got {m!r:.80}")
    return messages


class ChatMLTemplate:
    """`<|im_start|>{role}\\n{content}<|im_end|>\\n` per message (the Qwen / OpenAI ChatML layout)."""

    name = "chatml"
    start, end = "<|im_start|>", "<|im_end|>"

    def segments(self, messages: Sequence[Message], trainable_from: int = 0, add_generation_prompt: bool = False):
        out = []
        for i, m in enumerate(messages):
            learn = m["role"] == "assistant" and i >= trainable_from
            out.append(Segment(f"{self.start}{m['role']}\n", False, True))
            out.append(Segment(m["content"], learn, False))
            out.append(Segment(self.end, learn, True))  # the model must learn to stop
            out.append(Segment("\n", False, True))
        if add_generation_prompt:
            out.append(Segment(f"{self.start}assistant\n", False, True))
        return out

    def fingerprint(self) -> str:
        return "chatml-v1"


class HFChatTemplate:
    """A Hugging Face tokenizer's own Jinja template, cut into segments by rendering prefixes.

    For assistant message k: the text from `render(messages[:k], add_generation_prompt=True)` to
    `render(messages[:k+1])` is what the model writes. This needs a template whose rendering of a
    prefix is a prefix of the full rendering, which holds for the common templates; one that is not
    is a clear error.
    """

    name = "huggingface"

    def __init__(self, hf_tokenizer, source: str):
        self.hf = hf_tokenizer
        self.source = source

    def _render(self, messages, add_generation_prompt: bool) -> str:
        if not messages:
            return ""
        try:
            return self.hf.apply_chat_template(list(messages), tokenize=False,
                                               add_generation_prompt=add_generation_prompt)
        except Exception as e:
            # The template is the tokenizer author's Jinja code: it rejects conversations it does not
            # support with raise_exception (a TemplateError) or fails on them with any error. That is
            # a property of this row, not of the run, so it becomes a skip naming the row.
            raise ChatTemplateError(f"the chat template of {self.source} failed: {type(e).__name__}: {e} "
                                    "(data.tokenizer.chat_template: chatml renders any roles)") from e

    def segments(self, messages: Sequence[Message], trainable_from: int = 0, add_generation_prompt: bool = False):
        out, done = [], ""
        for k, m in enumerate(messages):
            if m["role"] == "assistant" and k >= trainable_from:
                prompt = self._render(messages[:k], add_generation_prompt=True)
                full = self._render(messages[: k + 1], add_generation_prompt=False)
                self._check_prefix(done, prompt, k)
                self._check_prefix(prompt, full, k)
                out.append(Segment(prompt[len(done) :], False, True))
                out.append(Segment(full[len(prompt) :], True, True))
                done = full
        final = self._render(messages, add_generation_prompt=add_generation_prompt)
        self._check_prefix(done, final, len(messages))
        out.append(Segment(final[len(done) :], False, True))
        return [s for s in out if s.text]

    def _check_prefix(self, prefix: str, text: str, k: int):
        if not text.startswith(prefix):
            raise ValueError(
                f"the chat template of {self.source} renders message {k} differently depending on what follows, "
                "so the trainable tokens cannot be located; set data.tokenizer.chat_template: chatml"
            )

    def fingerprint(self) -> str:
        return "hf:" + hashlib.sha256(str(self.hf.chat_template).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Tokenizers


class Tokenizer:
    """The interface the datasets use. Subclasses set the attributes and implement the encoders."""

    name: str
    vocab_size: int  # the largest id + 1 (not the count of entries: ids may have gaps)
    eos_id: int
    pad_id: int
    fingerprint: str
    chat_template: ChatMLTemplate | HFChatTemplate

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def encode_documents(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Documents as one flat array (each followed by EOS, in `token_dtype`) and their lengths."""
        docs = self.encode_batch(texts)
        lengths = np.fromiter((len(d) + 1 for d in docs), dtype=np.int64, count=len(docs))
        flat = np.empty(int(lengths.sum()), dtype=self.token_dtype)
        ends = np.cumsum(lengths)
        flat[ends - 1] = self.eos_id
        for doc, end, n in zip(docs, ends, lengths):
            flat[end - n : end - 1] = doc
        return flat, lengths

    @property
    def token_dtype(self) -> np.dtype:
        """Smallest unsigned dtype holding every id (`vocab_size` is max id + 1): uint16 up to 65,536, else uint32."""
        return np.dtype(np.uint16) if self.vocab_size <= 2**16 else np.dtype(np.uint32)

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes are ids 0..255; then `<|endoftext|>` (EOS and padding), `<|im_start|>`, `<|im_end|>`."""

    SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

    def __init__(self, chat_template: str = "auto"):
        self.name = "byte"
        self.special_ids = {s: 256 + i for i, s in enumerate(self.SPECIALS)}
        self.vocab_size = 256 + len(self.SPECIALS)
        self.eos_id = self.pad_id = self.special_ids["<|endoftext|>"]
        self.chat_template = ChatMLTemplate()
        self.fingerprint = "byte-v1:" + hashlib.sha256(json.dumps(self.SPECIALS).encode()).hexdigest()[:16]
        self._special_re = re.compile("(" + "|".join(re.escape(s) for s in self.SPECIALS) + ")")

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        if not allow_special:
            return list(text.encode("utf-8"))
        ids = []
        for piece in self._special_re.split(text):
            if piece in self.special_ids:
                ids.append(self.special_ids[piece])
            elif piece:
                ids.extend(piece.encode("utf-8"))
        return ids

    def encode_documents(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        # Fast path: UTF-8 bytes are the ids, so one join and one frombuffer do the whole batch.
        raw = [t.encode("utf-8") for t in texts]
        if not raw:
            return np.empty(0, dtype=self.token_dtype), np.empty(0, dtype=np.int64)
        lengths = np.fromiter((len(r) + 1 for r in raw), dtype=np.int64, count=len(raw))
        flat = np.frombuffer(b"\x00".join(raw) + b"\x00", dtype=np.uint8).astype(self.token_dtype)
        flat[np.cumsum(lengths) - 1] = self.eos_id
        return flat, lengths

    def decode(self, ids: Sequence[int]) -> str:
        names = {v: k for k, v in self.special_ids.items()}
        out, run = [], bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            out.append(names.get(i, ""))
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer: a bare `tokenizer.json` (the `tokenizers` library) or a directory /
    hub id (`transformers.AutoTokenizer`). Added special tokens written in the text are always
    recognised by these tokenizers (`allow_special` has no effect)."""

    EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|im_end|>", "<eos>", "<|end_of_text|>")

    def __init__(self, cfg: TokenizerConfig):
        path = cfg.path
        self.name = path
        self.hf = None
        if path.endswith(".json"):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"tokenizer file not found: '{path}' (data.tokenizer.path)")
            from tokenizers import Tokenizer as RustTokenizer

            self.backend = RustTokenizer.from_file(path)
            declared_eos = None
        else:
            from transformers import AutoTokenizer

            try:
                self.hf = AutoTokenizer.from_pretrained(path)
            except OSError as e:
                raise FileNotFoundError(
                    f"cannot load the Hugging Face tokenizer '{path}': {e}. Give a local directory with "
                    "tokenizer.json, a tokenizer.json file, or a hub id on a machine with network access "
                    "(or use data.tokenizer.type: byte offline)"
                ) from e
            self.backend = getattr(self.hf, "backend_tokenizer", None)
            if self.backend is None:
                raise ConfigError(f"tokenizer '{path}' has no fast (Rust) backend; give its tokenizer.json instead")
            declared_eos = self.hf.eos_token
        # Ids may have gaps (reserved or padded ranges), so the count of entries
        # (`get_vocab_size`) can be below the largest id: the storage dtype and the model's
        # embedding must hold max id + 1.
        self.vocab_size = max(self.backend.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        eos = cfg.eos_token or declared_eos or next(
            (t for t in self.EOS_CANDIDATES if self.backend.token_to_id(t) is not None), None
        )
        if eos is None or self.backend.token_to_id(eos) is None:
            raise ConfigError(
                f"tokenizer '{path}' declares no end-of-text token"
                + (f" and has no token {eos!r}" if eos else "")
                + "; set data.tokenizer.eos_token to one of its tokens"
            )
        self.eos_id = self.backend.token_to_id(eos)
        pad = self.hf.pad_token if self.hf is not None else None
        self.pad_id = self.backend.token_to_id(pad) if pad is not None else self.eos_id
        has_own = self.hf is not None and getattr(self.hf, "chat_template", None)
        if cfg.chat_template == "auto" and has_own:
            self.chat_template = HFChatTemplate(self.hf, path)
        else:
            self.chat_template = ChatMLTemplate()
        digest = hashlib.sha256(self.backend.to_str().encode()).hexdigest()[:16]
        self.fingerprint = f"huggingface:{digest}:eos={self.eos_id}"

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)


class TiktokenTokenizer(Tokenizer):
    """A tiktoken encoding; EOS is `<|endoftext|>`. Ordinary text never produces special ids."""

    def __init__(self, encoding, chat_template: str = "auto"):
        self.enc = encoding
        self.name = encoding.name
        self.vocab_size = encoding.n_vocab
        if "<|endoftext|>" not in encoding.special_tokens_set:
            raise ConfigError(f"tiktoken encoding '{encoding.name}' has no '<|endoftext|>' token to use as EOS")
        self.eos_id = self.pad_id = encoding.encode_single_token("<|endoftext|>")
        self.chat_template = ChatMLTemplate()
        h = hashlib.sha256(f"{encoding.name}|{encoding.n_vocab}|{encoding._pat_str}".encode())
        for token_id in range(encoding.n_vocab):
            try:
                h.update(encoding.decode_single_token_bytes(token_id))
            except KeyError:  # ids unused by the encoding (gaps below the special tokens)
                h.update(b"\x00gap")
        h.update(json.dumps(sorted(encoding._special_tokens.items())).encode())
        self.fingerprint = "tiktoken:" + h.hexdigest()[:16]

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        if allow_special:
            return self.enc.encode(text, allowed_special="all")
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(list(texts), num_threads=1)

    def decode(self, ids: Sequence[int]) -> str:
        return self.enc.decode([int(i) for i in ids])


def build_tokenizer(spec: TokenizerConfig | dict) -> Tokenizer:
    """The tokenizer named by the `data.tokenizer` block (a TokenizerConfig or its plain mapping)."""
    if isinstance(spec, dict):
        from src.utils.config import from_dict

        spec = from_dict(TokenizerConfig, spec, where="data.tokenizer", prefix="data.tokenizer.")
    if not isinstance(spec, TokenizerConfig):
        raise TypeError(f"build_tokenizer expects a TokenizerConfig (data.tokenizer), got {type(spec).__name__}")
    if spec.type == "byte":
        return ByteTokenizer()
    if spec.type == "huggingface":
        return HFTokenizer(spec)
    import tiktoken

    try:
        encoding = tiktoken.get_encoding(spec.path)
    except ValueError as e:
        raise ConfigError(f"data.tokenizer.path: {e}") from e
    except OSError as e:  # requests' ConnectionError / Timeout are OSErrors: the first use downloads the BPE file
        raise FileNotFoundError(
            f"cannot load the tiktoken encoding '{spec.path}': {type(e).__name__}: {e}. tiktoken downloads it on "
            "first use and caches it in $TIKTOKEN_CACHE_DIR (default: data-gym-cache in the temp directory): run "
            "once on a machine with network access and copy that cache here with TIKTOKEN_CACHE_DIR pointing at "
            "it (or use data.tokenizer.type: byte offline)"
        ) from e
    return TiktokenTokenizer(encoding)


def _warn_if_chatml_is_plain_text(tokenizer: Tokenizer) -> None:
    """Once per tokenizer: say so when ChatML's markers are not tokens of this vocabulary (GPT-2's,
    for one). The conversations then carry them as ordinary text, several tokens each, which trains
    and renders correctly but is not what a ChatML model's vocabulary means by them, and generation
    that stops on the end-of-text id does not stop at `<|im_end|>`."""
    template = tokenizer.chat_template
    if not isinstance(template, ChatMLTemplate) or getattr(tokenizer, "_chatml_checked", False):
        return
    tokenizer._chatml_checked = True
    encoded = {marker: tokenizer.encode(marker, allow_special=True) for marker in (template.start, template.end)}
    # One id that decodes back to the marker; an unknown-word id ([UNK]) is one id too, but loses it.
    if any(len(ids) != 1 or tokenizer.decode(ids) != marker for marker, ids in encoded.items()):
        pieces = {marker: f"{len(ids)} token(s), decoded {tokenizer.decode(ids)!r}" for marker, ids in encoded.items()}
        logger.warning(
            "the ChatML markers are not tokens of tokenizer %s (%s): conversations carry them as plain text. "
            "For single-token markers use a tokenizer that has them (Qwen2's, or data.tokenizer.type: byte), or "
            "that tokenizer's own template (data.tokenizer.chat_template: auto with a Hugging Face tokenizer that "
            "has one)",
            tokenizer.name, "; ".join(f"{m}: {n}" for m, n in pieces.items()),
        )


def tokenize_chat(
    tokenizer: Tokenizer,
    messages: Sequence[Message],
    trainable_from: int = 0,
    add_generation_prompt: bool = False,
) -> tuple[list[int], list[bool]]:
    """Token ids of a rendered conversation and, per token, whether the model learns it.

    Assistant messages at index >= `trainable_from` are learned (content and end marker); everything
    else (system, user, markup, earlier turns) is context.
    """
    ids: list[int] = []
    trainable: list[bool] = []
    _warn_if_chatml_is_plain_text(tokenizer)
    for seg in tokenizer.chat_template.segments(messages, trainable_from, add_generation_prompt):
        piece = tokenizer.encode(seg.text, allow_special=seg.special)
        ids.extend(piece)
        trainable.extend([seg.trainable] * len(piece))
    return ids, trainable
