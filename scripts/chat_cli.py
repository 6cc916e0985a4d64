"""Chat with a trained model in the terminal, tokens streamed as they are generated.

    python -m scripts.chat_cli                      # the SFT model (chatsft_checkpoints/<the one tag>)
    python -m scripts.chat_cli --phase mid --step 400
    python -m scripts.chat_cli -p "What is 12*3?"   # answer once and exit (for scripts and tests)

In the chat: /clear starts a new conversation, /quit (or Ctrl+D) leaves; Ctrl+C stops a reply being written, or
leaves when you are typing. The model may call the calculator; its results are shown as [= result].
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch

from nanochat.checkpoint import CheckpointError
from nanochat.config import ConfigError, finite_float
from nanochat.engine import Engine, add_model_args, load_from_args
from nanochat.tokenizer import Tokenizer, get_tokenizer


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scripts.chat_cli", description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("-p", "--prompt", default=None, help="answer this one message and exit")
    p.add_argument("--temperature", type=finite_float, default=0.6, help="0 = always the most likely token")
    p.add_argument("--top_k", type=int, default=50, help="sample among the k most likely tokens")
    p.add_argument("--max_tokens", type=int, default=256, help="the longest reply, in tokens")
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args(argv)
    if args.temperature < 0 or args.top_k < 1 or args.max_tokens < 1:
        p.error("--temperature must be >= 0, --top_k >= 1 and --max_tokens >= 1")
    return args


class Chat:
    """One conversation, kept as token ids (so what the model saw, tool outputs included, is exactly replayed)."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, args: argparse.Namespace) -> None:
        self.engine, self.tokenizer, self.args = engine, tokenizer, args
        sid = tokenizer.special_id
        self.user = (sid("<|user_start|>"), sid("<|user_end|>"), sid("<|assistant_start|>"))
        self.assistant_end = sid("<|assistant_end|>")
        # the reply ends at the assistant's end, or where a confused model starts another turn
        self.ends = {self.assistant_end, tokenizer.bos_id, *self.user}
        self.python = {sid("<|python_start|>"): "[calc: ", sid("<|python_end|>"): "]"}
        self.output = {sid("<|output_start|>"): "[= ", sid("<|output_end|>"): "]"}
        self.clear()

    def clear(self) -> None:
        self.ids = [self.tokenizer.bos_id]

    def reply(self, text: str, out) -> None:
        """Add the user's message, stream the assistant's reply to `out`, and keep both in the conversation."""
        start, end, assistant = self.user
        prompt = [*self.ids, start, *self.tokenizer.encode(text), end, assistant]
        room = self.engine.model.config.sequence_len - len(prompt)
        if room < 1:
            out.write("(the conversation fills the model's context: /clear to start a new one)\n")
            return
        reply: list[int] = []
        shown = ""  # text already written; decoding the whole reply each time keeps multi-byte characters whole
        try:
            for step in self.engine.generate(prompt, 1, min(self.args.max_tokens, room), self.args.temperature,
                                             self.args.top_k, self.args.seed):  # fmt: skip
                token = step.tokens[0]
                if step.done[0] or token in self.ends:
                    break
                reply.append(token)
                text_now = self._show(reply)
                if not text_now.endswith("\ufffd"):  # an incomplete UTF-8 character waits for its next byte
                    out.write(text_now[len(shown) :])
                    out.flush()
                    shown = text_now
        except KeyboardInterrupt:
            out.write(" (stopped)")
        out.write("\n")
        self.ids = [*prompt, *reply, self.assistant_end]

    def _show(self, reply: list[int]) -> str:
        pieces, run = [], []
        for token in reply:
            marker = self.python.get(token) or self.output.get(token)
            if marker is None:
                run.append(token)
                continue
            pieces += [self.tokenizer.decode(run), marker]
            run = []
        return "".join([*pieces, self.tokenizer.decode(run)])


def main(argv: list[str]) -> int:
    args = parse(argv)
    try:
        tokenizer = get_tokenizer()
        directory, model, meta = load_from_args(args)
        engine = Engine(model, tokenizer)
        chat = Chat(engine, tokenizer, args)
    except (ConfigError, CheckpointError, ValueError, OSError) as e:
        print(f"chat_cli: error: {e}", file=sys.stderr)
        return 2
    on_gpu = model.wte.weight.device.type == "cuda"
    autocast = torch.autocast("cuda", torch.bfloat16) if on_gpu else contextlib.nullcontext()
    with autocast:
        if args.prompt is not None:
            chat.reply(args.prompt, sys.stdout)
            return 0
        print(f"chatting with {directory} step {meta.step} ({meta.phase}); /clear, /quit")
        while True:
            try:
                text = input("> ")
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
            if text.strip() == "/quit":
                return 0
            if text.strip() == "/clear":
                chat.clear()
                print("(a new conversation)")
            elif text.strip():
                chat.reply(text, sys.stdout)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
