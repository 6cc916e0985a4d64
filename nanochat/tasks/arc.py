"""ARC (allenai/ai2_arc): grade-school science questions, ARC-Easy or ARC-Challenge, downloaded with Hugging
Face `datasets`. The offline alternative is the built-in choice task."""

from __future__ import annotations

from nanochat.tasks.base import Conversation, MultipleChoiceTask, load_hf, multiple_choice


def arc_conversation(row: dict) -> Conversation:
    # ARC labels its options A-E or 1-5; we letter them by position and find the answer by its label
    labels = list(row["choices"]["label"])
    return multiple_choice(row["question"], list(row["choices"]["text"]), labels.index(row["answerKey"]))


class ARC(MultipleChoiceTask):
    name = "arc-easy"
    subset = "ARC-Easy"

    def __init__(self, split: str = "train", seed: int = 0, **slicing: int) -> None:
        super().__init__(split, **slicing)
        source = f"{self.subset} (allenai/ai2_arc)"
        self.rows = load_hf(source, "choice", "allenai/ai2_arc", self.subset, split)

    def num_examples(self) -> int:
        return len(self.rows)

    def example(self, index: int) -> Conversation:
        return arc_conversation(self.rows[index])


class ARCChallenge(ARC):
    name = "arc-challenge"
    subset = "ARC-Challenge"
