"""`nanochat-run speedrun`: from nothing to a chat model in one command, each training phase under the same
supervision as `nanochat-run train`; rerun it after any stop and it goes on where it ended.

    data -> tokenizer -> base -> mid -> sft -> rl -> eval -> report.md

What a run does with each phase is decided by `plan_phase`, the whole policy:
    skip    a finished phase (a valid final checkpoint, made with these settings, from the current parent)
    resume  a started one (checkpoints, no final one): supervised again, from its newest valid checkpoint
    fresh   nothing there yet; or --redo of it or of a phase before it (its checkpoints are archived by the
            trainer, as with --resume=False); or its parent was retrained in this very run
    refuse  a finished phase whose settings or parent differ from what this run asks: one line naming the phase
            and the way out (--redo PHASE, or the old setting)

Settings come from a TOML file (--config), one table per phase; a phase table's keys are the settings of the
phase's script (`python -m scripts.chat_sft --help`), checked before anything runs:

    [data]                       [tokenizer]            [base]                    [eval]
    shards = 240                 vocab_size = 65536     device_batch_size = 16    tasks = "arithmetic,spelling"
                                                        [sft]                     max_problems = 200
                                                        num_iterations = 800

The run dir (default $NANOCHAT_BASE_DIR/speedrun/<tag>) keeps one event log for all phases (phase starts, skips
and ends, and every attempt of every phase, numbered across them), their logs, and report.md. With --remote-dir,
each phase copies its checkpoints to <remote>/<phase's folder>/<tag>, and the run dir goes to
<remote>/speedrun/<tag> after each phase; a phase whose checkpoints are there but not here (a new machine) is
restored from there first, verified, and then planned as usual (skipped when its final checkpoint came back).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nanochat import checkpoint, safefile
from nanochat.config import ConfigError
from nanochat.dataset import data_dir, list_shards
from nanochat.locks import DirLock
from nanochat.paths import file_fingerprint, get_base_dir, phase_dir, tokenizer_file
from nanochat.redact import redact
from nanochat.registry import PHASES as TRAINED
from nanochat.settings import marked
from supervisor.launch import Launch, UsageProblem, parse_settings, resolve
from supervisor.records import EventLog, RunDir

PHASES = ("data", "tokenizer", *TRAINED, "eval")  # the trained phases (registry.PHASES) between the plain commands
TABLES = {"data": {"shards": 240, "max_docs": 0}, "tokenizer": {"vocab_size": 65536, "max_chars": 2_000_000_000},
          "eval": {"tasks": "arithmetic,spelling,choice", "max_problems": 200, "max_tokens": 256}}  # fmt: skip
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
RUN_DIR_COPY_TIMEOUT = 120  # seconds


def load_config(path: Path | None) -> dict[str, dict]:
    """The TOML file as {phase: {key: value}}, every phase present; unknown tables or keys are one line."""
    tables: dict[str, dict] = {p: {} for p in PHASES}
    if path is None:
        return tables | {p: dict(d) for p, d in TABLES.items()}
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        loaded = tomllib.loads(path.read_text())
    except OSError as e:
        raise UsageProblem(f"cannot read --config {path} ({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageProblem(f"--config {path} is not valid TOML ({e})") from None
    for name, table in loaded.items():
        if name not in PHASES or not isinstance(table, dict):
            raise UsageProblem(f"--config {path}: [{name}] is not a phase; the tables are {', '.join(PHASES)}")
        if name in TABLES and (bad := set(table) - set(TABLES[name])):
            raise UsageProblem(f"--config {path}: [{name}] has no setting {sorted(bad)[0]!r}; it takes"
                               f" {', '.join(TABLES[name])}")  # fmt: skip
        tables[name] = dict(table)
    return tables | {p: {**d, **tables[p]} for p, d in TABLES.items()}


def trainer_args(table: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in table.items()]


@dataclass
class Decision:
    action: str  # skip | resume | fresh | refuse
    why: str


def settings_changed(saved: dict, asked) -> str:
    """'' if the phase's saved train_config matches what this run asks, else the first difference. A rerun may
    change the settings marked runtime (or quiet) on their fields freely: how a phase runs, not what it makes."""
    free = marked(type(asked), "runtime", "quiet")
    for key, value in sorted(saved.items()):
        if key not in free and hasattr(asked, key) and getattr(asked, key) != value:
            return f"with --{key}={value!r}, this run asks for {getattr(asked, key)!r}"
    return ""


def parent_changed(phase: str, meta: checkpoint.Meta) -> str:
    """'' if what the phase was made from is as it was (base: the tokenizer; the others: the source checkpoint)."""
    if phase == "base":
        saved = meta.tokenizer
        return "but with another tokenizer" if saved and saved != file_fingerprint(tokenizer_file()) else ""
    source = meta.source or {}
    if changed := checkpoint.source_changed(source):
        return f"but its parent ({source.get('phase')} step {source.get('step')}) {changed} since"
    return ""


def plan_phase(phase: str, newest: checkpoint.Checkpoint | None, asked, redo: bool, parent_rebuilt: bool) -> Decision:
    """What to do with a trained phase, given its newest valid checkpoint and the settings asked (module doc)."""
    if redo:
        return Decision("fresh", "--redo: starting afresh")
    if newest is None:
        return Decision("fresh", "starting")
    meta = newest.meta
    parent = parent_changed(phase, meta)
    if parent and parent_rebuilt:  # its parent was (re)made in this very run: this phase is stale by construction
        return Decision("fresh", f"{parent.removeprefix('but ')}: starting afresh")
    if newest.final:
        if problem := settings_changed(meta.train_config or {}, asked) or parent:
            return Decision("refuse", f"finished at step {newest.step} {problem}")
        return Decision("skip", f"done at step {newest.step}")
    return Decision("resume", f"resuming from step {newest.step}")  # (the trainer checks its own resume)


def newest_valid(directory: Path) -> checkpoint.Checkpoint | None:
    """The newest committed checkpoint whose files match its meta by size: the one resolver with sizes only (the
    trainer and the next phase verify checksums when they load it; a rerun that only skips must decide in a
    blink)."""
    return next(checkpoint.valid_newest_first(directory, verify=False, load_check=False), None)


@dataclass
class Speedrun:
    """One `nanochat-run speedrun` invocation. `supervise(launch, fresh)` runs a phase under the agent and returns
    its exit code; `display(line)` shows a line."""

    tag: str
    depth: int
    builtin: bool
    rl: bool
    redo: str | None
    run_dir: Path
    tables: dict[str, dict]
    supervise: Callable[[Launch, bool], int]
    display: Callable[[str], None] = print
    remote: str | None = None  # each phase copies to <remote>/<phase's folder>/<tag>
    phases: list[str] = field(default_factory=list)
    _copy_failed: bool = False

    def __post_init__(self) -> None:
        self.phases = [p for p in PHASES if self.rl or p != "rl"]
        if self.redo is not None and self.redo not in self.phases:
            raise UsageProblem(f"--redo must name a phase of this run ({', '.join(self.phases)}), got {self.redo!r}")
        self.events = EventLog(RunDir(self.run_dir), self.display)
        self.launches = {p: self._launch(p) for p in TRAINED if p in self.phases}  # every setting checked now

    def _launch(self, phase: str) -> Launch:
        args = [f"--model_tag={self.tag}"] + (["--depth", str(self.depth)] if phase == "base" else [])
        if self.remote:
            args.append(f"--remote_dir={self.remote_of(TRAINED[phase].folder)}")
        owned = {"depth", "model_tag", "checkpoint_dir", "source_dir", "resume", "remote_dir"}
        if taken := owned & set(self.tables[phase]):
            raise UsageProblem(f"[{phase}] {sorted(taken)[0]} is the speedrun's to set: use --depth, --model-tag,"
                               f" --remote-dir, --redo {phase}")  # fmt: skip
        args += trainer_args(self.tables[phase])
        try:
            launch = resolve(phase, TRAINED[phase].script, args, None if phase == "base" else self.dir_of(phase))
        except UsageProblem as e:
            raise UsageProblem(f"[{phase}] {e}") from None
        return launch

    def remote_of(self, folder: str) -> str:
        return f"{self.remote.rstrip('/')}/{folder}/{self.tag}"

    def dir_of(self, phase: str) -> Path:
        return phase_dir(phase, self.tag)

    # ---- the run ---------------------------------------------------------------------------------------------

    def run(self) -> int:
        lock = DirLock(self.run_dir, "speedrun")
        if msg := lock.acquire():
            self.display(msg)
        self.events.append("speedrun_start", phases=self.phases, tag=self.tag, depth=self.depth, redo=self.redo,
                           dirs={p: str(self.dir_of(p)) for p in TRAINED})  # fmt: skip
        code, redo, rebuilt, t0 = EXIT_OK, False, False, time.time()
        try:
            for phase in self.phases:
                redo = redo or phase == self.redo
                started = time.time()
                code, ran = self._phase(phase, redo, rebuilt)
                rebuilt = rebuilt or ran
                if code != EXIT_OK:
                    self.events.append("phase_end", phase=phase, exit_code=code, seconds=time.time() - started)
                    break
                if phase != self.phases[-1]:  # (after the last one, the report is written first: below)
                    self._copy_run_dir()
        finally:
            from supervisor.speedrun_report import write_report

            path = write_report(self.run_dir, self.phases, {p: self.dir_of(p) for p in TRAINED})
            self.events.append("speedrun_end", exit_code=code, seconds=time.time() - t0, report=str(path))
            self._copy_run_dir()
            lock.release()
        if code == EXIT_OK:
            self.display(f"speedrun: done in {(time.time() - t0) / 60:.1f} min; report: {path}")
        return code

    def _copy_run_dir(self) -> None:
        """With --remote-dir, the run dir (events, logs, report.md) goes to <remote>/speedrun/<tag> after each
        phase, so the story of a run outlives the machine with its checkpoints. Best effort: a failure is one line
        (once), and a slow remote holds the run up at most RUN_DIR_COPY_TIMEOUT seconds."""
        if not self.remote or self._copy_failed:
            return
        from nanochat.remote import copy_tree, first_line

        url, failure = self.remote_of("speedrun"), []
        shown = redact(url)

        def copy() -> None:
            try:
                copy_tree(self.run_dir, url, skip=lambda p: p.name == "heartbeat.json" or p.name.startswith("."))
            except Exception as e:  # noqa: BLE001 - the storage failing: say so, the run goes on
                failure.append(first_line(e))

        worker = threading.Thread(target=copy, daemon=True)
        worker.start()
        worker.join(RUN_DIR_COPY_TIMEOUT)
        if failure or worker.is_alive():
            why = failure[0] if failure else f"no answer in {RUN_DIR_COPY_TIMEOUT}s"
            self.display(f"speedrun: could not copy the run dir to {shown} ({why}); the checkpoints' copies go on")
            self._copy_failed = True

    def _phase(self, phase: str, redo: bool, rebuilt: bool) -> tuple[int, bool]:
        """(exit code, whether it produced something new) for one phase."""
        if phase == "data":
            return self._data(redo)
        if phase == "tokenizer":
            return self._tokenizer(redo)
        if phase == "eval":
            return self._eval(redo), False
        launch = self.launches[phase]
        if self.remote and not redo and not rebuilt:  # a fresh machine, a wiped disk: what is done is in the remote
            from nanochat.remote import check_remote, restore_if_newer

            say = lambda msg: self.display(f"speedrun: {phase}: {msg}")  # noqa: E731
            restore_if_newer(check_remote(self.remote_of(TRAINED[phase].folder)), launch.checkpoint_dir, say, say)
        newest = newest_valid(launch.checkpoint_dir)
        decision = plan_phase(phase, newest, parse_settings(launch.script, launch.trainer_args), redo, rebuilt)
        if decision.action == "refuse":
            raise UsageProblem(f"{phase}: {decision.why}: pass --redo {phase} to retrain it and what follows it,"
                               " or restore the setting")  # fmt: skip
        if decision.action == "skip":
            self.events.append("phase_skip", phase=phase, why=decision.why, step=newest.step,
                               checkpoint_dir=str(launch.checkpoint_dir))  # fmt: skip
            self.display(f"speedrun: {phase}: {decision.why}, skipped")
            return EXIT_OK, False
        self.display(f"speedrun: {phase}: {decision.why}")
        self.events.append("phase_start", phase=phase, action=decision.action, why=decision.why,
                           checkpoint_dir=str(launch.checkpoint_dir))  # fmt: skip
        started = time.time()
        code = self.supervise(launch, decision.action == "fresh")
        self.events.append("phase_end", phase=phase, exit_code=code, seconds=time.time() - started)
        return code, True

    def command(self, phase: str, args: list[str]) -> int:
        """A phase that is one plain command (data, tokenizer, eval): shown, run, its output to the run dir."""
        log = self.run_dir / f"{phase}.log"
        self.display(f"speedrun: {phase}: $ python {' '.join(args)}  (log: {log})")
        self.events.append("phase_start", phase=phase, action="run", cmd=args)
        started = time.time()
        with safefile.open_append(log) as out:  # never through a link planted at the name
            code = subprocess.call([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT)
        self.events.append("phase_end", phase=phase, exit_code=code, seconds=time.time() - started)
        if code:
            tail = safefile.read_text(log, errors="replace").strip().splitlines()[-1:] or [""]
            self.display(f"speedrun: {phase} failed (exit {code}): {tail[0]}; see {log}")
        return EXIT_FAILED if code else EXIT_OK

    def _data(self, redo: bool) -> tuple[int, bool]:
        table, shards = self.tables["data"], list_shards(data_dir(get_base_dir()))
        want = 2 if self.builtin else int(table["shards"])
        if len(shards) >= want and not redo:
            self.events.append("phase_skip", phase="data", why=f"{len(shards)} shards")
            self.display(f"speedrun: data: {len(shards)} shards in {data_dir(get_base_dir())}, skipped")
            return EXIT_OK, False
        args = ["-m", "nanochat.dataset"] + (["--builtin"] if self.builtin else ["-n", str(want)])
        if self.builtin and int(table["max_docs"]) > 0:
            args += ["--max-docs", str(table["max_docs"])]
        return self.command("data", args), True

    def _tokenizer(self, redo: bool) -> tuple[int, bool]:
        path, vocab = tokenizer_file(), int(self.tables["tokenizer"]["vocab_size"])
        if path.exists() and not redo:
            from tokenizers import Tokenizer as HFTokenizer

            have = HFTokenizer.from_file(str(path)).get_vocab_size()
            if have != vocab:
                raise UsageProblem(f"tokenizer: {path} has a vocabulary of {have}, this run asks for {vocab}: pass"
                                   " --redo tokenizer to train a new one (and everything after it)")  # fmt: skip
            self.events.append("phase_skip", phase="tokenizer", why=f"vocabulary {have}")
            self.display(f"speedrun: tokenizer: {path} (vocabulary {have}), skipped")
            return EXIT_OK, False
        args = [
            "-m",
            "scripts.tok_train",
            f"--vocab_size={vocab}",
            f"--max_chars={self.tables['tokenizer']['max_chars']}",
        ]
        return self.command("tokenizer", args), True

    def _eval(self, redo: bool) -> int:
        """chat_eval on the final model of each chat phase that has one; a record already there is kept."""
        table = self.tables["eval"]
        for phase in [p for p in self.phases if p in TRAINED and TRAINED[p].metric == "accuracy"]:
            newest = newest_valid(self.dir_of(phase))
            if newest is None or not newest.final:
                continue
            record = checkpoint.record_path(self.dir_of(phase), "chat_eval", newest.step)
            if record.exists() and not redo:
                self.display(f"speedrun: eval: {phase} step {newest.step} already evaluated ({record.name}), skipped")
                continue
            args = ["-m", "scripts.chat_eval", f"--checkpoint_dir={self.dir_of(phase)}", f"--step={newest.step}",
                    f"--tasks={table['tasks']}", f"--max_problems={table['max_problems']}",
                    f"--max_tokens={table['max_tokens']}"]  # fmt: skip
            if code := self.command("eval", args):
                return code
        return EXIT_OK


def check_config(tables: dict[str, dict]) -> None:
    """The numbers of the plain tables (the phase tables are checked by their scripts' parsers)."""
    for phase, key in (
        ("data", "shards"),
        ("tokenizer", "vocab_size"),
        ("eval", "max_problems"),
        ("eval", "max_tokens"),
    ):
        value = tables[phase][key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"[{phase}] {key} must be a whole number >= 1, got {value!r}")
