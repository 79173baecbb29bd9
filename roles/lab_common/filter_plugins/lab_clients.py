"""The lab's clients as every role, the summary and the tests see them: the only place that knows how a
client is derived from the tier catalog.

    {{ groups['clients'] | default([]) | lab_effective_clients(hostvars) }}

Order (docs/design.md, "The clients of the lab"): hosts in the given order (groups['clients']), then
each host's `lab_clients` order; a client's index in that order is its `partition_id`. Each entry is the
tier's values (that host's `lab_tiers`), then the client's own overrides, then `host` and `partition_id`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

try:  # run by Ansible; the unit tests import this file without it
    from ansible.errors import AnsibleFilterError
except ImportError:  # pragma: no cover
    AnsibleFilterError = ValueError


def lab_clients(hosts: Iterable[str], hostvars: Mapping) -> list[dict]:
    """Every client of `hosts` with its effective settings, in the lab's global order."""
    clients: list[dict] = []
    for host in hosts:
        own = hostvars[host]
        tiers = own.get("lab_tiers") or {}
        for client in own.get("lab_clients") or []:
            if client["tier"] not in tiers:
                raise AnsibleFilterError(
                    f"client {client['name']!r} on {host} has tier {client['tier']!r}, which lab_tiers does not "
                    f"define (tiers: {', '.join(sorted(tiers)) or 'none'}); run playbooks/preflight.yml"
                )
            clients.append({**dict(tiers[client["tier"]]), **dict(client), "host": host, "partition_id": len(clients)})
    return clients


class FilterModule:
    def filters(self):
        return {"lab_effective_clients": lab_clients}
