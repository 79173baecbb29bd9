#!/usr/bin/python
"""Wait until a one-shot container has exited: one task that reports its exit code, output and wait."""

from __future__ import annotations

DOCUMENTATION = r"""
module: lab_container_exited
short_description: Wait until a Docker container has exited, and return its exit code and last output
description:
  - Polls the container until it is no longer running (exited or dead) and returns its exit code, the last
    O(lines) lines of its output (stdout and stderr, in order) and how long it waited. One task, one line
    of output, no retries printed while a long job runs.
  - Fails at once when the container is missing, and after O(timeout) seconds with the output so far.
    A non-zero exit code is returned, not a failure (the caller says what it means).
options:
  name:
    description: Container name or id.
    type: str
    required: true
  timeout:
    description: Seconds to wait.
    type: int
    default: 600
  interval:
    description: Seconds between two looks at the container.
    type: float
    default: 2.0
  lines:
    description: Lines of output to return (the last ones).
    type: int
    default: 40
extends_documentation_fragment:
  - community.docker.docker.api_documentation
"""

EXAMPLES = r"""
- name: Wait for the data preparation
  lab_container_exited:
    name: flowerlab-data-prepare
    timeout: 1800
  register: job
"""

RETURN = r"""
exit_code:
  description: The container's exit code.
  type: int
  returned: success
output:
  description: The last O(lines) lines the container wrote.
  type: list
  elements: str
  returned: always
waited:
  description: Seconds waited.
  type: float
  returned: always
"""

from ansible.module_utils.lab_container_wait import wait_for_container  # noqa: E402
from ansible_collections.community.docker.plugins.module_utils.common_api import (  # noqa: E402
    AnsibleDockerClient,
)


def output(client: AnsibleDockerClient, name: str, lines: int) -> list[str]:
    """The container's last `lines` lines (Docker's logs endpoint, stdout and stderr interleaved)."""
    try:
        res = client._get(
            client._url("/containers/{0}/logs", name), params={"stdout": 1, "stderr": 1, "tail": str(lines)}
        )
        raw = client._get_result_tty(False, res, False)
    except Exception as err:  # noqa: BLE001 - the output only helps to explain; never hide the state
        return [f"(output not readable: {err})"]
    return raw.decode("utf-8", "replace").splitlines()[-lines:]


def main() -> None:
    client = AnsibleDockerClient(
        argument_spec={
            "name": {"type": "str", "required": True},
            "timeout": {"type": "int", "default": 600},
            "interval": {"type": "float", "default": 2.0},
            "lines": {"type": "int", "default": 40},
        },
        supports_check_mode=True,
    )
    params = client.module.params

    def arrived(state: dict, waited: float) -> dict | None:
        if state.get("Running") or state.get("Restarting"):
            return None
        return {"exit_code": int(state.get("ExitCode", -1)), "output": output(client, params["name"], params["lines"])}

    def late(state: dict, waited: float) -> tuple[str, dict]:
        return (
            f"container {params['name']} still running after {waited:.0f} s",
            {"output": output(client, params["name"], params["lines"])},
        )

    wait_for_container(
        client, params["name"], params["timeout"], params["interval"], arrived, late, missing={"output": []}
    )


if __name__ == "__main__":
    main()
