"""The SuperLink's view of runs, read through Flower's Control API (what `flwr ls` shows)."""

from __future__ import annotations

import json

# `flwr ls` status -> the lab's run status.
STATUSES = {
    "pending": "pending",
    "starting": "starting",
    "running": "running",
    "finished:completed": "completed",
    "finished:failed": "failed",
    "finished:stopped": "stopped",
}
RUN_STATUSES = tuple(dict.fromkeys(STATUSES.values()))


def lab_status(flwr_status: str) -> str:
    """The lab's name for a `flwr ls` status ('unknown' for one this Flower version does not list)."""
    return STATUSES.get(flwr_status, "unknown")


def list_runs(address: str) -> list[dict]:
    """Every run the SuperLink at `address` knows, as `flwr ls --format json` lists them.

    Raises OSError (or Flower's own error) when the SuperLink does not answer.
    """
    from flwr.cli.ls import _list_runs, _to_json
    from flwr.cli.typing import SuperLinkConnection
    from flwr.cli.utils import init_http_client_from_connection

    client = init_http_client_from_connection(SuperLinkConnection(name="flowerlab", address=address, insecure=True))
    try:
        return json.loads(_to_json(_list_runs(client)))["runs"]
    finally:
        client.close()


def latest(runs: list[dict]) -> dict | None:
    """The run started last (by the time it was submitted, then by id)."""
    return max(runs, key=lambda r: (r.get("pending-at") or "", int(r["run-id"])), default=None)
