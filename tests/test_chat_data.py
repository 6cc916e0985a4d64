"""SFT's best-fit packing, in process: whole conversations (none cut unless it alone exceeds a row, none lost),
targets only on the assistant's tokens, far less padding than a row each, and a position that round-trips exactly
through a checkpoint's JSON (the waiting conversations included), also onto another world size."""

from __future__ import annotations

import json

import torch

from nanochat.chat_data import IGNORE, BestFitLoader, PaddedLoader, draw
from nanochat.tasks import Task, TaskMixture, get_task
from nanochat.tokenizer import Tokenizer

CPU = torch.device("cpu")
T = 256


class Varied(Task):
    """Conversations of many lengths, each unique; every 17th longer than a row."""

    name = "varied"

    def num_examples(self) -> int:
        return 200

    def example(self, index: int) -> dict:
        words = " ".join(str(i * 7919) for i in range(60)) if index % 17 == 0 else "word " * (index % 13)
        user, answer = f"question {index}: {words[:40]}", f"answer {index}: {words}"
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def mixture(seed: int = 0, rank: int = 0, world: int = 1) -> TaskMixture:
    return TaskMixture([Varied()], seed=seed, rank=rank, world_size=world)


def test_rows_hold_whole_conversations_best_fit_and_none_is_lost(tokenizer: Tokenizer):
    loader = BestFitLoader(tokenizer, mixture(), 4, T, CPU, lookahead=8)
    rows = [loader.row() for _ in range(40)]
    twin = mixture()  # the same draws, one by one
    drawn = []
    while twin.state_dict()["step"] < loader.mixture.state_dict()["step"]:
        drawn.append(draw(tokenizer, twin, T))
    index_of = {tuple(ids): key[1] for key, ids, _ in drawn}
    placed = [tuple(ids) for row in rows for ids, _ in row]
    waiting = [tuple(ids) for _, ids, _ in loader.waiting]
    assert sorted(placed + waiting) == sorted(index_of) and len(index_of) == len(drawn)  # each exactly once
    assert len(placed) > 2 * len(rows)  # several to a row
    long_ones = 0
    for row in rows:
        assert sum(len(ids) for ids, _ in row) <= T + 1
        for ids, _ in row:
            assert ids[0] == tokenizer.bos_id
            full = tokenizer.render_conversation(Varied()[index_of[tuple(ids)]], 10**6)[0]
            assert ids == full[: T + 1] and (len(row) == 1 or len(full) <= T + 1)  # cut only alone in a row
            long_ones += len(full) > T + 1
    assert long_ones > 0
    # best fit: a closed row has no room for any conversation that was waiting after it
    loader2 = BestFitLoader(tokenizer, mixture(), 4, T, CPU, lookahead=8)
    for _ in range(20):
        used = sum(len(ids) for ids, _ in loader2.row())
        assert all(len(ids) > T + 1 - used for _, ids, _ in loader2.waiting)


def test_targets_are_the_assistant_tokens_and_padding_is_never_trained(tokenizer: Tokenizer):
    loader, twin = (BestFitLoader(tokenizer, mixture(), 4, T, CPU, lookahead=8) for _ in range(2))
    for _ in range(5):
        x, y = loader.next_batch()
        for r, row in enumerate(twin.row() for _ in range(4)):
            ids = [t for c in row for t in c[0]]
            mask = [m for c in row for m in c[1]]
            n = len(ids) - 1
            assert x[r, :n].tolist() == ids[:-1]
            assert y[r, :n].tolist() == [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]
            assert (y[r, n:] == IGNORE).all() and int((y[r] != IGNORE).sum()) == sum(mask)


def test_the_position_round_trips_exactly_and_onto_another_world_size(tokenizer: Tokenizer):
    loader = BestFitLoader(tokenizer, mixture(), 4, T, CPU, lookahead=8)
    for _ in range(3):
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))  # as a checkpoint stores it
    assert len(state["waiting"]) == 8
    resumed = BestFitLoader(tokenizer, mixture(), 4, T, CPU, lookahead=8)
    resumed.load_state_dict(state)
    for _ in range(5):
        for a, b in zip(loader.next_batch(), resumed.next_batch()):
            assert torch.equal(a, b)
    # two ranks' positions onto one rank: both ranks' waiting conversations are kept
    ranks = [BestFitLoader(tokenizer, mixture(rank=r, world=2), 4, T, CPU, lookahead=8) for r in range(2)]
    for rank in ranks:
        rank.next_batch()
    states = [json.loads(json.dumps(r.state_dict())) for r in ranks]
    one = BestFitLoader(tokenizer, mixture(), 4, T, CPU, lookahead=8)
    one.load_resharded(states)
    assert [list(k) for k, _, _ in one.waiting] == states[0]["waiting"] + states[1]["waiting"]
    assert one.mixture.state_dict()["step"] == max(s["mixture"]["step"] for s in states)


def test_packing_the_built_in_tasks_leaves_little_padding(tokenizer: Tokenizer):
    builtin = ("arithmetic", "spelling", "choice", "identity")

    def mix() -> TaskMixture:
        return TaskMixture([get_task(name, "train", 0, size=500) for name in builtin], seed=0)

    padded, packed = PaddedLoader(tokenizer, mix(), 4, 256, CPU), BestFitLoader(tokenizer, mix(), 4, 256, CPU)
    for _ in range(10):
        padded.next_batch(), packed.next_batch()
    assert padded.filled / padded.slots < 0.5 and packed.filled / packed.slots > 0.9
    assert packed.targets / packed.slots > 2 * padded.targets / padded.slots
