"""Cloud preemption notices (supervisor/preempt.py) against a real HTTP server on 127.0.0.1 that answers as each
cloud's metadata service does (AWS IMDSv2's token handshake included): the three clients, the poller's error
handling, the DMI detection, the one-line refusal of a bad --preemption, and one supervised run stopped by an AWS
notice mid-run (save at the notice's step, the upload flushed, exit 75)."""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from nanochat.remote import open_remote
from supervisor import preempt
from tests.helpers import assert_usage_error, run_cli
from tests.supervised import Run, newest, supervisor_runs

VM = "spot-vm-7"  # this machine's name, as Azure's scheduled events list it


class Metadata(ThreadingHTTPServer):
    """Every cloud's metadata service in one: no notice until `notice` is set. It enforces each cloud's headers
    (a client that forgets one gets the cloud's error, not an answer) and AWS's tokens (`revoke()` expires them)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.notice: dict | None = None  # aws: the instance-action document; gcp: any; azure: the event
        self.failing = False  # answer 500 to everything (a metadata service having a bad moment)
        self.tokens: set[str] = set()
        self.token_requests = 0
        self.unauthorized = 0  # aws GETs refused for a missing or expired token
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def revoke(self) -> None:
        self.tokens.clear()


class _Handler(BaseHTTPRequestHandler):
    server: Metadata

    def log_message(self, *args) -> None:  # quiet: pytest shows stderr of failures only
        pass

    def _send(self, code: int, body: str = "", ctype: str = "text/plain") -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self) -> None:
        s = self.server
        if self.path != "/latest/api/token" or s.failing:
            return self._send(500 if s.failing else 404)
        ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
        if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
            return self._send(400)
        token = secrets.token_urlsafe(16)
        s.tokens.add(token)
        s.token_requests += 1
        self._send(200, token)

    def do_GET(self) -> None:
        s, path = self.server, self.path
        if s.failing:
            return self._send(500)
        if path == "/latest/meta-data/spot/instance-action":
            if self.headers.get("X-aws-ec2-metadata-token") not in s.tokens:
                s.unauthorized += 1
                return self._send(401)
            return self._send(200, json.dumps(s.notice), "text/plain") if s.notice else self._send(404)
        if path == "/computeMetadata/v1/instance/preempted":
            if self.headers.get("Metadata-Flavor") != "Google":
                return self._send(403)
            return self._send(200, "TRUE" if s.notice else "FALSE")
        if path.startswith("/metadata/"):
            if self.headers.get("Metadata") != "true" or "api-version=" not in path:
                return self._send(400)
            if path.startswith("/metadata/instance/compute/name?"):
                return self._send(200, VM)
            if path.startswith("/metadata/scheduledevents?"):
                doc = {"DocumentIncarnation": 2 if s.notice else 1, "Events": [s.notice] if s.notice else []}
                return self._send(200, json.dumps(doc), "application/json")
        self._send(404)


@pytest.fixture
def server() -> Iterator[Metadata]:
    s = Metadata()
    yield s
    s.shutdown()
    s.server_close()


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_aws_token_handshake_expiry_and_notice(server: Metadata):
    client = preempt.Client("aws", server.url)
    assert client.poll() is None and client.poll() is None
    assert server.token_requests == 1 and server.unauthorized == 0  # one token serves every poll while it lives
    server.revoke()  # the token expired on the service's side: a 401, a new token, the same answer
    assert client.poll() is None
    assert server.token_requests == 2 and server.unauthorized == 1
    when = int(time.time()) + 120
    server.notice = {"action": "stop", "time": _iso(when)}
    notice = client.poll()
    assert notice is not None and (notice.cloud, notice.action, notice.deadline) == ("aws", "stop", when)


def test_gcp_preempted_flag(server: Metadata):
    client = preempt.Client("gcp", server.url)
    assert client.poll() is None
    server.notice = {"preempted": True}  # any notice: the service answers TRUE
    notice = client.poll()
    assert notice is not None and notice.cloud == "gcp"
    assert notice.warning == preempt.DEFAULT_WARNING["gcp"]  # GCP's answer carries no deadline: its documented 30 s


def test_azure_scheduled_events_for_this_machine_only(server: Metadata):
    client = preempt.Client("azure", server.url)
    assert client.poll() is None
    when = int(time.time()) + 30
    event = {"EventId": "E1", "EventType": "Preempt", "ResourceType": "VirtualMachine", "EventStatus": "Scheduled",
             "NotBefore": format_datetime(datetime.fromtimestamp(when, timezone.utc), usegmt=True),
             "Description": "", "EventSource": "Platform", "DurationInSeconds": -1}  # fmt: skip
    server.notice = {**event, "Resources": ["another-vm"]}  # a scale set's events reach every machine in it
    assert client.poll() is None
    server.notice = {**event, "EventType": "Freeze", "Resources": [VM]}  # a pause, not the machine going
    assert client.poll() is None
    server.notice = {**event, "Resources": [VM]}
    notice = client.poll()
    assert notice is not None and (notice.cloud, notice.action, notice.deadline) == ("azure", "preempt", when)


def test_poller_says_an_outage_once_and_still_sees_the_notice(server: Metadata):
    said: list[str] = []
    got: list[preempt.Notice] = []
    server.failing = True
    poller = preempt.Poller(preempt.Client("gcp", server.url), got.append, said.append, every=0.02).start()
    try:
        deadline = time.monotonic() + 30
        while len(said) < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)  # several more failed polls: none of them may say it again
        assert len(said) == 1 and "cannot read the gcp metadata service" in said[0] and "HTTP 500" in said[0]
        server.failing, server.notice = False, {"preempted": True}
        while not got and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        poller.stop()
    assert [n.cloud for n in got] == ["gcp"] and poller.notice is got[0]
    assert said[1:] == ["preemption: the gcp metadata service answers again"]


@pytest.mark.parametrize(
    ("files", "cloud"),
    [
        ({"sys_vendor": "Amazon EC2", "product_name": "m7i.large"}, "aws"),
        ({"sys_vendor": "Xen", "bios_version": "4.11.amazon"}, "aws"),
        ({"sys_vendor": "Google", "product_name": "Google Compute Engine"}, "gcp"),
        ({"sys_vendor": "Microsoft Corporation", "chassis_asset_tag": preempt.AZURE_ASSET_TAG}, "azure"),
        ({"sys_vendor": "Microsoft Corporation", "chassis_asset_tag": "None"}, None),  # Hyper-V, not Azure
        ({"sys_vendor": "QEMU"}, None),
        ({}, None),
    ],
)
def test_detect_the_cloud_from_dmi(tmp_path: Path, files: dict[str, str], cloud: str | None):
    for name, text in files.items():
        (tmp_path / name).write_text(text + "\n")
    assert preempt.detect(tmp_path)[0] == cloud
    if cloud is None:  # auto on no cloud: nothing watched, and the log says so
        said: list[str] = []
        assert preempt.start("auto", None, lambda n: None, said.append, dmi_dir=tmp_path) is None
        assert len(said) == 1 and "no cloud detected" in said[0]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--preemption", "ec2"], "--preemption must be one of auto|aws|gcp|azure|off, got 'ec2'"),
        (["--preemption", "aws", "--preemption-endpoint", "https://x/latest"], "--preemption-endpoint must be"),
    ],
)
def test_bad_preemption_options_are_one_line(monkeypatch, capsys, tmp_path: Path, args: list[str], needle: str):
    code, _, err = run_cli(monkeypatch, capsys, "train", "--checkpoint-dir", str(tmp_path / "c"), *args)
    assert_usage_error(code, err, needle)


@pytest.fixture
def supervise(tmp_path: Path, env: dict[str, str]) -> Iterator[Callable[..., Run]]:
    yield from supervisor_runs(tmp_path, env)


@pytest.mark.slow
def test_an_aws_notice_mid_run_saves_uploads_and_exits_for_requeue(supervise, server: Metadata, tmp_path: Path):
    url = f"file://{tmp_path / 'remote'}"
    # 64 micro-batches a step: a step (~1 s, more on a loaded machine) outlasts the stop's delivery (a watch tick,
    # the ranks' agreement), so "the step of the notice" is one step, not a blur of tiny ones
    run = supervise("--preemption", "aws", "--preemption-endpoint", server.url, "--remote-dir", url, iters=100000,
                    save_every=100000, trainer=("--total_batch_size=16384",))  # fmt: skip
    run.wait_for_step(3)
    server.notice = {"action": "terminate", "time": _iso(time.time() + 120)}
    out = run.finish(75, timeout=120)
    notices = run.events("preemption_notice")
    assert len(notices) == 1 and notices[0]["cloud"] == "aws" and notices[0]["action"] == "terminate", out[-3000:]
    step = notices[0]["step"]
    ckpt = newest(run.ckpt)
    # the step the supervisor last saw (its view is up to a tick old), or the one in flight, or on a loaded machine
    # the next: the trainer saves at the end of the step in which the stop reaches it
    assert step <= ckpt.step <= step + 2, (step, ckpt.step)
    assert f"stopped by SIGTERM at step {ckpt.step}" in run.attempt_log(1)
    assert ckpt.meta["stop_reason"] == "signal:SIGTERM" and not ckpt.final
    assert ckpt.step in [s for s, _ in open_remote(url).committed()]  # the upload was flushed before the exit
    saved = run.events("preemption_saved")
    assert len(saved) == 1 and saved[0]["checkpoint_step"] == ckpt.step and saved[0]["remote_step"] == ckpt.step
    assert abs(saved[0]["seconds"] + saved[0]["seconds_to_spare"] - notices[0]["seconds_left"]) <= 0.2
    assert run.classes() == ["stopped"] and run.events("run_end")[-1]["exit_code"] == 75
    assert "preemption: aws (--preemption); watching" in out
    assert f"preemption notice from aws (terminate) at step {step}" in out
    assert "preemption: stopped and saved in" in out and server.token_requests >= 1
