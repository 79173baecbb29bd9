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

import time  # noqa: E402

from ansible_collections.community.docker.plugins.module_utils.common_api import (  # noqa: E402
    AnsibleDockerClient,
)


def last_check(state: dict) -> str:
    log = (state.get("Health") or {}).get("Log") or []
    return (log[-1].get("Output") or "").strip()[-500:] if log else "no check has run yet"


def main() -> None:
    client = AnsibleDockerClient(
        argument_spec={
            "name": {"type": "str", "required": True},
            "timeout": {"type": "int", "default": 120},
            "interval": {"type": "float", "default": 1.0},
        },
        supports_check_mode=True,
    )
    params = client.module.params
    started = time.monotonic()
    while True:
        waited = round(time.monotonic() - started, 1)
        container = client.get_container(params["name"])
        if not container:
            client.fail(f"container {params['name']} does not exist", waited=waited)
        state = container["State"]
        if not state.get("Running") and not state.get("Restarting"):
            client.fail(
                f"container {params['name']} is {state.get('Status')} (exit code {state.get('ExitCode')}); "
                f"last healthcheck: {last_check(state)}",
                waited=waited,
            )
        status = (state.get("Health") or {}).get("Status", "none")
        if state.get("Running") and status in ("healthy", "none"):
            client.module.exit_json(changed=False, status=status, waited=waited)
        if waited >= params["timeout"]:
            client.fail(
                f"container {params['name']} not healthy after {waited:.0f} s (status {status}); "
                f"last healthcheck: {last_check(state)}",
                waited=waited,
            )
        time.sleep(params["interval"])


if __name__ == "__main__":
    main()
