"""Chat with a trained model in the browser: one page, the assistant's tokens streamed as they are generated.

    python -m scripts.chat_web                         # the SFT model, at http://127.0.0.1:8000
    python -m scripts.chat_web --phase mid --step 400 --port 8080
    python -m scripts.chat_web --checkpoint_dir path/to/ckpt --temperature 0 --device_type cpu

The page (scripts/chat_web.html) posts the whole conversation to POST /chat ({"messages": [{"role", "content"}]})
and reads the reply as it comes, one JSON object a line: {"part": n, "type": "text" | "python" | "python_output",
"text": ...} for each new piece of the reply, then {"done": true} or {"error": ...}. A refused request is an HTTP
400 or 413 with {"error": ...}. GET /health describes the model: phase, step, config, sampling settings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from nanochat.checkpoint import CheckpointError
from nanochat.config import ConfigError, finite_float
from nanochat.engine import Engine, add_model_args, load_from_args
from nanochat.tokenizer import Tokenizer, get_tokenizer

PAGE = Path(__file__).with_name("chat_web.html")
MAX_BODY = 1 << 20  # bytes in one request: more text than any context holds, refused before it is parsed


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scripts.chat_web", description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--temperature", type=finite_float, default=0.6, help="0 = always the most likely token")
    p.add_argument("--top_k", type=int, default=50, help="sample among the k most likely tokens")
    p.add_argument("--max_tokens", type=int, default=256, help="the longest reply, in tokens")
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args(argv)
    if args.temperature < 0 or args.top_k < 1 or args.max_tokens < 1 or not 0 <= args.port <= 65535:
        p.error("--temperature must be >= 0, --top_k >= 1, --max_tokens >= 1 and --port in 0..65535")
    return args


def prompt_for(tokenizer: Tokenizer, request: object) -> list[int]:
    """The tokens the model completes for a request {"messages": [...]} that ends with the user's message; any
    problem is a one-line ValueError (the tokenizer checks roles, their order and the content's shape)."""
    messages = request.get("messages") if isinstance(request, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError('the request needs {"messages": [...]}, a non-empty list of {"role", "content"}')
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str) and not content.strip():
            raise ValueError(f"message {i} is empty")
    prompt = tokenizer.render_for_completion({"messages": messages})
    if messages[-1]["role"] != "user":  # (valid by now) the prompt would redo the assistant's last reply
        raise ValueError("the last message must be the user's: there is nothing to answer")
    return prompt


def reply_parts(
    engine: Engine,
    prompt: list[int],
    max_tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int,
    stop: Callable[[], bool] = lambda: False,
) -> Iterator[tuple[int, str, str]]:
    """Generate the reply to `prompt`, as (part number, part type, new text) while it is written. A part is a run
    of text, a calculator call ("python") or the calculator's result ("python_output"): each special token that
    opens or closes a call starts the next part. Stops early once stop() is true."""
    tok, sid = engine.tokenizer, engine.tokenizer.special_id
    opens = {sid("<|python_start|>"): "python", sid("<|python_end|>"): "text",
             sid("<|output_start|>"): "python_output", sid("<|output_end|>"): "text"}  # fmt: skip
    # the reply ends at the assistant's end, or where a confused model starts another turn
    ends = {*engine.stop, sid("<|user_start|>"), sid("<|user_end|>"), sid("<|assistant_start|>")}
    part, kind, run, shown = 0, "text", [], ""
    for step in engine.generate(prompt, 1, max_tokens, temperature, top_k, seed):
        token = step.tokens[0]
        if step.done[0] or token in ends or stop():
            break
        if token in opens:
            if rest := tok.decode(run)[len(shown) :]:
                yield part, kind, rest
            part, kind, run, shown = part + 1, opens[token], [], ""
            continue
        run.append(token)
        # decoding the whole part each time keeps multi-byte characters whole: an incomplete one (U+FFFD at the
        # end) waits for its next byte
        text = tok.decode(run)
        if not text.endswith("\ufffd"):
            yield part, kind, text[len(shown) :]
            shown = text
    if rest := tok.decode(run)[len(shown) :]:
        yield part, kind, rest


def make_app(engine: Engine, args: argparse.Namespace, info: dict, page: str, stopping: threading.Event) -> FastAPI:
    """The web app: the page at /, the model's description at /health, replies at POST /chat. Once `stopping` is
    set, the replies being written end at their next token."""
    app = FastAPI(title="nanochat", docs_url=None, redoc_url=None, openapi_url=None)
    # One reply at a time, the lock held by the worker thread for the whole generation: the model is shared, torch
    # does not promise that one module's forward may run in several threads at once, and parallel replies would
    # only split the same cores (or GPU) while each holds a KV cache of up to the full context. Others wait.
    lock = threading.Lock()
    context = engine.model.config.sequence_len
    room = min(args.max_tokens, context // 4)  # the least a conversation must leave for the answer
    on_gpu = engine.model.wte.weight.device.type == "cuda"

    def refuse(status: int, why: str) -> JSONResponse:
        return JSONResponse({"error": why}, status_code=status)

    def stream(prompt: list[int], max_tokens: int, stop: threading.Event) -> Iterator[bytes]:
        """The reply as JSON lines. Generation runs in a thread of its own, so the lock is always taken and
        released in one place, however the client goes; setting `stop` ends it at the next token."""
        events: queue.Queue[dict] = queue.Queue()

        def work() -> None:
            last = {"done": True}
            try:
                # autocast is per thread, so it is entered here
                autocast = torch.autocast("cuda", torch.bfloat16) if on_gpu else contextlib.nullcontext()
                with lock, autocast:
                    sampling = (args.temperature, args.top_k, args.seed, lambda: stop.is_set() or stopping.is_set())
                    for part, kind, text in reply_parts(engine, prompt, max_tokens, *sampling):
                        events.put({"part": part, "type": kind, "text": text})
                if stopping.is_set():
                    last = {"error": "the server is stopping: this reply was cut short"}
            except Exception as e:  # noqa: BLE001 - shown in the page; the server carries on
                last = {"error": f"generation failed: {type(e).__name__}: {e}"}
            finally:
                events.put(last)

        threading.Thread(target=work, name="chat_web-reply", daemon=True).start()
        while True:
            event = events.get()
            yield (json.dumps(event) + "\n").encode()
            if "done" in event or "error" in event:
                return

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    @app.get("/health")
    async def health() -> dict:
        return info

    @app.post("/chat")
    async def chat(request: Request) -> Response:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                return refuse(413, f"the request is over {MAX_BODY >> 20} MiB: shorten the message")
        try:
            prompt = prompt_for(engine.tokenizer, json.loads(body))
        except ValueError as e:  # malformed JSON too (JSONDecodeError, UnicodeDecodeError are ValueErrors)
            return refuse(400, str(e))
        if len(prompt) > context - room:
            return refuse(413, f"the conversation is {len(prompt)} tokens; the model reads {context}, {room} of them"
                               " kept for the answer: shorten the message or start a new conversation")  # fmt: skip
        # A StreamingResponse pulls each line of a sync iterator in a worker thread: the event loop stays free.
        # Its background task runs once the response is over, finished or cut short by the client leaving (the
        # generator itself is not closed then), so a reply nobody reads stops at its next token.
        stop = threading.Event()
        lines = stream(prompt, min(args.max_tokens, context - len(prompt)), stop)
        return StreamingResponse(lines, media_type="application/x-ndjson", background=BackgroundTask(stop.set))

    return app


class Server(uvicorn.Server):
    """uvicorn's server, cutting the replies being written short when it is asked to stop (Ctrl+C, SIGTERM): it
    waits for open responses to end, and a long reply from a slow model would hold the exit for minutes."""

    def __init__(self, config: uvicorn.Config, stopping: threading.Event) -> None:
        super().__init__(config)
        self.stopping = stopping

    def handle_exit(self, sig: int, frame) -> None:
        self.stopping.set()
        super().handle_exit(sig, frame)


def main(argv: list[str]) -> int:
    args = parse(argv)
    try:
        tokenizer = get_tokenizer()
        directory, model, meta = load_from_args(args)
        engine = Engine(model, tokenizer)
        page = PAGE.read_text()
    except (ConfigError, CheckpointError, ValueError, OSError) as e:
        print(f"chat_web: error: {e}", file=sys.stderr)
        return 2
    info = {
        "model": directory.name,
        "directory": str(directory),
        "phase": meta.get("phase", "base_train"),
        "step": meta["step"],
        "model_config": meta["model_config"],
        "parameters": model.num_params(),
        "device": str(model.wte.weight.device),
        "sampling": {"temperature": args.temperature, "top_k": args.top_k, "max_tokens": args.max_tokens},
    }
    print(f"chat_web: {directory} step {meta['step']} at http://{args.host}:{args.port}", file=sys.stderr)
    stopping = threading.Event()
    config = uvicorn.Config(make_app(engine, args, info, page, stopping), args.host, args.port, log_level="info")
    server = Server(config, stopping)
    server.run()
    return 0 if server.started else 3  # uvicorn logged why it could not start (say, the port is taken)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
