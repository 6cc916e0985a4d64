"""The node's health check, run before each attempt (`--health-check`, the default): is this machine fit to train?

    disk      the filesystems of the checkpoint and run dirs have room for the next save: free space of at least
              DISK_MARGIN x the largest checkpoint in the checkpoint dir (the next save writes a whole one before
              the old ones are pruned), and never under MIN_FREE_DISK
    memory    the memory this node's processes may still take (the host's available memory, or the memory
              cgroup's limit minus its usage where that is smaller: supervisor/memory.py) covers what the run
              needs: the previous attempt's peak RSS, or MIN_FREE_MEMORY before any attempt has run
    device    each local GPU (on a CPU run: only in a drill, below) initialises and multiplies a fixed integer
              matrix by its transpose; the answer must equal the exact one to the last bit (small integers are
              exact in fp32 and in TF32). A GPU of which another process holds more than half the memory fails
              too (a worker of an earlier attempt that never went away). It runs in a subprocess (`python -m
              supervisor.health`) with a time limit, so a wedged driver cannot hang the supervisor, which never
              imports torch itself.

The cheap checks (disk, memory; milliseconds) run before every attempt. The device check (a torch import: seconds,
see scripts/bench_health.py) runs before the first attempt of each invocation and before a restart after a
failure that could be the machine's (`suspicious`: a CUDA or NCCL error, a collective timeout, an Xid in the
kernel log), and only when the cheap checks pass (torch's import alone needs a few hundred MB, which a node short
of memory may not have). A node that fails gets the AttemptClass `unhealthy`, and `policy.decide` gives up at
once: a restart on a sick machine only loops.

A trainer on the CPU gets disk and memory checked, not the device: the CPU runs this supervisor too, and the
check's torch import would cost every invocation seconds for nothing (`device_checked`). For tests and drills,
NANOCHAT_DEBUG_HEALTH=wrong-answer:I runs the device check even there, the CPU standing in for device 0, and makes
the subprocess perturb the answer of device I after the device computed it, so the same comparison sees it wrong.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from nanochat import checkpoint
from supervisor import memory
from supervisor.states import AttemptClass, Outcome

DEBUG_ENV = "NANOCHAT_DEBUG_HEALTH"
MIN_FREE_DISK = 16 << 20  # bytes: room for the logs and records; the checkpoints' own size asks for more once known
DISK_MARGIN = 1.5  # x the largest checkpoint: the next save, plus slack for its logs and records
MIN_FREE_MEMORY = 512 << 20  # bytes: before any attempt has measured the run's peak RSS
DEVICE_TIMEOUT = 120.0  # seconds for the device subprocess: torch's import (~1-3 s) plus CUDA's initialisation
MIN_GPU_FREE = 0.5  # of a GPU's memory that must be free: a stray process holding more takes our workers' room
MATRIX = 256  # the known computation: a MATRIX x MATRIX integer matrix times its transpose
# words in a failure's message that point at the machine rather than the program (CUDA and NCCL errors, ECC)
MACHINE_WORDS = ("cuda error", "cudaerror", "cuda_error", "nccl", "cublas", "cudnn", "ecc error", "uncorrectable",
                 "device-side assert", "illegal memory access", "unspecified launch failure", "xid")  # fmt: skip


@dataclass(frozen=True)
class Problem:
    """One failed check: its name, what it saw, and what to do."""

    check: str  # "disk", "memory" or "device"
    detail: str
    fix: str

    def line(self) -> str:
        return f"{self.check} check failed: {self.detail}; {self.fix}"


def check_node(checkpoint_dir: Path, other_dirs: list[Path], device_type: str, devices: int, peak_rss: int = 0,
               device: bool = True, since: float | None = None) -> list[Problem]:  # fmt: skip
    """Every failed check of this node (empty: healthy). `device_type` is the trainer's (auto, cuda, cpu);
    `devices` how many local GPUs a CUDA run uses; `peak_rss` the previous attempt's peak (0: none yet); `device`
    whether to run the device check too (see `suspicious`). A failed device check also quotes the newest Xid line
    the GPU driver logged since `since` (wall time), if any."""
    problems = disk_problems(checkpoint_dir, other_dirs) + memory_problems(peak_rss)
    if problems or not device or not device_checked(device_type):
        return problems
    problems = device_problems(device_type, devices)
    if problems and since is not None and (xids := memory.kernel_xids(since)):
        problems = [replace(p, detail=f"{p.detail} (kernel log: {xids[-1]})") for p in problems]
    return problems


def device_checked(device_type: str) -> bool:
    """Whether a trainer of `device_type` (auto, cuda, cpu) gets the device check: one on GPUs (auto: where an
    NVIDIA driver is installed), or any in a drill (module doc)."""
    gpus = (
        device_type == "cuda" or device_type == "auto" and (shutil.which("nvidia-smi") or Path("/dev/nvidia0").exists())
    )
    return bool(gpus or os.environ.get(DEBUG_ENV))


def suspicious(outcome: Outcome, since: float) -> bool:
    """Could the machine have caused this failure? A collective that timed out, an error naming CUDA or NCCL (or
    an ECC error), or an Xid line in the kernel log since `since` (wall time): then the device check runs again
    before the restart. Other failures (an exception in the trainer, an OOM, a kill) restart without it: the
    check costs a torch import (seconds), and the first attempt of each invocation has it anyway."""
    if outcome.kind is AttemptClass.NCCL_TIMEOUT:
        return True
    text = outcome.message.lower()
    return any(w in text for w in MACHINE_WORDS) or bool(memory.kernel_xids(since))


def disk_problems(checkpoint_dir: Path, other_dirs: list[Path]) -> list[Problem]:
    try:
        largest = max((c.size for c in checkpoint.scan(checkpoint_dir)), default=0)
    except OSError:
        largest = 0
    need = max(MIN_FREE_DISK, int(DISK_MARGIN * largest))
    why = f"{DISK_MARGIN:g} x the largest checkpoint, {_mib(largest)}" if need > MIN_FREE_DISK else "the minimum"
    return [
        Problem(
            "disk",
            f"{_mib(d['free'])} free of {_mib(d['total'])} at {d['path']}, under the {_mib(need)} needed ({why})",
            "free space there, or point --checkpoint-dir elsewhere",
        )  # fmt: skip
        for d in memory.disk_space([checkpoint_dir, *other_dirs])
        if d["free"] < need
    ]


def memory_problems(peak_rss: int) -> list[Problem]:
    free = memory.free_memory()
    need = peak_rss or MIN_FREE_MEMORY
    if free >= need:
        return []
    why = "the previous attempt's peak RSS" if peak_rss else "the minimum before any attempt"
    return [Problem("memory", f"{_mib(free)} free for this node's processes, under the {_mib(need)} needed ({why})",
                    "stop what else uses the memory, or raise the memory limit (cgroup) of this job")]  # fmt: skip


def device_problems(device_type: str, devices: int, timeout: float = DEVICE_TIMEOUT) -> list[Problem]:
    """Run the known computation on each local device in a subprocess and judge its answers."""
    fix = "take this machine out of service (nvidia-smi -q, the kernel log's Xid lines) or run on other nodes"
    cmd = [sys.executable, "-m", "supervisor.health", device_type, str(devices)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        try:  # a process stuck in the driver may not even die: never wait for it long
            proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        return [Problem("device", f"the {device_type} check did not finish within {timeout:g}s (a wedged driver?)",
                        fix)]  # fmt: skip
    results = []
    for line in out.splitlines():
        try:
            results.append(json.loads(line))
        except ValueError:
            continue
    if proc.returncode != 0 or not results:
        tail = " | ".join(out.strip().splitlines()[-3:]) or "no output"
        return [Problem("device", f"the device check exited with {proc.returncode}: {tail}", fix)]
    return [Problem("device", judge(r), fix) for r in results if judge(r)]


def judge(result: dict) -> str:
    """What is wrong with one device's answer ("" if nothing)."""
    where = f"{result['device']} ({result.get('name', '?')})"
    if result.get("error"):
        return f"{where}: {result['error']}"
    if result["max_error"] != 0:
        return f"{where}: {MATRIX}x{MATRIX} integer matmul off by up to {result['max_error']:g} (exact answer expected)"
    free, total = result.get("free"), result.get("total")
    if free is not None and total and free < MIN_GPU_FREE * total:
        return f"{where}: only {_mib(free)} of {_mib(total)} free (another process holds the rest)"
    return ""


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def _probe(device_type: str, devices: int) -> int:
    """The subprocess: one JSON line per device with its answer's largest error (or the error it raised)."""
    import platform

    import torch

    fault = os.environ.get(DEBUG_ENV, "")
    a = torch.randint(-4, 5, (MATRIX, MATRIX), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    exact = a @ a.T  # integer arithmetic on the CPU: the answer every device must give
    cuda = device_type == "cuda" or device_type == "auto" and (torch.cuda.is_available() or shutil.which("nvidia-smi"))
    names = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if cuda else ["cpu"]
    if cuda and len(names) < devices:
        print(json.dumps({"device": "cuda", "name": "-", "error": f"torch sees {len(names)} GPU(s), the run uses"
                          f" {devices}"}))  # fmt: skip
    for i, name in enumerate(names):
        out: dict = {"device": name}
        try:
            x = a.to(name, torch.float32)
            if name.startswith("cuda"):
                out["name"] = torch.cuda.get_device_name(name)
                out["free"], out["total"] = torch.cuda.mem_get_info(name)
            else:
                out["name"] = platform.processor() or platform.machine()
            got = (x @ x.T).cpu().to(torch.int64)  # .cpu() waits for the device
            if fault == f"wrong-answer:{i}":  # the drill: a wrong answer from this device, through the same check
                got[0, 0] += 1
            out["max_error"] = (got - exact).abs().max().item()
        except Exception as e:  # noqa: BLE001 - whatever the device raises is the check's finding
            out["error"] = f"{type(e).__name__}: {e}"
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_probe(sys.argv[1], int(sys.argv[2])))
