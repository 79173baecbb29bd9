"""The SuperLink's Control API as the lab uses it: its runs (what `flwr ls` shows) and its registered
SuperNode keys (what `flwr supernode list/register/unregister` manage).

    flowerlab-supernode-keys --superlink 127.0.0.1:8000 --root-certificates /tls/ca.crt --keys /supernode-keys

keeps the SuperLink's registered SuperNodes equal to the public keys in a directory (one
`<client>.pub` per client, in OpenSSH format): a key that appears is registered under its client's
name, a key that disappears is unregistered. It runs beside the SuperLink (kept by
flowerlab-supervise), so a SuperLink that restarts with an empty state has its keys again within
one interval, and Ansible only places files.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

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


def control_client(address: str, root_certificates: str | None = None):
    """A client of the Control API at `address`: TLS verified with `root_certificates`, else insecure."""
    from flwr.cli.typing import SuperLinkConnection
    from flwr.cli.utils import init_http_client_from_connection

    connection = SuperLinkConnection(
        name="flowerlab", address=address, root_certificates=root_certificates, insecure=root_certificates is None
    )
    return init_http_client_from_connection(connection)


def list_runs(address: str, root_certificates: str | None = None) -> list[dict]:
    """Every run the SuperLink at `address` knows, as `flwr ls --format json` lists them.

    Raises OSError (or Flower's own error) when the SuperLink does not answer.
    """
    from flwr.cli.ls import _list_runs, _to_json

    client = control_client(address, root_certificates)
    try:
        return json.loads(_to_json(_list_runs(client)))["runs"]
    finally:
        client.close()


def read_public_keys(directory: Path) -> dict[bytes, str]:
    """{public key as Flower stores it: client name} for every `<client>.pub` (OpenSSH EC key) in `directory`."""
    from cryptography.hazmat.primitives import serialization
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    keys = {}
    for path in sorted(directory.glob("*.pub")):
        key = serialization.load_ssh_public_key(path.read_bytes())
        keys[public_key_to_bytes(key)] = path.stem
    return keys


def sync_supernode_keys(client, wanted: dict[bytes, str]) -> list[str]:
    """Register the wanted keys the SuperLink lacks, unregister the registered ones no longer wanted.

    Returns one line per change (nothing when the SuperLink already agrees).
    """
    from flwr.proto.control_pb2 import ListNodesRequest, RegisterNodeRequest, UnregisterNodeRequest

    nodes = client.ListNodes(ListNodesRequest()).nodes_info
    registered = {bytes(n.public_key): n for n in nodes if n.status != "unregistered"}
    changes = []
    for key, name in wanted.items():
        if key not in registered:
            node_id = client.RegisterNode(RegisterNodeRequest(public_key=key, name=name)).node_id
            changes.append(f"registered {name} (node {node_id})")
    for key, node in registered.items():
        if key not in wanted:
            client.UnregisterNode(UnregisterNodeRequest(node_id=node.node_id))
            changes.append(f"unregistered {node.name or 'an unnamed SuperNode'} (node {node.node_id})")
    return changes


def supernode_keys_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flowerlab-supernode-keys", description=__doc__.splitlines()[0])
    parser.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink's Control API")
    parser.add_argument("--root-certificates", help="CA certificate that signed the SuperLink's (TLS)")
    parser.add_argument("--keys", type=Path, required=True, help="directory of <client>.pub public keys")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between checks")
    parser.add_argument("--once", action="store_true", help="check once and exit (non-zero on failure)")
    args = parser.parse_args(argv)
    last_error = None
    while True:
        try:
            client = control_client(args.superlink, args.root_certificates)
            try:
                for line in sync_supernode_keys(client, read_public_keys(args.keys)):
                    print(f"supernode keys: {line}", flush=True)
            finally:
                client.close()
            last_error = None
        except BaseException as err:  # noqa: BLE001 - Flower's CLI helpers exit on errors
            if isinstance(err, KeyboardInterrupt):
                raise
            if args.once:
                print(f"supernode keys: {err}", file=sys.stderr)
                return 1
            if str(err) != last_error:  # the SuperLink starting: say it once, not every interval
                print(f"supernode keys: not synchronised yet: {err}", file=sys.stderr, flush=True)
                last_error = str(err)
        if args.once:
            return 0
        time.sleep(args.interval)


def latest(runs: list[dict]) -> dict | None:
    """The run started last (by the time it was submitted, then by id)."""
    return max(runs, key=lambda r: (r.get("pending-at") or "", int(r["run-id"])), default=None)
