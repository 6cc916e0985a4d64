"""SFT's document mask, measured: packed SFT with attention kept inside each conversation of a row, and without.

    python -m scripts.bench_mask [--depth 4] [--seq 256] [--base_steps 300] [--sft_steps 150] [--seeds 1 2]

Built once in a temporary directory, as scripts/bench_chat.py builds it: the built-in corpus, a 1024-token
tokenizer, base training (--base_steps) and midtraining (--mid_steps). Then, for each seed, packed SFT from that
midtrained checkpoint with --doc_mask=True and --doc_mask=False (same seed, so the same conversations in the same
rows, same steps; the two arms' order alternates from seed to seed). Each SFT model is then scored as a chat sees
conversations, one at a time: the mean loss on the assistant's tokens (nats) of its seed's held-out test
conversations, and chat_eval's accuracy on the checkable built-in tasks. tok/s is SFT's median after its first step.
On a machine busy with other jobs pass --threads 1: two OpenMP threads that keep losing their cores wait for each
other (a depth-2 base step took 15 s with 2 threads and 0.7 s with 1 on the machine the README's run used).
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
from pathlib import Path

import torch

from nanochat.chat_data import PaddedLoader
from nanochat.chat_phase import mixtures
from nanochat.engine import Engine, load_checkpoint_model
from nanochat.settings import SFTConfig
from nanochat.tasks import get_task
from nanochat.tokenizer import Tokenizer
from scripts.bench_chat import prepare, train
from scripts.chat_eval import CHECKABLE, categorical, generative

ARMS = ("mask", "no mask")


@torch.no_grad()
def assistant_loss(model: torch.nn.Module, tokenizer: Tokenizer, seed: int, seq: int, convs: int) -> float:
    """Mean nats per assistant token over the first `convs` held-out conversations of the seed's SFT mixture, one
    per row (no other conversation to attend to, as in a chat)."""
    test_mix = mixtures(SFTConfig(seed=seed, task_size=2000), 0, 1)[1]  # the task_size bench_chat.train uses
    loader, rows = PaddedLoader(tokenizer, test_mix, 8, seq, torch.device("cpu")), 0
    nats, count = 0.0, 0
    while rows < convs:
        x, y = loader.next_batch()
        loss = model(x, y, reduction="none")
        nats += float(loss[y >= 0].double().sum())
        count += int((y >= 0).sum())
        rows += x.size(0)
    return nats / count


@torch.inference_mode()
def accuracy(model: torch.nn.Module, tokenizer: Tokenizer, problems: int) -> dict[str, float]:
    """chat_eval's score on the first `problems` test problems of each checkable built-in task."""
    engine, out = Engine(model, tokenizer), {}
    for name in CHECKABLE.split(","):
        task = get_task(name, "test", stop=problems)
        right = 0
        for i in range(len(task)):
            conv = task[i]
            if task.eval_type == "categorical":
                right += categorical(engine, tokenizer, task, conv)
            else:
                right += generative(engine, tokenizer, task, conv, 64)
        out[name] = right / max(1, len(task))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--base_steps", type=int, default=300)
    p.add_argument("--mid_steps", type=int, default=100)
    p.add_argument("--sft_steps", type=int, default=150)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--eval_convs", type=int, default=400, help="held-out conversations for the loss")
    p.add_argument("--problems", type=int, default=50, help="test problems per task for the accuracy")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if min(args.base_steps, args.mid_steps, args.sft_steps, args.eval_convs, args.problems) < 1:
        p.error("steps, --eval_convs and --problems must be >= 1")
    torch.set_num_threads(args.threads)
    steps = lambda n: argparse.Namespace(**{**vars(args), "steps": n})  # noqa: E731 - bench_chat.train's args
    with tempfile.TemporaryDirectory(prefix="bench_mask-") as tmp:
        base = Path(tmp)
        tokenizer = prepare(base)
        train(steps(args.base_steps), base, "scripts.base_train", base / "base", None, "base")
        train(steps(args.mid_steps), base, "scripts.mid_train", base / "mid", base / "base", "mid")
        results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
        for i, seed in enumerate(args.seeds):
            for arm in ARMS if i % 2 == 0 else ARMS[::-1]:
                out = base / f"sft-{seed}-{arm.replace(' ', '')}"
                flags = (f"--seed={seed}", f"--doc_mask={arm == 'mask'}")
                run = train(steps(args.sft_steps), base, "scripts.chat_sft", out, base / "mid", arm, *flags)
                model, _ = load_checkpoint_model(out)
                run["loss"] = assistant_loss(model, tokenizer, seed, args.seq, args.eval_convs)
                run["acc"] = accuracy(model, tokenizer, args.problems)
                results[arm].append(run)
                acc = ", ".join(f"{k} {100 * v:.0f}%" for k, v in run["acc"].items())
                print(f"seed {seed} {arm:<8} assistant loss {run['loss']:.4f}  accuracy: {acc}  "
                      f"{run['tok_s']:,.0f} tok/s", flush=True)  # fmt: skip
        print(f"\ndepth {args.depth}, {args.seq} tokens/row, SFT {args.sft_steps} steps from one base "
              f"({args.base_steps} + {args.mid_steps} mid steps), seeds {args.seeds}:")  # fmt: skip
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        for arm in ARMS:
            rs = results[arm]
            acc = ", ".join(f"{k} {100 * mean([r['acc'][k] for r in rs]):.1f}%" for k in rs[0]["acc"])
            per_seed = " ".join(f"{r['loss']:.4f}" for r in rs)
            print(f"  {arm:<8} assistant loss {mean([r['loss'] for r in rs]):.4f} (per seed {per_seed})"
                  f"  accuracy {acc}  "
                  f"{statistics.median(r['tok_s'] for r in rs):,.0f} tok/s")  # fmt: skip
        diffs = [m["loss"] - n["loss"] for m, n in zip(results["mask"], results["no mask"])]
        cost = statistics.median(n["tok_s"] / m["tok_s"] for m, n in zip(results["mask"], results["no mask"]))
        print(f"mask - no mask, assistant loss per seed: {' '.join(f'{d:+.4f}' for d in diffs)} "
              f"(perplexity x{math.exp(mean(diffs)):.3f}); tok/s no mask / mask: {cost:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
