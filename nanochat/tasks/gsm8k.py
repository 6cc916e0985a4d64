"""GSM8K (openai/gsm8k, "main"): grade-school math word problems, downloaded with Hugging Face `datasets`.

Its answers mark each calculation as <<12*3=36>>; we turn those into a python part ("12*3") and its
python_output ("36"), the same shape as the built-in arithmetic task, which is the offline alternative.
"""

from __future__ import annotations

import re

from nanochat.tasks.base import Conversation, Task, assistant, load_hf, numbers_match, user

CALCULATION = re.compile(r"<<([^<>=]*)=([^<>]*)>>")


def gsm8k_parts(answer: str) -> list[dict]:
    """GSM8K's answer text as assistant parts: text, and a python + python_output pair per <<expr=result>>."""
    parts: list[dict] = []
    done = 0
    for match in CALCULATION.finditer(answer):
        if match.start() > done:
            parts.append({"type": "text", "text": answer[done : match.start()]})
        parts.append({"type": "python", "text": match.group(1)})
        parts.append({"type": "python_output", "text": match.group(2)})
        done = match.end()
    if done < len(answer):
        parts.append({"type": "text", "text": answer[done:]})
    return parts


def gsm8k_conversation(row: dict) -> Conversation:
    return {"messages": [user(row["question"]), assistant(gsm8k_parts(row["answer"]))]}


class GSM8K(Task):
    name = "gsm8k"
    eval_type = "generative"

    def __init__(self, split: str = "train", seed: int = 0, **slicing: int) -> None:
        super().__init__(split, **slicing)
        self.rows = load_hf("GSM8K (openai/gsm8k)", "arithmetic", "openai/gsm8k", "main", split)

    def num_examples(self) -> int:
        return len(self.rows)

    def example(self, index: int) -> Conversation:
        return gsm8k_conversation(self.rows[index])

    def evaluate(self, conversation: Conversation, completion: str) -> bool:
        return numbers_match(conversation, completion)
