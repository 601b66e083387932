"""What the container lets the router use: cores from a cgroup v2 CPU quota (and `router.workers:
auto` honouring it), and CPU seconds from the cgroup or the process."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from deploy.cgroup import at_cgroup_root, available_cores, cgroup_cpu_seconds, cpu_seconds_source
from deploy.workers import resolve_workers


@pytest.mark.parametrize(
    ("cpu_max", "cpus", "expected"),
    [
        ("max 100000\n", 8, 8),  # no quota
        ("200000 100000\n", 8, 2),
        ("150000 100000\n", 8, 2),  # 1.5 cores: rounded up
        ("50000 100000\n", 8, 1),
        ("1000 100000\n", 8, 1),
        ("800000 100000\n", 4, 4),  # quota above the CPUs it may run on
        ("400000 200000\n", 8, 2),
        ("300000\n", 8, 3),  # no period: the kernel's 100000
        ("", 8, 8),
        ("garbage here\n", 8, 8),
        ("-1 100000\n", 8, 8),
        ("100000 0\n", 8, 8),
        ("1 2 3\n", 8, 8),
    ],
)
def test_available_cores_from_cgroup(
    tmp_path: Path, cpu_max: str, cpus: int, expected: int
) -> None:
    path = tmp_path / "cpu.max"
    path.write_text(cpu_max)
    assert available_cores(path, cpus=cpus) == expected


def test_available_cores_without_cgroup_is_the_affinity(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    assert available_cores(tmp_path / "missing") == affinity
    assert available_cores(tmp_path / "missing", cpus=3) == 3
    (tmp_path / "cpu.max").write_bytes(b"\xff\xfe")
    assert available_cores(tmp_path / "cpu.max", cpus=3) == 3


def test_available_cores_defaults_to_a_real_answer() -> None:
    assert available_cores() >= 1


def test_cgroup_cpu_seconds(tmp_path: Path) -> None:
    stat = tmp_path / "cpu.stat"
    assert cgroup_cpu_seconds(stat) is None
    stat.write_text("usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\n")
    assert cgroup_cpu_seconds(stat) == 1.5
    stat.write_text("user_usec 1000000\n")
    assert cgroup_cpu_seconds(stat) is None
    stat.write_text("usage_usec lots\n")
    assert cgroup_cpu_seconds(stat) is None


def test_cpu_seconds_source(tmp_path: Path) -> None:
    stat = tmp_path / "cpu.stat"
    assert cpu_seconds_source(stat) is time.process_time
    stat.write_text("usage_usec 2000000\n")
    read = cpu_seconds_source(stat)
    assert read() == 2.0
    stat.write_text("usage_usec 2500000\n")
    assert read() == 2.5
    stat.unlink()
    with pytest.raises(OSError):
        read()


def test_workers_auto_honours_the_cgroup_quota(tmp_path: Path) -> None:
    cpus = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("150000 100000\n")  # 1.5 cores: 2, if there are 2 CPUs to run on
    assert resolve_workers("auto", cpu_max=cpu_max) == min(2, cpus)
    cpu_max.write_text("50000 100000\n")
    assert resolve_workers("auto", cpu_max=cpu_max) == 1
    cpu_max.write_text("max 100000\n")
    assert resolve_workers("auto", cpu_max=cpu_max) == cpus
    assert resolve_workers(3, cpu_max=cpu_max) == 3
    assert resolve_workers("5", cpu_max=cpu_max) == 5


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0::/\n", True),  # a container's own cgroup namespace
        ("9:name=systemd:/\n1:cpu:/\n0::/\n", True),
        ("0::/user.slice/user-1000.slice/session-2.scope\n", False),  # a host
        ("", False),
    ],
)
def test_at_cgroup_root(tmp_path: Path, text: str, expected: bool) -> None:
    proc_cgroup = tmp_path / "cgroup"
    proc_cgroup.write_text(text)
    assert at_cgroup_root(proc_cgroup) is expected
    assert at_cgroup_root(tmp_path / "missing") is False


def test_cpu_seconds_source_reads_a_hosts_root_cgroup_only_in_a_container(tmp_path: Path) -> None:
    stat = tmp_path / "cpu.stat"
    stat.write_text("usage_usec 2000000\n")
    proc_cgroup = tmp_path / "cgroup"
    proc_cgroup.write_text("0::/user.slice/session-2.scope\n")

    def own() -> float:
        return 7.0

    assert cpu_seconds_source(stat, fallback=own, proc_cgroup=proc_cgroup) is own
    proc_cgroup.write_text("0::/\n")
    assert cpu_seconds_source(stat, fallback=own, proc_cgroup=proc_cgroup)() == 2.0
    stat.unlink()
    assert cpu_seconds_source(stat, fallback=own, proc_cgroup=proc_cgroup) is own
