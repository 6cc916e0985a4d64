"""Chat with a trained model in the browser: one page, the assistant's tokens streamed as they are generated.

    python -m scripts.chat_web                         # the SFT model, at http://127.0.0.1:8000
    python -m scripts.chat_web --phase mid --step 400 --port 8080
    python -m scripts.chat_web --checkpoint_dir path/to/ckpt --temperature 0 --device_type cpu
    NANOCHAT_WEB_TOKEN=... python -m scripts.chat_web --host 0.0.0.0 --allowed_hosts mybox.lan   # for the network

The page (scripts/chat_web.html) posts the whole conversation to POST /chat ({"messages": [{"role", "content"}]},
Content-Type: application/json) and reads the reply as it comes, one JSON object a line: {"part": n, "type": "text" |
"python" | "python_output", "text": ...} for each new piece of the reply, then {"done": true} or {"error": ...}. A
refused request gets {"error": ...} with HTTP 400 (malformed, or a Host the server does not answer to), 401 (no or
a wrong bearer token, when the server has one), 413 (too long), 415 (not JSON) or 503 (too many waiting: try again
after Retry-After seconds). GET /health describes the model: phase, step, config, sampling settings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import ipaddress
import json
import os
import re
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from nanochat.checkpoint import CheckpointError, Meta
from nanochat.config import ConfigError, finite_float
from nanochat.engine import Engine, add_model_args, load_from_args
from nanochat.gpt import GPT
from nanochat.tokenizer import Tokenizer, get_tokenizer

PAGE = Path(__file__).with_name("chat_web.html")
MAX_BODY = 1 << 20  # bytes in one request: more text than any context holds, refused before it is parsed
TOKEN_ENV = "NANOCHAT_WEB_TOKEN"  # the bearer token, out of `ps` (a flag's value shows there)
LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")  # the names a browser on this machine reaches the server by
WILDCARDS = ("", "0.0.0.0", "::")  # --host values that listen on every interface


def host_name(host: str) -> str:
    """The name in a Host header or a --host value, lower case, without its port: "[::1]:80" -> "[::1]"."""
    host = host.strip().lower()
    if host.startswith("["):  # an IPv6 literal, bracketed as in a URL
        return host[: host.find("]") + 1]
    if host.count(":") > 1:  # a bare IPv6 address (a --host value)
        return f"[{host}]"
    return host.split(":")[0].rstrip(".")  # "localhost." names the same host


def is_local(host: str) -> bool:
    """Whether only this machine can connect to an address the server listens on."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scripts.chat_web", description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--temperature", type=finite_float, default=0.6, help="0 = always the most likely token")
    p.add_argument("--top_k", type=int, default=50, help="sample among the k most likely tokens")
    p.add_argument("--max_tokens", type=int, default=256, help="the longest reply, in tokens")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--max_queue",
        type=int,
        default=4,
        help="requests that may wait while one is answered; more are refused (HTTP 503, Retry-After)",
    )
    p.add_argument(
        "--allowed_hosts",
        default="",
        help="comma-separated names the server answers to besides localhost (Host header), e.g. the"
        " machine's name or address when --host 0.0.0.0",
    )
    p.add_argument(
        "--auth_token",
        default=os.environ.get(TOKEN_ENV, ""),
        help=f"require 'Authorization: Bearer TOKEN' on every request but the page itself (better: set"
        f" {TOKEN_ENV}, which `ps` does not show); the page reads it from the URL: /#token=TOKEN",
    )
    p.add_argument("--show_paths", action="store_true", help="show the checkpoint's absolute path in /health")
    args = p.parse_args(argv)
    if args.temperature < 0 or args.top_k < 1 or args.max_tokens < 1 or not 0 <= args.port <= 65535:
        p.error("--temperature must be >= 0, --top_k >= 1, --max_tokens >= 1 and --port in 0..65535")
    if args.max_queue < 0:
        p.error(f"--max_queue must be >= 0 (0: no request waits), got {args.max_queue}")
    if args.auth_token and not re.fullmatch(r"[\x21-\x7e]+", args.auth_token):
        p.error(f"--auth_token ({TOKEN_ENV}) must be printable ASCII without spaces: an HTTP header carries it")
    names = [host_name(h) for h in args.allowed_hosts.split(",") if h.strip()]
    if "" in names:
        p.error(f"--allowed_hosts takes names like myhost.lan,192.168.1.5, got {args.allowed_hosts!r}")
    own = [] if args.host in WILDCARDS else [host_name(args.host)]  # the address it listens on reaches it
    args.hosts = sorted({*LOCAL_HOSTS, *own, *names})
    return args


def exposure(args: argparse.Namespace) -> list[str]:
    """What the server exposes, and to whom, for the start-up message (never the token itself)."""
    hosts = ", ".join(args.hosts)
    if is_local(args.host):
        lines = [f"only this machine can connect; it answers to Host {hosts}"]
    else:
        who = "anyone holding the token" if args.auth_token else "anyone"
        lines = [f"--host {args.host} takes connections from the network: {who} who reaches port {args.port} can"
                 f" have the model write replies and read /health (model, step, config); it answers to Host {hosts}"
                 " (add the names clients use with --allowed_hosts)"]  # fmt: skip
        if not args.auth_token:
            lines.append(f"no token: set {TOKEN_ENV} to require 'Authorization: Bearer <token>'")
    if args.auth_token:
        where = "<this machine>" if args.host in WILDCARDS else host_name(args.host)
        lines.append(f"requests need the bearer token: open http://{where}:{args.port}/#token=<your token> (the"
                     " page keeps it out of the URL and sends it as a header)")  # fmt: skip
    return lines


def describe(directory: Path, model: GPT, meta: Meta, args: argparse.Namespace) -> dict:
    """What GET /health says about the model; the checkpoint's path only with --show_paths (it names the user's
    folders to whoever can read /health)."""
    info = {
        "model": directory.name,
        "phase": meta.phase,
        "step": meta.step,
        "model_config": meta.model_config,
        "parameters": model.num_params(),
        "device": str(model.wte.weight.device),
        "sampling": {"temperature": args.temperature, "top_k": args.top_k, "max_tokens": args.max_tokens},
    }
    return {**info, "directory": str(directory.resolve())} if args.show_paths else info


def texts(content: object) -> Iterator[str]:
    """The strings of a message's content: the content itself, or the text of each of its parts."""
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        yield from (p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))


def fewest_tokens(request: object, longest: int) -> int:
    """A lower bound on the prompt's length in tokens from its characters alone (a token stands for at most
    `longest` bytes, a character for at least one), with each turn's two special tokens and the prompt's own two:
    cheap enough for the event loop, so a message far too long for the context is refused before it is tokenized."""
    messages = request.get("messages") if isinstance(request, dict) else None
    messages = [m for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []
    chars = sum(len(text) for m in messages for text in texts(m.get("content")))
    turns = sum(m.get("role") in ("user", "assistant") for m in messages)
    return 2 + 2 * turns + -(-chars // longest)


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
        for text in texts(content):
            try:  # JSON may carry half of a UTF-16 pair ("\ud800"): no text, and the tokenizer cannot take it
                text.encode()
            except UnicodeEncodeError as e:
                raise ValueError(
                    f"message {i} holds a lone surrogate {text[e.start]!r}: send whole characters"
                ) from None
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


class Guard:
    """Checks every request before the app sees it. The Host must be one the server answers to: a page on another
    site whose name it rebinds to 127.0.0.1 (DNS rebinding) sends its own name, and must not read /health or the
    replies. With a token, everything but the page itself (static, it holds nothing) needs 'Authorization: Bearer
    <token>'. A POST must be application/json: a plain HTML form on another site cannot send that, and a script
    there must first ask (CORS preflight), which this server never grants."""

    def __init__(self, app: ASGIApp, hosts: list[str], token: str) -> None:
        self.app, self.hosts, self.token = app, set(hosts), token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self.refusal(scope) if scope["type"] == "http" else None
        if refusal is None:
            return await self.app(scope, receive, send)
        status, why, headers = refusal
        await JSONResponse({"error": why}, status, headers)(scope, receive, send)

    def refusal(self, scope: Scope) -> tuple[int, str, dict] | None:
        headers = {k.lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get(b"host", "")
        if host_name(host) not in self.hosts:
            return 400, (f"this server does not answer to Host {host!r}: open it as http://localhost:<port>/, or"
                         " start it with --allowed_hosts naming the host"), {}  # fmt: skip
        if self.token and scope["path"] != "/":
            scheme, _, given = headers.get(b"authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("latin-1"), self.token):
                return 401, ("this server needs its token: open the page as http://<host>:<port>/#token=<token>, or"
                             " send 'Authorization: Bearer <token>'"), {"WWW-Authenticate": "Bearer"}  # fmt: skip
        kind = headers.get(b"content-type", "").partition(";")[0].strip().lower()
        if scope["method"] == "POST" and kind != "application/json":
            return 415, f"send the request as JSON, with Content-Type: application/json (got {kind or 'none'!r})", {}
        return None


class Turns:
    """The model answers one request at a time, first come first served (an asyncio.Lock is fair); at most
    `waiting` more wait for their turn and the rest are turned away at once (HTTP 503), so a burst of requests
    gets quick refusals instead of a long wait each."""

    def __init__(self, waiting: int) -> None:
        self.places = waiting + 1  # the one being answered and those waiting
        self.taken = 0
        self.lock = asyncio.Lock()  # the model: held from a reply's turn to the end of the thread generating it
        self.reply_s = 1.0  # how long the last reply took: about when a place frees up, for Retry-After

    def admit(self) -> Ticket | None:
        """A place in the line, or None when the line is full."""
        if self.taken >= self.places:
            return None
        self.taken += 1
        return Ticket(self)


class Ticket:
    """A request's place in the line, given back once: when its reply's generation ends, or when the request
    ends first (the client left while waiting, or the response never started)."""

    def __init__(self, turns: Turns) -> None:
        self.turns = turns
        self.handed = False  # the thread generating the reply holds the model and this place: it gives both back
        self.held = True

    def leave(self) -> None:
        if self.held:
            self.held = False
            self.turns.taken -= 1

    def abandon(self) -> None:
        """The request is over: give the place back unless the generating thread holds it."""
        if not self.handed:
            self.leave()


def make_app(engine: Engine, args: argparse.Namespace, info: dict, page: str, stopping: threading.Event) -> FastAPI:
    """The web app: the page at /, the model's description at /health, replies at POST /chat. Once `stopping` is
    set, the replies being written end at their next token."""
    app = FastAPI(title="nanochat", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, hosts=args.hosts, token=args.auth_token)
    # One reply at a time: the model is shared, torch does not promise that one module's forward may run in
    # several threads at once, and parallel replies would only split the same cores (or GPU) while each holds a KV
    # cache of up to the full context.
    turns = Turns(args.max_queue)
    context = engine.model.config.sequence_len
    room = min(args.max_tokens, context // 4)  # the least a conversation must leave for the answer
    longest = int(engine.tokenizer.token_bytes().max())  # bytes in the longest token, for fewest_tokens
    on_gpu = engine.model.wte.weight.device.type == "cuda"

    def refuse(status: int, why: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": why}, status_code=status, headers=headers)

    def too_long(tokens: str) -> JSONResponse:
        return refuse(413, f"the conversation is {tokens} tokens; the model reads {context}, {room} of them kept for"
                           " the answer: shorten the message or start a new conversation")  # fmt: skip

    def generate(prompt: list[int], max_tokens: int, stop: threading.Event, put: Callable[[dict], None]) -> dict:
        """Write the reply's parts with put(); returns the last line. Runs in a thread of its own, so the event
        loop stays free; stop (or the server stopping) ends it at the next token."""
        if stopping.is_set():  # its turn came as the server stops: not worth a prefill
            return {"error": "the server is stopping: try again once it is back"}
        # autocast is per thread, so it is entered here
        autocast = torch.autocast("cuda", torch.bfloat16) if on_gpu else contextlib.nullcontext()
        try:
            with autocast:
                sampling = (args.temperature, args.top_k, args.seed, lambda: stop.is_set() or stopping.is_set())
                for part, kind, text in reply_parts(engine, prompt, max_tokens, *sampling):
                    put({"part": part, "type": kind, "text": text})
        except Exception as e:  # noqa: BLE001 - shown in the page; the server carries on
            return {"error": f"generation failed: {type(e).__name__}: {e}"}
        return {"error": "the server is stopping: this reply was cut short"} if stopping.is_set() else {"done": True}

    def work(prompt: list[int], max_tokens: int, stop: threading.Event, ticket: Ticket, events: asyncio.Queue) -> None:
        """Generate the reply in this thread (the event loop stays free), its lines into `events`; then, on the
        loop, give the model and the request's place back and add the last line."""
        loop, start = asyncio.get_running_loop(), time.monotonic()

        def ended(last: dict) -> None:
            turns.reply_s = time.monotonic() - start
            turns.lock.release()
            ticket.leave()
            events.put_nowait(last)

        def run() -> None:
            last = {"error": "generation failed"}
            try:
                last = generate(prompt, max_tokens, stop, lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is closed: the server is gone
                    loop.call_soon_threadsafe(ended, last)

        threading.Thread(target=run, name="chat_web-reply", daemon=True).start()

    async def lines(prompt: list[int], max_tokens: int, stop: threading.Event, ticket: Ticket) -> AsyncIterator[bytes]:
        """The reply as JSON lines, once it is this request's turn. A client that leaves while waiting is
        cancelled in the wait (Starlette listens for the disconnect), which gives its place back at once."""
        events: asyncio.Queue[dict] = asyncio.Queue()
        try:
            await turns.lock.acquire()
            try:
                work(prompt, max_tokens, stop, ticket, events)
            except BaseException:
                turns.lock.release()
                raise
            ticket.handed = True  # the thread gives the model and the place back when it ends
            while True:
                event = await events.get()
                yield (json.dumps(event) + "\n").encode()
                if "done" in event or "error" in event:
                    return
        finally:
            stop.set()
            ticket.abandon()

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
            conversation = json.loads(body)
        except RecursionError:
            return refuse(400, 'the JSON is nested too deeply: send {"messages": [{"role", "content"}]}')
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            return refuse(400, f"the request is not JSON: {e}")
        if (fewest := fewest_tokens(conversation, longest)) > context - room:
            return too_long(f"at least {fewest}")
        try:
            prompt = await run_in_threadpool(prompt_for, engine.tokenizer, conversation)
        except ValueError as e:
            return refuse(400, str(e))
        if len(prompt) > context - room:
            return too_long(str(len(prompt)))
        ticket = turns.admit()
        if ticket is None:
            retry = max(1, round(turns.reply_s))
            return refuse(503, f"the model is busy and {turns.places - 1} more requests wait for it (--max_queue):"
                               f" try again in {retry} s", {"Retry-After": str(retry)})  # fmt: skip
        # The body is an async iterator, so Starlette cancels it when the client leaves; the background task runs
        # once the response is over, finished or cut short, so a reply nobody reads stops at its next token, and a
        # place taken by a response that never started is given back.
        stop = threading.Event()
        body = lines(prompt, min(args.max_tokens, context - len(prompt)), stop, ticket)

        def over() -> None:
            stop.set()
            ticket.abandon()

        return StreamingResponse(body, media_type="application/x-ndjson", background=BackgroundTask(over))

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
    print(f"chat_web: {directory} step {meta.step} at http://{args.host}:{args.port}", file=sys.stderr)
    for line in exposure(args):
        print(f"chat_web: {line}", file=sys.stderr)
    stopping = threading.Event()
    app = make_app(engine, args, describe(directory, model, meta, args), page, stopping)
    server = Server(uvicorn.Config(app, args.host, args.port, log_level="info"), stopping)
    server.run()
    return 0 if server.started else 3  # uvicorn logged why it could not start (say, the port is taken)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
