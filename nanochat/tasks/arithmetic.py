"""Multi-step arithmetic word problems in GSM8K's format, generated from a seed.

The assistant reasons step by step; each step is a calculator call (a python part such as "12*3") whose result
comes back as a python_output part ("36"), and the reply ends with the line "#### <answer>".
"""

from __future__ import annotations

import random
from collections.abc import Callable

from nanochat.calculator import calculate
from nanochat.tasks.base import Conversation, GeneratedTask, assistant, numbers_match, user
from nanochat.tasks.words import NAMES

ITEMS = ["pencils", "stickers", "apples", "marbles", "cards", "cookies", "stamps", "shells", "beads", "books"]
THINGS = ["bike", "game", "jacket", "lamp", "backpack", "puzzle", "kite", "watch"]

Step = tuple[str, str, str]  # text before the call, the calculator expression, text after its result


def calc(expr: str) -> int:
    """A step's result, by the calculator the engine answers with (so outputs look the same in training and chat)."""
    result = calculate(expr)
    if result is None or not result.lstrip("-").isdigit():
        raise ValueError(f"{expr!r} is not a calculator expression with a whole-number result")
    return int(result)


# Each template draws its numbers and returns (question, steps). A step's expression refers to earlier steps'
# results as "{0}", "{1}", ..., filled in as the problem is solved.


def packs(rng: random.Random, name: str) -> tuple[str, list[Step]]:
    a, b, item = rng.randint(2, 12), rng.randint(3, 25), rng.choice(ITEMS)
    c = rng.randint(1, a * b - 1)
    question = (
        f"{name} buys {a} packs of {item}. Each pack has {b} {item}. {name} gives {c} {item} to a friend. "
        f"How many {item} does {name} have now?"
    )
    return question, [
        (f"{name} buys ", f"{a}*{b}", f" {item}.\n"),
        (f"After giving {c} away, {name} has ", f"{{0}}-{c}", f" {item} left.\n"),
    ]


def wages(rng: random.Random, name: str) -> tuple[str, list[Step]]:
    a, b, c = rng.randint(8, 40), rng.randint(2, 10), rng.randint(2, 30)
    question = f"{name} earns ${a} an hour and works {b} hours a day. How much does {name} earn in {c} days?"
    return question, [
        ("In one day, ", f"{a}*{b}", " dollars are earned.\n"),
        (f"In {c} days that is ", f"{{0}}*{c}", " dollars.\n"),
    ]


def legs(rng: random.Random, name: str) -> tuple[str, list[Step]]:
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    question = f"{name}'s farm has {a} chickens and {b} cows. How many legs do the animals have in total?"
    return question, [
        ("The chickens have ", f"{a}*2", " legs.\n"),
        ("The cows have ", f"{b}*4", " legs.\n"),
        ("Together that is ", "{0}+{1}", " legs.\n"),
    ]


def sharing(rng: random.Random, name: str) -> tuple[str, list[Step]]:
    each, friends = rng.randint(3, 20), rng.randint(2, 12)
    c = rng.randint(1, each - 1)
    question = (
        f"{name} bakes {each * friends} cookies and shares them equally among {friends} friends. Each "
        f"friend eats {c} of their cookies. How many cookies does each friend have left?"
    )
    return question, [
        ("Each friend gets ", f"{each * friends}/{friends}", " cookies.\n"),
        (f"After eating {c}, each friend has ", f"{{0}}-{c}", " cookies left.\n"),
    ]


def more_than(rng: random.Random, name: str) -> tuple[str, list[Step]]:
    other = rng.choice([n for n in NAMES if n != name])
    a, b, item = rng.randint(5, 300), rng.randint(2, 150), rng.choice(ITEMS)
    question = f"{name} has {a} {item}. {other} has {b} more {item} than {name}. How many {item} do they have together?"
    return question, [
        (f"{other} has ", f"{a}+{b}", f" {item}.\n"),
        ("Together they have ", f"{a}+{{0}}", f" {item}.\n"),
    ]


def savings(rng: random.Random, name: str) -> tuple[str, list[Step]]:
    a, b, thing = rng.randint(5, 60), rng.randint(3, 20), rng.choice(THINGS)
    c = rng.randint(1, a * b - 1)
    question = (
        f"{name} saves ${a} every week. After {b} weeks, {name} spends ${c} on a {thing}. "
        f"How much money does {name} have left?"
    )
    return question, [
        (f"After {b} weeks {name} has saved ", f"{a}*{b}", " dollars.\n"),
        (f"After buying the {thing}, {name} has ", f"{{0}}-{c}", " dollars left.\n"),
    ]


def shopping(rng: random.Random, name: str) -> tuple[str, list[Step]]:
    pen, book, p, n = rng.randint(1, 9), rng.randint(2, 15), rng.randint(2, 12), rng.randint(1, 8)
    question = (
        f"Pens cost ${pen} each and notebooks cost ${book} each. {name} buys {p} pens and {n} notebooks. "
        f"How much does {name} spend?"
    )
    return question, [
        ("The pens cost ", f"{p}*{pen}", " dollars.\n"),
        ("The notebooks cost ", f"{n}*{book}", " dollars.\n"),
        ("In total that is ", "{0}+{1}", " dollars.\n"),
    ]


def fraction(rng: random.Random, name: str) -> tuple[str, list[Step]]:
    k, per, item = rng.randint(2, 6), rng.randint(3, 40), rng.choice(ITEMS)
    total = k * per
    question = f"A box holds {total} {item}. {name} takes 1/{k} of them. How many {item} are left in the box?"
    return question, [
        (f"{name} takes ", f"{total}/{k}", f" {item}.\n"),
        ("That leaves ", f"{total}-{{0}}", f" {item} in the box.\n"),
    ]


TEMPLATES: list[Callable[[random.Random, str], tuple[str, list[Step]]]] = [
    packs,
    wages,
    legs,
    sharing,
    more_than,
    savings,
    shopping,
    fraction,
]


def solve(steps: list[Step]) -> tuple[list[dict], int]:
    """The assistant's parts for a list of steps (each call followed by its output) and the final result."""
    parts: list[dict] = []
    results: list[int] = []
    text = ""  # text between two calls is one part, so it tokenizes as it would be generated
    for before, expr, after in steps:
        expr = expr.format(*results)
        results.append(calc(expr))
        parts += [
            {"type": "text", "text": text + before},
            {"type": "python", "text": expr},
            {"type": "python_output", "text": str(results[-1])},
        ]
        text = after
    parts.append({"type": "text", "text": f"{text}#### {results[-1]}"})
    return parts, results[-1]


class Arithmetic(GeneratedTask):
    name = "arithmetic"
    eval_type = "generative"

    def generate(self, rng: random.Random) -> tuple[str, Conversation]:
        question, steps = rng.choice(TEMPLATES)(rng, rng.choice(NAMES))
        parts, _ = solve(steps)
        return question, {"messages": [user(question), assistant(parts)]}

    def evaluate(self, conversation: Conversation, completion: str) -> bool:
        return numbers_match(conversation, completion)
