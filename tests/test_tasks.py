"""Chat tasks: the built-in generated tasks, the downloaded ones (offline: converters and errors), the registry and
TaskMixture's weighting, resuming and sharding."""

from __future__ import annotations

import json
import re
import sys
import types
from collections import Counter

import pytest

from nanochat.tasks import BUILTIN_TASKS, TASKS, TaskMixture, TaskUnavailable, get_task, parse_mixture
from nanochat.tasks.arithmetic import calc
from nanochat.tasks.base import Task, reference
from nanochat.tasks.gsm8k import gsm8k_parts
from nanochat.tasks.words import CATEGORIES
from nanochat.tokenizer import Tokenizer

CHECKED = ["arithmetic", "spelling", "choice"]  # the built-in tasks with an evaluate()


def problem_key(conversation: dict) -> str:
    """What makes two problems the same, whatever the phrasing: a multiple-choice question with its options in
    any order, a spelling problem's quoted word (and letter), otherwise the text, ignoring case and a final ?!."""
    prompt = conversation["messages"][0]["content"]
    if "letters" in conversation:
        question, *options = prompt.split("\n")[2:-1]
        return question + "|" + "|".join(sorted(o[3:] for o in options))
    quoted = sorted(re.findall(r'"([^"]*)"', prompt))
    if quoted:
        return "|".join(quoted)
    return "\n".join(str(m["content"]).lower().rstrip("?!.") for m in conversation["messages"])


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_generated_tasks_are_deterministic_from_the_seed(name: str) -> None:
    a, b, other = get_task(name, "train", seed=3), get_task(name, "train", seed=3), get_task(name, "train", seed=4)
    assert len(a) == 10_000 and len(get_task(name, "test")) == 500
    assert [a[i] for i in range(50)] == [b[i] for i in range(50)]
    assert [a[i] for i in range(50)] != [other[i] for i in range(50)]
    assert a[-1] == a[len(a) - 1]
    with pytest.raises(IndexError):
        a[len(a)]


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_train_and_test_never_share_a_problem(name: str) -> None:
    train = {problem_key(c) for c in get_task(name, "train", seed=0, size=4000)}
    # a different seed for test: the partition is fixed by the problem itself, not by the seed
    test = [problem_key(c) for c in get_task(name, "test", seed=1, size=1000)]
    assert len(train) > 100 and len(set(test)) > 20
    assert not train.intersection(test)


def test_slicing_and_size() -> None:
    full = get_task("arithmetic", "train", size=100)
    part = get_task("arithmetic", "train", size=100, start=10, stop=50, step=2)
    assert len(part) == 20 and part[0] == full[10] and part[19] == full[48]
    assert len(get_task("spelling", "test", size=0)) == 0
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        get_task("spelling", "val")


@pytest.mark.parametrize("name", BUILTIN_TASKS)
@pytest.mark.parametrize("split", ["train", "test"])
def test_builtin_conversations_render_and_train_on_something(tokenizer: Tokenizer, name: str, split: str) -> None:
    task = get_task(name, split)
    for i in range(0, len(task), len(task) // 100):
        ids, mask = tokenizer.render_conversation(task[i], max_tokens=100_000)
        assert len(ids) == len(mask) and sum(mask) > 0
        assert tokenizer.render_for_completion(task[i]) == ids[: len(tokenizer.render_for_completion(task[i]))]


@pytest.mark.parametrize("name", CHECKED)
def test_evaluate_accepts_the_reference_and_rejects_a_wrong_answer(name: str) -> None:
    task = get_task(name, "test")
    assert task.eval_type in ("generative", "categorical")
    for conv in (task[i] for i in range(200)):
        right = reference(conv)
        assert task.evaluate(conv, right), right
        if task.eval_type == "categorical":
            wrong = next(letter for letter in conv["letters"] if letter != right)
            assert task.evaluate(conv, f"Answer: {right}.") and task.evaluate(conv, f" ({right}) because")
        else:
            answer = right.rsplit("#### ", 1)[1]
            wrong = "#### " + (str(int(answer) + 1) if answer.isdigit() else answer[::-1] + "-x")
        assert not task.evaluate(conv, wrong), wrong
        assert not task.evaluate(conv, "I don't know")


def test_evaluate_details() -> None:
    arithmetic, spelling = get_task("arithmetic", "test"), get_task("spelling", "test")
    conv = {"messages": chat_messages("?", "so\n#### 1234")}
    assert arithmetic.evaluate(conv, "lots of work\n#### 1,234") and arithmetic.evaluate(conv, "#### $1234.")
    assert not arithmetic.evaluate(conv, "1234") and not arithmetic.evaluate(conv, "#### 1234 #### 5")
    conv = {"messages": chat_messages("?", "x\n#### a-p-p")}
    assert spelling.evaluate(conv, "#### A - P - P.") and not spelling.evaluate(conv, "#### a-p")
    with pytest.raises(NotImplementedError, match="identity task has no automatic check"):
        get_task("identity", "test").evaluate(conv, "#### a-p-p")


def test_arithmetic_calculator_calls_give_their_outputs_and_the_final_answer() -> None:
    for conv in get_task("arithmetic", "train", size=300):
        parts = conv["messages"][1]["content"]
        calls = [p["text"] for p in parts if p["type"] == "python"]
        outputs = [p["text"] for p in parts if p["type"] == "python_output"]
        assert len(calls) >= 2 and [str(calc(c)) for c in calls] == outputs
        assert parts[-1]["text"].endswith(f"#### {outputs[-1]}") and int(outputs[-1]) >= 0


def test_builtin_facts_are_unambiguous() -> None:
    words = [w for ws in CATEGORIES.values() for w in ws]
    assert len(words) == len(set(words))  # a word in two categories would make "which is a fruit?" ambiguous
    for conv in get_task("choice", "train", size=500):
        assert conv["letters"] == ["A", "B", "C", "D"] and reference(conv) in conv["letters"]
    assert any("mississippi" in reference(c) for c in get_task("spelling", "train", size=5000))


# ---- downloaded tasks, offline ------------------------------------------------------------------------------

HF_TASKS = {"gsm8k": "arithmetic", "mmlu": "choice", "arc-easy": "choice", "arc-challenge": "choice"}


@pytest.mark.parametrize("name", [*HF_TASKS, "smoltalk"])
def test_downloaded_task_without_datasets_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails, installed or not
    with pytest.raises(TaskUnavailable) as info:
        get_task(name, "train")
    msg = str(info.value)
    assert "\n" not in msg and "pip install datasets" in msg and isinstance(info.value, ValueError)
    assert f"the built-in alternative is --tasks={HF_TASKS.get(name, 'identity,spelling,arithmetic,choice')}" in msg
    assert {"gsm8k": "openai/gsm8k", "mmlu": "cais/mmlu", "smoltalk": "smol-smoltalk"}.get(name, "ai2_arc") in msg


def chat_messages(*texts: str) -> list[dict]:
    return [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(texts)]


def fake_datasets(monkeypatch: pytest.MonkeyPatch, rows: list[dict] | Exception) -> list[tuple]:
    """Install a stand-in `datasets` module whose load_dataset returns rows (or raises); returns its calls."""
    calls: list[tuple] = []

    def load_dataset(path: str, config: str | None, split: str) -> list[dict]:
        calls.append((path, config, split))
        if isinstance(rows, Exception):
            raise rows
        return rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_downloaded_task_that_cannot_load_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    offline = ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)\nTraceback\nmore")
    fake_datasets(monkeypatch, offline)
    with pytest.raises(TaskUnavailable) as info:
        get_task("gsm8k", "test")
    msg = str(info.value)
    assert "\n" not in msg and "ConnectionError: Couldn't reach 'openai/gsm8k'" in msg
    assert msg.endswith("the built-in alternative is --tasks=arithmetic")


def test_gsm8k_calculations_become_calculator_parts(monkeypatch: pytest.MonkeyPatch, tokenizer: Tokenizer) -> None:
    answer = "She sold 48/2 = <<48/2=24>>24 clips in May.\nIn all 48+24 = <<48+24=72>>72 clips.\n#### 72"
    calls = fake_datasets(monkeypatch, [{"question": "How many clips?", "answer": answer}])
    task = get_task("gsm8k", "test")
    assert calls == [("openai/gsm8k", "main", "test")] and len(task) == 1
    parts = task[0]["messages"][1]["content"]
    assert parts == gsm8k_parts(answer)
    assert [(p["type"], p["text"]) for p in parts] == [
        ("text", "She sold 48/2 = "),
        ("python", "48/2"),
        ("python_output", "24"),
        ("text", "24 clips in May.\nIn all 48+24 = "),
        ("python", "48+24"),
        ("python_output", "72"),
        ("text", "72 clips.\n#### 72"),
    ]
    assert task.evaluate(task[0], "... #### 72") and not task.evaluate(task[0], "#### 71")
    assert sum(tokenizer.render_conversation(task[0], 10_000)[1]) > 0


def test_mmlu_arc_and_smoltalk_rows_convert(monkeypatch: pytest.MonkeyPatch, tokenizer: Tokenizer) -> None:
    mmlu_row = {"question": "2+2?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"], "answer": 1}
    calls = fake_datasets(monkeypatch, [{"train": mmlu_row}])  # auxiliary_train's nested rows
    conv = get_task("mmlu", "train")[0]
    assert calls == [("cais/mmlu", "auxiliary_train", "train")]
    assert conv["messages"][0]["content"].startswith("The following is a multiple choice question about elementary")
    assert "\nB. 4\n" in conv["messages"][0]["content"] and reference(conv) == "B"
    arc_row = {"question": "Q?", "choices": {"text": ["x", "y", "z"], "label": ["1", "2", "3"]}, "answerKey": "3"}
    calls = fake_datasets(monkeypatch, [arc_row])
    task = get_task("arc-challenge", "test")
    assert calls == [("allenai/ai2_arc", "ARC-Challenge", "test")]
    assert task[0]["letters"] == ["A", "B", "C"] and reference(task[0]) == "C" and task.evaluate(task[0], "C")
    smol_row = {"messages": [{"role": "system", "content": "Be kind."}, *chat_messages("Hi", "Hello!")]}
    fake_datasets(monkeypatch, [smol_row])
    ids, mask = tokenizer.render_conversation(get_task("smoltalk", "train")[0], 1000)
    assert tokenizer.decode(ids).startswith("<|bos|><|user_start|>Be kind.\n\nHi<|user_end|>") and sum(mask) > 0


# ---- registry -----------------------------------------------------------------------------------------------


def test_parse_mixture() -> None:
    tasks, weights = parse_mixture("arithmetic:2, spelling,identity:0.5", "test", seed=1, size=10)
    assert [t.name for t in tasks] == ["arithmetic", "spelling", "identity"] and weights == [2.0, 1.0, 0.5]
    assert all(len(t) == 10 and t.split == "test" for t in tasks)
    assert set(BUILTIN_TASKS) <= set(TASKS)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("arithmatic:2,spelling", "unknown task 'arithmatic': did you mean 'arithmetic'?"),
        ("spelling,zzz", "unknown task 'zzz': (known tasks: arithmetic, spelling"),
        ("spelling:x", "the weight of 'spelling' must be a number >= 0, got 'x'"),
        ("spelling:-1", "the weight of 'spelling' must be a number >= 0, got '-1'"),
        ("spelling:nan", "must be a number >= 0"),
        ("spelling,,identity", "empty entry in task mixture"),
        ("", "empty entry in task mixture"),
        ("identity,identity:2", "task 'identity' appears twice"),
    ],
)
def test_parse_mixture_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_mixture(spec, "train")
    assert message in str(info.value) and "\n" not in str(info.value)


# ---- mixture ------------------------------------------------------------------------------------------------


def small(name: str, size: int) -> Task:
    return get_task(name, "train", size=size)


def test_mixture_follows_the_weights_and_visits_each_example_once_per_epoch() -> None:
    mix = TaskMixture([small("arithmetic", 100), small("spelling", 50), small("identity", 30)], [3, 1, 0], seed=5)
    draws = [mix.advance() for _ in range(4000)]
    share = Counter(t for t, _ in draws)
    assert abs(share[0] / 4000 - 0.75) < 0.03 and share[2] == 0
    spelling = [i for t, i in draws if t == 1]
    assert sorted(spelling[:50]) == list(range(50)) and sorted(spelling[50:100]) == list(range(50))
    assert spelling[:50] != spelling[50:100]  # a fresh order each epoch
    assert mix.epoch == pytest.approx(4000 / 150)
    again = TaskMixture([small("arithmetic", 100), small("spelling", 50), small("identity", 30)], [3, 1, 0], seed=5)
    assert [again.advance() for _ in range(4000)] == draws
    conv = next(iter(TaskMixture([small("spelling", 50)], seed=5)))
    assert conv in [small("spelling", 50)[i] for i in range(50)]


def test_mixture_state_dict_resumes_exactly() -> None:
    tasks = [small("arithmetic", 40), small("choice", 25)]
    mix = TaskMixture(tasks, [1, 2], seed=7)
    for _ in range(37):
        next(mix)
    state = json.loads(json.dumps(mix.state_dict()))  # it is plain data
    expected = [next(mix) for _ in range(60)]
    resumed = TaskMixture(tasks, [1, 2], seed=7)
    resumed.load_state_dict(state)
    assert [next(resumed) for _ in range(60)] == expected
    for other in (TaskMixture(tasks, [1, 3], seed=7), TaskMixture(tasks, [1, 2], seed=8), TaskMixture(tasks[:1])):
        with pytest.raises(ValueError, match="the saved task-mixture state is for another mixture"):
            other.load_state_dict(state)


def test_mixture_ranks_get_disjoint_shards_of_one_stream() -> None:
    tasks = [small("arithmetic", 500), small("spelling", 300)]
    single = TaskMixture(tasks, [2, 1], seed=3)
    whole = [single.advance() for _ in range(120)]
    ranks = [TaskMixture(tasks, [2, 1], seed=3, rank=r, world_size=3) for r in range(3)]
    shards = [[m.advance() for _ in range(40)] for m in ranks]
    assert [shard[k] for k in range(40) for shard in shards] == whole  # rank r takes draws r, r+3, ...
    assert len(set(whole)) == len(whole)  # no example twice within the first epoch: the ranks are disjoint
    # every rank holds the same state, so rank 0's state resumes rank 2 exactly
    assert all(m.state_dict() == ranks[0].state_dict() for m in ranks)
    resumed = TaskMixture(tasks, [2, 1], seed=3, rank=2, world_size=3)
    resumed.load_state_dict(ranks[0].state_dict())
    assert [resumed.advance() for _ in range(20)] == [ranks[2].advance() for _ in range(20)]
    with pytest.raises(ValueError, match="need 0 <= rank < world_size"):
        TaskMixture(tasks, rank=3, world_size=3)


@pytest.mark.parametrize(
    ("tasks", "weights"),
    [([], None), ([small("spelling", 0), small("identity", 0)], None), ([small("spelling", 5)], [0.0])],
)
def test_empty_mixture_is_a_one_line_error(tasks: list[Task], weights: list[float] | None) -> None:
    with pytest.raises(ValueError) as info:
        TaskMixture(tasks, weights)
    assert str(info.value).startswith("empty task mixture") and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="weights must be finite and >= 0"):
        TaskMixture([small("spelling", 5)], [-1.0])
    with pytest.raises(ValueError, match="got 2 weights for 1 tasks"):
        TaskMixture([small("spelling", 5)], [1.0, 1.0])
