"""Evidence about resources, read when an attempt starts and ends: memory cgroups and their OOM-kill counters,
the kernel log's OOM kills, the memory limit, and free disk space. Every reader is best effort: it returns
None or nothing when it cannot read, never raises.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import psutil

NEARLY_FULL_CAP = 1 << 30  # a filesystem with less free than 1% of its size, or than this, counts as full


def memory_cgroup(pid: int | str = "self") -> tuple[Path, int] | None:
    """(directory, cgroup version) of the memory cgroup of `pid`, v1 or v2."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):  # v1: a hierarchy of its own
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/"), 1
    for line in lines:
        if line.startswith("0::"):  # v2: the unified hierarchy
            return Path("/sys/fs/cgroup") / line[3:].lstrip("/"), 2
    return None


def _oom_counter(path: Path) -> int | None:
    """The `oom_kill N` line of memory.events (v2), memory.oom_control (v1) or /proc/vmstat."""
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        pass
    return None


def cgroup_oom_file(pid: int | str = "self") -> Path | None:
    cg = memory_cgroup(pid)
    if cg is None:
        return None
    return cg[0] / ("memory.events" if cg[1] == 2 else "memory.oom_control")


def host_oom_kills() -> int | None:
    return _oom_counter(Path("/proc/vmstat"))


@dataclass
class OomCounters:
    """OOM-kill counters of each watched process's memory cgroup, read when we first saw the process, plus the
    host-wide counter at the start. Compared at the end, they say whether the kernel killed something in there."""

    host: int | None = field(default_factory=host_oom_kills)
    cgroups: dict[int, tuple[Path, int]] = field(default_factory=dict)  # pid -> (counter file, count then)

    def watch(self, pid: int) -> None:
        if pid in self.cgroups:
            return
        path = cgroup_oom_file(pid)
        count = _oom_counter(path) if path else None
        if path is not None and count is not None:
            self.cgroups[pid] = (path, count)

    def cgroup_increase(self) -> dict[int, int]:
        """pid -> how many OOM kills its memory cgroup saw since we first saw the pid (readable ones only)."""
        out = {}
        for pid, (path, before) in self.cgroups.items():
            now = _oom_counter(path)
            if now is not None:
                out[pid] = now - before
        return out

    def host_increase(self) -> int | None:
        now = host_oom_kills()
        return None if now is None or self.host is None else now - self.host


def kernel_log(since: float, needle: str, path: str = "/dev/kmsg", limit: int = 100_000) -> list[tuple[float, str]]:
    """(wall time, text) of each kernel log record containing `needle` logged after `since` (wall time). Reads
    /dev/kmsg without blocking (one record per read there); empty when it cannot be read."""
    found: list[tuple[float, str]] = []
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return found
    boot = psutil.boot_time()
    try:
        for _ in range(limit):
            try:
                data = os.read(fd, 8192)
            except BlockingIOError:
                break  # the end of the buffer
            except BrokenPipeError:
                continue  # a record was overwritten while we read: go on with the next
            except OSError:
                break
            if not data:
                break
            for record in data.decode(errors="replace").splitlines():
                head, _, msg = record.partition(";")  # "priority,sequence,microseconds since boot,flags;text"
                parts = head.split(",")
                if needle not in msg or len(parts) < 3:
                    continue
                try:
                    stamp = boot + int(parts[2]) / 1e6
                except ValueError:
                    continue
                if stamp >= since - 1:
                    found.append((stamp, msg.strip()))
    finally:
        os.close(fd)
    return found


def kernel_oom_kills(pids: set[int], since: float, path: str = "/dev/kmsg") -> dict[int, str]:
    """pid -> the kernel log line "... Killed process <pid> ..." for each of `pids` killed after `since` (wall
    time); a pid reused since an older kill does not count."""
    found: dict[int, str] = {}
    for _, msg in kernel_log(since, "Killed process ", path) if pids else []:
        try:
            pid = int(msg.split("Killed process ", 1)[1].split()[0])
        except (ValueError, IndexError):
            continue
        if pid in pids:
            found[pid] = msg
    return found


def kernel_xids(since: float, path: str = "/dev/kmsg") -> list[str]:
    """The NVIDIA driver's Xid lines ("NVRM: Xid (PCI:...): 79, ...": a GPU error the driver saw) since `since`."""
    return [msg for _, msg in kernel_log(since, "NVRM: Xid", path)]


def memory_limit() -> int:
    """The memory this supervisor's processes may use: the memory cgroup's limit if set, else physical RAM."""
    limit = psutil.virtual_memory().total
    cg = memory_cgroup()
    if cg:
        name = "memory.max" if cg[1] == 2 else "memory.limit_in_bytes"
        try:
            text = (cg[0] / name).read_text().strip()
            if text.isdigit():
                limit = min(limit, int(text))
        except OSError:
            pass
    return limit


def free_memory() -> int:
    """The memory this supervisor's processes may still take: the host's available memory, or the memory cgroup's
    limit minus its usage where that is less. The page cache of files counts as free (the kernel reclaims it
    before it kills anything); shared memory (tmpfs, /dev/shm snapshots) does not."""
    free = psutil.virtual_memory().available
    cg = memory_cgroup()
    if cg is None:
        return free
    names = ("memory.max", "memory.current") if cg[1] == 2 else ("memory.limit_in_bytes", "memory.usage_in_bytes")
    try:
        limit, usage = ((cg[0] / name).read_text().strip() for name in names)
        stat = dict(line.split() for line in (cg[0] / "memory.stat").read_text().splitlines() if " " in line)
    except (OSError, ValueError):
        return free
    if not (limit.isdigit() and usage.isdigit()):  # v2's "max": no limit
        return free
    v1 = "total_" if cg[1] == 1 else ""  # v1 counts the cgroup's own pages without it, its children's with it
    cache = int(stat.get(f"{v1}inactive_file", 0)) + int(stat.get(f"{v1}active_file", 0))
    return min(free, max(0, int(limit) - int(usage) + cache))


def disk_space(paths: list[Path]) -> list[dict]:
    """[{path, free, total}] for the filesystem of each path (its nearest existing parent), one entry per
    filesystem."""
    out, seen = [], set()
    for path in paths:
        probe = path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            dev = probe.stat().st_dev
            usage = shutil.disk_usage(probe)
        except OSError:
            continue
        if dev not in seen:
            seen.add(dev)
            out.append({"path": str(path), "free": usage.free, "total": usage.total})
    return out


def nearly_full(disk: dict) -> bool:
    return disk["free"] < min(disk["total"] // 100, NEARLY_FULL_CAP)
