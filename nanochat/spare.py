"""The worker side of a warm spare (`nanochat-run train --spare`, supervisor/spare.py): a torchrun worker that
imports the training script (torch and nanochat with it), then waits, cheaply, for the supervisor's go, and only
then becomes that script's `__main__` with the arguments the go carries.

    torchrun ... -m nanochat.spare -- <script module> [<module to import too> ...]   (the supervisor starts it)

What a spare saves a restart is the interpreter's start-up and the imports (seconds); the process group, the data
and the checkpoint come after the go, with the attempt's own arguments (the policy may have changed them since
the spare started). While waiting it has no process group, no CUDA context and no data: idle processes holding
imported modules. It dies with torchrun (the parent-death signal `scripts/__init__.py` arms on import).
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import sys
import time
from pathlib import Path

from nanochat.lifeline import started_at

DIR_ENV = "NANOCHAT_SPARE_DIR"  # the folder the go appears in (set for a spare's torchrun only)
GO_TIME_ENV = "NANOCHAT_SPARE_GO"  # the wall time of the go: where the trainer's start-up counts from
GO_FILE = "go.json"  # {"script", "args": [trainer arguments], "at": wall time, "attempt_id"}, written whole (a rename)
# the attempt a spare became ("<run id>-<n>"): its processes keep the spare's own tag (supervisor/procs.py's
# ATTEMPT_ENV, by which the supervisor finds them), its records name this attempt (nanochat/metrics.py)
BECAME_ENV = "NANOCHAT_SPARE_BECAME"
# imported by the trainer later, at its first use: torch.optim's optimizers import torch._dynamo in their __init__
# (~3 s on a CPU, half the optimizers-and-data part of a restart), and compile needs it anyway
LATE_IMPORTS = ("torch._dynamo",)
COMPILE_IMPORTS = ("torch._inductor.compile_fx",)  # what torch.compile imports (~5 s on a CPU): for compiled runs
POLL = 0.02  # seconds between looks for the go: a restart waits at most this, an idle spare costs ~nothing


def began() -> float:
    """The wall time this process's start-up counts from: the go of a warm spare, or the process's creation."""
    if go := os.environ.get(GO_TIME_ENV):
        return float(go)
    return started_at()


def wait_for_go(folder: Path) -> dict:
    """Block until the go file appears in `folder`, and return what it says."""
    go = folder / GO_FILE
    while True:
        try:
            return json.loads(go.read_text())
        except FileNotFoundError:
            time.sleep(POLL)


def main(argv: list[str]) -> None:
    script, *also = argv[argv.index("--") + 1 :] if "--" in argv else argv
    importlib.import_module(script)  # the seconds a spare exists for: torch, nanochat, the script's own imports
    for module in (*LATE_IMPORTS, *also):  # also: what the supervisor knows the trainer will need (compile)
        importlib.import_module(module)
    go = wait_for_go(Path(os.environ.pop(DIR_ENV)))
    if go["script"] != script:  # the supervisor checks this before its go; a mismatch is a bug, said plainly
        sys.exit(f"nanochat.spare: imported {script} but the go is for {go['script']}")
    os.environ[BECAME_ENV] = go["attempt_id"]
    os.environ[GO_TIME_ENV] = repr(go["at"])  # from the go, not from now: imports still running when it came count
    sys.argv = [script, "--", *go["args"]]  # as `python -m <script> -- <args>` has it (runpy sets argv[0])
    runpy.run_module(script, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
