"""Spelling a word letter by letter, and counting a letter in a word, generated from a seed.

Small models see tokens, not letters, so both need to be taught explicitly. The reply ends with a checkable
final line: "#### a-p-p-l-e" for spelling, "#### 2" for counting.
"""

from __future__ import annotations

import random
import string

from nanochat.tasks.base import Conversation, GeneratedTask, assistant, final_answer, reference, user
from nanochat.tasks.words import WORDS

SPELL_PROMPTS = [
    'Spell the word "{w}" letter by letter.',
    'How do you spell "{w}"?',
    'Can you spell "{w}" for me, one letter at a time?',
    'Please spell out "{w}".',
    'spell "{w}"',
]
COUNT_PROMPTS = [
    'How many times does the letter "{c}" appear in "{w}"?',
    'How many "{c}"s are there in the word "{w}"?',
    'Count the letter "{c}" in "{w}".',
    'In the word "{w}", how many times do you see "{c}"?',
    'how many "{c}" in "{w}"',
]


def spell_reply(word: str) -> str:
    return f'Letter by letter, "{word}" is spelled:\n#### {"-".join(word)}'


def count_reply(word: str, letter: str) -> str:
    """Walk through the word, numbering each match, so the count is built up step by step."""
    seen, walk = 0, []
    for ch in word:
        if ch == letter:
            seen += 1
            walk.append(f"{ch} ({seen})")
        else:
            walk.append(ch)
    times = "once" if seen == 1 else f"{seen} times"
    verdict = f'"{letter}" does not appear in "{word}".' if seen == 0 else f'"{letter}" appears {times}.'
    return f'Going through "{word}" letter by letter: {", ".join(walk)}.\nSo {verdict}\n#### {seen}'


class Spelling(GeneratedTask):
    name = "spelling"
    eval_type = "generative"

    def generate(self, rng: random.Random) -> tuple[str, Conversation]:
        word = rng.choice(WORDS)
        if rng.random() < 0.4:
            prompt, reply, key = rng.choice(SPELL_PROMPTS).format(w=word), spell_reply(word), f"spell:{word}"
        else:
            # mostly letters of the word, sometimes any letter, so "0 times" is learned too
            letter = rng.choice(word) if rng.random() < 0.8 else rng.choice(string.ascii_lowercase)
            prompt, reply = rng.choice(COUNT_PROMPTS).format(w=word, c=letter), count_reply(word, letter)
            key = f"count:{word}:{letter}"
        return key, {"messages": [user(prompt), assistant(reply)]}

    def evaluate(self, conversation: Conversation, completion: str) -> bool:
        got, want = final_answer(completion), final_answer(reference(conversation))
        # spelling answers compare case- and space-insensitively ("A-P-P-L-E", "a - p - p - l - e")
        return got is not None and "".join(got.lower().rstrip(".").split()) == want
