"""The device's own budget and usage, read from its cgroup (v1 or v2).

Inside a container the cgroup is the container's, so the ClientApp reports the CPU and memory
limits the lab gave it and what it used, even where cAdvisor does not run.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

# cgroup v1 reports "no limit" as a huge number close to 2**63.
_V1_UNLIMITED = 1 << 60


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _host_memory_bytes(proc: Path) -> int:
    for line in (_read(proc / "meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


class Cgroup:
    """The cgroup of this process. `root` and `proc` can point at fixture trees in tests."""

    def __init__(self, root: str | Path = "/sys/fs/cgroup", proc: str | Path = "/proc"):
        self.root = Path(root)
        self.proc = Path(proc)
        self.version = 2 if (self.root / "cgroup.controllers").exists() else 1
        self._paths = self._own_paths()

    def _own_paths(self) -> dict[str, str]:
        """Controller -> path of this process's cgroup ('' key for v2)."""
        paths: dict[str, str] = {}
        for line in (_read(self.proc / "self" / "cgroup") or "").splitlines():
            parts = line.split(":", 2)
            if len(parts) != 3:
                continue
            _, controllers, path = parts
            for controller in controllers.split(",") if controllers else [""]:
                paths[controller] = path.lstrip("/")
        return paths

    def _file(self, controller: str, name: str) -> str | None:
        """Read a cgroup file: in this process's own cgroup, else at the mount root (containers)."""
        if self.version == 2:
            bases = [self.root / self._paths.get("", ""), self.root]
        else:
            mounts = [self.root / controller] + sorted(self.root.glob(f"*{controller}*"))
            rel = self._paths.get(controller, "")
            bases = [m / rel for m in mounts] + mounts
        for base in bases:
            value = _read(base / name)
            if value is not None:
                return value
        return None

    def in_own_cgroup(self) -> bool:
        """False on a bare host (root cgroup), where cgroup usage is the whole machine's.

        A container shows its cgroup path (v1), or its own namespace whose root, unlike the
        host's root cgroup, has a cpu.max file (v2).
        """
        if self.version == 2:
            return bool(self._paths.get("")) or (self.root / "cpu.max").exists()
        return bool(self._paths.get("memory"))

    def cpu_limit_cores(self) -> float:
        """CPU quota in cores; the number of CPUs when there is no quota."""
        if self.version == 2:
            value = self._file("", "cpu.max")
            if value:
                quota, _, period = value.partition(" ")
                if quota != "max" and period:
                    return int(quota) / int(period)
        else:
            quota = self._file("cpu", "cpu.cfs_quota_us")
            period = self._file("cpu", "cpu.cfs_period_us")
            if quota and period and int(quota) > 0:
                return int(quota) / int(period)
        return float(os.cpu_count() or 1)

    def memory_limit_bytes(self) -> int:
        """Memory limit; the host's memory when there is none."""
        host = _host_memory_bytes(self.proc)
        if self.version == 2:
            value = self._file("", "memory.max")
            limit = int(value) if value and value != "max" else 0
        else:
            value = self._file("memory", "memory.limit_in_bytes")
            limit = int(value) if value and int(value) < _V1_UNLIMITED else 0
        if limit and host:
            return min(limit, host)
        return limit or host

    def cpu_usage_seconds(self) -> float | None:
        if self.version == 2:
            for line in (self._file("", "cpu.stat") or "").splitlines():
                if line.startswith("usage_usec "):
                    return int(line.split()[1]) / 1e6
            return None
        value = self._file("cpuacct", "cpuacct.usage")
        return int(value) / 1e9 if value else None

    def memory_peak_bytes(self) -> int | None:
        name = ("memory.peak", "memory.current") if self.version == 2 else ("memory.max_usage_in_bytes",)
        for n in name:
            value = self._file("memory", n)
            if value:
                return int(value)
        return None

    def oom_kills(self) -> int | None:
        """Processes the kernel's OOM killer killed in this cgroup since it was created (None: unknown)."""
        text = self._file("", "memory.events") if self.version == 2 else self._file("memory", "memory.oom_control")
        for line in (text or "").splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return None


def oom_note(cgroup: Cgroup | None = None) -> str:
    """What to add to an error when processes of this container were OOM-killed ('' when none were).

    Ends with a `[oom-kills=N]` marker that the ServerApp reads from the error reply.
    """
    cgroup = cgroup or Cgroup()
    kills = cgroup.oom_kills() if cgroup.in_own_cgroup() else None
    if not kills:
        return ""
    limit = cgroup.memory_limit_bytes() / 2**20
    return f" (out of memory: {kills} OOM kill(s) in this container, memory limit {limit:.0f} MiB) [oom-kills={kills}]"


def _process_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _process_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class FitMeter:
    """Measures CPU seconds and peak memory of one fit, from the cgroup when the device has one."""

    def __init__(self, cgroup: Cgroup | None = None):
        self.cgroup = cgroup or Cgroup()
        self.use_cgroup = self.cgroup.in_own_cgroup() and self.cgroup.cpu_usage_seconds() is not None
        self._cpu0 = 0.0

    def _cpu(self) -> float:
        value = self.cgroup.cpu_usage_seconds() if self.use_cgroup else None
        return value if value is not None else _process_cpu_seconds()

    def __enter__(self) -> FitMeter:
        self._cpu0 = self._cpu()
        return self

    def __exit__(self, *exc) -> None:
        self.cpu_seconds = self._cpu() - self._cpu0
        peak = self.cgroup.memory_peak_bytes() if self.use_cgroup else None
        self.memory_peak_bytes = max(peak or 0, _process_peak_bytes())

    def metrics(self) -> dict[str, float]:
        return {
            "cpu-limit-cores": self.cgroup.cpu_limit_cores(),
            "memory-limit-bytes": float(self.cgroup.memory_limit_bytes()),
            "memory-peak-bytes": float(self.memory_peak_bytes),
            "cpu-seconds": float(self.cpu_seconds),
            "oom-kills": float((self.cgroup.oom_kills() or 0) if self.use_cgroup else 0),
        }


def tf_threads(cgroup: Cgroup | None = None) -> int:
    """Threads for TensorFlow: the whole cores of the quota, at least one.

    On these devices one thread trains faster than two under a 1-CPU quota (no throttling).
    """
    return max(1, int((cgroup or Cgroup()).cpu_limit_cores()))
