"""Supervised fine-tuning: whole conversations packed into rows (best fit; --pack=False: one per padded row), with
the loss only on what the assistant writes.

One process:   python -m scripts.chat_sft --num_iterations=100
Distributed:   torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft -- --tasks=smoltalk,arc-easy,gsm8k
Every setting: python -m scripts.chat_sft --help

Starts from the final checkpoint of mid_checkpoints/<model_tag> and saves to chatsft_checkpoints/<model_tag>, with
the checkpoint contract of base training (nanochat/phase.py runs the loop; nanochat/chat_phase.py the rest).
"""

from __future__ import annotations

import os
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from nanochat.chat_data import BestFitLoader, PaddedLoader
from nanochat.chat_phase import train_chat
from nanochat.config import parse_args
from nanochat.registry import PHASES
from nanochat.settings import SFTConfig
from nanochat.train_loop import run_and_exit

PHASE = PHASES["sft"]


@record
def main(argv: list[str]) -> int:
    cfg, overrides = parse_args(SFTConfig(), argv)
    loader = BestFitLoader if cfg.pack else PaddedLoader
    return train_chat(PHASE, cfg, overrides, loader, doc_mask=cfg.pack and cfg.doc_mask)  # one per row: no mask


def cli() -> None:
    run_and_exit(PHASE.run_name, main, sys.argv[1:])


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cli()
