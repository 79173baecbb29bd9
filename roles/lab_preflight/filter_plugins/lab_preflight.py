"""Validation of a whole lab inventory, used by the lab_preflight role.

`lab_preflight_errors` returns every problem it finds as one line of text that names the host,
the client and the key involved and says what is allowed, so that a user sees all problems at once.
"""

from __future__ import annotations

import importlib
import importlib.util
import ipaddress
import re
import sys
import tomllib
from pathlib import Path

DOCUMENTATION = """
  name: lab_preflight_errors
  short_description: List every problem of a Flower lab inventory
  description:
    - Checks groups, the tier catalog, each host's clients, resources against the host's facts,
      bind addresses and the run configuration. Returns a list of messages (empty when valid).
  positional: _input
  options:
    _input:
      description: The inventory's hostvars.
      type: dict
      required: true
"""

MEMORY_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([bkmg]?)$", re.IGNORECASE)
BANDWIDTH_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(kbit|mbit|gbit)$")
CLIENT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,47}$")
RUN_KEY_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
MEMORY_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
BANDWIDTH_UNITS = {"kbit": 1000, "mbit": 1000**2, "gbit": 1000**3}
DOCKER_MIN_MEMORY = 6 * 1024**2
TIER_KEYS = ("cpus", "memory", "batch_size", "learning_rate", "bandwidth")
REQUIRED_TIER_KEYS = ("cpus", "memory", "batch_size", "learning_rate")
CLIENT_KEYS = ("name", "tier", "cpus", "memory", "batch_size", "learning_rate", "bandwidth")
LAB_GROUPS = ("server", "clients", "monitoring")
ALLOWED_MEMORY = 'a number with an optional unit b, k, m or g, at least 6m (e.g. "2g", "1536m")'
ALLOWED_BANDWIDTH = 'a rate in kbit, mbit or gbit (e.g. "512kbit", "10mbit")'


def memory_bytes(value) -> int | None:
    """Bytes of a Docker memory value ("2g", "1536m", 3221225472), None when malformed."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    match = MEMORY_RE.match(str(value).strip())
    if not match:
        return None
    return int(float(match.group(1)) * MEMORY_UNITS[match.group(2).lower()])


def bandwidth_bits(value) -> int | None:
    """Bits per second of a tc rate ("10mbit"), None when malformed."""
    match = BANDWIDTH_RE.match(str(value).strip())
    if not match:
        return None
    return int(float(match.group(1)) * BANDWIDTH_UNITS[match.group(2)])


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_settings(where: str, settings: dict, errors: list[str]) -> None:
    """Check tier-like values (from a tier or a client's overrides) at `where`."""
    if "cpus" in settings:
        cpus = settings["cpus"]
        if not _is_number(cpus) or cpus <= 0:
            errors.append(f"{where}: key 'cpus' is {cpus!r}; allowed: a number above 0 (e.g. 0.5, 1, 2)")
    if "memory" in settings:
        mem = memory_bytes(settings["memory"])
        if mem is None or mem < DOCKER_MIN_MEMORY:
            errors.append(f"{where}: key 'memory' is {settings['memory']!r}; allowed: {ALLOWED_MEMORY}")
    if "batch_size" in settings:
        bs = settings["batch_size"]
        if not isinstance(bs, int) or isinstance(bs, bool) or bs < 1:
            errors.append(f"{where}: key 'batch_size' is {bs!r}; allowed: an integer of 1 or more")
    if "learning_rate" in settings:
        lr = settings["learning_rate"]
        if not _is_number(lr) or lr <= 0:
            errors.append(f"{where}: key 'learning_rate' is {lr!r}; allowed: a number above 0 (e.g. 0.01)")
    if settings.get("bandwidth") is not None and bandwidth_bits(settings["bandwidth"]) is None:
        errors.append(f"{where}: key 'bandwidth' is {settings['bandwidth']!r}; allowed: {ALLOWED_BANDWIDTH}")


def _check_groups(groups: dict, errors: list[str]) -> list[str]:
    lab_hosts = list(groups.get("lab") or [])
    if not lab_hosts:
        errors.append(
            "inventory: group 'lab' is missing or empty; it must contain the groups server, clients and monitoring"
        )
    for group in LAB_GROUPS:
        members = list(groups.get(group) or [])
        if not members:
            errors.append(
                f"inventory: group '{group}' is missing or empty; groups needed: "
                f"{', '.join(LAB_GROUPS)} (children of 'lab')"
            )
        for host in members:
            if host not in lab_hosts:
                errors.append(
                    f"host {host}: in group '{group}' but not in group 'lab'; make '{group}' a child of 'lab'"
                )
    for group in ("server", "monitoring"):
        members = list(groups.get(group) or [])
        if len(members) > 1:
            errors.append(
                f"inventory: group '{group}' has {len(members)} hosts ({', '.join(members)}); allowed: exactly one"
            )
    return lab_hosts


def _check_tiers(tiers, errors: list[str]) -> dict:
    if not isinstance(tiers, dict) or not tiers:
        errors.append(
            f"group_vars: key 'lab_tiers' is missing or not a mapping of tier name -> {{{', '.join(TIER_KEYS)}}}"
        )
        return {}
    for name, tier in tiers.items():
        where = f"tier {name}"
        if not isinstance(tier, dict):
            errors.append(f"{where}: must be a mapping with keys {', '.join(TIER_KEYS)}")
            continue
        for key in tier:
            if key not in TIER_KEYS:
                errors.append(f"{where}: unknown key {key!r}; allowed keys: {', '.join(TIER_KEYS)}")
        for key in REQUIRED_TIER_KEYS:
            if key not in tier:
                errors.append(f"{where}: key {key!r} is missing; required keys: {', '.join(REQUIRED_TIER_KEYS)}")
        _check_settings(where, tier, errors)
    return tiers


def _app_run_config(path: str | None) -> dict | None:
    if not path or not Path(path).is_file():
        return None
    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    return data.get("tool", {}).get("flwr", {}).get("app", {}).get("config")


def _flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _check_run_config(run_config, app_defaults: dict | None, errors: list[str], app_config_file=None) -> None:
    where = "group_vars: lab_run_config"
    if run_config is None:
        return
    if not isinstance(run_config, dict):
        errors.append(
            f"{where} is {type(run_config).__name__}; allowed: a mapping of run-config key -> "
            "string, integer, float or boolean"
        )
        return
    known = _flatten(app_defaults) if app_defaults else None
    for key, value in run_config.items():
        if not isinstance(key, str) or not RUN_KEY_RE.match(key):
            errors.append(f"{where}: key {key!r} is malformed; allowed: lower-case words joined by - . or _")
            continue
        if isinstance(value, dict | list) or value is None:
            errors.append(f"{where}: key {key!r} is {value!r}; allowed: a string, integer, float or boolean")
            continue
        if isinstance(value, str) and ('"' in value or "'" in value or "\\" in value or " " in value):
            errors.append(f"{where}: key {key!r} is {value!r}; strings may not contain quotes, backslashes or spaces")
        if known is None:
            continue
        if key not in known:
            errors.append(
                f"{where}: unknown key {key!r}; allowed keys (app/pyproject.toml "
                f"[tool.flwr.app.config]): {', '.join(sorted(known))}"
            )
            continue
        default = known[key]
        expected = type(default)
        ok = (
            (expected is bool and isinstance(value, bool))
            or (expected is int and isinstance(value, int) and not isinstance(value, bool))
            or (expected is float and _is_number(value))
            or (expected is str and isinstance(value, str))
        )
        if not ok:
            errors.append(
                f"{where}: key {key!r} is {value!r} ({type(value).__name__}); allowed: "
                f"{expected.__name__} like the app's default {default!r}"
            )
            continue
    if known is not None and app_config_file and not any(e.startswith(where) for e in errors):
        problem = _app_settings_error({**known, **run_config}, Path(app_config_file).parent)
        if problem:
            errors.append(f"{where}: {problem}")


def _app_settings_error(config: dict, app_dir: Path) -> str | None:
    """The app's own check of the merged run config (values, e.g. straggler-policy), when its source is here.

    The app's settings module and the policies it imports use only the standard library.
    """
    package = app_dir / "flowerlab_app"
    if not (package / "settings.py").is_file():
        return None
    name = "_lab_preflight_app"
    spec = importlib.util.spec_from_file_location(
        name, package / "__init__.py", submodule_search_locations=[str(package)]
    )
    sys.modules[name] = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(sys.modules[name])
        settings = importlib.import_module(f"{name}.settings")
        try:
            settings.RunSettings.from_run_config(config)
        except settings.ConfigError as err:
            return str(err).removeprefix("run config: ")
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
    return None


# lab_common's defaults of the keys checked here (the role passes the file's values).
LAB_DEFAULTS = {"lab_bind_address": "127.0.0.1", "lab_tls": True, "lab_supernode_auth": True}


def lab_preflight_errors(hostvars, groups, app_config_file=None, lab_defaults=None) -> list[str]:
    """Every problem of the lab inventory, one message each (empty list: valid).

    `lab_defaults`: lab_common's defaults (role defaults are not part of hostvars).
    """
    defaults = {**LAB_DEFAULTS, **{k: v for k, v in (lab_defaults or {}).items() if k in LAB_DEFAULTS}}
    default_bind_address = defaults["lab_bind_address"]
    errors: list[str] = []
    lab_hosts = _check_groups(groups, errors)
    client_hosts = list(groups.get("clients") or [])
    multi_host = len(set(lab_hosts)) > 1
    app_defaults = _app_run_config(app_config_file)
    seen: dict[str, str] = {}
    total_clients = 0

    for host in lab_hosts:
        hv = hostvars[host]
        tiers = _check_tiers(hv.get("lab_tiers"), errors)
        _check_run_config(hv.get("lab_run_config"), app_defaults, errors, app_config_file)

        # Role defaults are not part of hostvars: a host without lab_bind_address
        # in the inventory gets lab_common's default (loopback).
        bind = hv.get("lab_bind_address", default_bind_address)
        try:
            addr = ipaddress.ip_address(str(bind))
        except ValueError:
            errors.append(f"host {host}: key 'lab_bind_address' is {bind!r}; allowed: an IP address of this host")
        else:
            if multi_host and addr.is_loopback:
                errors.append(
                    f"host {host}: key 'lab_bind_address' is {bind} (loopback) in a lab of "
                    f"{len(set(lab_hosts))} hosts; other hosts cannot reach it: set this host's "
                    "private address"
                )

        clients = hv.get("lab_clients")
        if clients is None:
            clients = []
        if host not in client_hosts:
            if clients:
                errors.append(
                    f"host {host}: has lab_clients but is not in group 'clients'; add it to "
                    "'clients' or move its clients"
                )
            continue
        if not isinstance(clients, list):
            errors.append(
                f"host {host}: key 'lab_clients' is {type(clients).__name__}; allowed: a list of {{name, tier}} entries"
            )
            continue
        if not clients:
            errors.append(f"host {host}: in group 'clients' but lab_clients is empty; place at least one client")

        vcpus = hv.get("ansible_processor_vcpus") or hv.get("ansible_facts", {}).get("processor_vcpus")
        memtotal_mb = hv.get("ansible_memtotal_mb") or hv.get("ansible_facts", {}).get("memtotal_mb")
        if not vcpus or not memtotal_mb:
            errors.append(
                f"host {host}: facts processor_vcpus/memtotal_mb are missing (host unreachable or "
                "facts not gathered); cannot check cpus and memory"
            )
        host_memory = 0
        for index, client in enumerate(clients):
            if not isinstance(client, dict):
                errors.append(
                    f"host {host}: lab_clients[{index}] is {client!r}; allowed: a mapping with "
                    f"keys {', '.join(CLIENT_KEYS)}"
                )
                continue
            name = client.get("name")
            label = f"host {host}, client {name}" if name else f"host {host}, lab_clients[{index}]"
            if not isinstance(name, str) or not CLIENT_NAME_RE.match(name):
                errors.append(
                    f"{label}: key 'name' is {name!r}; allowed: lower-case letters, digits, "
                    "'-', '_', '.', starting with a letter or digit, at most 48 characters"
                )
            else:
                total_clients += 1
                if name in seen:
                    errors.append(
                        f"host {host}, client {name}: the client name {name} is used twice "
                        f"(hosts {seen[name]} and {host}); client names must be unique in the lab"
                    )
                else:
                    seen[name] = host
            for key in client:
                if key not in CLIENT_KEYS:
                    errors.append(f"{label}: unknown key {key!r}; allowed keys: {', '.join(CLIENT_KEYS)}")
            tier_name = client.get("tier")
            if tier_name not in tiers:
                errors.append(
                    f"{label}: key 'tier' is {tier_name!r}, an unknown tier; allowed tiers: "
                    f"{', '.join(sorted(map(str, tiers))) or '(lab_tiers is empty)'}"
                )
                effective = dict(client)
            else:
                tier = tiers[tier_name] if isinstance(tiers[tier_name], dict) else {}
                effective = {**tier, **client}
            overrides = {k: v for k, v in client.items() if k in TIER_KEYS}
            _check_settings(label, overrides, errors)
            cpus = effective.get("cpus")
            if vcpus and _is_number(cpus) and cpus > vcpus:
                errors.append(
                    f"{label}: key 'cpus' is {cpus}, above the {vcpus} cores of host {host}; "
                    f"allowed: above 0 and at most {vcpus}"
                )
            mem = memory_bytes(effective.get("memory")) if "memory" in effective else None
            if mem:
                host_memory += mem
        if memtotal_mb and host_memory > memtotal_mb * 1024**2:
            errors.append(
                f"host {host}: the memory limits of its clients add up to "
                f"{host_memory / 1024**3:.1f} GiB (key 'memory'), above the host's "
                f"{memtotal_mb / 1024:.1f} GiB of memory; lower the tiers' memory or move clients"
            )

    _check_security(hostvars, lab_hosts, multi_host, defaults, errors)
    if lab_hosts and client_hosts and total_clients == 0 and not any("lab_clients" in e for e in errors):
        errors.append("inventory: no client is placed on any host; add lab_clients to a host of group 'clients'")
    # Tiers and the run config are group_vars: report each of their problems once.
    return list(dict.fromkeys(errors))


def _check_security(hostvars, lab_hosts: list[str], multi_host: bool, defaults: dict, errors: list[str]) -> None:
    """lab_tls and lab_supernode_auth: booleans, one value for the whole lab, TLS on when several hosts."""
    for key in ("lab_tls", "lab_supernode_auth"):
        values = {}
        for host in dict.fromkeys(lab_hosts):
            value = hostvars[host].get(key, defaults[key])
            if not isinstance(value, bool):
                errors.append(f"host {host}: key {key!r} is {value!r}; allowed: true or false")
            else:
                values[host] = value
        if len(set(values.values())) > 1:
            listed = ", ".join(f"{h}: {str(v).lower()}" for h, v in values.items())
            errors.append(
                f"inventory: key {key!r} differs between hosts ({listed}); allowed: one value for the whole lab"
            )
        if key == "lab_tls" and multi_host and False in values.values():
            errors.append(
                f"inventory: key 'lab_tls' is false in a lab of {len(set(lab_hosts))} hosts: model weights would cross "
                "the network in plaintext and any process that reaches the SuperLink could join; allowed: true "
                "(the default; lab_tls: false is for a single-host lab only)"
            )


class FilterModule:
    def filters(self):
        return {"lab_preflight_errors": lab_preflight_errors}
