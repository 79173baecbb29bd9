#!/usr/bin/python
"""Wait until a container's healthcheck passes: one task that reports how long it waited."""

from __future__ import annotations

DOCUMENTATION = r"""
module: lab_container_healthy
short_description: Wait until a Docker container is healthy
description:
  - Polls the container's state until its healthcheck reports C(healthy), and returns how long that took.
  - While Docker still reports C(starting), the module runs the container's healthcheck command itself
    (as Docker would: in the container, with the healthcheck's timeout) at every look, and the wait is
    over when it passes. Docker runs its first check only one healthcheck interval after the start (the
    engine has no start interval before API 1.44), so a container that is ready in 3 s would otherwise
    hold the play for the whole interval; Docker's own status turns C(healthy) at that first check.
  - A container without a healthcheck counts as healthy once it runs.
  - Fails at once when the container is missing or stopped (a restarting container is waited for), and
    after O(timeout) seconds with the healthcheck's last output.
options:
  name:
    description: Container name or id.
    type: str
    required: true
  timeout:
    description: Seconds to wait.
    type: int
    default: 120
  interval:
    description: Seconds between two looks at the container.
    type: float
    default: 1.0
extends_documentation_fragment:
  - community.docker.docker.api_documentation
"""

EXAMPLES = r"""
- name: Wait until healthy
  lab_container_healthy:
    name: flowerlab-superlink
    timeout: 300
"""

RETURN = r"""
status:
  description: >-
    How the wait ended: C(healthy) (Docker's status), C(passed) (Docker's status is still C(starting) and
    the healthcheck command passed when the module ran it), or C(none) (no healthcheck).
  type: str
  returned: success
waited:
  description: Seconds waited.
  type: float
  returned: always
"""

import time  # noqa: E402

from ansible.module_utils.lab_container_wait import wait_for_container  # noqa: E402
from ansible_collections.community.docker.plugins.module_utils._api.errors import APIError  # noqa: E402
from ansible_collections.community.docker.plugins.module_utils.common_api import (  # noqa: E402
    AnsibleDockerClient,
)


def last_check(state: dict) -> str:
    log = (state.get("Health") or {}).get("Log") or []
    return (log[-1].get("Output") or "").strip()[-500:] if log else "no check has run yet"


def health(state: dict) -> str:
    return (state.get("Health") or {}).get("Status", "none")


def check_command(healthcheck: dict | None) -> list[str] | None:
    """The argv Docker runs for a healthcheck's test (CMD or CMD-SHELL), None when there is none."""
    test = (healthcheck or {}).get("Test") or []
    if len(test) > 1 and test[0] == "CMD":
        return list(test[1:])
    if len(test) == 2 and test[0] == "CMD-SHELL":
        return ["/bin/sh", "-c", test[1]]
    return None


def run_check(client: AnsibleDockerClient, name: str, argv: list[str], timeout: float) -> str:
    """Run the healthcheck command in the container, as Docker does (exec, the container's user and
    environment), and say how it ended: "exit code N", "timed out after S s" or the engine's error."""
    try:
        exec_id = client.post_json_to_json(
            "/containers/{0}/exec", name, data={"Cmd": argv, "AttachStdout": False, "AttachStderr": False}
        )["Id"]
        client.post_json_to_text("/exec/{0}/start", exec_id, data={"Detach": True, "Tty": False})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = client.get_json("/exec/{0}/json", exec_id)
            if not run.get("Running"):
                return f"exit code {run.get('ExitCode')}"
            time.sleep(0.2)
    except APIError as error:  # e.g. the container stopped or restarts between two looks
        return str(error)
    return f"timed out after {timeout:g} s"


def main() -> None:
    client = AnsibleDockerClient(
        argument_spec={
            "name": {"type": "str", "required": True},
            "timeout": {"type": "int", "default": 120},
            "interval": {"type": "float", "default": 1.0},
        },
        supports_check_mode=True,
    )
    name = client.module.params["name"]
    healthcheck = (client.get_container(name) or {}).get("Config", {}).get("Healthcheck")
    argv = check_command(healthcheck)
    check_timeout = ((healthcheck or {}).get("Timeout") or 30 * 10**9) / 10**9
    own_check = {}  # how the module's last run of the healthcheck ended

    def arrived(state: dict, waited: float) -> dict | None:
        if not state.get("Running") and not state.get("Restarting"):  # stopped: it cannot get healthy
            client.fail(
                f"container {name} is {state.get('Status')} (exit code {state.get('ExitCode')}); "
                f"last healthcheck: {last_check(state)}",
                waited=waited,
            )
        if state.get("Running") and health(state) in ("healthy", "none"):
            return {"status": health(state)}
        if state.get("Running") and health(state) == "starting" and argv and not client.module.check_mode:
            own_check["result"] = run_check(client, name, argv, check_timeout)
            if own_check["result"] == "exit code 0":
                return {"status": "passed"}
        return None

    def late(state: dict, waited: float) -> tuple[str, dict]:
        return (
            f"container {name} not healthy after {waited:.0f} s (status {health(state)}); "
            f"last healthcheck: {last_check(state)}"
            + (f"; the wait's own run of it: {own_check['result']}" if own_check else ""),
            {},
        )

    wait_for_container(client, name, client.module.params["timeout"], client.module.params["interval"], arrived, late)


if __name__ == "__main__":
    main()
