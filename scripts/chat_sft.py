"""Supervised fine-tuning: one conversation per row, padded, with the loss only on what the assistant writes.

One process:   python -m scripts.chat_sft --num_iterations=100
Distributed:   torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft -- --tasks=smoltalk,arc-easy,gsm8k
Every setting: python -m scripts.chat_sft --help

Starts from the final checkpoint of mid_checkpoints/<model_tag> and saves to chatsft_checkpoints/<model_tag>, with
the checkpoint contract of base training (nanochat/phase.py runs the loop; nanochat/chat_phase.py the rest).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from torch.distributed.elastic.multiprocessing.errors import record

from nanochat.chat_phase import ChatConfig, train_chat
from nanochat.config import parse_args
from nanochat.registry import PHASES
from nanochat.train_loop import run_and_exit

PHASE = PHASES["sft"]


@dataclass
class SFTConfig(ChatConfig):
    # batch: rows are whole conversations, so the step is counted in rows x max_seq_len tokens (padding included)
    device_batch_size: int = 4  # conversations per micro-batch on each rank
    total_batch_size: int = -1  # tokens (rows x max_seq_len) per step; -1 = one micro-batch on every rank
    # fine-tuning nudges: 2% of the pretraining learning rates, decayed linearly to 0 over the whole run
    embedding_lr: float = 0.004  # AdamW, token embedding
    unembedding_lr: float = 0.00008  # AdamW, output head
    matrix_lr: float = 0.0004  # Muon, every matrix in the blocks
    warmdown_ratio: float = 1.0  # fraction of steps decaying the LR at the end
    eval_every: int = 100  # -1 = only at the end


@record
def main(argv: list[str]) -> int:
    cfg, overrides = parse_args(SFTConfig(), argv)
    return train_chat(PHASE.run_name, cfg, overrides, PHASE.name, packed=False)


def cli() -> None:
    run_and_exit(PHASE.run_name, main, sys.argv[1:])


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cli()
