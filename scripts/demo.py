"""`make demo`: the whole pipeline on a CPU in a few minutes, with no download.

Builds the built-in corpus and a small tokenizer under $NANOCHAT_BASE_DIR (unless they are already there), then
trains a tiny model and shows its loss falling. Each step is a real command, printed before it runs, so you can
run any of them yourself afterwards.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

from nanochat.common import get_base_dir
from nanochat.dataset import data_dir, list_shards
from nanochat.tokenizer import tokenizer_dir

TRAIN_ARGS = [
    "--depth=2",
    "--head_dim=64",
    "--max_seq_len=256",
    "--device_batch_size=8",
    "--total_batch_size=-1",
    "--num_iterations=200",
    "--eval_every=100",
    "--eval_tokens=32768",
    "--sample_every=-1",
    "--log_every=10",
    "--save_every=50",
    "--keep_last_n_checkpoints=2",
    "--model_tag=demo",
]


def run(args: list[str]) -> str:
    print(f"\n$ {' '.join(['python', *args[1:]])}", flush=True)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        if not line.startswith("  "):  # skip the trainer's settings dump
            print(line, end="", flush=True)
        lines.append(line)
    if proc.wait() != 0:
        sys.exit(f"demo: the command above failed with exit code {proc.returncode}")
    return "".join(lines)


def main() -> None:
    t0 = time.time()
    base = get_base_dir()
    print(f"demo: working in NANOCHAT_BASE_DIR={base}")
    py = sys.executable
    if len(list_shards(data_dir(base))) < 2:
        run([py, "-m", "nanochat.dataset", "--builtin"])
    if not (tokenizer_dir(base) / "tokenizer.json").exists():
        run([py, "-m", "scripts.tok_train", "--vocab_size=4096"])
    log = run([py, "-m", "scripts.base_train", *TRAIN_ARGS, "--resume=False"])
    losses = [float(m) for m in re.findall(r"\| loss ([0-9.]+)", log)]
    bpbs = [float(m) for m in re.findall(r"validation bpb ([0-9.]+)", log)]
    print(f"\ndemo: done in {time.time() - t0:.0f}s")
    if losses:
        print(f"demo: training loss fell from {losses[0]:.3f} to {losses[-1]:.3f}; validation bpb {bpbs[-1]:.3f}")
    print(f"demo: checkpoints in {base / 'base_checkpoints' / 'demo'}; continue training with:")
    print(f"  python -m scripts.base_train {' '.join(TRAIN_ARGS).replace('=200', '=300')}")


if __name__ == "__main__":
    main()
