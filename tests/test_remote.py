"""Remote copies (--remote_dir) against a real S3 API on localhost (moto in server mode, s3fs as the client) and a
file:// remote: uploads in commit order, restore on a fresh machine bit-identical, a SIGKILL mid-upload leaves no
half checkpoint, an endpoint that is down only warns (once) and is caught up later, retention."""

from __future__ import annotations

import http.client
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import fsspec
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem

from nanochat import checkpoint, compress, node_dirs, remote
from nanochat.checkpoint import LATEST, RUN_ID, CheckpointError, StorageError
from nanochat.common import DistInfo
from nanochat.remote import open_remote
from tests.runs import (
    Trainer,
    assert_finished,
    assert_identical,
    assert_same_final_state,
    kill_group,
    one_line_error,
    port_from_log,
    train,
)
from tests.supervised import Run, cli, train_cmd


def s3_env(env: dict, port: int) -> dict:
    return {**env, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}  # fmt: skip


def start_moto(log_path: Path, **env: str) -> tuple[subprocess.Popen, int]:
    """A moto S3 server on 127.0.0.1 (the process, its port); `env` configures it (e.g. to check credentials)."""
    pytest.importorskip("moto", reason="moto[server] is not installed (pip install -e '.[test]')")
    with open(log_path, "w") as log:  # port 0: the kernel picks a free one, the server's log names it
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"], stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, **env})  # fmt: skip
    port = port_from_log(log_path, proc, r"Running on http://127\.0\.0\.1:(\d+)")
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("the moto server did not start")
            time.sleep(0.2)


@pytest.fixture(scope="session")
def s3(tmp_path_factory) -> int:
    """A moto S3 server on 127.0.0.1 (the port), with a bucket `ckpts`."""
    proc, port = start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3_env({}, port).items():
            mp.setenv(key, value)
        open_remote("s3://ckpts").fs.mkdir("ckpts")
        yield port
    proc.terminate()
    proc.wait(10)


def remote_steps(url: str) -> list[int]:
    return sorted(step for step, _ in open_remote(url).committed())


@pytest.mark.slow
def test_a_fresh_machine_resumes_from_the_s3_copy_bit_identical(tmp_path, menv, s3, reference_1):
    env, url = s3_env(menv, s3), "s3://ckpts/fresh-machine"
    d = tmp_path / "ckpt"
    t = Trainer(env, d, f"--remote_dir={url}", "--debug_fault=hang@step:10")  # the upload of 8 runs meanwhile
    t.wait_for(r"uploaded step 8 to s3://ckpts/fresh-machine")
    kill_group(t.proc)  # the machine dies
    assert remote_steps(url) == [4, 8]
    shutil.rmtree(d)  # the machine is gone
    proc = train(env, d, f"--remote_dir={url}")
    assert "the remote s3://ckpts/fresh-machine has step 8, newer than the local nothing" in proc.stdout
    assert "resumed from step 8" in proc.stdout
    assert_finished(proc, d)
    assert_same_final_state(d, reference_1[0])
    assert remote_steps(url) == [4, 8, 12] and "remote: step 12 is in s3://ckpts/fresh-machine" in proc.stdout
    meta = open_remote(url).meta(12)
    assert meta["final"] and meta["files"] == checkpoint.inspect(d, 12).meta["files"]


@pytest.mark.slow
def test_a_fresh_machine_resumes_from_a_compressed_copy_bit_identical(tmp_path, menv, reference_1):
    """--compress=auto compresses when there is a remote: the files there (and here) are zstd; resume is exact."""
    url, d = f"file://{tmp_path / 'remote'}", tmp_path / "ckpt"
    t = Trainer(menv, d, f"--remote_dir={url}", "--debug_fault=hang@step:10")
    t.wait_for(r"uploaded step 8 to file://")
    kill_group(t.proc)
    meta = open_remote(url).meta(8)
    assert {f["codec"] for f in meta["files"].values()} == {"zstd"}
    assert all(f["size"] < f["raw_size"] for f in meta["files"].values())
    shutil.rmtree(d)
    proc = train(menv, d, f"--remote_dir={url}")
    assert "resumed from step 8" in proc.stdout
    assert_finished(proc, d)
    want = reference_1[0]
    for kind in ("model", "optim"):
        got = compress.load(d / checkpoint.file_name(kind, 12))
        assert_identical(got, torch.load(want / checkpoint.file_name(kind, 12), weights_only=True), kind)


@pytest.mark.slow
def test_a_sigkill_mid_upload_leaves_no_remote_checkpoint_and_the_next_run_uploads_it(tmp_path, menv):
    url = f"file://{tmp_path / 'remote'}"
    d = tmp_path / "ckpt"
    killed = train(menv, d, f"--remote_dir={url}", "--debug_fault=sigkill@upload:optim", "--num_iterations=4")
    assert killed.returncode == -9 and "debug_fault: sigkill at upload phase optim" in killed.stdout
    on_remote = sorted(p.name for p in (tmp_path / "remote").iterdir())
    assert on_remote == ["model_000004.pt", "optim_000004.pt"] and remote_steps(url) == []  # payload, no meta
    again = train(menv, d, f"--remote_dir={url}", "--num_iterations=4")
    assert again.returncode == 0 and "resumed from step 4" in again.stdout, again.stdout + again.stderr
    assert "uploaded step 4" in again.stdout and remote_steps(url) == [4]


@pytest.mark.slow
def test_an_endpoint_that_is_down_warns_once_and_is_caught_up_later(tmp_path, menv, s3, refused_port):
    down = {**s3_env(menv, refused_port), "AWS_MAX_ATTEMPTS": "1"}  # nothing listens there; botocore tries once
    url, d = "s3://ckpts/was-down", tmp_path / "ckpt"
    proc = train(down, d, f"--remote_dir={url}", "--remote_flush_timeout=3")
    assert_finished(proc, d)
    warnings = [line for line in proc.stderr.splitlines() if "uploading step" in line]
    assert len(warnings) == 1 and "retrying in the background, training goes on" in warnings[0], proc.stderr
    assert "remote: step 12 is not in s3://ckpts/was-down after --remote_flush_timeout=3s" in proc.stderr
    proc = train(s3_env(menv, s3), d, f"--remote_dir={url}")  # back up: the finished run's copy catches up
    assert proc.returncode == 0 and "uploaded step 12" in proc.stdout, proc.stdout + proc.stderr
    assert remote_steps(url) == [12]


class Throttle(http.server.ThreadingHTTPServer):
    """An HTTP proxy to the moto server on 127.0.0.1 that answers the first `n` uploads (PUT/POST) with S3's
    throttling error (503 SlowDown), as a busy bucket does, and passes everything else through."""

    def __init__(self, upstream: int, n: int):
        self.upstream, self.left, self.throttled = upstream, n, 0
        super().__init__(("127.0.0.1", 0), _ThrottleHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _ThrottleHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _handle(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        server: Throttle = self.server  # type: ignore[assignment]
        if self.command in ("PUT", "POST") and server.left > 0:
            server.left, server.throttled = server.left - 1, server.throttled + 1
            error = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(error)))
            self.end_headers()
            self.wfile.write(error)
            return
        upstream = http.client.HTTPConnection("127.0.0.1", server.upstream, timeout=60)
        upstream.request(self.command, self.path, body, dict(self.headers))
        reply = upstream.getresponse()
        data = reply.read()
        self.send_response(reply.status)
        for key, value in reply.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        upstream.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

    def log_message(self, *args) -> None:
        pass


@pytest.mark.slow
def test_wrong_credentials_and_a_missing_bucket_warn_once_and_the_run_completes_locally(tmp_path, menv, s3):
    proc = train({**s3_env(menv, s3), "AWS_MAX_ATTEMPTS": "1"}, tmp_path / "a", "--remote_dir=s3://no-such-bucket/run",
                 "--remote_flush_timeout=2")  # fmt: skip
    assert_finished(proc, tmp_path / "a")
    warnings = [line for line in proc.stderr.splitlines() if "uploading step" in line]
    assert len(warnings) == 1 and "The specified bucket does not exist" in warnings[0], proc.stderr
    assert "no-such-bucket" not in open_remote("s3://ckpts").fs.ls("")  # never created by us
    server, port = start_moto(tmp_path / "moto-auth.log", INITIAL_NO_AUTH_ACTION_COUNT="0")  # checks credentials
    try:
        env = {**s3_env(menv, port), "AWS_MAX_ATTEMPTS": "1"}
        proc = train(env, tmp_path / "b", "--remote_dir=s3://ckpts/run", "--remote_flush_timeout=2")
    finally:
        server.kill()
    assert_finished(proc, tmp_path / "b")
    warnings = [line for line in proc.stderr.splitlines() if "uploading step" in line]
    assert len(warnings) == 1 and "Access Key Id you provided does not exist" in warnings[0], proc.stderr
    assert "remote: step 12 is not in s3://ckpts/run after --remote_flush_timeout=2s" in proc.stderr


@pytest.mark.slow
def test_a_throttling_bucket_warns_once_and_the_uploads_catch_up(tmp_path, menv, s3):
    proxy = Throttle(s3, n=12)  # s3fs itself retries SlowDown 5 times: the uploader sees two failed tries
    try:
        env = {**s3_env(menv, proxy.server_address[1]), "AWS_MAX_ATTEMPTS": "1"}
        url, d = "s3://ckpts/throttled", tmp_path / "ckpt"
        proc = train(env, d, f"--remote_dir={url}", "--remote_flush_timeout=120")
    finally:
        proxy.shutdown()
    assert_finished(proc, d)
    assert proxy.throttled == 12
    warnings = [line for line in proc.stderr.splitlines() if "uploading step" in line]
    assert len(warnings) == 1 and "reduce your request rate" in warnings[0], proc.stderr
    assert "retrying in the background, training goes on" in warnings[0]
    assert "the remote s3://ckpts/throttled works again" in proc.stdout, proc.stdout
    assert 12 in remote_steps(url) and "remote: step 12 is in s3://ckpts/throttled" in proc.stdout


@pytest.mark.slow
def test_a_full_remote_warns_once_the_summary_and_status_show_the_lag_and_push_catches_up(tmp_path, menv, small_fs):
    """The supervisor's view: a file:// remote on a filesystem that is full. The run completes locally; its
    end-of-run summary and `status` say how far the remote lags and why; once there is room, push sends the rest."""
    remote = small_fs("64k")
    url, d = f"file://{remote}", tmp_path / "ckpt"
    run = Run(train_cmd(d, "--remote-dir", url, iters=12, save_every=4, trainer=("--remote_flush_timeout=3",)), d,
              menv)  # fmt: skip
    out, log = run.finish(0), run.attempt_log(1)
    assert len(re.findall(r"uploading step \d+ to file://\S+ failed", log)) == 1, log
    (summary,) = [line for line in out.splitlines() if "  remote: " in line]
    assert "remote: nothing copied yet, 3 checkpoints behind; last error: " in summary, summary
    assert "No space left on device" in summary
    st = cli(menv, "status", "--checkpoint-dir", str(d))
    assert "nothing copied yet, 3 checkpoints behind; last error: " in st.stdout, st.stdout
    subprocess.run(["mount", "-o", "remount,size=64m", str(remote)], check=True)  # room again
    pushed = cli(menv, "push", "--remote-dir", url, "--checkpoint-dir", str(d))
    assert pushed.returncode == 0 and "pushed 3 checkpoint(s)" in pushed.stdout, pushed.stdout + pushed.stderr
    assert remote_steps(url) == [4, 8, 12]


@pytest.mark.slow
def test_keep_every_is_honoured_by_the_trainer_the_remote_and_prune(tmp_path, menv, reference_1):
    url, d = f"file://{tmp_path / 'remote'}", tmp_path / "ckpt"
    proc = train(menv, d, f"--remote_dir={url}", "--save_every=2", "--keep_last_n_checkpoints=2", "--keep_every=6")
    assert_finished(proc, d)
    assert [c.step for c in checkpoint.scan(d)] == [6, 10, 12]
    assert remote_steps(url) == [6, 10, 12]
    local = Path(shutil.copytree(reference_1[0], tmp_path / "ref"))  # checkpoints 4, 8, 12
    done = cli(menv, "prune", "--keep", "1", "--keep-every", "8", "--yes", "--checkpoint-dir", str(local))
    assert done.returncode == 0 and [c.step for c in checkpoint.scan(local)] == [8, 12], done.stdout + done.stderr
    bad = cli(menv, "prune", "--keep-every", "-1", "--checkpoint-dir", str(local))
    assert bad.returncode == 2 and "--keep-every >= 0" in bad.stderr


@pytest.mark.slow
def test_remote_retention_keeps_the_newest_and_never_touches_other_files(tmp_path, menv):
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "notes.txt").write_text("mine")
    proc = train(menv, tmp_path / "ckpt", f"--remote_dir=file://{remote}", "--remote_keep_last_n=2")
    assert proc.returncode == 0, proc.stderr
    assert remote_steps(f"file://{remote}") == [8, 12] and (remote / "notes.txt").read_text() == "mine"
    assert json.loads((remote / "meta_000012.json").read_text())["final"]
    assert (remote / "latest_step.txt").read_text() == "12\n"


def test_a_url_without_its_filesystem_package_is_one_line(tmp_path, menv):
    pytest.importorskip("s3fs")
    proc = train(menv, tmp_path / "ckpt", "--remote_dir=gs://bucket/run")
    if "gcsfs" in sys.modules or _installed("gcsfs"):
        pytest.skip("gcsfs is installed here")
    assert "gs:// needs gcsfs: pip install 'nanochat-run[gcs]'" in one_line_error(proc)
    assert "is not a URL" in one_line_error(train(menv, tmp_path / "ckpt", "--remote_dir=bucket/run"))


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@pytest.mark.slow
def test_push_pull_and_status_and_a_tampered_remote_file_is_refused(tmp_path, menv, reference_1):
    local = Path(shutil.copytree(reference_1[0], tmp_path / "ckpt"))
    remote = tmp_path / "remote"
    url = f"file://{remote}"
    st = cli(menv, "status", "--json", "--checkpoint-dir", str(local), "--remote-dir", url)
    assert st.returncode == 0 and json.loads(st.stdout)["remote"]["behind"] == 3, st.stderr
    pushed = cli(menv, "push", "--remote-dir", url, "--checkpoint-dir", str(local))
    assert pushed.returncode == 0 and "pushed 3 checkpoint(s)" in pushed.stdout, pushed.stderr
    assert remote_steps(url) == [4, 8, 12]
    again = cli(menv, "push", "--remote-dir", url, "--checkpoint-dir", str(local))
    assert "already has them all" in again.stdout
    st = json.loads(cli(menv, "status", "--json", "--checkpoint-dir", str(local), "--remote-dir", url).stdout)
    assert st["remote"] == {"url": url, "remote_step": 12, "remote_steps": [4, 8, 12], "behind": 0}

    pulled = cli(menv, "pull", url, "--step", "8", "--to", str(tmp_path / "pulled"))
    assert pulled.returncode == 0 and "pulled step 8" in pulled.stdout, pulled.stderr
    assert checkpoint.inspect(tmp_path / "pulled", 8).valid
    assert (tmp_path / "pulled" / "model_000008.pt").read_bytes() == (local / "model_000008.pt").read_bytes()

    data = bytearray((remote / "optim_000012.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes: only the checksum can tell
    (remote / "optim_000012.pt").write_bytes(bytes(data))
    bad = cli(menv, "pull", url, "--to", str(tmp_path / "tampered"))
    assert bad.returncode == 1 and "Traceback" not in bad.stderr, bad.stderr
    assert "optim_000012.pt: fails its checksum (corrupted)" in bad.stderr and len(bad.stderr.splitlines()) == 1
    assert not list((tmp_path / "tampered").glob("*.pt"))  # nothing half-fetched is left
    missing = cli(menv, "pull", url, "--step", "5", "--to", str(tmp_path / "x"))
    assert missing.returncode == 1 and "has no committed checkpoint at step 5 (it has 4, 8, 12)" in missing.stderr
    plan = cli(menv, "prune", "--keep", "1", "--dry-run", "--remote-dir", url, "--checkpoint-dir", str(local))
    assert plan.returncode == 0 and re.findall(r"would delete step (\d+):", plan.stdout) == ["4", "8"], plan.stderr
    done = cli(menv, "prune", "--keep", "1", "--yes", "--remote-dir", url, "--checkpoint-dir", str(local))
    assert done.returncode == 0 and "deleted 2 checkpoint(s)" in done.stdout, done.stderr
    assert remote_steps(url) == [12] and len(list(remote.glob("*_0000*"))) == 3  # the final one, whole


# ---- a hostile or broken bucket, in-process (real files through fsspec's local filesystem) -------------------


def bucket(tmp_path: Path, steps: dict[int, dict], run_id: str = "run-a") -> str:
    """A file:// remote holding a checkpoint per step, uploaded from a local dir as a run does; `steps` maps each
    step to its model state. Returns the URL."""
    local, url = tmp_path / "source", f"file://{tmp_path / 'bucket'}"
    local.mkdir()
    for step, model in steps.items():
        checkpoint.write(local, step, model, {"m": torch.ones(3) * step}, {"run_id": run_id})
        open_remote(url).upload(local, step)
    return url


def fine(step: int) -> dict:
    return {"w": torch.arange(6.0) + step}


def unsafe(step: int) -> dict:
    """A model state whose file has the right size and checksum but does not load with weights_only=True."""
    return {"w": torch.zeros(2), "evil": Path("/tmp")}


def tamper(url: str, step: int, edit) -> bytes:
    """Rewrite a remote meta (consistently: a tampered bucket, not a damaged one); returns the new bytes."""
    path = Path(url.removeprefix("file://")) / checkpoint.file_name("meta", step)
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    return path.read_bytes()


def with_file(directory: Path, name: str, data: bytes = b"alias ls='rm -rf ~'\n"):
    """A meta edit that lists `name` (a real file in `directory`) with its true size and checksum."""
    (directory / name).write_bytes(data)
    return lambda meta: meta["files"].update({name: {"size": len(data), "xxh3_64": checkpoint.file_digest(
        directory / name)}})  # fmt: skip


class TwoFaced(LocalFileSystem):
    """A local bucket that answers the first read of each meta truthfully and every later one with `later` (a
    bucket changed between two reads, or one that serves readers differently): the storage, not the code."""

    protocol = ("twofaced",)
    later: dict[str, bytes] = {}
    reads: dict[str, int] = {}

    def cat_file(self, path, start=None, end=None, **kwargs):
        path = self._strip_protocol(path)
        n = TwoFaced.reads[path] = TwoFaced.reads.get(path, 0) + 1
        if n > 1 and path in TwoFaced.later:
            return TwoFaced.later[path]
        return super().cat_file(path, start, end, **kwargs)


def test_a_two_faced_bucket_gets_nowhere(tmp_path):
    """The meta a pull or a restore checked is the one it downloads against: a second read that names another
    file (`.bashrc`) is never made, so nothing but the checkpoint's own files lands in the local dir."""
    url = bucket(tmp_path, {4: fine(4)})
    root = Path(url.removeprefix("file://"))
    honest = (root / "meta_000004.json").read_bytes()
    evil = tamper(url, 4, with_file(root, ".bashrc"))
    (root / "meta_000004.json").write_bytes(honest)
    fsspec.register_implementation("twofaced", TwoFaced, clobber=True)
    TwoFaced.later, TwoFaced.reads = {str(root / "meta_000004.json"): evil}, {}
    pulled = remote.pull(f"twofaced://{root}", None, tmp_path / "pulled")
    assert pulled.valid and pulled.meta == json.loads(honest)
    assert not (tmp_path / "pulled" / ".bashrc").exists()
    assert sorted(p.name for p in (tmp_path / "pulled").iterdir()) == [
        LATEST, "meta_000004.json", "model_000004.pt", "optim_000004.pt"]  # fmt: skip
    TwoFaced.reads = {}
    warnings: list[str] = []
    remote.restore_if_newer(open_remote(f"twofaced://{root}"), tmp_path / "fresh", warnings.append, lambda m: None)
    assert not (tmp_path / "fresh" / ".bashrc").exists() and checkpoint.inspect(tmp_path / "fresh", 4).valid
    assert warnings == [] and TwoFaced.reads == {str(root / "meta_000004.json"): 1}  # read once, never again


def test_a_meta_naming_other_files_is_not_a_checkpoint_and_nothing_else_is_pruned(tmp_path):
    """The checkpoint module's one rule on names, remotely: a meta listing any file but its step's own is not
    committed (never pulled or restored), a download against it fetches nothing, and pruning deletes only the
    files `file_name` spells, never a lookalike (other digits, another suffix, a trailing newline)."""
    url = bucket(tmp_path, {4: fine(4), 8: fine(8), 12: fine(12)})
    root, r = Path(url.removeprefix("file://")), open_remote(url)
    tamper(url, 12, with_file(root, ".bashrc"))
    assert [s for s, _ in r.committed()] == [8, 4]
    with pytest.raises(CheckpointError, match=r"has no committed checkpoint at step 12 \(it has 4, 8\)"):
        remote.pull(url, 12, tmp_path / "pulled")
    lookalikes = ["model_000004.json", "model_0000004.pt", "model_\u0660\u0660\u0660\u0660\u0660\u0664.pt",
                  "optim_000004.pt\n", "meta_000004.json.bak"]  # fmt: skip
    for name in lookalikes:
        (root / name).write_bytes(b"mine")
    assert r.prune(1, "run-a") == [4]
    kept = [checkpoint.file_name(k, s) for s in (8, 12) for k in ("meta", "model", "optim")]
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(("model", "optim", "meta"))) == sorted(
        lookalikes + kept
    )
    meta = json.loads((root / "meta_000012.json").read_text())  # as a caller that skipped `committed` has it
    with pytest.raises(CheckpointError, match=r"the meta of step 12 is not valid \(lists '\.bashrc'"):
        r.download(12, tmp_path / "node", meta)
    assert not (tmp_path / "node").exists()  # refused before anything is made


def test_a_download_that_fails_verification_leaves_nothing(tmp_path, menv):
    """A checkpoint whose sizes and checksums match but whose file does not load safely: a pull is refused (exit
    1, one line) and leaves no file, no meta and no marker in --to; a restore skips it for the older one and
    keeps nothing of it either."""
    url = bucket(tmp_path, {4: fine(4), 8: unsafe(8)})
    to = tmp_path / "pulled"
    with pytest.raises(CheckpointError, match=r"does not load safely \(UnpicklingError"):
        remote.pull(url, None, to)
    assert not to.exists()  # made by the pull, removed again
    to.mkdir()
    (to / "notes.txt").write_text("mine")
    bad = cli(menv, "pull", url, "--to", str(to))
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and len(bad.stderr.splitlines()) == 1, bad.stderr
    assert "model_000008.pt: does not load safely" in bad.stderr
    assert sorted(p.name for p in to.iterdir()) == ["notes.txt"]
    warnings: list[str] = []
    local = tmp_path / "fresh"
    remote.restore_if_newer(open_remote(url), local, warnings.append, lambda m: None)
    assert len(warnings) == 1 and "skipping the remote checkpoint at step 8" in warnings[0], warnings
    assert sorted(p.name for p in local.iterdir()) == [
        RUN_ID, LATEST, "meta_000004.json", "model_000004.pt", "optim_000004.pt"]  # fmt: skip
    assert (local / LATEST).read_text() == "4\n" and checkpoint.inspect(local, 4).valid


def test_a_node_dir_never_commits_a_copy_that_does_not_verify(tmp_path):
    """A node of a run with a dir per node fetches the resume point from the remote; a copy that does not verify
    is an error on every rank (here: the one rank, with no collective to wait on), and nothing of it is left."""
    url = bucket(tmp_path, {8: unsafe(8)})
    point = checkpoint.inspect(tmp_path / "source", 8, load_check=False)
    node = tmp_path / "node"
    one = DistInfo(rank=1, local_rank=0, world_size=1, device=torch.device("cpu"))  # rank 0 is on another node
    with pytest.raises(StorageError, match=r"downloading step 8 .*/model_000008\.pt: does not load safely"):
        node_dirs.after_start(node, open_remote(url), one, True, point, "run-a", True, lambda m: None, pytest.fail)
    assert sorted(p.name for p in node.iterdir()) == [RUN_ID]


def test_a_dir_per_node_start_reads_each_checkpoint_once(tmp_path, monkeypatch):
    """Rank 0's start in a dir per node (node_dirs.before_start, the remote restore, find_start, after_start) and
    the saver's first prune share one verification cache, as the trainer passes it: the newest checkpoint (~5 GB
    at d20) is read once, not at each of them. The count observes the real checksum function, unchanged."""
    from collections import Counter

    from nanochat.checkpoint import verify
    from nanochat.saver import Saver
    from nanochat.train_loop import find_start

    url = bucket(tmp_path, {4: fine(4), 8: fine(8)})
    node = tmp_path / "source"  # this node's dir: the run's checkpoints, all on the remote too
    reads, digest = Counter(), verify.file_digest
    monkeypatch.setattr(verify, "file_digest", lambda path, *a, **k: reads.update([path.name]) or digest(path, *a, **k))
    cache = Saver(node).verified
    one = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    node_dirs.before_start(node, open_remote(url), one, True, lambda m: None, pytest.fail, cache)
    remote.restore_if_newer(open_remote(url), node, pytest.fail, lambda m: None, cache)
    (where, point), run_id = find_start(node, True, one, cache=cache)
    node_dirs.after_start(node, open_remote(url), one, True, point, run_id, True, lambda m: None, pytest.fail)
    assert (where, point.step, run_id) == (node, 8, "run-a")
    assert checkpoint.prune(node, 1, cache=cache) == [
        node / checkpoint.file_name(k, 4) for k in ("meta", "model", "optim")
    ]
    assert reads == {checkpoint.file_name(k, s): 1 for k in ("model", "optim") for s in (4, 8)}
