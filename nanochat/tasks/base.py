"""The Task base class and what the tasks share: seeded generation with a fixed train/test partition, answer
extraction, the multiple-choice prompt, and lazy loading of Hugging Face datasets.

A conversation is plain data, {"messages": [{"role": ..., "content": ...}, ...]}, rendered by
Tokenizer.render_conversation. Multiple-choice conversations also carry "letters", the valid answers.
"""

from __future__ import annotations

import hashlib
import random
import re
from decimal import Decimal, InvalidOperation
from typing import Any

Conversation = dict[str, Any]
SPLITS = ("train", "test")
LETTERS = "ABCDEFGHIJ"
TEST_SHARE = 10  # a generated problem belongs to the test split when its key hashes to 0 mod TEST_SHARE


class TaskUnavailable(ValueError):
    """A task's data cannot be loaded here (package missing, offline); the message names a built-in alternative."""


class Task:
    """Conversations of one split, indexable; start/stop/step take a slice of the examples (like range)."""

    name = "task"
    eval_type: str | None = None  # "generative": sample, then evaluate(); "categorical": pick among "letters"

    def __init__(self, split: str = "train", start: int = 0, stop: int | None = None, step: int = 1) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if start < 0 or (stop is not None and stop < 0) or step < 1:
            raise ValueError(f"need start >= 0, stop >= 0 and step >= 1, got {start}, {stop}, {step}")
        self.split = split
        self._slice = slice(start, stop, step)
        self._range: range | None = None

    def num_examples(self) -> int:
        """How many examples the whole split has (before slicing)."""
        raise NotImplementedError

    def example(self, index: int) -> Conversation:
        """Example `index` of the whole split (before slicing)."""
        raise NotImplementedError

    def evaluate(self, conversation: Conversation, completion: str) -> bool:
        """Whether completion (the assistant's generated reply) answers conversation correctly."""
        raise NotImplementedError(f"the {self.name} task has no automatic check")

    @property
    def indices(self) -> range:
        if self._range is None:  # computed on first use: a downloaded task knows its size only once loaded
            self._range = range(self.num_examples())[self._slice]
        return self._range

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Conversation:
        return self.example(self.indices[i])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(split={self.split!r}, examples={len(self)})"


class GeneratedTask(Task):
    """A task generated from a seed, no download. Example i of a split comes from its own seeded random stream,
    and each problem has a key whose hash decides its split once and for all, so no problem can be in both
    splits (whatever the seeds); generate() simply draws again until it hits a problem of the wanted split."""

    sizes = {"train": 10_000, "test": 500}

    def __init__(self, split: str = "train", seed: int = 0, size: int | None = None, **slicing: int) -> None:
        super().__init__(split, **slicing)
        self.seed = seed
        self.size = self.sizes[split] if size is None else size
        if self.size < 0:
            raise ValueError(f"size must be >= 0, got {self.size}")

    def generate(self, rng: random.Random) -> tuple[str, Conversation]:
        """One random problem: (key identifying the problem, conversation)."""
        raise NotImplementedError

    def num_examples(self) -> int:
        return self.size

    def example(self, index: int) -> Conversation:
        if not 0 <= index < self.size:
            raise IndexError(f"{self.name} {self.split} has {self.size} examples, no index {index}")
        # a string seed is hashed with SHA-512 by random.Random: stable across runs and machines
        rng = random.Random(f"{self.name}/{self.split}/{self.seed}/{index}")
        for _ in range(1000):
            key, conversation = self.generate(rng)
            if split_of(key) == self.split:
                return conversation
        raise RuntimeError(f"{self.name}: no {self.split} problem in 1000 draws (the problem space is too small)")


def split_of(key: str) -> str:
    """The split a generated problem belongs to, fixed by its key."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "big") % TEST_SHARE == 0 else "train"


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(content: str | list[dict]) -> dict:
    return {"role": "assistant", "content": content}


def message_text(message: dict) -> str:
    """A message's content as one string (parts joined, tool outputs included, as GSM8K writes them)."""
    content = message["content"]
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


def reference(conversation: Conversation) -> str:
    """The text of the conversation's last assistant message: the reference answer."""
    return message_text([m for m in conversation["messages"] if m["role"] == "assistant"][-1])


def final_answer(text: str) -> str | None:
    """What follows the last `####` marker in text (GSM8K's final-answer line), stripped; None if none."""
    found = re.findall(r"####[ \t]*([^\n]*)", text)
    return found[-1].strip() if found else None


def as_number(text: str | None) -> Decimal | None:
    """A final answer like "1,234", "$36" or "2.50." as a number; None if it is not one."""
    if text is None:
        return None
    cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        return Decimal(cleaned)
    except InvalidOperation:
        return None


def numbers_match(conversation: Conversation, completion: str) -> bool:
    """Whether the completion's #### answer equals the reference's as a number."""
    got = as_number(final_answer(completion))
    return got is not None and got == as_number(final_answer(reference(conversation)))


# ---- multiple choice -----------------------------------------------------------------------------------------


def multiple_choice(question: str, choices: list[str], answer: int, subject: str | None = None) -> Conversation:
    """A conversation in MMLU's format: the question, lettered options, and the answer as a single letter."""
    if not 2 <= len(choices) <= len(LETTERS) or not 0 <= answer < len(choices):
        raise ValueError(f"a multiple-choice question needs 2-{len(LETTERS)} choices and a valid answer index")
    letters = list(LETTERS[: len(choices)])
    header = f"The following is a multiple choice question about {subject}.\n\n" if subject else ""
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(letters, choices))
    prompt = f"{header}{question}\n{options}\nAnswer with the letter of the correct option."
    return {"messages": [user(prompt), assistant(letters[answer])], "letters": letters}


def answer_letter(completion: str, letters: list[str]) -> str | None:
    """The letter a completion answers with ("B", "B.", "(B) ...", "Answer: B"); None if it gives none."""
    match = re.match(r"\s*(?:[Aa]nswer\s*(?:is)?\s*:?\s*)?\(?([A-Z])(?![A-Za-z])", completion)
    return match.group(1) if match and match.group(1) in letters else None


class MultipleChoiceTask(Task):
    eval_type = "categorical"

    def evaluate(self, conversation: Conversation, completion: str) -> bool:
        return answer_letter(completion, conversation["letters"]) == reference(conversation).strip()


# ---- Hugging Face datasets -----------------------------------------------------------------------------------


def load_hf(source: str, alternative: str, path: str, config: str | None, split: str) -> Any:
    """datasets.load_dataset(path, config, split=split), imported only now; any failure is a one-line
    TaskUnavailable naming the source and the built-in task to use instead."""
    instead = f"the built-in alternative is --tasks={alternative}"
    try:
        import datasets
    except ImportError:
        raise TaskUnavailable(
            f"{source} needs the Hugging Face `datasets` package and network access (pip install datasets); {instead}"
        ) from None
    try:
        return datasets.load_dataset(path, config, split=split)
    except Exception as err:  # offline, missing cache, bad config: all mean "not here"
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise TaskUnavailable(
            f"{source} could not be loaded ({type(err).__name__}: {reason}); it needs network access or a cached"
            f" copy; {instead}"
        ) from err
