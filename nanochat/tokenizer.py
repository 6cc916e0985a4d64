"""Byte-level BPE tokenizer (HF `tokenizers`) with a GPT-4-style pre-split and nanochat's special tokens: <|bos|>
starts every document, the others delimit the turns and tool calls of a chat (see render_conversation).

Text is split by the GPT-4 regex, each piece is mapped to bytes (ByteLevel, as printable stand-in characters),
and BPE merges are learned on those bytes, so every string round-trips exactly: decode(encode(s)) == s.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from nanochat import safefile
from nanochat.paths import file_fingerprint, tokenizer_file

BOS = "<|bos|>"
# the chat's structure; ids follow BOS's, so they are the same in every tokenizer trained here
SPECIAL_TOKENS = [
    BOS,
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the calculator tool ...
    "<|python_end|>",
    "<|output_start|>",  # ... and the tool's output comes back (written by the engine, not the model)
    "<|output_end|>",
]
FILE_NAME = "tokenizer.json"
# GPT-4 (cl100k) split: contractions, words with an optional leading non-letter, numbers of up to 3 digits,
# punctuation runs, and whitespace (the trailing space of a run is left to start the next word).
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)


def _configure_parallelism() -> None:
    """Keep HF tokenizers' thread pool fast, safe and quiet under torchrun and fork.

    tokenizers encodes batches on a Rust thread pool. A child forked after the pool was used inherits the pool
    but not its threads, so a parallel encode there would deadlock. When TOKENIZERS_PARALLELISM is unset,
    tokenizers turns parallelism off in such children itself, and older releases also print a multi-line
    warning on every fork (torch.compile workers, fork-based DataLoader workers). We set the variable (default
    true; a user's own value wins), which keeps the parent's parallel batch encode and silences the warning, and
    since an explicit value also disables that built-in guard, we set it to false in every child forked from
    Python ourselves: tokenizers reads the variable on each call, so a forked child that tokenises runs
    single-threaded instead of deadlocking. torchrun's ranks are fresh processes, not forks, so each has its
    own pool; we size it so the ranks on one machine share the cores instead of each starting a thread per core.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    os.register_at_fork(after_in_child=lambda: os.environ.__setitem__("TOKENIZERS_PARALLELISM", "false"))
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local_ranks > 1 and "RAYON_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ["RAYON_NUM_THREADS"] = str(max(1, cores // local_ranks))


_configure_parallelism()


def _byte_chars() -> dict[str, int]:
    """ByteLevel's printable stand-in character for each byte value, inverted: char -> byte.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are mapped, in order, to code points
    256, 257, ... so that no stand-in is whitespace or a control character.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class Tokenizer:
    """A trained BPE tokenizer; construct it with train() or load()."""

    def __init__(self, hf: HFTokenizer) -> None:
        bos = hf.token_to_id(BOS)
        if bos is None:
            raise ValueError(f"tokenizer has no {BOS} token: retrain it with `python -m scripts.tok_train`")
        # "<|bos|>" appearing inside a document is just text; only our code inserts the real BOS token
        hf.encode_special_tokens = True
        self._hf = hf
        self._bos = bos
        self.fingerprint: str | None = None  # of the file it was loaded from (Tokenizer.load)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Learn BPE merges on texts; vocab_size counts the 256 byte tokens and the special tokens.

        A corpus too small to support that many merges gives a smaller vocabulary (see the vocab_size property).
        """
        least = 256 + len(SPECIAL_TOKENS)
        if vocab_size < least:
            raise ValueError(f"vocab_size must be at least {least} (256 bytes + {len(SPECIAL_TOKENS)} special tokens),"
                             f" got {vocab_size}")  # fmt: skip
        hf = HFTokenizer(models.BPE(byte_fallback=False))
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            show_progress=False,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    def save(self, directory: Path) -> None:
        """Write directory/tokenizer.json atomically (temp file, then rename)."""
        directory.mkdir(parents=True, exist_ok=True)
        safefile.write_text(directory / FILE_NAME, self._hf.to_str(pretty=True))  # (nanochat/safefile.py)

    @classmethod
    def load(cls, directory: Path) -> Tokenizer:
        path = directory / FILE_NAME
        try:
            text = safefile.read_text(path, errors="replace")  # a planted symlink is refused, never followed
        except FileNotFoundError:
            raise FileNotFoundError(f"no tokenizer in {directory}: run `python -m scripts.tok_train`") from None
        try:
            hf = HFTokenizer.from_str(text)
        except Exception as err:  # tokenizers raises a bare Exception for malformed files
            raise ValueError(f"{path} is not a valid tokenizer ({err}): rerun `python -m scripts.tok_train`") from err
        tokenizer = cls(hf)
        tokenizer.fingerprint = file_fingerprint(path)  # recorded by the base model trained with it
        return tokenizer

    @property
    def bos_id(self) -> int:
        return self._bos

    def special_id(self, token: str) -> int:
        """The id of a special token, e.g. "<|assistant_end|>". A tokenizer trained before the chat tokens existed
        has only <|bos|>: base training works with it, the chat phases need a retrained one."""
        idx = self._hf.token_to_id(token) if token in SPECIAL_TOKENS else None
        if idx is None:
            raise ValueError(
                f"the tokenizer has no {token} token (it predates the chat tokens, or it is not a special token):"
                " retrain it with `python -m scripts.tok_train`, then the base model"
            )
        return idx

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of text, without BOS."""
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (no BOS), encoded in parallel on tokenizers' thread pool."""
        # encode_batch_fast (tokenizers >= 0.21) skips computing the character offsets we never use
        encode = getattr(self._hf, "encode_batch_fast", self._hf.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._hf.decode(ids, skip_special_tokens=False)

    def token_bytes(self) -> torch.Tensor:
        """int64 [vocab_size]: how many UTF-8 bytes each token stands for (0 for special tokens), for bits-per-byte."""
        chars = _byte_chars()
        special = {t.content for t in self._hf.get_added_tokens_decoder().values()}
        counts = torch.zeros(self.vocab_size, dtype=torch.int64)
        for token, idx in self._hf.get_vocab(with_added_tokens=True).items():
            if token not in special:
                # a token's string is its bytes in stand-in characters, one character per byte
                assert all(c in chars for c in token), f"token {idx} is not byte-level: {token!r}"
                counts[idx] = len(token)
        return counts

    # ---- chat rendering ----------------------------------------------------------------------------------

    def render_conversation(self, conversation: dict, max_tokens: int) -> tuple[list[int], list[int]]:
        """Token ids of a chat and a same-length mask: 1 on what the assistant writes (the tokens SFT trains on).

        Layout: <|bos|>, then <|user_start|> text <|user_end|> per user turn and <|assistant_start|> content
        <|assistant_end|> per assistant turn; a system message is folded into the first user turn. The mask is 1
        on the assistant's text, its <|python_start|>..<|python_end|> calls and its <|assistant_end|>; 0 on
        everything else, including the calculator's <|output_start|>..<|output_end|> (the engine writes those).
        A longer rendering is cut at max_tokens. Malformed conversations raise a one-line ValueError.
        """
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        turns = _chat_turns(conversation)
        if not any(role == "assistant" for role, _ in turns):
            raise ValueError("the conversation has no assistant turn: nothing to train on")
        ids, mask = self._render_turns(turns)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: dict) -> list[int]:
        """The prompt an engine completes: the conversation without its last assistant message (if it ends with
        one), followed by <|assistant_start|>."""
        turns = _chat_turns(conversation)
        if turns[-1][0] == "assistant":
            turns = turns[:-1]
        ids, _ = self._render_turns(turns)
        return [*ids, self.special_id("<|assistant_start|>")]

    def visualize(self, ids: list[int], mask: list[int]) -> str:
        """The decoded ids with each trained-on run (mask 1) wrapped in ⟦ ⟧, for eyeballing a rendering."""
        pieces = []
        for trained, run in itertools.groupby(zip(ids, mask, strict=True), key=lambda pair: pair[1]):
            text = self.decode([i for i, _ in run])
            pieces.append(f"⟦{text}⟧" if trained else text)
        return "".join(pieces)

    def _render_turns(self, turns: list[tuple[str, list[dict]]]) -> tuple[list[int], list[int]]:
        sid = self.special_id
        ids, mask = [self.bos_id], [0]

        def add(new: list[int], trained: int) -> None:
            ids.extend(new)
            mask.extend([trained] * len(new))

        for role, parts in turns:
            if role == "user":
                add([sid("<|user_start|>"), *self.encode(parts[0]["text"]), sid("<|user_end|>")], 0)
                continue
            add([sid("<|assistant_start|>")], 0)
            for part in parts:
                text = self.encode(part["text"])
                if part["type"] == "text":
                    add(text, 1)
                elif part["type"] == "python":  # the model writes the call, so it learns to make it
                    add([sid("<|python_start|>"), *text, sid("<|python_end|>")], 1)
                else:  # the tool's answer is given to the model, never predicted by it
                    add([sid("<|output_start|>"), *text, sid("<|output_end|>")], 0)
            add([sid("<|assistant_end|>")], 1)
        return ids, mask


def tokenizer_dir(base: Path | None = None) -> Path:
    """Where the tokenizer lives: <base>/tokenizer, base defaulting to get_base_dir()."""
    return tokenizer_file(base).parent


def get_tokenizer(base: Path | None = None) -> Tokenizer:
    """Load the tokenizer from tokenizer_dir(base); a one-line FileNotFoundError says how to make one."""
    return Tokenizer.load(tokenizer_dir(base))


# ---- chat conversations --------------------------------------------------------------------------------------

PART_TYPES = ("text", "python", "python_output")


def _chat_turns(conversation: dict) -> list[tuple[str, list[dict]]]:
    """Check a conversation ({"messages": [...]}) and return its turns as (role, parts), the system message folded
    into the first user turn. Every problem is a one-line ValueError naming the message at fault."""
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not isinstance(messages, list):
        raise ValueError(f"a conversation is a dict with a 'messages' list, got {type(conversation).__name__}")
    if not messages:
        raise ValueError("the conversation has no messages")
    system = None
    turns: list[tuple[str, list[dict]]] = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"message {i} has unknown role {role!r} (expected system, user or assistant)")
        parts = _message_parts(i, role, message.get("content"))
        if role == "system":
            if i != 0:
                raise ValueError(f"message {i} is a system message, but only the first message may be one")
            system = parts[0]["text"]
            continue
        expected = "user" if not turns or turns[-1][0] == "assistant" else "assistant"
        if role != expected:
            raise ValueError(
                f"message {i} is from the {role} but the {expected} should speak next "
                "(turns alternate user/assistant, starting with the user)"
            )
        if system is not None:
            parts = [{"type": "text", "text": f"{system}\n\n{parts[0]['text']}"}]
            system = None
        turns.append((role, parts))
    if not turns:
        raise ValueError("the conversation has only a system message: it needs a user turn")
    return turns


def _message_parts(i: int, role: str, content: object) -> list[dict]:
    """A message's content as a list of parts; only the assistant may use parts other than a plain string."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if role != "assistant" or not isinstance(content, list):
        allowed = "a string or a list of parts" if role == "assistant" else "a string"
        raise ValueError(f"message {i} ({role}) content must be {allowed}, got {type(content).__name__}")
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in PART_TYPES:
            raise ValueError(f"message {i} part {j} has unknown type {kind!r} (expected text, python or python_output)")
        if not isinstance(part.get("text"), str):
            raise ValueError(f"message {i} part {j} ({kind}) has no 'text' string")
    return content
