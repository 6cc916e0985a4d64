"""Multiple-choice questions in MMLU's format (question, options A-D, a one-letter answer), generated from facts
the generator can check itself: arithmetic comparisons and word facts from the built-in vocabulary."""

from __future__ import annotations

import random
from collections.abc import Callable

from nanochat.tasks.base import Conversation, GeneratedTask, MultipleChoiceTask, multiple_choice
from nanochat.tasks.words import CATEGORIES, WORDS

# a question generator returns (subject, question, choices, index of the right choice)
Question = tuple[str, str, list[str], int]


def distinct(draw: Callable[[], object], n: int) -> list:
    """n distinct values from draw()."""
    found: list = []
    while len(found) < n:
        value = draw()
        if value not in found:
            found.append(value)
    return found


def extreme(rng: random.Random) -> Question:
    numbers = distinct(lambda: rng.randint(1, 999), 4)
    largest = rng.random() < 0.5
    best = max(numbers) if largest else min(numbers)
    question = f"Which of these numbers is the {'largest' if largest else 'smallest'}?"
    return "arithmetic", question, [str(n) for n in numbers], numbers.index(best)


def computed(rng: random.Random) -> Question:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice(["+", "-", "*"])
    right = a + b if op == "+" else a - b if op == "-" else a * b
    # near misses, the kind of slips a model makes: off by one, by ten, or by one of the operands
    wrong = [right + d for d in (-10, -2, -1, 1, 2, 10, a, -b) if d != 0 and right + d != right]
    options = [right, *rng.sample(sorted(set(wrong)), 3)]
    rng.shuffle(options)
    return "arithmetic", f"What is {a} {op} {b}?", [str(n) for n in options], options.index(right)


def parity(rng: random.Random) -> Question:
    even = rng.random() < 0.5
    pick = rng.randrange(0, 1000, 2) + (0 if even else 1)
    others = distinct(lambda: rng.randrange(0, 1000, 2) + (1 if even else 0), 3)
    options = [pick, *others]
    rng.shuffle(options)
    question = f"Which of these numbers is {'even' if even else 'odd'}?"
    return "arithmetic", question, [str(n) for n in options], options.index(pick)


def category(rng: random.Random) -> Question:
    kind = rng.choice(sorted(CATEGORIES))
    right = rng.choice(CATEGORIES[kind])
    options = [right, *rng.sample([w for k, words in CATEGORIES.items() if k != kind for w in words], 3)]
    rng.shuffle(options)
    return "vocabulary", f"Which of these is {kind}?", options, options.index(right)


def alphabetical(rng: random.Random) -> Question:
    words = rng.sample(WORDS, 4)
    first = rng.random() < 0.5
    question = f"Which word comes {'first' if first else 'last'} in alphabetical order?"
    return "vocabulary", question, words, words.index(min(words) if first else max(words))


def longest(rng: random.Random) -> Question:
    by_length: dict[int, list[str]] = {}
    for w in WORDS:
        by_length.setdefault(len(w), []).append(w)
    lengths = rng.sample(sorted(by_length), 4)  # distinct lengths, so exactly one word is the longest
    words = [rng.choice(by_length[n]) for n in lengths]
    return "vocabulary", "Which of these words has the most letters?", words, lengths.index(max(lengths))


GENERATORS = [extreme, computed, parity, category, alphabetical, longest]


class Choice(GeneratedTask, MultipleChoiceTask):
    name = "choice"

    def generate(self, rng: random.Random) -> tuple[str, Conversation]:
        subject, question, options, answer = rng.choice(GENERATORS)(rng)
        # the key ignores the order of the options: a reshuffled train question is still the same question
        return f"{question}|{sorted(options)}", multiple_choice(question, options, answer, subject)
