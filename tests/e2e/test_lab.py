"""End-to-end test of the README's main command on this machine.

Runs `ansible-playbook site.yml -i inventory/local` for real (the docker role installs the engine,
images are built locally) and checks what a user would: limits, health, a federated run that
completes and learns with the tiers visible in its fit seconds, no zombie processes, the ServerApp
metrics endpoint, idempotence, runs in a row, a run on a busy machine, a failed run reported and
started again, and that broken inventories fail before any change. The tests run in file order and
share the lab brought up by the first one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import (
    LOCAL_INVENTORY,
    ROOT,
    docker,
    inspect,
    inventory_vars,
    lab_containers,
    parse_memory,
    recap,
    run_site,
    wait_for,
)

SUPERLINK = "flowerlab-superlink"


def flwr_runs() -> list[dict]:
    out = docker("exec", SUPERLINK, "flwr", "ls", "lab", "--format", "json")
    return json.loads(out)["runs"]


def history(run_id: str) -> dict:
    return json.loads(docker("exec", SUPERLINK, "cat", f"/results/{run_id}/history.json"))


def run_ids() -> list[str]:
    return [r["run-id"] for r in flwr_runs()]


def started_unix(container: str) -> float:
    """When the container was last started (Docker's StartedAt, UTC)."""
    from datetime import datetime

    stamp = inspect(container)["State"]["StartedAt"]  # e.g. 2026-12-01T17:49:27.123456789Z
    return datetime.fromisoformat(stamp[:26].rstrip("Z") + "+00:00").timestamp()


def zombies(container: str) -> list[str]:
    """Processes of the container in state Z (finished, never waited for)."""
    out = docker("exec", container, "sh", "-c", "grep -l '^State:.*Z' /proc/[0-9]*/status || true")
    return out.split()


def mean_fit_by_tier(hist: dict) -> dict[str, float]:
    """Mean fit seconds per tier over the rounds after the first (which traces the graph once)."""
    fits: dict[str, list[float]] = {}
    for r in hist["rounds"][1:]:
        for c in r["clients"].values():
            fits.setdefault(c["tier"], []).append(c["fit-seconds"])
    return {tier: sum(v) / len(v) for tier, v in fits.items()}


def clients_of(hostvars: dict) -> dict[str, dict]:
    """Client name -> effective settings (tier values with the client's overrides)."""
    clients = {}
    for host, hv in hostvars.items():
        tiers = hv["lab_tiers"]
        for client in hv.get("lab_clients", []):
            clients[client["name"]] = {**tiers[client["tier"]], **client, "host": host}
    return clients


@pytest.fixture(scope="module")
def lab():
    first = run_site(LOCAL_INVENTORY)
    assert first.returncode == 0, "site.yml failed on inventory/local"
    hostvars = inventory_vars(LOCAL_INVENTORY)
    return {"first": first, "clients": clients_of(hostvars)}


def test_first_run_brings_up_the_lab_and_follows_the_run(lab):
    out = lab["first"].stdout
    counts = recap(out)
    assert counts, "no PLAY RECAP in the output"
    assert all(c["failed"] == 0 and c["unreachable"] == 0 for c in counts.values()), counts
    rounds = len(history(run_ids()[0])["rounds"])
    for n in range(1, rounds + 1):
        assert f"round {n}: accuracy " in out, f"the play did not print round {n}"
    assert "Flower heterogeneity lab summary" in out
    assert "(finished:completed)" in out and "final accuracy" in out and "tier iot: fit" in out


def test_second_run_changes_nothing_and_leaves_the_run_alone(lab):
    runs_before = flwr_runs()
    assert len(runs_before) == 1, f"expected exactly one run started by site.yml, got {runs_before}"
    containers_before = lab_containers()
    second = run_site(LOCAL_INVENTORY)
    assert second.returncode == 0
    counts = recap(second.stdout)
    assert all(c["changed"] == 0 for c in counts.values()), f"second run changed something: {counts}"
    assert lab_containers() == containers_before, "a container was recreated or restarted"
    runs_after = flwr_runs()
    assert [r["run-id"] for r in runs_after] == [r["run-id"] for r in runs_before]
    assert "failed" not in runs_after[0]["status"], runs_after[0]


def test_client_containers_carry_their_tier_limits(lab):
    assert len(lab["clients"]) >= 3
    assert len({c["tier"] for c in lab["clients"].values()}) >= 3, "inventory/local needs three tiers"
    for name, client in lab["clients"].items():
        host_config = inspect(f"flowerlab-supernode-{name}")["HostConfig"]
        assert host_config["NanoCpus"] == round(float(client["cpus"]) * 1e9), name
        assert host_config["Memory"] == parse_memory(client["memory"]), name
        assert not any("docker.sock" in b for b in host_config.get("Binds") or []), name


def test_superlink_is_healthy(lab):
    assert inspect(SUPERLINK)["State"]["Health"]["Status"] == "healthy"


def test_federated_run_completes_with_every_client(lab):
    def finished():
        run = flwr_runs()[0]
        return run if run["status"].startswith("finished") else None

    run = wait_for("the federated run to finish", finished, timeout=1500, interval=10)
    assert run["status"] == "finished:completed", run
    lab["run_id"] = run["run-id"]
    hist = history(run["run-id"])
    rounds = hist["rounds"]
    assert hist["status"] == "completed"
    assert len(rounds) == hist["num_rounds"] >= 2
    for entry in rounds:
        assert set(entry["clients"]) == set(lab["clients"]), entry


def test_the_run_learns_and_shows_the_tiers(lab):
    """Accuracy climbs well above chance (0.1); the 0.5-cpu tier trains slower than the 1-cpu tier."""
    hist = history(lab["run_id"])
    accuracies = [r["accuracy"] for r in hist["rounds"]]
    assert all(r["central_accuracy"] is not None for r in hist["rounds"]), "central evaluation is off"
    assert accuracies[-1] > 0.5, accuracies
    fits = mean_fit_by_tier(hist)
    by_cpus = sorted(lab["clients"].values(), key=lambda c: float(c["cpus"]))
    slowest, fastest = by_cpus[0]["tier"], by_cpus[-1]["tier"]
    assert fits[slowest] > fits[fastest], fits
    # Warm clients: a round's overhead (round seconds minus the slowest fit) is far below the old 140 s.
    overheads = [r["overhead_seconds"] for r in hist["rounds"][1:]]
    assert max(overheads) < 60, overheads


def test_no_zombie_processes_remain_in_flower_containers(lab):
    for name in [SUPERLINK] + [f"flowerlab-supernode-{c}" for c in lab["clients"]]:
        assert zombies(name) == [], name


def test_serverapp_metrics_report_the_completed_run(lab):
    with urllib.request.urlopen("http://127.0.0.1:9400/metrics", timeout=10) as resp:
        text = resp.read().decode()
    run_id = lab["run_id"]

    def status_line():
        body = urllib.request.urlopen("http://127.0.0.1:9400/metrics", timeout=10).read().decode()
        return f'flowerlab_run_status{{run_id="{run_id}",status="completed"}} 1.0' in body

    wait_for("the exporter to report the run completed", status_line, timeout=60, interval=3)
    assert "flowerlab_run_active 0.0" in text


def test_serverapp_metrics_endpoint_serves_every_client(lab):
    """The lasting ServerApp exporter (published on loopback) serves the finished run's series."""
    with urllib.request.urlopen("http://127.0.0.1:9400/metrics", timeout=10) as resp:
        text = resp.read().decode()
    assert "model_accuracy " in text
    for name in lab["clients"]:
        assert f'flowerlab_client_fit_seconds{{client="{name}"' in text, name


@pytest.mark.parametrize(
    "case", ["unknown tier", "malformed memory", "cpus above cores", "duplicate client", "memory above host"]
)
def test_broken_inventory_fails_before_any_change(lab, inventory_copy, case):
    hostvars = inventory_vars(LOCAL_INVENTORY)["localhost"]
    first_client = hostvars["lab_clients"][0]
    host_vars = inventory_copy / "host_vars" / "localhost.yml"
    data = yaml.safe_load(host_vars.read_text())
    if case == "unknown tier":
        data["lab_clients"][0]["tier"] = "quantum"
        expect = ["quantum", first_client["name"], "tier"]
    elif case == "malformed memory":
        data["lab_clients"][0]["memory"] = "3x"
        expect = ["3x", first_client["name"], "memory"]
    elif case == "cpus above cores":
        data["lab_clients"][0]["cpus"] = 64
        expect = [first_client["name"], "cpus"]
    elif case == "duplicate client":
        data["lab_clients"].append(dict(data["lab_clients"][0]))
        expect = [first_client["name"], "twice"]
    else:
        data["lab_clients"][0]["memory"] = "100000g"
        expect = ["memory", "localhost"]
    host_vars.write_text(yaml.safe_dump(data))
    before = lab_containers()
    proc = run_site(inventory_copy)
    assert proc.returncode != 0, f"{case}: site.yml accepted a broken inventory"
    for word in expect:
        assert word in proc.stdout, f"{case}: the error does not name {word!r}"
    assert "TASK [docker" not in proc.stdout, f"{case}: the play went past the preflight"
    assert lab_containers() == before, f"{case}: a container changed"


def test_changing_a_tier_changes_exactly_that_client(lab, inventory_copy):
    # flower_run_policy=never: a new configuration would otherwise start a new run (policy once).
    hostvars = inventory_vars(LOCAL_INVENTORY)["localhost"]
    tiers = hostvars["lab_tiers"]
    target = hostvars["lab_clients"][0]
    own_cpus = tiers[target["tier"]]["cpus"]
    new_tier = next(t for t in tiers if tiers[t]["cpus"] != own_cpus)
    host_vars = inventory_copy / "host_vars" / "localhost.yml"
    data = yaml.safe_load(host_vars.read_text())
    data["lab_clients"][0]["tier"] = new_tier
    host_vars.write_text(yaml.safe_dump(data))
    before = lab_containers()
    proc = run_site(inventory_copy, "-e", "flower_run_policy=never")
    assert proc.returncode == 0
    after = lab_containers()
    changed = {name for name in before if before[name] != after.get(name)}
    assert changed == {f"flowerlab-supernode-{target['name']}"}, changed
    host_config = inspect(f"flowerlab-supernode-{target['name']}")["HostConfig"]
    assert host_config["NanoCpus"] == round(float(tiers[new_tier]["cpus"]) * 1e9)
    assert host_config["Memory"] == parse_memory(tiers[new_tier]["memory"])
    # Back to the inventory as committed: that container returns to its own tier.
    assert run_site(LOCAL_INVENTORY, "-e", "flower_run_policy=never").returncode == 0
    restored = inspect(f"flowerlab-supernode-{target['name']}")["HostConfig"]
    assert restored["NanoCpus"] == round(float(tiers[target["tier"]]["cpus"]) * 1e9)


PROMETHEUS = "http://127.0.0.1:9090"


def prom_query(expr: str) -> list[dict]:
    url = f"{PROMETHEUS}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_scrapes_every_client_and_host(lab):
    """The lab's real Prometheus holds the app's model and per-client series and the hosts' node-exporter."""
    wanted = set(lab["clients"])

    def scraped():
        clients = {s["metric"].get("client") for s in prom_query("flowerlab_client_fit_seconds")}
        return wanted <= clients and prom_query("model_accuracy") and clients

    wait_for("per-client series in Prometheus", scraped, timeout=180, interval=5)
    up = {s["metric"]["job"]: s["value"][1] for s in prom_query('up{job=~"node-exporter|flower-serverapp"}')}
    assert up == {"node-exporter": "1", "flower-serverapp": "1"}, up
    for client in wanted:
        series = prom_query(f'flowerlab_client_cpu_limit_cores{{client="{client}"}}')
        assert series, client
        assert float(series[0]["value"][1]) == pytest.approx(float(lab["clients"][client]["cpus"])), client
    hosts = {s["metric"]["host"] for s in prom_query("node_memory_MemTotal_bytes")}
    assert hosts == {"localhost"}, hosts


def rule_names() -> set[str]:
    with urllib.request.urlopen(f"{PROMETHEUS}/api/v1/rules", timeout=10) as resp:
        groups = json.load(resp)["data"]["groups"]
    return {rule["name"] for group in groups for rule in group["rules"]}


def test_alert_rules_are_loaded(lab):
    rules = yaml.safe_load((ROOT / "roles/prometheus/files/rules/flowerlab-alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert "FlowerRunFailed" in alerts
    assert alerts <= rule_names(), alerts - rule_names()


def firing_alerts() -> list[dict]:
    with urllib.request.urlopen(f"{PROMETHEUS}/api/v1/alerts", timeout=10) as resp:
        return [a for a in json.load(resp)["data"]["alerts"] if a["state"] == "firing"]


def test_every_dashboard_expression_is_accepted_by_prometheus(lab):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "dashboards" / "check_dashboards.py"), "--prometheus", PROMETHEUS],
        capture_output=True,
        text=True,
        timeout=300,
    )
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_grafana_provisioning_files_parse(lab):
    grafana_dir = Path("/var/lib/flowerlab/grafana")
    files = [p for p in grafana_dir.rglob("*") if p.suffix in {".yml", ".yaml", ".json"}]
    assert any(p.suffix == ".json" for p in files), f"no dashboards under {grafana_dir}"
    assert any(p.suffix in {".yml", ".yaml"} for p in files), f"no provisioning files under {grafana_dir}"
    for path in files:
        text = path.read_text()
        assert json.loads(text) if path.suffix == ".json" else yaml.safe_load(text), path


def test_runs_in_a_row_complete_and_stay_warm(lab):
    """A second run on the same containers: completes, learns, and its first round is not cold."""
    before = run_ids()
    proc = run_site(LOCAL_INVENTORY, "-e", "flower_run_policy=always")
    assert proc.returncode == 0
    new = [r for r in run_ids() if r not in before]
    assert len(new) == 1, new
    first, second = history(lab["run_id"]), history(new[0])
    assert second["status"] == "completed" and second["rounds"][-1]["accuracy"] > 0.5
    # The first run's round 1 traced the model in every trainer; in the second run, a client whose
    # container lived through the first run (the tier test recreated one) trains warm from round 1.
    warm = [name for name in lab["clients"] if started_unix(f"flowerlab-supernode-{name}") < first["started_unix"]]
    assert warm, "every client container was recreated since the first run"
    for name in warm:
        cold_fit = first["rounds"][0]["clients"][name]["fit-seconds"]
        warm_fit = second["rounds"][0]["clients"][name]["fit-seconds"]
        assert warm_fit < cold_fit / 2, (name, cold_fit, warm_fit)
    lab["run_id"] = new[0]


@pytest.fixture
def busy_machine(tmp_path):
    """A CPU hog on every core and a disk writer, each bounded in time and stopped by the fixture."""
    cores = os.cpu_count() or 2
    hogs = [subprocess.Popen(["timeout", "900", sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    writer = subprocess.Popen(
        ["timeout", "900", "sh", "-c",
         f"while true; do dd if=/dev/zero of={tmp_path}/load bs=1M count=256 conv=fsync 2>/dev/null; done"]
    )  # fmt: skip
    yield
    for p in [*hogs, writer]:
        p.terminate()
    for p in [*hogs, writer]:
        p.wait(timeout=30)


def test_a_run_completes_on_a_busy_machine(lab, busy_machine):
    """Four rounds (accuracy about 0.87 on this seeded data) while every core is taken and a disk writes."""
    load_before = os.getloadavg()[0]
    before = run_ids()
    config = {**inventory_vars(LOCAL_INVENTORY)["localhost"]["lab_run_config"], "num-server-rounds": 4}
    proc = run_site(LOCAL_INVENTORY, "-e", "flower_run_policy=always", "-e", json.dumps({"lab_run_config": config}))
    load_during = os.getloadavg()[0]
    assert proc.returncode == 0, "the run on a busy machine failed"
    new = [r for r in run_ids() if r not in before]
    hist = history(new[0])
    assert hist["status"] == "completed" and hist["rounds"][-1]["accuracy"] > 0.5
    print(f"load average {load_before:.1f} before, {load_during:.1f} at the end of the run")
    assert load_during >= (os.cpu_count() or 2), "the machine was not busy"


def test_a_failed_run_is_reported_and_started_again(lab, inventory_copy):
    """fail-at-round makes the ServerApp fail in round 2: metrics, alert, summary say so; `once` retries."""
    run_yml = inventory_copy / "group_vars" / "all" / "run.yml"
    data = yaml.safe_load(run_yml.read_text())
    data["lab_run_config"]["fail-at-round"] = 2
    run_yml.write_text(yaml.safe_dump(data))
    before = run_ids()
    proc = run_site(inventory_copy)
    assert proc.returncode != 0, "a failed run must fail the play (after the summary)"
    failed = [r for r in run_ids() if r not in before]
    assert len(failed) == 1
    assert f"Run: {failed[0]} (finished:failed)" in proc.stdout
    assert "InjectedFailure" in proc.stdout and "Fail when the run the play waited for did not complete" in proc.stdout
    assert history(failed[0])["status"] == "failed"

    def alert():
        return [a for a in firing_alerts() if a["labels"]["alertname"] == "FlowerRunFailed"]

    fired = wait_for("FlowerRunFailed to fire", alert, timeout=120, interval=5)
    assert fired[0]["labels"]["run_id"] == failed[0]
    # The same configuration again: `once` starts a new run because the last one failed.
    again = run_site(inventory_copy)
    said = " ".join(again.stdout.split())  # the callback wraps long messages
    assert f"Run {failed[0]} of this lab configuration ended finished:failed: starting a new run" in said
    assert len([r for r in run_ids() if r not in before]) == 2
