#!/usr/bin/python
"""Wait until a container's healthcheck passes: one task that reports how long it waited."""

from __future__ import annotations

DOCUMENTATION = r"""
module: lab_container_healthy
short_description: Wait until a Docker container is healthy
description:
  - Polls the container's state until its healthcheck reports C(healthy), and returns how long that took.
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
  description: The container's health status at the end (C(healthy), or C(none) without a healthcheck).
  type: str
  returned: success
waited:
  description: Seconds waited.
  type: float
  returned: always
"""

from ansible.module_utils.lab_container_wait import wait_for_container  # noqa: E402
from ansible_collections.community.docker.plugins.module_utils.common_api import (  # noqa: E402
    AnsibleDockerClient,
)


def last_check(state: dict) -> str:
    log = (state.get("Health") or {}).get("Log") or []
    return (log[-1].get("Output") or "").strip()[-500:] if log else "no check has run yet"


def health(state: dict) -> str:
    return (state.get("Health") or {}).get("Status", "none")


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

    def arrived(state: dict, waited: float) -> dict | None:
        if not state.get("Running") and not state.get("Restarting"):  # stopped: it cannot get healthy
            client.fail(
                f"container {name} is {state.get('Status')} (exit code {state.get('ExitCode')}); "
                f"last healthcheck: {last_check(state)}",
                waited=waited,
            )
        if state.get("Running") and health(state) in ("healthy", "none"):
            return {"status": health(state)}
        return None

    def late(state: dict, waited: float) -> tuple[str, dict]:
        return (
            f"container {name} not healthy after {waited:.0f} s (status {health(state)}); "
            f"last healthcheck: {last_check(state)}",
            {},
        )

    wait_for_container(client, name, client.module.params["timeout"], client.module.params["interval"], arrived, late)


if __name__ == "__main__":
    main()
