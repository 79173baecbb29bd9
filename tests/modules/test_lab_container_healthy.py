"""Unit tests of lab_container_healthy's reading of a container's healthcheck: the command the wait runs
itself while Docker still says `starting` is the one Docker would run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROLE = ROOT / "roles" / "lab_common"


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# The module imports its module_utils as Ansible ships them (ansible.module_utils.<name>).
load("ansible.module_utils.lab_container_wait", ROLE / "module_utils" / "lab_container_wait.py")
healthy = load("lab_container_healthy", ROLE / "library" / "lab_container_healthy.py")


@pytest.mark.parametrize(
    ("healthcheck", "argv"),
    [
        ({"Test": ["CMD", "flowerlab-supervise", "--check", "9094"]}, ["flowerlab-supervise", "--check", "9094"]),
        (
            {"Test": ["CMD-SHELL", "wget -q -O /dev/null http://127.0.0.1:9100/"]},
            ["/bin/sh", "-c", "wget -q -O /dev/null http://127.0.0.1:9100/"],
        ),
        ({"Test": ["NONE"]}, None),  # healthcheck disabled
        ({"Test": []}, None),  # inherited from the image: nothing to run here
        ({}, None),
        (None, None),  # no healthcheck at all
    ],
)
def test_the_wait_runs_the_command_docker_would(healthcheck, argv):
    assert healthy.check_command(healthcheck) == argv


def test_a_container_without_a_healthcheck_counts_as_healthy_once_it_runs():
    assert healthy.health({"Running": True}) == "none"
    assert healthy.health({"Health": {"Status": "starting"}}) == "starting"
