"""Credentials in a remote URL (nanochat/redact.py): redacted in everything shown or recorded, and off torchrun's and
the workers' command lines, while the trainer still reaches the storage with them. The storage of the end-to-end
test is a real fsspec filesystem that checks credentials: `vault://USER:PASSWORD@host/<local path>`, a local dir
that refuses every operation with wrong ones, registered through fsspec's entry points in a folder on PYTHONPATH
(so the supervisor, torchrun and the workers all find it)."""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nanochat import resume
from nanochat.config import ConfigError
from nanochat.redact import ENV, redact, reveal
from supervisor import procs
from supervisor.launch import resolve
from supervisor.records import RunDir, append_event
from tests.runs import one_line_error, train
from tests.supervised import Run, cli, supervisor_runs, torchrun_of, workers_of

USER, PASSWORD = "AKIAVAULTUSER7", "pw-hunter2-9f3k"

VAULT = f'''
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import infer_storage_options


class VaultFS(LocalFileSystem):
    """vault://USER:PASSWORD@host/<absolute local path>: every operation needs the right credentials."""

    protocol = "vault"

    def __init__(self, username=None, password=None, **kw):
        super().__init__(**kw)
        self.granted = (username, password) == ({USER!r}, {PASSWORD!r})

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, str) and path.startswith("vault://"):
            path = "/" + path[len("vault://"):].split("/", 1)[1]
        return super()._strip_protocol(path)

    @staticmethod
    def _get_kwargs_from_urls(path):
        options = infer_storage_options(path)
        return {{"username": options.get("username"), "password": options.get("password")}}


def _guarded(name):
    def method(self, *args, **kwargs):
        if not self.granted:
            raise PermissionError("vault: access denied")
        return getattr(LocalFileSystem, name)(self, *args, **kwargs)

    return method


for _name in ("ls", "info", "exists", "_open", "cp_file", "get_file", "put_file", "rm_file", "makedirs", "mkdir"):
    setattr(VaultFS, _name, _guarded(_name))
'''


def vault_plugin(where: Path) -> Path:
    """A folder for PYTHONPATH that registers the vault:// filesystem with fsspec."""
    (where / "vaultfs_plugin-1.0.dist-info").mkdir(parents=True)
    (where / "vaultfs_plugin.py").write_text(textwrap.dedent(VAULT))
    (where / "vaultfs_plugin-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: vaultfs-plugin\nVersion: 1.0\n"
    )
    (where / "vaultfs_plugin-1.0.dist-info" / "entry_points.txt").write_text(
        "[fsspec.specs]\nvault = vaultfs_plugin:VaultFS\n"
    )
    return where


# ---- the one redaction -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("s3://AKIA:secret@bucket/run", "s3://***@bucket/run"),
        ("gs://token@bucket", "gs://***@bucket"),
        ("s3://AKIA:se/cr@et@bucket/p", "s3://***@bucket/p"),  # an unescaped / and @ in the password
        (
            "https://h/p?X-Amz-Signature=abc&versionId=3&sig=x#f",
            "https://h/p?X-Amz-Signature=***&versionId=3&sig=***#f",
        ),
        ("--remote_dir=s3://k:s@b/p and (file://u:p@/tmp/x)", "--remote_dir=s3://***@b/p and (file://***@/tmp/x)"),
        ('{"cmd": ["--remote_dir=s3://k:s@b"]}', '{"cmd": ["--remote_dir=s3://***@b"]}'),
        ("s3://bucket/dir@v2/x", "s3://bucket/dir@v2/x"),  # an @ in a path is no user info
        ("file:///tmp/a@b", "file:///tmp/a@b"),
        ("no url here: a@b:c", "no url here: a@b:c"),
    ],
)
def test_redact(text, want):
    assert redact(text) == want
    assert redact(want) == want


def test_reveal_maps_the_redacted_form_back_to_the_real_url_from_the_environment():
    real = "s3://k:s@bucket/run"
    assert reveal("s3://***@bucket/run", {ENV: real}) == real
    assert reveal(real, {}) == real  # a trainer run by hand with the real URL
    assert reveal("s3://plain/run", {ENV: real}) == "s3://plain/run"  # another URL: the setting wins
    with pytest.raises(ConfigError, match=rf"--remote_dir=s3://\*\*\*@other/run has its credentials redacted.*{ENV}"):
        reveal("s3://***@other/run", {ENV: real})


def test_resolve_moves_the_credentials_from_the_trainer_args_into_the_environment(tmp_path):
    real = "memory://k:s3cret@bucket/run"
    args = ["--depth=1", f"--remote_dir={real}", "--remote-dir", real]
    launch = resolve("base", "scripts.base_train", args, tmp_path)
    assert launch.trainer_args == ["--depth=1", "--remote_dir=memory://***@bucket/run", "--remote-dir",
                                   "memory://***@bucket/run"]  # fmt: skip
    assert launch.env == {ENV: real}
    assert procs.environ_for("a-1", extra=launch.env)[ENV] == real
    plain = resolve("base", "scripts.base_train", ["--remote_dir=memory://bucket/run"], tmp_path)
    assert plain.trainer_args == ["--remote_dir=memory://bucket/run"] and plain.env == {}


def test_an_inherited_remote_env_never_reaches_torchrun(monkeypatch):
    monkeypatch.setenv(ENV, "s3://k:s@stale/run")
    assert ENV not in procs.environ_for("a-1")


def test_the_remote_url_can_come_from_the_environment_and_a_dry_run_shows_it_redacted(tmp_path, env):
    """NANOCHAT_REMOTE_DIR instead of --remote-dir keeps the URL off the supervisor's own command line too."""
    env = {**env, ENV: "memory://k:s3cret@bucket/run"}
    proc = cli(env, "train", "--dry-run", "--depth", "1", "--checkpoint-dir", str(tmp_path / "ckpt"))
    assert proc.returncode == 0, proc.stderr
    shown = "memory://***@bucket/run"
    assert f"--remote_dir={shown}" in proc.stdout and f"remote_dir = {shown!r}" in proc.stdout
    assert "s3cret" not in proc.stdout + proc.stderr


def test_a_resume_from_a_meta_that_holds_credentials_does_not_carry_them_on():
    """A checkpoint saved before redaction: its remote_dir is the same setting, not a change to record."""
    saved, now = {"remote_dir": "s3://k:s3cret@b/p", "depth": 2}, {"remote_dir": "s3://***@b/p", "depth": 2}
    assert resume.changes(saved, now) == []
    assert resume.changes(saved, {**now, "depth": 3}) == [{"setting": "depth", "from": 2, "to": 3}]


def test_the_event_log_never_records_a_credential(tmp_path):
    append_event(RunDir(tmp_path), "attempt_start", cmd=["torchrun", "--remote_dir=s3://k:s3cret@b/p"])
    text = (tmp_path / "events.jsonl").read_text()
    assert "s3cret" not in text and json.loads(text)["cmd"][1] == "--remote_dir=s3://***@b/p"


# ---- end to end --------------------------------------------------------------------------------------------------


@pytest.fixture
def vault_env(tmp_path: Path, env: dict[str, str]) -> dict[str, str]:
    plugin = str(vault_plugin(tmp_path / "plugin"))
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [plugin, env.get("PYTHONPATH")]))}


@pytest.fixture
def supervise(tmp_path: Path, vault_env: dict[str, str]) -> Iterator[Callable[..., Run]]:
    yield from supervisor_runs(tmp_path, vault_env)


@pytest.mark.slow
def test_a_supervised_run_with_credentials_in_its_remote_url_writes_them_nowhere(tmp_path, vault_env, supervise):
    remote = tmp_path / "remote"
    url, shown = f"vault://{USER}:{PASSWORD}@localhost{remote}", f"vault://***@localhost{remote}"
    run = supervise("--remote-dir", url, iters=6, save_every=3)
    torchrun, workers = torchrun_of(run), []

    def started() -> bool:
        workers[:] = workers_of(torchrun)
        return len(workers) == 2

    run.wait_for("2 workers", started)
    for p in [torchrun, *workers]:  # what `ps` shows every user of the machine
        cmdline = " ".join(p.cmdline())
        assert PASSWORD not in cmdline and USER not in cmdline and f"--remote_dir={shown}" in cmdline
    run.finish(0)
    # the trainer reached the storage with the real credentials (from the environment): the final checkpoint is there
    meta = json.loads((remote / "meta_000006.json").read_text())
    assert meta["final"] and meta["train_config"]["remote_dir"] == shown
    assert f"remote: step 6 is in {shown}" in run.attempt_log(1)
    status = cli(vault_env, "status", "--checkpoint-dir", str(run.ckpt), "--remote-dir", url)
    assert status.returncode == 0 and f"remote: {shown}: step 6" in status.stdout, status
    wrong = f"vault://{USER}:wrong-{PASSWORD}@localhost{remote}"
    denied = cli(vault_env, "pull", wrong, "--to", str(tmp_path / "pulled"))
    assert denied.returncode == 1 and f"pulling from {shown} failed (PermissionError" in denied.stderr, denied
    # nothing written (metas here and there, events, heartbeat, metrics, torchrun.log, the ranks' logs, the
    # supervisor's output) nor printed holds the user or the password
    written = [p for p in tmp_path.rglob("*") if p.is_file() and tmp_path / "plugin" not in p.parents]
    assert len(written) > 20, written
    texts = {str(p): p.read_bytes().decode(errors="replace") for p in written}
    texts |= {"status": status.stdout + status.stderr, "pull": denied.stdout + denied.stderr}
    assert not [where for where, text in texts.items() if PASSWORD in text or USER in text or PASSWORD in where]


@pytest.mark.slow
def test_a_trainer_run_by_hand_with_credentials_uses_them_and_records_them_nowhere(tmp_path, vault_env):
    remote, ckpt = tmp_path / "remote", tmp_path / "ckpt"
    url, shown = f"vault://{USER}:{PASSWORD}@localhost{remote}", f"vault://***@localhost{remote}"
    proc = train(vault_env, ckpt, f"--remote_dir={url}", "--num_iterations=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"remote: step 4 is in {shown}" in proc.stdout and f"remote_dir = {shown!r}" in proc.stdout
    assert json.loads((remote / "meta_000004.json").read_text())["train_config"]["remote_dir"] == shown
    texts = [p.read_bytes().decode(errors="replace") for p in [*ckpt.rglob("*"), *remote.rglob("*")] if p.is_file()]
    assert not [text for text in [proc.stdout, proc.stderr, *texts] if PASSWORD in text or USER in text]
    # its redacted form is refused in one line: the credentials are not there to use
    refused = train(vault_env, tmp_path / "other", f"--remote_dir={shown}")
    assert "has its credentials redacted" in one_line_error(refused), refused.stderr[-3000:]
