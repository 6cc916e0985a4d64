"""`make demo`: the whole product on a CPU in a few minutes, with no download.

Builds the built-in corpus and a small tokenizer under $NANOCHAT_BASE_DIR (unless they are already there), then
trains a tiny model under the supervisor, `nanochat-run train`, with one injected crash: you see the failure
classified, a restart with resume from the last checkpoint, and the budget completed; then `nanochat-run status` and
`nanochat-run plot` (a PNG of the run). Each step is a real command, printed before it runs, so you can run any of
them yourself afterwards.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time

from nanochat.common import get_base_dir
from nanochat.dataset import data_dir, list_shards
from nanochat.paths import phase_dir
from nanochat.tokenizer import tokenizer_dir

SUPERVISOR_ARGS = ["--depth", "2", "--num-iterations", "200", "--save-every", "50", "--keep-last-n", "2",
                   "--model-tag", "demo", "--backoff", "2", "--progress-every", "5"]  # fmt: skip
TRAINER_ARGS = [
    "--head_dim=64",
    "--max_seq_len=256",
    "--device_batch_size=8",
    "--total_batch_size=-1",
    "--eval_every=100",
    "--eval_tokens=32768",
    "--sample_every=-1",
    "--log_every=10",
    "--debug_fault=raise@step:120",  # one transient crash, 20 steps after the checkpoint at step 100
]


def run(args: list[str]) -> str:
    shown = args[2:] if args[1:2] == ["-m"] and args[2] == "supervisor.cli" else ["python", *args[1:]]
    print(f"\n$ {' '.join(shown).replace('supervisor.cli', 'nanochat-run')}", flush=True)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        if not re.match(r"  \w+ = ", line):  # skip the trainer's settings dump (`  key = value`)
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
    ckpt_dir = phase_dir("base", "demo")
    for old in (ckpt_dir, ckpt_dir.with_name("demo.run")):
        if old.exists():
            print(f"demo: removing the previous demo run in {old}")
            shutil.rmtree(old)
    run([py, "-m", "supervisor.cli", "train", *SUPERVISOR_ARGS, "--", *TRAINER_ARGS])
    trainer_log = "".join(p.read_text() for p in sorted(ckpt_dir.with_name("demo.run").glob("attempt-*/torchrun.log")))
    losses = [float(m) for m in re.findall(r"\| loss ([0-9.]+)", trainer_log)]
    run([py, "-m", "supervisor.cli", "status", "--model-tag", "demo"])
    picture = run([py, "-m", "supervisor.cli", "plot", "--model-tag", "demo"]).strip().splitlines()[-1]
    print(f"\ndemo: done in {time.time() - t0:.0f}s")
    if losses:
        print(f"demo: training loss fell from {losses[0]:.3f} to {losses[-1]:.3f}")
    print(f"demo: the trainer's own logs are in {ckpt_dir.with_name('demo.run')}/attempt-*/torchrun.log")
    print(f"demo: a picture of the run (loss, the crash and its restart, tokens/s): {picture}")


if __name__ == "__main__":
    main()
