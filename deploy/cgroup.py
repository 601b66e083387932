"""What the container lets the router use: cores from the cgroup v2 CPU quota, and CPU seconds.

These read files (the I/O edge); the deciders get plain numbers. Every reader takes its path as
a parameter so that tests can point it at a file of their own.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_CPU_STAT = Path("/sys/fs/cgroup/cpu.stat")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")


def available_cores(cpu_max: Path = CGROUP_CPU_MAX, *, cpus: int | None = None) -> int:
    """The cores this process may use: the cgroup v2 CPU quota (``cpu.max``, quota / period,
    rounded up) capped by the CPUs it may run on (``cpus``, default ``sched_getaffinity``).

    No quota (``max``), no cgroup v2 file, or one that does not parse: the CPU count alone.
    """
    if cpus is None:
        cpus = _schedulable_cpus()
    quota = _cgroup_quota_cores(cpu_max)
    if quota is None:
        return max(cpus, 1)
    return max(1, min(cpus, quota))


def _schedulable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _cgroup_quota_cores(cpu_max: Path) -> int | None:
    try:
        fields = cpu_max.read_text().split()
    except (OSError, UnicodeDecodeError):
        return None
    if not fields or fields[0] == "max" or len(fields) > 2:
        return None
    try:
        quota = int(fields[0])
        period = int(fields[1]) if len(fields) == 2 else 100_000  # the kernel's default
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return -(-quota // period)  # ceiling, in integers


def cgroup_cpu_seconds(cpu_stat: Path = CGROUP_CPU_STAT) -> float | None:
    """CPU seconds used by every process of this cgroup (``usage_usec`` of ``cpu.stat``), or
    None without cgroup v2. In a container that is all the router's workers together."""
    try:
        text = cpu_stat.read_text()
    except (OSError, UnicodeDecodeError):
        return None
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec":
            try:
                return int(value) / 1e6
            except ValueError:
                return None
    return None


def at_cgroup_root(proc_cgroup: Path = PROC_SELF_CGROUP) -> bool:
    """Whether the process sits at the root of its cgroup namespace (``0::/``): a container's
    own cgroup. On a host the same ``/sys/fs/cgroup`` is the root cgroup of the whole machine."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return False
    return "0::/" in lines


def cpu_seconds_source(
    cpu_stat: Path = CGROUP_CPU_STAT,
    *,
    fallback: Callable[[], float] = time.process_time,
    proc_cgroup: Path | None = None,
) -> Callable[[], float]:
    """A reader of the CPU seconds the router uses: the cgroup's when there is one (it counts
    every process of the container), else ``fallback`` (this process's ``time.process_time``).

    With ``proc_cgroup`` (a ``/proc/<pid>/cgroup`` file) the cgroup counts only when the process
    is at its cgroup namespace's root (:func:`at_cgroup_root`), so that a router run on a host
    does not read the CPU of the whole machine.
    """
    if cgroup_cpu_seconds(cpu_stat) is None:
        return fallback
    if proc_cgroup is not None and not at_cgroup_root(proc_cgroup):
        return fallback

    def read() -> float:
        seconds = cgroup_cpu_seconds(cpu_stat)
        if seconds is None:
            raise OSError(f"cannot read {cpu_stat}")
        return seconds

    return read
