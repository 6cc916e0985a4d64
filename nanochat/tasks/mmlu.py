"""MMLU (cais/mmlu): four-option questions on 57 subjects, downloaded with Hugging Face `datasets`.

Training uses the auxiliary_train set (questions from other exams, kept apart from MMLU's own), evaluation
the test set. The offline alternative is the built-in choice task.
"""

from __future__ import annotations

from nanochat.tasks.base import Conversation, MultipleChoiceTask, load_hf, multiple_choice


def mmlu_conversation(row: dict) -> Conversation:
    if isinstance(row.get("train"), dict):  # some releases of auxiliary_train nest each row under "train"
        row = row["train"]
    subject = (row.get("subject") or "").replace("_", " ") or None
    return multiple_choice(row["question"], list(row["choices"]), int(row["answer"]), subject)


class MMLU(MultipleChoiceTask):
    name = "mmlu"

    def __init__(self, split: str = "train", seed: int = 0, **slicing: int) -> None:
        super().__init__(split, **slicing)
        config, hf_split = ("auxiliary_train", "train") if split == "train" else ("all", "test")
        self.rows = load_hf("MMLU (cais/mmlu)", "choice", "cais/mmlu", config, hf_split)

    def num_examples(self) -> int:
        return len(self.rows)

    def example(self, index: int) -> Conversation:
        return mmlu_conversation(self.rows[index])
