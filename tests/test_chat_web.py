"""scripts/chat_web.py: the HTTP API of a real server on a tiny random checkpoint, and its page in headless Chromium.

The checkpoint is a random model saved with nanochat.checkpoint (no training): greedy replies are deterministic, and
with the special tokens' logits zeroed every reply runs to --max_tokens, so there is always text to compare.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from nanochat import checkpoint
from nanochat.engine import Engine, load_checkpoint_model
from nanochat.tokenizer import Tokenizer
from scripts.chat_web import reply_parts
from tests.runs import REPO_ROOT, kill_group, port_from_log
from tests.test_engine import ScriptedGPT, random_model, without_specials

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
STEP = 7
CONTEXT = 128
MAX_TOKENS = 16
HELLO = [{"role": "user", "content": "Hello there, how are you?"}]


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
def server(ckpt: Path, server_env: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real server in a session of its own, greedy; yields its URL once /health answers."""
    log = tmp_path_factory.mktemp("chat_web_log") / "server.log"
    cmd = [sys.executable, "-m", "scripts.chat_web", "--checkpoint_dir", str(ckpt), "--device_type=cpu",
           "--port", "0", "--temperature", "0", "--max_tokens", str(MAX_TOKENS)]  # fmt: skip
    with open(log, "w") as out:  # port 0: the kernel picks a free port, uvicorn's log names it
        proc = subprocess.Popen(cmd, env=server_env, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        port = port_from_log(log, proc, r"Uvicorn running on http://127\.0\.0\.1:(\d+)", timeout=120)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"chat_web exited with {proc.returncode}:\n{log.read_text()}")
            try:
                urllib.request.urlopen(url + "/health", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"chat_web did not answer within 60 s:\n{log.read_text()}")
                time.sleep(0.1)
        yield url
    finally:
        kill_group(proc)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def post(url: str, body: bytes) -> tuple[int, list[dict]]:
    """(HTTP status, the JSON lines of the answer)."""
    request = urllib.request.Request(url + "/chat", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, [json.loads(line) for line in r]
    except urllib.error.HTTPError as e:
        return e.code, [json.loads(e.read())]


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
}


@pytest.mark.parametrize("body, status, says", list(BAD_REQUESTS.values()), ids=list(BAD_REQUESTS))
def test_bad_requests_get_a_clear_json_error(server: str, body, status: int, says: str):
    got, events = post(server, body if isinstance(body, bytes) else json.dumps(body).encode())
    assert got == status
    assert len(events) == 1 and says in events[0]["error"], events
    assert chat(server, HELLO)  # and the server carries on


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
            page.goto(server)
            expect(page.locator("#model")).to_contain_text(f"step {STEP}")
            expect(page.locator("#model")).to_contain_text("chat_sft")

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
