"""Unit tests of lab_common's lab_effective_clients filter: how a client is derived from the tier catalog."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "roles" / "lab_common" / "filter_plugins"))

from lab_clients import FilterModule, lab_clients  # noqa: E402

TIERS = {
    "iot": {"cpus": 0.5, "memory": "2g", "batch_size": 16, "learning_rate": 0.005, "bandwidth": "5mbit"},
    "laptop": {"cpus": 1.0, "memory": "3g", "batch_size": 32, "learning_rate": 0.02},
}


def test_tier_values_then_own_overrides_in_the_global_order_with_partition_ids():
    hostvars = {
        "edge-b": {"lab_tiers": TIERS, "lab_clients": [{"name": "b1", "tier": "laptop", "memory": "4g"}]},
        "edge-a": {
            "lab_tiers": TIERS,
            "lab_clients": [{"name": "a1", "tier": "iot"}, {"name": "a2", "tier": "iot", "cpus": 0.25}],
        },
        "server": {"lab_tiers": TIERS},
    }
    # groups['clients'] decides the host order, not the hostvars' order.
    assert lab_clients(["edge-a", "edge-b", "server"], hostvars) == [
        {**TIERS["iot"], "name": "a1", "tier": "iot", "host": "edge-a", "partition_id": 0},
        {**TIERS["iot"], "name": "a2", "tier": "iot", "cpus": 0.25, "host": "edge-a", "partition_id": 1},
        {**TIERS["laptop"], "name": "b1", "tier": "laptop", "memory": "4g", "host": "edge-b", "partition_id": 2},
    ]
    assert TIERS["iot"]["cpus"] == 0.5, "the catalog itself is left alone"


def test_each_host_reads_its_own_catalog():
    small = {"iot": {**TIERS["iot"], "cpus": 0.1}}
    hostvars = {
        "a": {"lab_tiers": TIERS, "lab_clients": [{"name": "x", "tier": "iot"}]},
        "b": {"lab_tiers": small, "lab_clients": [{"name": "y", "tier": "iot"}]},
    }
    assert [c["cpus"] for c in lab_clients(["a", "b"], hostvars)] == [0.5, 0.1]


def test_no_clients_anywhere():
    assert lab_clients([], {}) == []
    assert lab_clients(["h"], {"h": {"lab_tiers": TIERS, "lab_clients": None}}) == []


def test_an_unknown_tier_names_the_client_the_host_and_the_tiers():
    hostvars = {"h": {"lab_tiers": TIERS, "lab_clients": [{"name": "q", "tier": "quantum"}]}}
    with pytest.raises(Exception, match=r"client 'q' on h has tier 'quantum'.*\(tiers: iot, laptop\)"):
        lab_clients(["h"], hostvars)


def test_the_filter_name():
    assert FilterModule().filters() == {"lab_effective_clients": lab_clients}
