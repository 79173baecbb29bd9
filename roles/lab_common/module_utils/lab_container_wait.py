"""The polling both of lab_common's wait modules share: look at a container until it is where the
caller wants it, fail at once when it is missing, fail with what it said at the timeout."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_for_container(
    client: Any,
    name: str,
    timeout: float,
    interval: float,
    arrived: Callable[[dict, float], dict | None],
    late: Callable[[dict, float], tuple[str, dict]],
    missing: dict | None = None,
) -> None:
    """Poll `name` every `interval` seconds, up to `timeout`, and end the module.

    `arrived(state, waited)` looks at the container's State: a dict to return (the wait is over; it may
    also call client.fail, with `waited`, when the container can never get there), or None to go on
    waiting. `late(state, waited)`
    gives the message and extra results of the failure at the timeout. `missing` adds results to the
    failure when the container does not exist. Every result carries `waited` (seconds)."""
    started = time.monotonic()
    while True:
        waited = round(time.monotonic() - started, 1)
        container = client.get_container(name)
        if not container:
            client.fail(f"container {name} does not exist", waited=waited, **(missing or {}))
            return
        state = container["State"]
        result = arrived(state, waited)
        if result is not None:
            client.module.exit_json(changed=False, waited=waited, **result)
            return
        if waited >= timeout:
            message, extra = late(state, waited)
            client.fail(message, waited=waited, **extra)
            return
        time.sleep(interval)
