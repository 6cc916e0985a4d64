"""Defaults for `nanochat-run train` inside a SLURM job, read from the SLURM_* variables, so that an sbatch script
needs no rendezvous flags: `srun --ntasks-per-node=1 nanochat-run train ...` runs one supervisor per node, and each
finds out here how many nodes there are, which one it is, and where they meet.

- nnodes: the step's node count (SLURM_STEP_NUM_NODES, else SLURM_NNODES).
- node_rank: SLURM_NODEID.
- rdzv_endpoint: the step's first node (from SLURM_STEP_NODELIST / SLURM_JOB_NODELIST) and RDZV_PORT; torchrun on
  that node hosts the c10d rendezvous store, and the others connect to it.
- rdzv_id: the job id, so a rendezvous never mixes two jobs.
- nproc_per_node: SLURM_GPUS_ON_NODE when the job asked for GPUs (otherwise the supervisor's own default).

A one-node job gets none of the rendezvous settings: plain `torchrun --standalone`. Only what the command line left
out is filled in.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from collections.abc import Mapping

from supervisor.launch import UsageProblem

RDZV_PORT = 29500  # torchrun's usual port; the first node must have it (and the next, the supervisors' channel) free
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def from_env(environ: Mapping[str, str], rendezvous: bool = True) -> dict:
    """The supervisor settings a SLURM job implies (empty outside SLURM); with `rendezvous=False` (the user chose
    --nnodes, --node-rank or --rdzv-endpoint) none of those three. Raises UsageProblem for a multi-node job that
    would not run one supervisor per node (started outside an `srun` step, or several tasks per node)."""
    job = environ.get("SLURM_JOB_ID")
    if not job:
        return {}
    found: dict = {"rdzv_id": f"slurm-{job}"}
    gpus = _int(environ.get("SLURM_GPUS_ON_NODE"))
    if gpus:
        found["nproc_per_node"] = gpus
    in_step = "SLURM_STEP_ID" in environ or "SLURM_STEPID" in environ
    nodes = _int(environ.get("SLURM_STEP_NUM_NODES" if in_step else "SLURM_NNODES")) or 1
    if nodes == 1 or not rendezvous:
        return found
    if not in_step:
        raise UsageProblem(
            f"SLURM job {job} has {nodes} nodes but nanochat-run runs outside an srun step, on one of them only: run"
            " `srun --ntasks-per-node=1 nanochat-run train ...` (see scripts/slurm/nanochat.sbatch), or pass"
            " --nnodes 1 to train on this node alone"
        )
    tasks = _int(environ.get("SLURM_STEP_NUM_TASKS"))
    if tasks and tasks != nodes:
        raise UsageProblem(
            f"the srun step of SLURM job {job} runs {tasks} tasks on {nodes} nodes: nanochat-run needs exactly one"
            " per node (`srun --ntasks-per-node=1`); torchrun starts the workers of each node"
        )
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or ""
    found.update(nnodes=str(nodes), rdzv_endpoint=f"{first_host(nodelist)}:{RDZV_PORT}")
    if (rank := _int(environ.get("SLURM_NODEID"))) is not None:
        found["node_rank"] = rank
    return found


def fill(sup, environ: Mapping[str, str], ctx) -> str | None:
    """Set the fields of `sup` (a Supervision) that SLURM implies and the command line (click's `ctx`) left at their
    defaults (the rendezvous settings only when none of them was given). Returns one line saying what was taken
    from SLURM, or None outside SLURM."""

    def given(name: str) -> bool:
        source = ctx.get_parameter_source(name) if name in ctx.params else None
        return source is not None and source.name != "DEFAULT"

    found = from_env(environ, rendezvous=not any(map(given, ("nnodes", "node_rank", "rdzv_endpoint"))))
    if not found:
        return None
    own = {f.name for f in dataclasses.fields(sup)}
    taken = []
    for name, value in found.items():
        if name in own and not given(name):
            setattr(sup, name, value)
            taken.append(f"--{name.replace('_', '-')}={value}")
    if not taken:
        alone = sup.nnodes == "1" and not sup.rdzv_endpoint
        taken = ["one node (torchrun --standalone)" if alone else "rendezvous settings from the command line"]
    return f"SLURM job {environ['SLURM_JOB_ID']}: " + " ".join(taken)


def first_host(nodelist: str) -> str:
    """The first host name of a SLURM node list such as `node[01-04,07],gpu7`: parsed here, or by `scontrol show
    hostnames` for a syntax this parser does not know."""
    try:
        return expand(nodelist)[0]
    except ValueError:
        pass
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            out = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
            if out.returncode == 0 and out.stdout.split():
                return out.stdout.split()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    raise UsageProblem(f"cannot read the SLURM node list {nodelist!r}: pass --rdzv-endpoint HOST:PORT")


def expand(nodelist: str) -> list[str]:
    """Every host of a node list, in order: comma-separated names, each with any number of bracketed groups of
    numbers and ranges (`a[1-2]b[3,5]`), zero-padding kept. ValueError for anything else."""
    hosts: list[str] = []
    for item in _split_top(nodelist.strip()):
        if not item:
            raise ValueError(f"empty name in node list {nodelist!r}")
        names = [""]
        for m in re.finditer(r"([^\[\]]*)(?:\[([^\[\]]*)\])?", item):
            choices = [""] if m.group(2) is None else _numbers(m.group(2))
            names = [n + m.group(1) + c for n in names for c in choices]
        hosts += names
    if not hosts:
        raise ValueError("empty node list")
    return hosts


def _split_top(text: str) -> list[str]:
    """Split at the commas outside brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth not in (0, 1):
            raise ValueError(f"unbalanced brackets in {text!r}")
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced brackets in {text!r}")
    return [*items, text[start:]]


def _numbers(group: str) -> list[str]:
    out = []
    for part in group.split(","):
        m = _RANGE.match(part.strip())
        if not m:
            raise ValueError(f"bad range {part!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"bad range {part!r}")
        out += [str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1)]
    return out


def _int(value: str | None) -> int | None:
    """SLURM counts such as `4` or `4(x2)`: the leading number."""
    m = re.match(r"\d+", value or "")
    return int(m.group()) if m else None
