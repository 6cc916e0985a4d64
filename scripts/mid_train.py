"""Midtraining: the base model learns the chat format, tool calls and the tasks' styles, on conversations packed
into full rows like pretraining (every token trained on).

One process:   python -m scripts.mid_train --num_iterations=200
Distributed:   torchrun --standalone --nproc_per_node=8 -m scripts.mid_train -- --tasks=smoltalk,mmlu,gsm8k,identity
Every setting: python -m scripts.mid_train --help

Starts from the final checkpoint of base_checkpoints/<model_tag> and saves to mid_checkpoints/<model_tag> under the
checkpoint contract of base training: nanochat/phase.py runs the loop, nanochat/chat_phase.py the rest.
"""

from __future__ import annotations

import os
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from nanochat.chat_data import PackedLoader
from nanochat.chat_phase import train_chat
from nanochat.config import parse_args
from nanochat.registry import PHASES
from nanochat.settings import MidConfig
from nanochat.train_loop import run_and_exit

PHASE = PHASES["mid"]


@record
def main(argv: list[str]) -> int:
    cfg, overrides = parse_args(MidConfig(), argv)
    return train_chat(PHASE, cfg, overrides, PackedLoader)


def cli() -> None:
    run_and_exit(PHASE.run_name, main, sys.argv[1:])


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cli()
