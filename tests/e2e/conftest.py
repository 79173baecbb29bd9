"""Helpers for the end-to-end test of the lab: run playbooks, read the inventory, talk to Docker."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOCAL_INVENTORY = ROOT / "inventory" / "local"
RECAP = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def tool(name: str) -> str:
    """A command from the venv that runs the tests, else from PATH."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def run_site(inventory: Path, *extra: str, playbook: str | tuple[str, ...] = "site.yml") -> subprocess.CompletedProcess:
    """ansible-playbook of one playbook, or of several in one call (e.g. flower.yml then run.yml)."""
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1")
    playbooks = (playbook,) if isinstance(playbook, str) else playbook
    cmd = [tool("ansible-playbook"), *playbooks, "-i", str(inventory), *extra]
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    print(f"$ {' '.join(cmd)}  ({time.monotonic() - started:.0f} s, rc={proc.returncode})")
    print(proc.stdout[-6000:])
    print(proc.stderr[-3000:], file=sys.stderr)
    return proc


def recap(output: str) -> dict[str, dict[str, int]]:
    return {
        host: {"ok": int(ok), "changed": int(changed), "unreachable": int(unr), "failed": int(failed)}
        for host, ok, changed, unr, failed in RECAP.findall(output)
    }


def inventory_vars(inventory: Path) -> dict:
    out = subprocess.run(
        [tool("ansible-inventory"), "-i", str(inventory), "--list"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)["_meta"]["hostvars"]


def docker(*args: str, check: bool = True) -> str:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check).stdout


def inspect(name: str) -> dict:
    return json.loads(docker("inspect", name))[0]


def lab_containers() -> dict[str, tuple[str, str]]:
    """Container name -> (id, StartedAt) for every container of the lab."""
    ids = docker("ps", "-aq", "--filter", "label=org.flowerlab.lab").split()
    result = {}
    for cid in ids:
        info = inspect(cid)
        result[info["Name"].lstrip("/")] = (info["Id"], info["State"]["StartedAt"])
    return result


def wait_for(what: str, check, timeout: float, interval: float = 5.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def parse_memory(value: str | int) -> int:
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([bkmg]?)", str(value).strip().lower())
    assert m, f"bad memory value {value!r}"
    return int(float(m.group(1)) * {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m.group(2)])


@pytest.fixture
def inventory_copy(tmp_path: Path) -> Path:
    """A writable copy of inventory/local (symlinks resolved)."""
    dest = tmp_path / "inventory"
    shutil.copytree(LOCAL_INVENTORY, dest, symlinks=False)
    return dest


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "lab_up: needs the machine to itself (tests/run.sh runs these alone, stage lab-up): the first run,"
        " the second site.yml, the run on a busy machine",
    )
