"""The warm spare (`nanochat-run train --spare`): while an attempt trains, the next attempt's torchrun is already
started, its workers past the interpreter's start-up and their imports, waiting (nanochat/spare.py). A restart
then hands the spare its arguments instead of starting torchrun cold: the seconds of imports are already spent.

The arguments are the new attempt's own, read at the go (the policy may have changed the trainer's settings after
an OOM); anything else torchrun was started with (the workers, the script, the environment) must be what the new
attempt asks for, or the spare is thrown away and the attempt starts cold. One machine only: a multi-node
attempt's rendezvous is the nodes' together. The spare lives in <run dir>/spare/ (its go file, and its logs until
an attempt takes them into its attempt-NNN/); when the run ends the spare is killed and that folder removed.
Its cost: --nproc-per-node idle processes holding imported torch (host memory, no GPU memory, no process group).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil

from nanochat import spare as worker
from nanochat.config import ConfigError, HelpRequested
from nanochat.registry import by_script
from supervisor import procs
from supervisor.launch import TrainOptions, gpu_count, parse_settings
from supervisor.workers import Workers

RANK_LOGS = ("/stdout.log", "/stderr.log")  # torchrun's --redirects files of each rank
SPAWN_WAIT = 30.0  # seconds a restart waits for a just-started spare's workers to appear (then: a cold start)


class Spare:
    """At most one spare torchrun at a time, for the next attempt of this supervisor."""

    def __init__(self, opts: TrainOptions, root: Path, run_id: str):
        self.opts, self.root, self.run_id = opts, root, run_id
        self.proc: subprocess.Popen | None = None
        self.attempt_id = ""  # the spare's tag (procs.ATTEMPT_ENV): its processes keep it once an attempt takes it
        self.started = 0  # spares started by this supervisor: each gets a tag of its own
        self._spec: procs.LaunchSpec | None = None  # what the spare was started for (arguments left out)
        self._env: dict[str, str] = {}

    def enabled(self, device: str | None) -> bool:
        """--spare on, or auto with the trainer on `device` "cuda" (its heartbeat's); one machine, a known script."""
        o = self.opts
        wanted = o.spare == "on" or o.spare == "auto" and device == "cuda"
        return wanted and o.nnodes == "1" and not o.rdzv_endpoint and by_script(o.script) is not None

    def start(self, spec: procs.LaunchSpec, env: dict[str, str], device: str | None) -> str:
        """Start a spare for attempts like `spec` (its arguments aside) run with `env`, unless one is waiting already.
        Returns what to tell the user ("" when nothing was started)."""
        if not self.enabled(device) or self.proc is not None:
            return ""
        shutil.rmtree(self.root, ignore_errors=True)  # what a spare an attempt took left: its go file
        self.started += 1
        self.attempt_id = f"{self.run_id}-spare{self.started}"
        log_dir = self.root / "log"
        try:
            log_dir.mkdir(parents=True)
            args = [spec.script, *_late_imports(spec)]
            launch = dataclasses.replace(spec, script=worker.__name__, trainer_args=args, log_dir=log_dir)
            env = {**env, procs.ATTEMPT_ENV: self.attempt_id, worker.DIR_ENV: str(self.root)}
            self.proc = procs.launch(launch, log_dir / "torchrun.log", env)
        except OSError as e:  # a full disk, say: the next restart starts cold, as without --spare
            shutil.rmtree(self.root, ignore_errors=True)
            return f"no warm spare ({e}): the next restart starts cold"
        self._spec, self._env = _unargued(spec), _untagged(env)
        return f"warm spare: torchrun pid {self.proc.pid} started for the next attempt; its workers wait after imports"

    def take(self, spec: procs.LaunchSpec, env: dict[str, str], log_dir: Path) -> tuple[subprocess.Popen, str] | None:
        """The spare as the attempt `spec` with `env`: its logs moved into `log_dir`, its workers told to go with
        `spec`'s arguments. None (and the spare killed) if there is none, it died, or it was started otherwise."""
        if self.proc is None:
            return None
        if (_unargued(spec), _untagged(env)) != (self._spec, self._env) or not self._spawned():
            self.close()
            return None
        try:  # the files stay open in torchrun and its workers: they go on writing under the new names
            for entry in (self.root / "log").iterdir():
                entry.rename(log_dir / entry.name)
            go = self.root / f".{worker.GO_FILE}.tmp"
            go.write_text(json.dumps({"script": spec.script, "args": list(spec.trainer_args), "at": time.time(),
                                      "attempt_id": env[procs.ATTEMPT_ENV]}))  # fmt: skip
            go.rename(self.root / worker.GO_FILE)  # whole, or not there: a worker never reads half of it
        except OSError:  # the attempt's logs are elsewhere (another disk), or this one is full: start cold
            self.close()
            return None
        taken, self.proc = (self.proc, self.attempt_id), None
        return taken

    def _spawned(self, timeout: float = SPAWN_WAIT) -> bool:
        """Whether torchrun has started every worker and reads their log files, waiting for it if it is about to
        (a spare taken within a second of its start). Its --tee threads open the ranks' files by name, once they
        exist: moved before that, the ranks' lines would never reach the attempt's torchrun.log."""
        workers, deadline = Workers(self.attempt_id, self.opts.nproc_per_node), time.monotonic() + timeout
        while self.proc is not None and self.proc.poll() is None and time.monotonic() < deadline:
            workers.refresh(self.proc.pid)
            if len(workers.all) >= workers.expected and self._teeing():
                return True
            time.sleep(0.02)
        return False

    def _teeing(self) -> bool:
        """Whether torchrun holds every rank's stdout.log and stderr.log open for reading (its tee)."""
        log = str((self.root / "log").resolve())
        try:
            files = psutil.Process(self.proc.pid).open_files()
        except psutil.Error:
            return False
        tees = {f.path for f in files if f.mode == "r" and f.path.startswith(log) and f.path.endswith(RANK_LOGS)}
        return len(tees) >= 2 * self.opts.nproc_per_node

    def close(self) -> None:
        """Kill the spare, if one is waiting, and remove its folder (the run is over, or the spare does not fit)."""
        if self.proc is not None:
            procs.kill_tree(self.proc, procs.attempt_processes(self.attempt_id), signal.SIGKILL)
            self.proc = None
        shutil.rmtree(self.root, ignore_errors=True)


def _unargued(spec: procs.LaunchSpec) -> procs.LaunchSpec:
    """A launch without what changes from attempt to attempt: its arguments, log dir and (multi-node) rendezvous."""
    return dataclasses.replace(spec, trainer_args=[], log_dir=Path(), rdzv_id=None)


def _late_imports(spec: procs.LaunchSpec) -> tuple[str, ...]:
    """What the spare should import beyond the script, judged by the attempt it follows (the settings rarely change
    between attempts; if they do, the imports are only wasted): torch.compile's, for a trainer that compiles."""
    try:
        cfg = parse_settings(spec.script, list(spec.trainer_args))
    except (ConfigError, HelpRequested):  # cannot happen for an attempt that trained; then nothing extra
        return ()
    # as the trainer decides: --device_type=auto is CUDA where torch sees a GPU (no nvidia-smi: no torch import)
    cuda = cfg.device_type == "cuda" or (cfg.device_type == "auto" and shutil.which("nvidia-smi") and gpu_count() > 0)
    return worker.COMPILE_IMPORTS if cfg.compiles(bool(cuda)) else ()


def _untagged(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in (procs.ATTEMPT_ENV, worker.DIR_ENV)}
