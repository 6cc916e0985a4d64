"""Accuracy of a chat model on held-out tasks: one table, and a JSON record beside the checkpoint.

    python -m scripts.chat_eval                          # the SFT model on the built-in tasks' test splits
    python -m scripts.chat_eval --phase mid --tasks arithmetic,gsm8k,mmlu,arc-easy --max_problems 500

Multiple-choice tasks are scored by the letter the model finds most likely right after <|assistant_start|>
(categorical); the others by generating an answer at temperature 0, calculator included, and checking it
(generative). The record goes to <checkpoint dir>/chat_eval_<step>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import torch

from nanochat import checkpoint
from nanochat.checkpoint import CheckpointError
from nanochat.config import ConfigError
from nanochat.engine import Engine, add_model_args, load_from_args
from nanochat.tasks import Task, get_task, parse_mixture_spec
from nanochat.tokenizer import Tokenizer, get_tokenizer

CHECKABLE = "arithmetic,spelling,choice"  # the built-in tasks with an automatic check


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scripts.chat_eval", description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--tasks", default=CHECKABLE, help=f"comma-separated task names (default: {CHECKABLE})")
    p.add_argument("--max_problems", type=int, default=200, help="per task, from the start of its test split")
    p.add_argument("--max_tokens", type=int, default=256, help="the longest generated answer")
    args = p.parse_args(argv)
    if args.max_problems < 1 or args.max_tokens < 1:
        p.error("--max_problems and --max_tokens must be >= 1")
    return args


def categorical(engine: Engine, tokenizer: Tokenizer, task: Task, conversation: dict) -> bool:
    """The most likely of the conversation's answer letters, right after <|assistant_start|>."""
    prompt = tokenizer.render_for_completion(conversation)
    if len(prompt) > engine.model.config.sequence_len:
        return False  # the question alone overflows the context: no answer
    device = engine.model.wte.weight.device
    logits = engine.model(torch.tensor([prompt], dtype=torch.long, device=device))[0, -1]
    letters = conversation["letters"]
    ids = [tokenizer.encode(letter)[0] for letter in letters]  # single letters are single tokens
    return task.evaluate(conversation, letters[int(logits[ids].argmax())])


def generative(engine: Engine, tokenizer: Tokenizer, task: Task, conversation: dict, max_tokens: int) -> bool:
    prompt = tokenizer.render_for_completion(conversation)
    room = engine.model.config.sequence_len - len(prompt)
    if room < 1:
        return False  # the question alone fills the context: no answer
    completions, _ = engine.generate_batch(prompt, 1, min(max_tokens, room), temperature=0.0)
    return task.evaluate(conversation, tokenizer.decode(completions[0]))


def main(argv: list[str]) -> int:
    args = parse(argv)
    try:
        tokenizer = get_tokenizer()
        tasks = [get_task(name, "test", stop=args.max_problems) for name, _ in parse_mixture_spec(args.tasks)]
        for task in tasks:
            if task.eval_type is None:
                raise ConfigError(f"the {task.name} task has no automatic check; checkable: {CHECKABLE} and the"
                                  " downloaded gsm8k, mmlu, arc-easy, arc-challenge")  # fmt: skip
        directory, model, meta = load_from_args(args)
    except (ConfigError, CheckpointError, ValueError, OSError) as e:  # TaskUnavailable is a ValueError
        print(f"chat_eval: error: {e}", file=sys.stderr)
        return 2
    engine = Engine(model, tokenizer)
    on_gpu = model.wte.weight.device.type == "cuda"
    autocast = torch.autocast("cuda", torch.bfloat16) if on_gpu else contextlib.nullcontext()
    print(f"evaluating {directory} step {meta.step} ({meta.phase})")
    results = {}
    with autocast, torch.inference_mode():
        for task in tasks:
            t0, right = time.perf_counter(), 0
            for i in range(len(task)):
                conversation = task[i]
                if task.eval_type == "categorical":
                    right += categorical(engine, tokenizer, task, conversation)
                else:
                    right += generative(engine, tokenizer, task, conversation, args.max_tokens)
            n = len(task)
            results[task.name] = {"correct": right, "total": n, "accuracy": right / max(n, 1),
                                  "kind": task.eval_type, "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    print(f"{'task':<16}{'kind':<13}{'correct':>9}{'total':>7}{'accuracy':>10}")
    for name, r in results.items():
        print(f"{name:<16}{r['kind']:<13}{r['correct']:>9}{r['total']:>7}{100 * r['accuracy']:>9.1f}%")
    record = {"step": meta.step, "phase": meta.phase, "time": time.time(), "tasks": results}
    try:
        path = checkpoint.write_record(directory, "chat_eval", meta.step, record)
        print(f"record: {path}")
    except OSError as e:
        print(f"chat_eval: could not write the record into {directory} ({e.strerror or e})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
