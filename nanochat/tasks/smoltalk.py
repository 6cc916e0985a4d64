"""SmolTalk (HuggingFaceTB/smol-smoltalk): general chat conversations for SFT, downloaded with Hugging Face
`datasets`. Its rows are already {"messages": [{"role", "content"}, ...]}, an optional system message first.
Offline, a mixture of the built-in tasks stands in."""

from __future__ import annotations

from nanochat.tasks.base import Conversation, Task, load_hf

BUILTIN_MIX = "identity,spelling,arithmetic,choice"


def smoltalk_conversation(row: dict) -> Conversation:
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in row["messages"]]}


class SmolTalk(Task):
    name = "smoltalk"

    def __init__(self, split: str = "train", seed: int = 0, **slicing: int) -> None:
        super().__init__(split, **slicing)
        source = "SmolTalk (HuggingFaceTB/smol-smoltalk)"
        self.rows = load_hf(source, BUILTIN_MIX, "HuggingFaceTB/smol-smoltalk", None, split)

    def num_examples(self) -> int:
        return len(self.rows)

    def example(self, index: int) -> Conversation:
        return smoltalk_conversation(self.rows[index])
