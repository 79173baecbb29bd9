"""Unit tests of lab_common's shared container wait (module_utils/lab_container_wait.py), with a client
that answers from a script of container states instead of a Docker engine."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "roles" / "lab_common" / "module_utils"))

from lab_container_wait import wait_for_container  # noqa: E402


class Ended(Exception):
    """How the module ends: exit_json or fail_json, with its results."""

    def __init__(self, failed: bool, **results):
        super().__init__(results)
        self.failed = failed
        self.results = results


class ScriptedClient:
    """Answers get_container with the next state of `states` (None: no such container), the last one
    for ever; exit_json and fail raise Ended as the real module's sys.exit would end it."""

    def __init__(self, states: list[dict | None]):
        self.states = list(states)
        self.looks = 0
        self.module = self

    def get_container(self, name: str) -> dict | None:
        self.looks += 1
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        return None if state is None else {"Name": name, "State": state}

    def exit_json(self, **results):
        raise Ended(False, **results)

    def fail(self, msg: str, **results):
        raise Ended(True, msg=msg, **results)


def running(up: bool) -> dict:
    return {"Running": up, "Restarting": False, "ExitCode": 0 if up else 3}


def done_when_stopped(state: dict, waited: float) -> dict | None:
    return None if state["Running"] else {"exit_code": state["ExitCode"]}


def late(state: dict, waited: float) -> tuple[str, dict]:
    return f"still running after {waited:.0f} s", {"output": ["last line"]}


def test_returns_what_arrived_says_once_the_container_gets_there():
    client = ScriptedClient([running(True), running(True), running(False)])
    with pytest.raises(Ended) as ended:
        wait_for_container(client, "job", timeout=60, interval=0, arrived=done_when_stopped, late=late)
    assert not ended.value.failed
    assert ended.value.results["exit_code"] == 3 and ended.value.results["changed"] is False
    assert ended.value.results["waited"] >= 0 and client.looks == 3


def test_a_missing_container_fails_at_once_with_the_extra_results():
    client = ScriptedClient([None])
    with pytest.raises(Ended) as ended:
        wait_for_container(
            client, "job", timeout=60, interval=0, arrived=done_when_stopped, late=late, missing={"output": []}
        )
    assert ended.value.failed and client.looks == 1
    assert ended.value.results["msg"] == "container job does not exist" and ended.value.results["output"] == []


def test_the_timeout_fails_with_the_late_message():
    client = ScriptedClient([running(True)])
    with pytest.raises(Ended) as ended:
        wait_for_container(client, "job", timeout=0.3, interval=0.1, arrived=done_when_stopped, late=late)
    assert ended.value.failed and client.looks >= 2
    assert ended.value.results["msg"] == "still running after 0 s"
    assert ended.value.results["output"] == ["last line"] and ended.value.results["waited"] >= 0.3


def test_arrived_may_end_the_wait_with_a_failure_of_its_own():
    client = ScriptedClient([running(False)])

    def never_healthy_once_stopped(state: dict, waited: float) -> dict | None:
        if not state["Running"]:
            client.fail("container web is exited (exit code 3)", waited=waited)
        return None

    with pytest.raises(Ended) as ended:
        wait_for_container(client, "web", timeout=60, interval=0, arrived=never_healthy_once_stopped, late=late)
    assert ended.value.failed and ended.value.results["msg"] == "container web is exited (exit code 3)"
    assert ended.value.results["waited"] >= 0
