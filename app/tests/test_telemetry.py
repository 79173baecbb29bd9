from pathlib import Path

from flowerlab_app.telemetry import Cgroup, FitMeter, oom_note, tf_threads

GIB = 1024**3


def cgroup(fixtures: Path, name: str) -> Cgroup:
    return Cgroup(root=fixtures / name / "sys", proc=fixtures / name / "proc")


def test_cgroup_v1_limits_and_usage(fixtures):
    cg = cgroup(fixtures, "cgroup-v1")
    assert cg.version == 1
    assert cg.in_own_cgroup()
    assert cg.cpu_limit_cores() == 1.5
    assert cg.memory_limit_bytes() == 2 * GIB
    assert cg.memory_peak_bytes() == 1288490188
    assert cg.cpu_usage_seconds() == 2.5
    assert tf_threads(cg) == 1


def test_cgroup_v2_limits_and_usage(fixtures):
    cg = cgroup(fixtures, "cgroup-v2")
    assert cg.version == 2
    assert cg.in_own_cgroup()
    assert cg.cpu_limit_cores() == 0.5
    assert cg.memory_limit_bytes() == GIB
    assert cg.memory_peak_bytes() == 734003200
    assert cg.cpu_usage_seconds() == 4.2
    assert tf_threads(cg) == 1


def test_cgroup_v2_without_limits_reports_the_host(fixtures):
    import os

    cg = cgroup(fixtures, "cgroup-v2-unlimited")
    assert not cg.in_own_cgroup()
    assert cg.cpu_limit_cores() == float(os.cpu_count())
    assert cg.memory_limit_bytes() == 24576000 * 1024


def test_cgroup_v1_inside_a_container_reads_the_mount_root(tmp_path, fixtures):
    """Docker on cgroup v1 mounts the container's own cgroup at /sys/fs/cgroup/<controller>."""
    sys_dir, proc = tmp_path / "sys", tmp_path / "proc"
    (sys_dir / "cpu").mkdir(parents=True)
    (sys_dir / "memory").mkdir()
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text("5:memory:/docker/0123\n4:cpu:/docker/0123\n")
    (proc / "meminfo").write_text("MemTotal: 24576000 kB\n")
    (sys_dir / "cpu" / "cpu.cfs_quota_us").write_text("75000\n")
    (sys_dir / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    (sys_dir / "memory" / "memory.limit_in_bytes").write_text(f"{3 * GIB}\n")
    cg = Cgroup(root=sys_dir, proc=proc)
    assert cg.cpu_limit_cores() == 0.75
    assert cg.memory_limit_bytes() == 3 * GIB


def test_unlimited_v1_memory_is_the_host_memory(tmp_path):
    sys_dir, proc = tmp_path / "sys", tmp_path / "proc"
    (sys_dir / "memory").mkdir(parents=True)
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text("5:memory:/\n")
    (proc / "meminfo").write_text("MemTotal: 1000 kB\n")
    (sys_dir / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert Cgroup(root=sys_dir, proc=proc).memory_limit_bytes() == 1000 * 1024


def test_fit_meter_measures_this_process():
    with FitMeter() as meter:
        sum(i * i for i in range(300_000))
    m = meter.metrics()
    assert m["cpu-seconds"] > 0
    assert m["memory-peak-bytes"] > 10 * 1024**2
    assert m["cpu-limit-cores"] > 0 and m["memory-limit-bytes"] > 0


def test_oom_kills_are_read_from_the_cgroup_and_named_in_errors(fixtures):
    v1, v2 = cgroup(fixtures, "cgroup-v1"), cgroup(fixtures, "cgroup-v2")
    assert (v1.oom_kills(), v2.oom_kills()) == (2, 3)
    assert oom_note(v1) == " (out of memory: 2 OOM kill(s) in this container, memory limit 2048 MiB) [oom-kills=2]"
    assert cgroup(fixtures, "cgroup-v2-unlimited").oom_kills() is None
    assert oom_note(cgroup(fixtures, "cgroup-v2-unlimited")) == ""
