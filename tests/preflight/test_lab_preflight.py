"""Unit tests of the inventory preflight (roles/lab_preflight/filter_plugins), a pure function."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "roles" / "lab_preflight" / "filter_plugins"))

import lab_preflight as lp  # noqa: E402

APP_CONFIG = str(ROOT / "app" / "pyproject.toml")
TIERS = {
    "iot": {"cpus": 0.5, "memory": "2g", "batch_size": 16, "learning_rate": 0.005},
    "laptop": {"cpus": 1.0, "memory": "3g", "batch_size": 32, "learning_rate": 0.02},
}
ONE_HOST = {"all": ["h"], "lab": ["h"], "server": ["h"], "clients": ["h"], "monitoring": ["h"]}


def hostvars(**overrides) -> dict:
    host = {
        "lab_tiers": copy.deepcopy(TIERS),
        "lab_clients": [{"name": "client-a", "tier": "iot"}, {"name": "client-b", "tier": "laptop"}],
        "lab_run_config": {"num-server-rounds": 3},
        "ansible_processor_vcpus": 2,
        "ansible_memtotal_mb": 8192,
    }
    host.update(overrides)
    return {"h": host}


def errors(hv: dict, groups: dict = ONE_HOST) -> list[str]:
    return lp.lab_preflight_errors(hv, groups, APP_CONFIG)


def test_a_valid_inventory_has_no_errors():
    assert errors(hostvars()) == []


def test_memory_and_bandwidth_units_by_hand():
    assert lp.memory_bytes("2g") == 2 * 1024**3
    assert lp.memory_bytes("1536m") == 1536 * 1024**2
    assert lp.memory_bytes(3221225472) == 3221225472
    assert lp.memory_bytes("3x") is None and lp.memory_bytes(True) is None
    assert lp.bandwidth_bits("10mbit") == 10_000_000 and lp.bandwidth_bits("10mb") is None


def test_unknown_tier_names_host_client_key_and_the_allowed_tiers():
    hv = hostvars(lab_clients=[{"name": "client-a", "tier": "quantum"}])
    assert errors(hv) == [
        "host h, client client-a: key 'tier' is 'quantum', an unknown tier; allowed tiers: iot, laptop"
    ]


def test_cpus_above_the_hosts_cores():
    hv = hostvars(lab_clients=[{"name": "client-a", "tier": "iot", "cpus": 4}])
    assert errors(hv) == [
        "host h, client client-a: key 'cpus' is 4, above the 2 cores of host h; allowed: above 0 and at most 2"
    ]


def test_memory_limits_above_the_hosts_memory_add_up_over_clients():
    # 2g (iot) + 3g (laptop) + 4g override = 9 GiB > 8 GiB
    hv = hostvars(
        lab_clients=[
            {"name": "a", "tier": "iot"},
            {"name": "b", "tier": "laptop"},
            {"name": "c", "tier": "iot", "memory": "4g"},
        ]
    )
    [message] = errors(hv)
    assert message.startswith("host h: the memory limits of its clients add up to 9.0 GiB (key 'memory')")


def test_a_client_name_used_on_two_hosts():
    groups = {"all": ["s", "e1", "e2"], "lab": ["s", "e1", "e2"], "server": ["s"], "clients": ["e1", "e2"],
              "monitoring": ["s"]}  # fmt: skip
    hv = {
        "s": {**hostvars()["h"], "lab_clients": [], "lab_bind_address": "10.0.0.1"},
        "e1": {**hostvars()["h"], "lab_clients": [{"name": "twin", "tier": "iot"}], "lab_bind_address": "10.0.0.2"},
        "e2": {**hostvars()["h"], "lab_clients": [{"name": "twin", "tier": "iot"}], "lab_bind_address": "10.0.0.3"},
    }
    assert errors(hv, groups) == [
        "host e2, client twin: the client name twin is used twice (hosts e1 and e2); client names must be unique "
        "in the lab"
    ]


def test_loopback_bind_address_in_a_multi_host_lab():
    groups = {"all": ["s", "e"], "lab": ["s", "e"], "server": ["s"], "clients": ["e"], "monitoring": ["s"]}
    hv = {"s": {**hostvars()["h"], "lab_clients": []}, "e": {**hostvars()["h"], "lab_bind_address": "10.0.0.2"}}
    [message] = errors(hv, groups)
    assert message.startswith("host s: key 'lab_bind_address' is 127.0.0.1 (loopback) in a lab of 2 hosts")


def test_tls_off_in_a_multi_host_lab_and_values_that_differ_or_are_not_booleans():
    groups = {"all": ["s", "e"], "lab": ["s", "e"], "server": ["s"], "clients": ["e"], "monitoring": ["s"]}
    server = {**hostvars()["h"], "lab_clients": [], "lab_bind_address": "10.0.0.1"}
    edge = {**hostvars()["h"], "lab_bind_address": "10.0.0.2"}
    assert errors({"s": server, "e": edge}, groups) == []
    off = {k: {**v, "lab_tls": False} for k, v in {"s": server, "e": edge}.items()}
    [message] = errors(off, groups)
    assert message.startswith("inventory: key 'lab_tls' is false in a lab of 2 hosts: model weights would cross")
    assert errors({"s": server, "e": {**edge, "lab_supernode_auth": False}}, groups) == [
        "inventory: key 'lab_supernode_auth' differs between hosts (s: true, e: false); allowed: one value for the "
        "whole lab"
    ]
    assert errors({"s": server, "e": {**edge, "lab_supernode_auth": "yes"}}, groups) == [
        "host e: key 'lab_supernode_auth' is 'yes'; allowed: true or false"
    ]


def test_tls_off_on_a_single_host_is_an_allowed_opt_out():
    assert errors(hostvars(lab_tls=False, lab_supernode_auth=False)) == []
    # lab_common's defaults apply to hosts that do not set the keys.
    assert lp.lab_preflight_errors(hostvars(), ONE_HOST, APP_CONFIG, {"lab_tls": "maybe"}) == [
        "host h: key 'lab_tls' is 'maybe'; allowed: true or false"
    ]


@pytest.mark.parametrize(
    ("run_config", "message"),
    [
        ({"num-server-rounds": "two"}, "key 'num-server-rounds' is 'two' (str); allowed: int like the app's default 3"),
        ({"rounds": 3}, "unknown key 'rounds'; allowed keys (app/pyproject.toml [tool.flwr.app.config]): "),
        ({"straggler-policy": "fastest"}, "key 'straggler-policy' is 'fastest'; allowed: static, deadline"),
        ({"deadline-seconds": -1.0}, "key 'deadline-seconds' is -1.0; expected 0 (measured) or seconds > 0"),
        ({"partitioner": "zipf"}, "key 'partitioner' is 'zipf'; allowed: iid, dirichlet"),
    ],
)
def test_run_config_keys_types_and_the_apps_own_values(run_config, message):
    [error] = errors(hostvars(lab_run_config=run_config))
    assert error.startswith("group_vars: lab_run_config: ") and message in error


def test_every_problem_at_once():
    hv = hostvars(lab_clients=[{"name": "a", "tier": "quantum"}, {"name": "b", "tier": "iot", "memory": "3x"}])
    assert len(errors(hv)) == 2
