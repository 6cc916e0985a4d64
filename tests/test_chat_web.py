"""scripts/chat_web.py: the HTTP API of a real server on a tiny random checkpoint, and its page in headless Chromium.

The checkpoint is a random model saved with nanochat.checkpoint (no training): greedy replies are deterministic, and
with the special tokens' logits zeroed every reply runs to --max_tokens, so there is always text to compare. The
line of waiting requests is tested on the app served in this process by a real uvicorn, with a model (or a
tokenizer) that waits at a gate the test opens: the test decides when a reply may go on.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import uvicorn

from nanochat import checkpoint
from nanochat.engine import Engine, load_checkpoint_model
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer, tokenizer_dir
from scripts.chat_web import describe, exposure, make_app, parse, prompt_for, reply_parts
from tests.helpers import ScriptedGPT, random_model, without_specials
from tests.runs import REPO_ROOT, kill_group, port_from_log

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
STEP = 7
CONTEXT = 128
MAX_TOKENS = 16
HELLO = [{"role": "user", "content": "Hello there, how are you?"}]
TOKEN = "s3cret-T0ken"  # the module's server wants it as a bearer token
BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Path:
    """A valid checkpoint of a tiny random model, written the way the trainer's saver commits one."""
    model = without_specials(random_model(tokenizer.vocab_size, seq=CONTEXT), tokenizer)
    directory = tmp_path_factory.mktemp("chat_web") / "ckpt"
    directory.mkdir()
    meta = {"model_config": model.config.to_dict(), "phase": "chat_sft"}
    checkpoint.write(directory, STEP, model.state_dict(), {}, meta)
    checkpoint.mark_latest(directory, STEP)
    return directory


@pytest.fixture(scope="module")
def server_env(base_dir: Path) -> dict[str, str]:
    return {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def server_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chat_web_log") / "server.log"


@pytest.fixture(scope="module")
def server(ckpt: Path, server_env: dict, server_log: Path) -> Iterator[str]:
    """The real server in a session of its own, greedy, with a token; yields its URL once /health answers."""
    cmd = [sys.executable, "-m", "scripts.chat_web", "--checkpoint_dir", str(ckpt), "--device_type=cpu",
           "--port", "0", "--temperature", "0", "--max_tokens", str(MAX_TOKENS), "--max_queue", "8",
           "--allowed_hosts", "nanochat.test"]  # fmt: skip
    with open(server_log, "w") as out:  # port 0: the kernel picks a free port, uvicorn's log names it
        proc = subprocess.Popen(cmd, env={**server_env, "NANOCHAT_WEB_TOKEN": TOKEN}, cwd=REPO_ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        port = port_from_log(server_log, proc, r"Uvicorn running on http://127\.0\.0\.1:(\d+)", timeout=120)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"chat_web exited with {proc.returncode}:\n{server_log.read_text()}")
            try:
                urllib.request.urlopen(url + "/", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"chat_web did not answer within 60 s:\n{server_log.read_text()}")
                time.sleep(0.1)
        yield url
    finally:
        kill_group(proc)


def fetch(url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """(HTTP status, headers, body) of a GET (or a POST of body), with the bearer token unless headers say."""
    kind = {"Content-Type": "application/json"} if body is not None else {}
    request = urllib.request.Request(url, data=body, headers={**BEARER, **kind, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def get_json(url: str) -> dict:
    status, _, body = fetch(url)
    assert status == 200, body
    return json.loads(body)


def post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, list[dict]]:
    """(HTTP status, the JSON lines of the answer)."""
    status, _, answer = fetch(url + "/chat", body, headers)
    return status, [json.loads(line) for line in answer.splitlines()]


def ask(text: str) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": text}]}).encode()


def chat(url: str, messages: list[dict]) -> str:
    """The streamed reply's text; the stream must end with {"done": true}."""
    status, events = post(url, json.dumps({"messages": messages}).encode())
    assert status == 200 and events[-1] == {"done": True}, events
    assert all(e["type"] == "text" for e in events[:-1])  # this model never calls the calculator
    return "".join(e["text"] for e in events[:-1])


def engine_reply(ckpt: Path, tokenizer: Tokenizer, messages: list[dict]) -> str:
    """What a greedy Engine generates on the same checkpoint, in this process."""
    model, _ = load_checkpoint_model(ckpt)
    prompt = tokenizer.render_for_completion({"messages": messages})
    completions, _ = Engine(model, tokenizer).generate_batch(prompt, max_tokens=MAX_TOKENS, temperature=0)
    assert len(completions[0]) == MAX_TOKENS
    return tokenizer.decode(completions[0])


# ---- the HTTP API ----------------------------------------------------------------------------------------------


def test_health_describes_the_checkpoint(server: str, ckpt: Path):
    info = get_json(server + "/health")
    assert (info["step"], info["phase"], info["model"]) == (STEP, "chat_sft", ckpt.name)
    assert info["model_config"]["sequence_len"] == CONTEXT
    assert info["sampling"] == {"temperature": 0.0, "top_k": 50, "max_tokens": MAX_TOKENS}
    # whoever reads /health learns nothing of the user's folders, unless the server is started to tell
    assert "directory" not in info and str(ckpt.parent) not in json.dumps(info)
    model, meta = load_checkpoint_model(ckpt)
    assert describe(ckpt, model, meta, parse(["--show_paths"]))["directory"] == str(ckpt.resolve())


SECOND_TURN = [*HELLO, {"role": "assistant", "content": "Fine."}, {"role": "user", "content": "And now?"}]


@pytest.mark.parametrize("messages", [HELLO, SECOND_TURN], ids=["first turn", "second turn"])
def test_greedy_reply_streams_what_the_engine_generates(server: str, ckpt: Path, tokenizer: Tokenizer, messages):
    status, events = post(server, json.dumps({"messages": messages}).encode())
    assert status == 200
    assert len(events) > 3  # streamed piece by piece, not in one block
    assert "".join(e.get("text", "") for e in events) == engine_reply(ckpt, tokenizer, messages)


def test_concurrent_requests_each_get_their_own_reply(server: str):
    conversations = [[{"role": "user", "content": f"Tell me about {topic}."}] for topic in ("cats", "the sea", "x")]
    alone = [chat(server, c) for c in conversations]
    assert len(set(alone)) == len(alone)  # different prompts, different replies: a mix-up would show
    with ThreadPoolExecutor(len(conversations) * 2) as pool:
        together = list(pool.map(lambda c: chat(server, c), conversations * 2))
    assert together == alone * 2


BAD_REQUESTS = {  # name: (body, HTTP status, what the error says)
    "too long": ({"messages": [{"role": "user", "content": "word " * 300}]}, 413, "start a new conversation"),
    "empty": ({"messages": [{"role": "user", "content": "  "}]}, 400, "message 0 is empty"),
    "bad role": ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "unknown role 'robot'"),
    "bad order": ({"messages": [{"role": "user", "content": "hi"}] * 2}, 400, "the assistant should speak next"),
    "ends with the assistant": ({"messages": SECOND_TURN[:2]}, 400, "last message must be the user's"),
    "no messages": ({"messages": []}, 400, "non-empty list"),
    "no list": ({"text": "hi"}, 400, "non-empty list"),
    "not json": (b"{not json", 400, "Expecting property name"),
    "huge body": (b"x" * ((1 << 20) + 1), 413, "over 1 MiB"),
    # a megabyte of text is refused from its length alone, before the tokenizer holds up the server for seconds
    "a megabyte": ({"messages": [{"role": "user", "content": "word " * 200_000}]}, 413, "the conversation is at least"),
    "lone surrogate": (b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}', 400, "lone surrogate '\\ud800'"),
    "lone surrogate in a part": ({"messages": [*HELLO, {"role": "assistant", "content": [{"type": "text",
                                  "text": "\udfff"}]}, *HELLO]}, 400, "message 1 holds a lone surrogate"),
    "nested too deeply": (b"[" * 100_000, 400, "nested too deeply"),
    "messages nested too deeply": (b'{"messages": ' + b"[" * 100_000, 400, "nested too deeply"),
}  # fmt: skip


@pytest.mark.parametrize("body, status, says", list(BAD_REQUESTS.values()), ids=list(BAD_REQUESTS))
def test_bad_requests_get_a_clear_json_error(server: str, server_log: Path, body, status: int, says: str):
    got, events = post(server, body if isinstance(body, bytes) else json.dumps(body).encode())
    assert got == status
    assert len(events) == 1 and says in events[0]["error"] and "\n" not in events[0]["error"], events
    assert chat(server, HELLO)  # and the server carries on
    assert "Traceback" not in server_log.read_text()


# ---- who may use the server -----------------------------------------------------------------------------------


def test_other_host_names_are_refused(server: str):
    """A page whose own name resolves to 127.0.0.1 (DNS rebinding) sends that name: it reads nothing."""
    port = server.rsplit(":", 1)[1]
    for path, body in [("/", None), ("/health", None), ("/chat", ask("hi"))]:
        for host in ["evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}"]:
            status, _, answer = fetch(server + path, body, {"Host": host})
            assert status == 400 and f"does not answer to Host {host!r}" in json.loads(answer)["error"], answer
        for host in [f"localhost:{port}", "LOCALHOST", f"[::1]:{port}", "nanochat.test"]:  # --allowed_hosts adds one
            assert fetch(server + path, body, {"Host": host})[0] == 200, host


def test_a_post_must_be_json(server: str):
    """A plain HTML form on another site can post text/plain or form data (no CORS preflight): both are refused."""
    for kind in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"]:
        status, events = post(server, json.dumps({"messages": HELLO}).encode(), {"Content-Type": kind})
        assert status == 415 and "Content-Type: application/json" in events[0]["error"], events
    assert post(server, ask("hi"), {"Content-Type": "application/json; charset=utf-8"})[0] == 200


def test_the_token_is_needed_and_never_logged(server: str, server_log: Path):
    for headers in [{"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                    {"Authorization": f"Basic {TOKEN}"}]:  # fmt: skip
        for path, body in [("/health", None), ("/chat", ask("hi"))]:
            status, answer_headers, answer = fetch(server + path, body, headers)
            assert status == 401 and "needs its token" in json.loads(answer)["error"], answer
            assert answer_headers["www-authenticate"] == "Bearer"
    status, _, page = fetch(server + "/", None, {"Authorization": ""})  # the page itself holds nothing
    assert status == 200 and b"<title>nanochat</title>" in page
    assert fetch(server + "/health")[0] == 200 and chat(server, HELLO)
    log = server_log.read_text()
    assert "chat_web: requests need the bearer token: open http://127.0.0.1:" in log
    assert "only this machine can connect" in log
    assert TOKEN not in log, log


def test_start_up_says_what_is_exposed():
    anyone = exposure(parse(["--host", "0.0.0.0", "--port", "8080"]))
    assert "0.0.0.0 takes connections from the network: anyone who reaches port 8080 can" in anyone[0]
    assert "no token: set NANOCHAT_WEB_TOKEN" in anyone[1]
    with_token = exposure(parse(["--host", "0.0.0.0", "--auth_token", TOKEN, "--allowed_hosts", "box.lan:8080"]))
    assert "anyone holding the token" in with_token[0] and "box.lan" in with_token[0]
    assert "open http://<this machine>:8000/#token=<your token>" in with_token[1]
    assert TOKEN not in "".join(with_token)


@pytest.mark.parametrize("flags, says", [
    (["--max_queue", "-1"], "--max_queue must be >= 0"),
    (["--auth_token", "two words"], "printable ASCII without spaces"),
    (["--allowed_hosts", ":80"], "--allowed_hosts takes names like"),
])  # fmt: skip
def test_bad_flags_are_refused(flags: list[str], says: str, capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as e:
        parse(flags)
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_startup_errors_are_one_line(tmp_path: Path, server_env: dict):
    """No checkpoint dir; no model of the phase asked for: one line on stderr, exit 2, no traceback."""
    cases = [["--checkpoint_dir", str(tmp_path / "missing")], ["--phase", "mid"]]
    procs = [subprocess.Popen([sys.executable, "-m", "scripts.chat_web", *args, "--device_type=cpu",
                               "--port", "0"], env=server_env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args in cases]  # fmt: skip
    for proc, says in zip(procs, ["has no valid checkpoint", "no model in"]):
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, (out, err)
        assert err.count("\n") == 1 and err.startswith("chat_web: error: ") and says in err, err
        assert "Traceback" not in out + err


def test_calculator_calls_are_parts_of_their_own(tokenizer: Tokenizer):
    sid, enc = tokenizer.special_id, tokenizer.encode
    forced = [sid("<|output_start|>"), *enc("36"), sid("<|output_end|>")]  # what the engine writes in
    script = [*enc("Let me see: "), sid("<|python_start|>"), *enc("12*3"), sid("<|python_end|>"),
              *enc("x") * len(forced), *enc(" so 36, café."), sid("<|assistant_end|>")]  # fmt: skip
    engine = Engine(ScriptedGPT(tokenizer.vocab_size, [script]), tokenizer)
    parts: dict[int, tuple[str, str]] = {}
    for part, kind, text in reply_parts(engine, [tokenizer.bos_id], 100, 1.0, 3, 0):
        parts[part] = (kind, parts.get(part, (kind, ""))[1] + text)
    assert list(parts.values()) == [("text", "Let me see: "), ("python", "12*3"), ("python_output", "36"),
                                    ("text", " so 36, café.")]  # fmt: skip


# ---- the line of waiting requests, on the app served in this process ------------------------------------------


class GatedGPT(GPT):
    """A tiny random model whose every forward pass waits for `gate`; `prompts` records what each reply was
    asked (its prefill), so a test sees which requests reached the model."""

    def __init__(self, vocab: int):
        super().__init__(GPTConfig.from_depth(1, vocab, CONTEXT, head_dim=32))
        self.init_weights(0)
        self.eval()
        self.gate, self.prompts = threading.Event(), []

    def forward(self, idx, targets=None, reduction="mean", kv_cache=None):
        if idx.size(1) > 1:
            self.prompts.append(idx[0].tolist())
        assert self.gate.wait(60), "the test never opened the gate"
        return super().forward(idx, targets, reduction, kv_cache=kv_cache)


class GatedTokenizer(Tokenizer):
    """The test tokenizer, but encoding a text that contains "[hold]" waits for `gate`."""

    def __init__(self, hf):
        super().__init__(hf)
        self.gate, self.holding = threading.Event(), threading.Event()

    def encode(self, text: str) -> list[int]:
        if "[hold]" in text:
            self.holding.set()
            assert self.gate.wait(60), "the test never opened the gate"
        return super().encode(text)


@contextlib.contextmanager
def serving(engine: Engine, *flags: str) -> Iterator[str]:
    """make_app's app for `engine` under a real uvicorn in a thread, on a port the OS picks; yields its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    stopping = threading.Event()
    app = make_app(engine, parse(["--temperature", "0", *flags]), {"model": "gated"}, "", stopping)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        stopping.set()
        server.should_exit = True
        thread.join(30)
        sock.close()


def wait_for(condition, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.01)


def open_reply(url: str, body: bytes) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """POST /chat and read the answer's status and headers only; the reply is read (or left) by the caller."""
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
    conn.request("POST", "/chat", body, {"Content-Type": "application/json"})
    return conn, conn.getresponse()


def close(conn: http.client.HTTPConnection, response: http.client.HTTPResponse) -> None:
    response.close()
    conn.close()


def lines_of(response: http.client.HTTPResponse) -> list[dict]:
    return [json.loads(line) for line in response.read().splitlines()]


def test_a_full_line_is_refused_at_once_with_retry_after(tokenizer: Tokenizer):
    model = GatedGPT(tokenizer.vocab_size)
    with serving(Engine(model, tokenizer), "--max_queue", "1") as url, ThreadPoolExecutor(1) as pool:
        try:
            first = pool.submit(post, url, ask("first"))
            wait_for(lambda: len(model.prompts) == 1, "the first reply to reach the model")
            conn, second = open_reply(url, ask("second"))  # the one place in the line
            assert second.status == 200
            status, headers, answer = fetch(url + "/chat", ask("third"))
            assert status == 503 and "--max_queue" in json.loads(answer)["error"], answer
            assert int(headers["retry-after"]) >= 1
            assert len(model.prompts) == 1
        finally:
            model.gate.set()
        assert first.result()[1][-1] == {"done": True}
        assert lines_of(second)[-1] == {"done": True}  # the one waiting got its turn
        close(conn, second)
    assert model.prompts == [prompt_for(tokenizer, json.loads(ask(text))) for text in ("first", "second")]


def test_a_client_that_leaves_the_line_frees_its_place_at_once(tokenizer: Tokenizer):
    model = GatedGPT(tokenizer.vocab_size)
    with serving(Engine(model, tokenizer), "--max_queue", "1") as url, ThreadPoolExecutor(1) as pool:
        try:
            first = pool.submit(post, url, ask("first"))
            wait_for(lambda: len(model.prompts) == 1, "the first reply to reach the model")
            conn, second = open_reply(url, ask("second"))
            assert second.status == 200 and fetch(url + "/chat", ask("third"))[0] == 503  # the line is full ...
            close(conn, second)  # ... until the second client goes, while the model still writes the first reply
            tries, deadline = [], time.monotonic() + 30
            while not tries or tries[-1][1].status == 503:
                assert time.monotonic() < deadline, "the place of the client that left was not given back"
                tries.append(open_reply(url, ask("third")))
                time.sleep(0.01)
            conn, third = tries.pop()
            for c, r in tries:
                close(c, r)
        finally:
            model.gate.set()
        assert first.result()[1][-1] == {"done": True} and lines_of(third)[-1] == {"done": True}
        close(conn, third)
    # the second request never reached the model
    assert model.prompts == [prompt_for(tokenizer, json.loads(ask(text))) for text in ("first", "third")]


def test_tokenizing_leaves_the_server_free(base_dir: Path, tokenizer: Tokenizer):
    slow = GatedTokenizer.load(tokenizer_dir(base_dir))
    model = without_specials(random_model(tokenizer.vocab_size, seq=CONTEXT), tokenizer)
    with serving(Engine(model, slow)) as url, ThreadPoolExecutor(1) as pool:
        try:
            held = pool.submit(post, url, ask("[hold] a message still being tokenized"))
            assert slow.holding.wait(30)
            start = time.monotonic()
            with urllib.request.urlopen(url + "/health", timeout=10) as r:
                assert json.loads(r.read()) == {"model": "gated"}
            assert time.monotonic() - start < 5
        finally:
            slow.gate.set()
        status, events = held.result()
        assert status == 200 and events[-1] == {"done": True}


# ---- the page, in a real browser --------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_page_in_chromium(server: str, tmp_path: Path):
    if not Path(CHROMIUM).exists():
        # CI installs it (.ci/run) and sets NANOCHAT_REQUIRE_BROWSER: there a missing browser fails, never skips
        missing = pytest.fail if os.environ.get("NANOCHAT_REQUIRE_BROWSER") else pytest.skip
        missing(f"no {CHROMIUM}: install Debian's chromium (`make chromium`, or apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    expect = sync_api.expect
    first = chat(server, HELLO)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{server}/#token={TOKEN}")  # as chat_web's start-up message says
            expect(page.locator("#model")).to_contain_text(f"step {STEP}")
            expect(page.locator("#model")).to_contain_text("chat_sft")
            assert TOKEN not in page.url  # taken out of the address bar and history

            page.fill("#input", HELLO[0]["content"])
            page.press("#input", "Enter")
            reply = page.locator(".assistant[data-done]")
            expect(reply).to_have_count(1)
            assert page.locator(".user").text_content() == HELLO[0]["content"]
            assert reply.text_content() == first and first

            # the second turn sends the whole conversation, the first reply included
            page.fill("#input", "And now?")
            page.click("#send")
            expect(reply).to_have_count(2)
            second = [*HELLO, {"role": "assistant", "content": first}, {"role": "user", "content": "And now?"}]
            assert reply.nth(1).text_content() == chat(server, second)
            page.screenshot(path=str(tmp_path / "chat_web.png"))

            page.click("#new")
            expect(page.locator("#log .msg")).to_have_count(0)

            page.fill("#input", "word " * 300)
            page.click("#send")
            expect(page.locator("#error")).to_contain_text("start a new conversation")
            expect(page.locator("#log .msg")).to_have_count(0)  # the refused message is taken back ...
            expect(page.locator("#input")).to_have_value("word " * 300)  # ... into the box, to be shortened
            page.screenshot(path=str(tmp_path / "chat_web_error.png"))
        finally:
            browser.close()
    assert (tmp_path / "chat_web.png").stat().st_size > 0
