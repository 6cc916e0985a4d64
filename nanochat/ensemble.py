"""Evaluating several checkpoints of one run: each on its own, their ensemble, and their weight average.

    each       the phase's metric for every checkpoint: validation bits per byte for base and mid (the trainer's
               own evaluation: the same data, batch shape and token count) or task accuracy for sft and rl (scored
               as scripts/chat_eval.py scores it)
    ensemble   the same metric for the mean of the checkpoints' output probabilities, on the same batches
    average    the same metric for the model whose weights are the checkpoints' elementwise mean (checkpoint
               averaging, as in LAWA and model soups); `save_average` writes it as a checkpoint of its own

Memory: at most two sets of weights and one batch of logits at a time, so ten depth-20 checkpoints fit on one GPU.
The ensemble never holds two models. Its probability of a target token is the mean of the models' probabilities of
it, so each model's pass adds its p(target) to a running sum: one float per evaluated token, or one per answer
option of a multiple-choice problem. A generated answer would need every model at each decoding step, so generative
tasks are not ensembled. The average is a running sum of weights (one set) plus the checkpoint being added (two).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from nanochat import checkpoint
from nanochat.checkpoint import Checkpoint, CheckpointError
from nanochat.config import ConfigError
from nanochat.registry import DEFAULT
from nanochat.tasks import BUILTIN_TASKS, TASKS, Task, TaskMixture, get_task, parse_mixture_spec

if TYPE_CHECKING:  # torch is imported where it is used: bad input is refused before seconds of import
    import torch

    from nanochat.gpt import GPT
    from nanochat.tokenizer import Tokenizer

MODES = ("each", "ensemble", "average")
CHECKABLE = "arithmetic,spelling,choice"  # chat_eval's default: the built-in tasks with an automatic check
CATEGORICAL = [name for name, cls in TASKS.items() if getattr(cls, "eval_type", None) == "categorical"]
Scores = dict[str, float]  # column -> value: {"val_bpb": ...} or {task name: accuracy}


# ----------------------------------------------------------------------------------------------------------------
# choosing the checkpoints


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        raise ConfigError(f"--mode takes {', '.join(MODES)} (comma-separated), got {text!r}")
    return [m for m in MODES if m in modes]


def parse_spec(spec: str) -> int | list[int] | None:
    """'all' -> None, 'last:N' -> N, '1000,2000' -> [1000, 2000]."""
    text = spec.strip()
    if text == "all":
        return None
    if text.startswith("last:") and text[5:].isdigit() and int(text[5:]) >= 1:
        return int(text[5:])
    parts = [p.strip() for p in text.split(",")]
    if text and all(p.isascii() and p.isdigit() for p in parts):
        return sorted({int(p) for p in parts})
    raise ConfigError(f"--checkpoints takes all, last:N (N >= 1) or steps like 1000,2000, got {spec!r}")


def select(directory: Path, spec: str, warn: Callable[[str], None]) -> list[Checkpoint]:
    """The checkpoints `spec` names (see parse_spec), oldest first, each verified (checksums and a safe load). An
    invalid one is skipped with a warning; a step without a checkpoint, or nothing valid left, is a ConfigError."""
    want = parse_spec(spec)
    on_disk = checkpoint.scan(directory)  # sizes only: the full check is below, for the chosen ones alone
    steps = [c.step for c in on_disk if c.committed]
    if not steps:
        raise ConfigError(f"no checkpoints in {directory}: train first, or pass another --checkpoint-dir/--phase")
    if isinstance(want, list):
        if missing := [s for s in want if s not in {c.step for c in on_disk}]:
            raise ConfigError(f"no checkpoint at step {', '.join(map(str, missing))} in {directory}; it has steps"
                              f" {', '.join(map(str, steps))}: pick among them")  # fmt: skip
        candidates = [c.step for c in on_disk if c.step in want]
    else:
        candidates = steps
    chosen: list[Checkpoint] = []
    for step in sorted(candidates, reverse=True):
        ckpt = checkpoint.inspect(directory, step)
        if not ckpt.valid:
            warn(f"skipping the checkpoint at step {step}: {ckpt.problem}")
            continue
        chosen.append(ckpt)
        if isinstance(want, int) and len(chosen) == want:
            break
    if not chosen:
        raise ConfigError(f"no valid checkpoint among steps {', '.join(map(str, candidates))} in {directory}")
    first = chosen[-1]
    for c in chosen:
        if c.meta.model_config != first.meta.model_config:
            raise CheckpointError(f"the checkpoints at steps {first.step} and {c.step} in {directory} are different"
                                  " models (model_config): evaluate them separately")  # fmt: skip
    return sorted(chosen, key=lambda c: c.step)


# ----------------------------------------------------------------------------------------------------------------
# the metrics


class Evaluation(Protocol):
    """A phase's metric. `score` evaluates one model; with `pool` it also adds the model's probabilities into the
    ensemble's running sums, which `pooled` turns into the ensemble's scores. `solo=False`: the model's own scores
    are not wanted (only the ensemble is), so work that does not feed the ensemble may be skipped."""

    metric: str
    lower_is_better: bool

    def score(self, model: GPT, pool: bool = False, solo: bool = True) -> Scores: ...
    def pooled(self) -> Scores: ...
    def describe(self) -> dict: ...


class _Tap:
    """Stands in for the model inside evaluate_bpb: hands back the model's per-token losses untouched, and adds
    each token's probability of its target, exp(-loss), to the pool's running sums."""

    def __init__(self, model: GPT, pool: Bpb) -> None:
        self.model, self.pool, self.batch = model, pool, 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor, reduction: str = "none") -> torch.Tensor:
        loss = self.model(x, y, reduction=reduction)
        self.pool.add(self.batch, y, loss)
        self.batch += 1
        return loss


class Bpb:
    """Validation bits per byte, by the trainer's own function (nanochat/loss_eval.py) on `loader()`'s batches,
    which must be the same ones at every call. The ensemble's sums: p(target) per token (float64) and the targets
    (int32, to price them in bytes at the end and to check that every model saw the same batches)."""

    metric, lower_is_better = "val_bpb", True

    def __init__(self, loader: Callable[[], object], steps: int, token_bytes: torch.Tensor, what: dict) -> None:
        self.loader, self.steps, self.token_bytes, self.what = loader, steps, token_bytes, what
        self.p: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.members = 0

    def score(self, model: GPT, pool: bool = False, solo: bool = True) -> Scores:
        from nanochat.loss_eval import evaluate_bpb

        tap = _Tap(model, self) if pool else model
        bpb = evaluate_bpb(tap, self.loader(), self.steps, self.token_bytes)
        if pool:
            if self.members and tap.batch != len(self.p):
                raise RuntimeError(f"the validation data gave {tap.batch} batches, before {len(self.p)}")
            self.members += 1
        return {self.metric: bpb}

    def add(self, batch: int, y: torch.Tensor, loss: torch.Tensor) -> None:
        import torch

        p = torch.exp(-loss.double())
        if self.members == 0:
            self.p.append(p)
            self.targets.append(y.to(torch.int32))
        elif batch < len(self.p) and torch.equal(self.targets[batch], y.to(torch.int32)):
            self.p[batch] += p
        else:  # the loaders are deterministic; this guards the ensemble's meaning, not a user error
            raise RuntimeError(
                f"validation batch {batch} differs between checkpoints: the ensemble needs the same data"
            )

    def pooled(self) -> Scores:
        """As evaluate_bpb, with -log(mean p) for each token's loss."""
        import torch

        nats = torch.zeros((), dtype=torch.float64, device=self.token_bytes.device)
        nbytes = torch.zeros((), dtype=torch.float64, device=self.token_bytes.device)
        for p, y in zip(self.p, self.targets):
            y = y.long()
            b = torch.where(y >= 0, self.token_bytes[y.clamp(min=0)], 0)
            nats += (-torch.log(p / self.members) * (b > 0)).sum()
            nbytes += b.sum()
        bpb = float("nan") if nbytes.item() == 0 else nats.item() / (math.log(2) * nbytes.item())
        return {self.metric: bpb}

    def describe(self) -> dict:
        return {**self.what, "batches": self.steps}


def validation(meta: checkpoint.Meta, tokenizer: Tokenizer, device: torch.device, eval_tokens: int = -1) -> Bpb:
    """The evaluation the phase's trainer runs, read from a checkpoint's meta: base training's validation split,
    or midtraining's test conversations packed into rows, with the trainer's batch shape and token count (all its
    ranks' together; `eval_tokens` > 0: about that many instead)."""
    from nanochat.loss_eval import eval_token_count

    cfg, model_cfg = meta.train_config, meta.model_config
    B = cfg["device_batch_size"]
    T = cfg["max_seq_len"] if cfg["max_seq_len"] > 0 else model_cfg["sequence_len"]  # a chat phase's -1: the model's
    if eval_tokens > 0:
        steps = max(1, eval_tokens // (B * T))
    else:  # as Phase.plan: batches per rank, times the ranks (they read the same split in shares)
        world = meta.world_size or 1
        total = eval_token_count(cfg["eval_tokens"], cfg["eval_every"], meta.num_iterations, meta.total_batch_size)
        steps = max(1, total // (B * T * world)) * world
    what = {"data": "", "batch": [B, T], "tokens": steps * B * T}
    if meta.phase == DEFAULT.run_name:  # base training's data; the chat phases' tasks
        from nanochat.dataloader import DataLoader

        what["data"] = "the validation split"
        loader = lambda: DataLoader(tokenizer, B, T, "val", 0, 1, device)  # noqa: E731
    else:
        from nanochat.chat_data import PackedLoader

        spec = cfg.get("eval_tasks") or cfg["tasks"]
        mixture = _test_mixture(spec, cfg["seed"], cfg["task_size"])
        start = mixture.state_dict()
        what["data"] = f"test conversations of {spec}"

        def loader():  # every call reads the same conversations, as the trainer's evaluator does
            mixture.load_state_dict(start)
            return PackedLoader(tokenizer, mixture, B, T, device)

    return Bpb(loader, steps, tokenizer.token_bytes().to(device), what)


def _test_mixture(spec: str, seed: int, task_size: int) -> TaskMixture:
    """The evaluation mixture of a chat phase on one rank, built as nanochat/chat_phase.py `mixtures` builds it
    (only the test half: the training half may be a large download)."""
    size = task_size // 20 + 1
    try:
        entries = parse_mixture_spec(spec)
        tasks = [
            get_task(name, "test", seed, **({"size": size} if name in BUILTIN_TASKS else {})) for name, _ in entries
        ]
        return TaskMixture(tasks, [w for _, w in entries], seed=seed, rank=0, world_size=1)
    except ValueError as e:  # TaskUnavailable (offline, no `datasets`), an empty mixture
        raise ConfigError(f"the phase's evaluation tasks cannot load here: {e}") from None


class Accuracy:
    """Task accuracy on test problems, scored as chat_eval scores it: a multiple-choice problem by the most likely
    answer letter right after <|assistant_start|> (categorical), any other by a greedy answer, calculator
    included, checked by the task (generative). The ensemble's sums: each letter's probability, per problem."""

    metric, lower_is_better = "accuracy", False

    def __init__(self, tasks: list[Task], tokenizer: Tokenizer, max_tokens: int) -> None:
        self.tasks, self.tokenizer, self.max_tokens = tasks, tokenizer, max_tokens
        self.p: dict[str, list[torch.Tensor | None]] = {}  # task -> per problem: summed letter probabilities
        self.members = 0

    @property
    def categorical(self) -> list[Task]:
        return [t for t in self.tasks if t.eval_type == "categorical"]

    def score(self, model: GPT, pool: bool = False, solo: bool = True) -> Scores:
        from nanochat.engine import Engine

        engine, scores = Engine(model, self.tokenizer), {}
        for task in self.tasks:
            if task.eval_type == "categorical":
                right = 0
                for i, conversation in enumerate(_problems(task)):
                    p = self._letter_probs(model, conversation)
                    if pool:
                        self._add(task.name, i, p)
                    right += p is not None and task.evaluate(conversation, conversation["letters"][int(p.argmax())])
            elif solo:
                right = sum(self._generate(engine, task, conversation) for conversation in _problems(task))
            else:
                continue
            scores[task.name] = right / max(len(task), 1)
        if pool:
            self.members += 1
        return scores

    def _letter_probs(self, model: GPT, conversation: dict) -> torch.Tensor | None:
        """The answer letters' probabilities (float64); None when the question alone overflows the context."""
        import torch

        prompt = self.tokenizer.render_for_completion(conversation)
        if len(prompt) > model.config.sequence_len:
            return None
        device = model.wte.weight.device
        logits = model(torch.tensor([prompt], dtype=torch.long, device=device))[0, -1]
        ids = [self.tokenizer.encode(letter)[0] for letter in conversation["letters"]]  # one token per letter
        return torch.softmax(logits.double(), dim=-1)[ids].cpu()

    def _add(self, task: str, i: int, p: torch.Tensor | None) -> None:
        sums = self.p.setdefault(task, [])
        if self.members == 0:
            sums.append(p)
        elif sums[i] is not None:
            sums[i] = sums[i] + p  # p is None for every member alike: the prompt's length does not change

    def _generate(self, engine, task: Task, conversation: dict) -> bool:
        prompt = self.tokenizer.render_for_completion(conversation)
        room = engine.model.config.sequence_len - len(prompt)
        if room < 1:
            return False  # the question alone fills the context: no answer
        completions, _ = engine.generate_batch(prompt, 1, min(self.max_tokens, room), temperature=0.0)
        return task.evaluate(conversation, self.tokenizer.decode(completions[0]))

    def pooled(self) -> Scores:
        """The categorical tasks' accuracy by the mean letter probabilities (their argmax: the mean's scale does
        not matter)."""
        scores = {}
        for task in self.categorical:
            sums = self.p.get(task.name, [])
            right = sum(
                p is not None and task.evaluate(conversation, conversation["letters"][int(p.argmax())])
                for p, conversation in zip(sums, _problems(task))
            )
            scores[task.name] = right / max(len(task), 1)
        return scores

    def describe(self) -> dict:
        return {"tasks": {t.name: {"problems": len(t), "kind": t.eval_type} for t in self.tasks},
                "max_tokens": self.max_tokens}  # fmt: skip


def _problems(task: Task) -> Iterator[dict]:
    return (task[i] for i in range(len(task)))


def chat_tasks(spec: str, max_problems: int) -> list[Task]:
    """chat_eval's tasks: the first `max_problems` of each test split; a task without an automatic check, or one
    that cannot load here, is a ConfigError."""
    try:
        tasks = [get_task(name, "test", stop=max_problems) for name, _ in parse_mixture_spec(spec)]
    except ValueError as e:  # an unknown name, TaskUnavailable
        raise ConfigError(f"--tasks: {e}") from None
    for task in tasks:
        if task.eval_type is None:
            raise ConfigError(f"the {task.name} task has no automatic check; checkable: {CHECKABLE} and the"
                              " downloaded gsm8k, mmlu, arc-easy, arc-challenge")  # fmt: skip
    return tasks


# ----------------------------------------------------------------------------------------------------------------
# each, ensemble, average


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, as the trainer evaluates; plain fp32 on the CPU."""
    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", torch.bfloat16)
    return contextlib.nullcontext()


def build(meta: checkpoint.Meta, device: torch.device) -> GPT:
    """An empty model of a checkpoint's shape on `device`, in eval mode, for load_state_dict."""
    import torch

    from nanochat.gpt import GPT, GPTConfig

    with torch.device(device):
        model = GPT(GPTConfig(**meta.model_config))
    return model.to(device).eval()  # the rotary tables are made on the CPU


def score(model: GPT, evaluation: Evaluation, pool: bool = False, solo: bool = True) -> Scores:
    import torch

    device = model.wte.weight.device
    with autocast(device), torch.inference_mode():
        return evaluation.score(model, pool, solo)


def each(
    model: GPT,
    directory: Path,
    ckpts: list[Checkpoint],
    evaluation: Evaluation,
    pool: bool = False,
    solo: bool = True,
    log: Callable[[Checkpoint, Scores], None] = lambda ckpt, scores: None,
) -> list[Scores]:
    """Every checkpoint's scores, loaded one at a time into `model` (whose weights are overwritten): the model and
    one loaded state are the two sets of weights. `pool` also feeds the ensemble (see `ensemble`)."""
    device = model.wte.weight.device
    results = []
    for ckpt in ckpts:
        state = checkpoint.load_model(directory, ckpt, device)
        model.load_state_dict(state)
        del state
        results.append(score(model, evaluation, pool, solo))
        log(ckpt, results[-1])
    return results


def average(directory: Path, ckpts: list[Checkpoint], device: torch.device) -> dict[str, torch.Tensor]:
    """The uniform average of the checkpoints' weights: a running sum in the weights' own dtype (one set) plus the
    checkpoint being added (the second), divided at the end. Added oldest first."""
    total: dict[str, torch.Tensor] | None = None
    for ckpt in ckpts:
        state = checkpoint.load_model(directory, ckpt, device)
        if total is None:
            # on the CPU the loaded tensors map the file: the sum needs memory of its own
            total = {k: v.clone() if device.type == "cpu" else v for k, v in state.items()}
        else:
            for k, v in total.items():
                v += state[k]
        del state
    for v in total.values():
        v /= len(ckpts)
    return total


def save_average(out: Path, directory: Path, ckpts: list[Checkpoint], state: dict, extra: dict) -> Checkpoint:
    """Write the averaged weights as a weights-only checkpoint of their own in `out` (new or empty), at the newest
    source's step, final, so that chat_cli, chat_web, chat_eval and a next phase (--source_dir) load it. Its meta is
    the newest source's (model config, tokenizer, phase, lineage) less that checkpoint's metrics, plus
    `averaged_from` (each source's dir, step and model checksum) and `extra`; a lineage (run id) of its own."""
    if any(c.committed for c in checkpoint.scan(out)):
        raise ConfigError(f"{out} already holds checkpoints: save the average into a new or empty dir")
    newest = ckpts[-1]
    kept = newest.meta.to_dict().items()
    meta = {k: v for k, v in kept if not k.startswith("val_") and k not in ("files", "saved_at")}
    checkpoint.make_dir(out)
    meta.update(extra, final=True, stop_reason="averaged", run_id=checkpoint.start_lineage(out),
                averaged_from=[checkpoint.source_record(directory, c) for c in ckpts])  # fmt: skip
    cpu = {k: v.detach().cpu() for k, v in state.items()}  # a CUDA tensor must load on any machine (no copy on CPU)
    checkpoint.write(out, newest.step, cpu, None, meta)  # weights only: there is no optimizer state to keep
    del cpu
    checkpoint.mark_latest(out, newest.step)
    saved = checkpoint.inspect(out, newest.step)
    if not saved.valid:  # never hand out a path to a checkpoint that does not load
        raise CheckpointError(f"the averaged checkpoint in {out} does not verify: {saved.problem}")
    return saved
