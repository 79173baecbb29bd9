"""End-to-end test of the README's main command on this machine.

Runs `ansible-playbook site.yml -i inventory/local` for real (the docker role installs the engine,
images are built locally) and checks what a user would: limits, health, a federated run that
completes and learns with the tiers visible in its fit seconds, no zombie processes, the ServerApp
metrics endpoint, idempotence, an experiment (two policies, runs in a row), faults (a client killed in
a round, a client out of memory, a SuperNode cut off from the SuperLink, the SuperLink restarted in a run),
a run on a busy machine, a failed run reported and started again, and that broken inventories fail
before any change. The tests run in file order and share the lab brought up by the first one.

The tests marked `lab_up` need the machine to themselves. `tests/run.sh` runs them on their own (stage
`lab-up`, nothing else on the machine), then the others beside Molecule on that lab
(FLOWERLAB_E2E_LAB_UP=1). The tiers' order in fit seconds is a claim about a machine the lab has to
itself: on a machine busy with other work a container's --cpus is a ceiling only, and the fit seconds of
the tiers can come out in any order (in a run beside Molecule the 0.5-cpu tier's median was 2.3 s, the
1-cpu tier's 2.9 s; beside lint, unit and app-e2e, whose processes run outside Docker, the order held in
three runs and failed in a fourth: 0.5-cpu 5.29 s, 1-cpu 5.33 s). The busy machine is a known load, a
hog per core and a disk writer: alone it took 130 to 250 s; beside Molecule, whose work its hogs
slowed as well, 868 s. The second site.yml comes before it, while the marked run is still site.yml's.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
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

sys.path.insert(0, str(ROOT / "roles" / "lab_common" / "filter_plugins"))
from lab_clients import lab_clients as effective_clients  # noqa: E402

SUPERLINK = "flowerlab-superlink"
# The Flower part of site.yml and a run, in one ansible-playbook call: for tests that change SuperNodes
# and start a run, without the engine, images and monitoring plays that have nothing to do.
FLOWER_AND_RUN = ("playbooks/flower.yml", "playbooks/run.yml")


def flwr_runs() -> list[dict]:
    out = docker("exec", SUPERLINK, "flwr", "ls", "lab", "--format", "json")
    return json.loads(out)["runs"]


def history(run_id: str) -> dict:
    return json.loads(docker("exec", SUPERLINK, "cat", f"/results/{run_id}/history.json"))


def rounds_recorded(run_id: str) -> int:
    """Rounds in the run's history so far (0 before the ServerApp wrote it)."""
    try:
        return len(history(run_id)["rounds"])
    except (subprocess.CalledProcessError, ValueError, KeyError):
        return 0


def run_ids() -> list[str]:
    return [r["run-id"] for r in flwr_runs()]


def started_unix(container: str) -> float:
    """When the container was last started (Docker's StartedAt, UTC)."""
    from datetime import datetime

    stamp = inspect(container)["State"]["StartedAt"]  # e.g. 2026-12-01T17:49:27.123456789Z
    return datetime.fromisoformat(stamp[:26].rstrip("Z") + "+00:00").timestamp()


def zombies(container: str, seconds: float = 5.0) -> list[str]:
    """Processes of the container in state Z (finished, never waited for) that stay so for `seconds`:
    a child that exited just now is a zombie until the reaper, which polls every second, waits for it."""

    def now() -> list[str]:
        out = docker("exec", container, "sh", "-c", "grep -l '^State:.*Z' /proc/[0-9]*/status || true")
        return out.split()

    found = now()
    deadline = time.monotonic() + seconds
    while found and time.monotonic() < deadline:
        time.sleep(0.5)
        found = [z for z in now() if z in found]
    return found


def median_fit_by_tier(hist: dict) -> dict[str, float]:
    """Median fit seconds per tier over the rounds after the first (which traces the graph once): one
    round slowed by a burst of other work on a busy machine does not decide the order."""
    fits: dict[str, list[float]] = {}
    for r in hist["rounds"][1:]:
        for c in r["clients"].values():
            fits.setdefault(c["tier"], []).append(c["fit-seconds"])
    return {tier: statistics.median(v) for tier, v in fits.items()}


def clients_of(hostvars: dict) -> dict[str, dict]:
    """Client name -> effective settings, by lab_common's lab_effective_clients filter (the roles' own)."""
    return {c["name"]: c for c in effective_clients(list(hostvars), hostvars)}


@pytest.fixture(scope="module")
def lab():
    """The lab of inventory/local, brought up from nothing: an earlier lab on this machine (its runs,
    Prometheus samples and alerts, experiments, run marker, prepared data) is purged first, so that what
    the tests read is this session's alone. With FLOWERLAB_E2E_LAB_UP=1 the lab brought up so by an
    earlier session (tests/run.sh's lab-up stage, the lab_up tests) is used as it is: its first run is the
    one site.yml started."""
    if os.environ.get("FLOWERLAB_E2E_LAB_UP") == "1":
        runs = flwr_runs()
        assert runs and all(r["status"] == "finished:completed" for r in runs), runs
        first_run = min((r["run-id"] for r in runs), key=lambda run_id: history(run_id)["started_unix"])
        hostvars = inventory_vars(LOCAL_INVENTORY)
        return {"first": None, "clients": clients_of(hostvars), "run_id": first_run}
    purge = run_site(LOCAL_INVENTORY, "-e", "lab_teardown_purge=true", playbook="playbooks/teardown.yml")
    assert purge.returncode == 0, "the teardown of an earlier lab failed"
    assert lab_containers() == {}, "containers of an earlier lab are left"
    first = run_site(LOCAL_INVENTORY)
    assert first.returncode == 0, "site.yml failed on inventory/local"
    hostvars = inventory_vars(LOCAL_INVENTORY)
    return {"first": first, "clients": clients_of(hostvars)}


@pytest.mark.lab_up
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


@pytest.mark.lab_up
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


@pytest.mark.lab_up
def test_client_containers_carry_their_tier_limits(lab):
    assert len(lab["clients"]) >= 3
    assert len({c["tier"] for c in lab["clients"].values()}) >= 3, "inventory/local needs three tiers"
    for name, client in lab["clients"].items():
        host_config = inspect(f"flowerlab-supernode-{name}")["HostConfig"]
        assert host_config["NanoCpus"] == round(float(client["cpus"]) * 1e9), name
        assert host_config["CpuShares"] == round(float(client["cpus"]) * 1024), name  # the tiers' order under load
        assert host_config["Memory"] == parse_memory(client["memory"]), name
        assert not any("docker.sock" in b for b in host_config.get("Binds") or []), name


@pytest.mark.lab_up
def test_superlink_is_healthy(lab):
    assert inspect(SUPERLINK)["State"]["Health"]["Status"] == "healthy"


@pytest.mark.lab_up
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


@pytest.mark.lab_up
def test_the_run_learns_and_shows_the_tiers(lab):
    """Accuracy climbs well above chance (0.1); the 0.5-cpu tier trains slower than the 1-cpu tier."""
    hist = history(lab["run_id"])
    accuracies = [r["accuracy"] for r in hist["rounds"]]
    assert all(r["central_accuracy"] is not None for r in hist["rounds"]), "central evaluation is off"
    assert accuracies[-1] > 0.5, accuracies
    fits = median_fit_by_tier(hist)
    by_cpus = sorted(lab["clients"].values(), key=lambda c: float(c["cpus"]))
    slowest, fastest = by_cpus[0]["tier"], by_cpus[-1]["tier"]
    assert fits[slowest] > fits[fastest], fits
    # Warm clients: a round's overhead (round seconds minus the slowest fit) is far below the old 140 s.
    overheads = [r["overhead_seconds"] for r in hist["rounds"][1:]]
    assert max(overheads) < 60, overheads


@pytest.mark.lab_up
def test_no_zombie_processes_remain_in_flower_containers(lab):
    for name in [SUPERLINK] + [f"flowerlab-supernode-{c}" for c in lab["clients"]]:
        assert zombies(name) == [], name


@pytest.mark.lab_up
def test_serverapp_metrics_report_the_completed_run(lab):
    with urllib.request.urlopen("http://127.0.0.1:9400/metrics", timeout=10) as resp:
        text = resp.read().decode()
    run_id = lab["run_id"]

    def status_line():
        body = urllib.request.urlopen("http://127.0.0.1:9400/metrics", timeout=10).read().decode()
        return f'flowerlab_run_status{{run_id="{run_id}",status="completed"}} 1.0' in body

    wait_for("the exporter to report the run completed", status_line, timeout=60, interval=3)
    assert "flowerlab_run_active 0.0" in text


@pytest.mark.lab_up
def test_serverapp_metrics_endpoint_serves_every_client(lab):
    """The lasting ServerApp exporter (published on loopback) serves the finished run's series."""
    with urllib.request.urlopen("http://127.0.0.1:9400/metrics", timeout=10) as resp:
        text = resp.read().decode()
    assert "model_accuracy " in text
    for name in lab["clients"]:
        assert f'flowerlab_client_fit_seconds{{client="{name}"' in text, name
    # One exporter per lab, its container: the ServerApp started none inside the SuperLink.
    found = docker("exec", SUPERLINK, "sh", "-c", "grep -l 'flowerlab_app[.]metrics' /proc/[0-9]*/cmdline || true")
    assert found.split() == [], found


def test_a_broken_inventory_fails_before_any_change(lab, inventory_copy):
    """One wiring case on the deployed lab; every broken inventory is the lab_preflight scenario's."""
    hostvars = inventory_vars(LOCAL_INVENTORY)["localhost"]
    first_client = hostvars["lab_clients"][0]
    host_vars = inventory_copy / "host_vars" / "localhost.yml"
    data = yaml.safe_load(host_vars.read_text())
    data["lab_clients"][0]["tier"] = "quantum"
    host_vars.write_text(yaml.safe_dump(data))
    before = lab_containers()
    proc = run_site(inventory_copy)
    assert proc.returncode != 0, "site.yml accepted a client of an unknown tier"
    for word in ("quantum", first_client["name"], "tier", "allowed"):
        assert word in proc.stdout, f"the error does not name {word!r}"
    assert "TASK [docker" not in proc.stdout, "the play went past the preflight"
    assert lab_containers() == before, "a container changed"


PROMETHEUS = "http://127.0.0.1:9090"


def prom_query(expr: str) -> list[dict]:
    url = f"{PROMETHEUS}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.mark.lab_up
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


@pytest.mark.lab_up
def test_alert_rules_are_loaded(lab):
    rules = yaml.safe_load((ROOT / "roles/prometheus/files/rules/flowerlab-alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert "FlowerRunFailed" in alerts
    assert alerts <= rule_names(), alerts - rule_names()


@pytest.mark.lab_up
def test_no_alert_fired_or_went_pending_while_the_lab_ran_healthy(lab):
    """Every run so far completed with every client: no alert may have fired, or even gone pending
    (ALERTS keeps both states as series; the lab's Prometheus was new with the lab)."""
    ever = prom_query("max_over_time(ALERTS[2h])")
    assert ever == [], [(a["metric"]["alertname"], a["metric"].get("alertstate")) for a in ever]


def firing_alerts() -> list[dict]:
    with urllib.request.urlopen(f"{PROMETHEUS}/api/v1/alerts", timeout=10) as resp:
        return [a for a in json.load(resp)["data"]["alerts"] if a["state"] == "firing"]


@pytest.mark.lab_up
def test_every_dashboard_expression_is_accepted_by_prometheus(lab):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "dashboards" / "check_dashboards.py"), "--prometheus", PROMETHEUS],
        capture_output=True,
        text=True,
        timeout=300,
    )
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.lab_up
def test_grafana_provisioning_files_parse(lab):
    grafana_dir = Path("/var/lib/flowerlab/grafana")
    files = [p for p in grafana_dir.rglob("*") if p.suffix in {".yml", ".yaml", ".json"}]
    assert any(p.suffix == ".json" for p in files), f"no dashboards under {grafana_dir}"
    assert any(p.suffix in {".yml", ".yaml"} for p in files), f"no provisioning files under {grafana_dir}"
    for path in files:
        text = path.read_text()
        assert json.loads(text) if path.suffix == ".json" else yaml.safe_load(text), path


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


@pytest.mark.lab_up
def test_a_run_completes_on_a_busy_machine(lab, busy_machine):
    """Four rounds (accuracy 0.81 on this seeded data; three reach only 0.49), started and followed by
    `playbooks/run.yml`, while every core is taken and a disk writes."""
    load_before = os.getloadavg()[0]
    before = run_ids()
    config = {**inventory_vars(LOCAL_INVENTORY)["localhost"]["lab_run_config"], "num-server-rounds": 4}
    proc = run_site(
        LOCAL_INVENTORY,
        "-e",
        "flower_run_policy=always",
        "-e",
        json.dumps({"lab_run_config": config}),
        playbook="playbooks/run.yml",
    )
    load_during = os.getloadavg()[0]
    assert proc.returncode == 0, "the run on a busy machine failed"
    new = [r for r in run_ids() if r not in before]
    hist = history(new[0])
    assert hist["status"] == "completed" and hist["rounds"][-1]["accuracy"] > 0.5
    print(f"load average {load_before:.1f} before, {load_during:.1f} at the end of the run")
    assert load_during >= (os.cpu_count() or 2), "the machine was not busy"


def test_an_experiment_runs_policies_in_a_row_and_reports_them(lab, tmp_path):
    """A short experiment (static and deadline, one seed, three rounds): two runs in a row on the warm lab,
    both histories and a report with plots on the controller; deadline's steps follow its budget."""
    before = run_ids()
    extra = {
        "flower_run_experiment_name": "e2e",
        "flower_run_experiment_policies": ["static", "deadline"],
        "flower_run_experiment_seeds": [1],
        "flower_run_experiment_config": {"num-server-rounds": 3},
        "flower_run_experiment_local_dir": str(tmp_path),
    }
    proc = run_site(LOCAL_INVENTORY, "-e", json.dumps(extra), playbook="playbooks/experiment.yml")
    assert proc.returncode == 0, "the experiment failed"
    new = [r for r in run_ids() if r not in before]
    assert len(new) == 2, new
    by_policy = {h["policy"]: h for h in map(history, new)}
    assert set(by_policy) == {"static", "deadline"}, by_policy.keys()
    static, deadline = by_policy["static"], by_policy["deadline"]
    for hist in (static, deadline):
        assert hist["status"] == "completed" and len(hist["rounds"]) == 3

    # static: every client local-epochs over its partition, every round
    epochs = inventory_vars(LOCAL_INVENTORY)["localhost"]["lab_run_config"]["local-epochs"]
    for rnd in static["rounds"]:
        assert not rnd["budget_seconds"]
        for c in rnd["clients"].values():
            assert c["steps"] == -(-c["num-examples"] // c["batch-size"]) * epochs, c
    # deadline: a speed query before round 1, then every round gives each client the median client's time for
    # local-epochs; each plans the steps that fit in it at the speed it measured last, and stops early only
    # when the budget ran out first.
    latest = {name: dict(c) for name, c in deadline["calibration"]["clients"].items()}
    assert set(latest) == set(lab["clients"])
    for rnd in deadline["rounds"]:
        budget = rnd["budget_seconds"]
        needed = [-(-c["num-examples"] // c["batch-size"]) * epochs * c["step-seconds"] for c in latest.values()]
        assert budget == pytest.approx(statistics.median(needed))
        for name, c in rnd["clients"].items():
            assert c["planned-steps"] == max(1, math.floor(budget / latest[name]["step-seconds"])), (name, c)
            assert c["steps"] == c["planned-steps"] or (c["stopped-at-budget"] and c["fit-seconds"] >= budget)
            assert c["samples-trained"] == c["steps"] * c["batch-size"]
        for name, c in rnd["clients"].items():  # what the next round plans from (a 1-step fit measures nothing)
            latest[name].update({k: v for k, v in c.items() if k in ("step-seconds", "num-examples", "batch-size")})
    # The client that needs the most time for local-epochs (by its speed before round 1) trains fewer steps
    # in deadline's first round than static gives it: the budget is the median client's need, below its own.
    # (From the measured speeds, not the tiers: a small batch can make the smallest tier fast per step.)
    calibrated = deadline["calibration"]["clients"]
    steps_for_epochs = {n: -(-c["num-examples"] // c["batch-size"]) * epochs for n, c in calibrated.items()}
    slowest = max(calibrated, key=lambda n: steps_for_epochs[n] * calibrated[n]["step-seconds"])
    assert deadline["rounds"][0]["clients"][slowest]["steps"] < steps_for_epochs[slowest], slowest

    # Runs in a row stay warm: a client whose container lived through the lab's first run trains its first
    # round of the experiment at less than half that run's (cold, tracing) round-1 fit.
    cold = history(lab["run_id"])
    warm = [name for name in lab["clients"] if started_unix(f"flowerlab-supernode-{name}") < cold["started_unix"]]
    assert warm, "every client container was recreated since the first run"
    for name in warm:
        cold_fit = cold["rounds"][0]["clients"][name]["fit-seconds"]
        assert static["rounds"][0]["clients"][name]["fit-seconds"] < cold_fit / 2, name

    report = tmp_path / "e2e"
    for key in ("static-seed1", "deadline-seed1"):
        assert json.loads((report / "runs" / key / "history.json").read_text())["run_id"] in new
        for png in ("accuracy.png", "fit_seconds.png", "idle_seconds.png"):
            assert (report / "runs" / key / png).read_bytes()[:4] == b"\x89PNG", (key, png)
    md = (report / "report.md").read_text()
    assert "| static | 1 |" in md and "| deadline | 1 |" in md
    assert (report / "report.html").exists() and (report / "accuracy_vs_time.png").exists()
    said = " ".join(proc.stdout.split())
    assert f"Report: {report}/report.html" in said
    assert "static: 0.85 accuracy " in said and "deadline: 0.85 accuracy " in said

    # The same experiment again runs nothing and changes nothing.
    again = run_site(LOCAL_INVENTORY, "-e", json.dumps(extra), playbook="playbooks/experiment.yml")
    assert again.returncode == 0
    assert all(c["changed"] == 0 for c in recap(again.stdout).values()), recap(again.stdout)
    assert sorted(r for r in run_ids() if r not in before) == sorted(new)
    lab["run_id"] = deadline["run_id"]


def parse_rate(value: str) -> int:
    """A tier's bandwidth (e.g. "5mbit") in bits/s."""
    number, unit = float(value[:-4]), value[-4:]
    return round(number * {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}[unit])


def tbf_rate_bits(container: str) -> int | None:
    """The rate in bits/s of the tbf at the root of the container's link on the lab network (upload side)."""
    info = inspect(container)
    [net] = info["NetworkSettings"]["Networks"].values()
    ns = ["nsenter", f"--net={info['NetworkSettings']['SandboxKey']}"]
    links = json.loads(subprocess.run([*ns, "ip", "-j", "link", "show"], capture_output=True, text=True).stdout)
    [link] = [x["ifname"] for x in links if x.get("address") == net["MacAddress"]]
    qdiscs = subprocess.run([*ns, "tc", "-j", "qdisc", "show", "dev", link, "root"], capture_output=True, text=True)
    tbf = [q for q in json.loads(qdiscs.stdout) if q.get("kind") == "tbf"]
    return tbf[0]["options"]["rate"] * 8 if tbf else None


def registered_nodes() -> dict[str, str]:
    """node id -> status of every SuperNode the SuperLink has registered (SuperNode authentication)."""
    out = docker("exec", SUPERLINK, "flwr", "supernode", "ls", "lab", "--format", "json")
    return {n["node-id"]: n["status"] for n in json.loads(out)["nodes"] if n["status"] != "unregistered"}


def test_a_client_killed_in_a_round_restarts_rejoins_and_the_run_completes(lab, inventory_copy):
    """A crash, not a `docker stop`: SIGKILL of a client container's init from the host while round 2 of a run
    started by `playbooks/run.yml` trains.
    Docker restarts the container (restart policy), the client rejoins under the node id its key was
    registered with, round 2 closes without its reply (the reply guard: the SuperLink sees the node online
    again and would never report the lost message) and records it, later rounds have it again, and the
    run completes."""
    victim = "client-c"  # the 1-cpu tier: its cold restart stays well inside the next round's reply guard
    container = f"flowerlab-supernode-{victim}"
    nodes = registered_nodes()
    assert sorted(nodes.values()) == ["online"] * len(lab["clients"]), nodes
    restarts = inspect(container)["RestartCount"]
    run_yml = inventory_copy / "group_vars" / "all" / "run.yml"
    data = yaml.safe_load(run_yml.read_text())
    # Eight local epochs: the victim trains a few seconds per round even on an idle machine (two take it
    # about one), so the kill below lands inside its round-2 training, not between two rounds.
    data["lab_run_config"].update({"num-server-rounds": 3, "local-epochs": 8})
    run_yml.write_text(yaml.safe_dump(data))
    before = run_ids()
    since = f"{time.time():.3f}"

    def clientapps_started() -> int:  # one per train message (static policy, no evaluate messages)
        logs = subprocess.run(["docker", "logs", "--since", since, container], capture_output=True, text=True)
        return (logs.stdout + logs.stderr).count("flwr-clientapp` process")

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        play = pool.submit(run_site, inventory_copy, "-e", "flower_run_policy=always", playbook="playbooks/run.yml")
        # (every look is a `flwr ls` in the SuperLink, a CLI start of about a CPU second)
        run_id = wait_for(
            "the run to start", lambda: [r for r in run_ids() if r not in before], timeout=300, interval=3
        )[0]
        wait_for(f"{victim} to receive round 2", lambda: clientapps_started() >= 2, timeout=600, interval=0.3)
        time.sleep(1.5)  # its ClientApp has handed the message to the warm trainer, which trains for seconds
        os.kill(inspect(container)["State"]["Pid"], signal.SIGKILL)
        proc = play.result(timeout=1800)
    assert proc.returncode == 0, "the run must complete without the killed client's round-2 reply"
    hist = history(run_id)
    assert hist["status"] == "completed" and len(hist["rounds"]) == 3
    second = hist["rounds"][1]
    lost = second["missing"] + [f["client"] for f in second["failed"]]
    assert victim in lost and victim not in second["clients"], second
    assert any(victim in r["clients"] for r in hist["rounds"][2:]), "the restarted client never trained again"
    assert inspect(container)["RestartCount"] > restarts
    # Its first healthcheck runs one lab_healthcheck_interval (30 s) after the restart.
    wait_for(f"{container} to be healthy", lambda: inspect(container)["State"]["Health"]["Status"] == "healthy",
             timeout=120, interval=3)  # fmt: skip
    assert registered_nodes() == nodes, "a restarted client must keep its node id"
    said = " ".join(proc.stdout.split())
    assert f"no reply from {victim}" in said or f"failed: {victim}" in said


def test_a_client_moved_to_a_tier_without_enough_memory_changes_alone_and_is_oom_killed(lab, inventory_copy):
    """client-a moved to a new tier, `starved` (other cpus, 700 MiB: training peaks near 1.05 GiB), and a run of
    two rounds, by the Flower part alone (flower.yml, then run.yml): exactly client-a's container changes, to
    the new tier's limits; the kernel OOM-kills its trainer and client-a fails every round; the run goes on
    with the others and completes, the history names the OOM kill, and the app's own metrics fire
    FlowerClientOutOfMemory (no cAdvisor needed). flower.yml with the committed inventory then gives client-a
    its own tier back, and changes nothing else."""
    victim = "client-a"
    container = f"flowerlab-supernode-{victim}"
    hostvars = inventory_vars(LOCAL_INVENTORY)["localhost"]
    own = hostvars["lab_tiers"][lab["clients"][victim]["tier"]]
    starved = {**own, "cpus": 0.75 if float(own["cpus"]) != 0.75 else 0.5, "memory": "700m"}
    tiers_yml = inventory_copy / "group_vars" / "all" / "tiers.yml"
    tiers = yaml.safe_load(tiers_yml.read_text())
    tiers["lab_tiers"]["starved"] = starved
    tiers_yml.write_text(yaml.safe_dump(tiers))
    host_vars = inventory_copy / "host_vars" / "localhost.yml"
    data = yaml.safe_load(host_vars.read_text())
    [client] = [c for c in data["lab_clients"] if c["name"] == victim]
    client["tier"] = "starved"
    host_vars.write_text(yaml.safe_dump(data))
    run_yml = inventory_copy / "group_vars" / "all" / "run.yml"
    config = yaml.safe_load(run_yml.read_text())
    config["lab_run_config"]["num-server-rounds"] = 2
    run_yml.write_text(yaml.safe_dump(config))
    before_containers = lab_containers()
    before = run_ids()
    proc = run_site(inventory_copy, "-e", "flower_run_policy=always", playbook=FLOWER_AND_RUN)
    assert proc.returncode == 0, "the run goes on with the clients that have enough memory"
    after_containers = lab_containers()
    changed = {name for name in before_containers if before_containers[name] != after_containers.get(name)}
    assert changed == {container}, changed
    host_config = inspect(container)["HostConfig"]
    assert host_config["NanoCpus"] == round(starved["cpus"] * 1e9)
    assert host_config["CpuShares"] == round(starved["cpus"] * 1024)
    assert host_config["Memory"] == 700 * 2**20

    [run_id] = [r for r in run_ids() if r not in before]
    hist = history(run_id)
    assert hist["status"] == "completed"
    failures = []
    for rnd in hist["rounds"]:
        assert set(rnd["clients"]) == set(lab["clients"]) - {victim}, rnd["clients"].keys()
        failures += [f for f in rnd["failed"] if f["client"] == victim]
    assert len(failures) == len(hist["rounds"]), hist["rounds"]
    oom_named = [f for f in failures if f.get("oom_kills", 0) >= 1 and "out of memory" in f["error"]]
    assert oom_named, failures
    # On a loaded machine a SuperNode starved of memory can miss its heartbeats before the kernel kills
    # its trainer: that round's reply is "Node Unavailable" (seen in a full test run beside Molecule).
    for failure in failures:
        assert failure in oom_named or "Node Unavailable" in failure["error"], failure

    def oom_alert():
        return [a for a in firing_alerts() if a["labels"]["alertname"] == "FlowerClientOutOfMemory"]

    def oom_failures_scraped():  # the run's count as Prometheus scraped it last (every 15 s)
        series = prom_query("flowerlab_oom_failed_replies")
        return series and float(series[0]["value"][1]) == len(oom_named)

    # Back to the inventory as committed while the alert comes (it reads the finished run's metrics, not
    # the container): that container alone returns to its own tier.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        restore = pool.submit(run_site, LOCAL_INVENTORY, playbook="playbooks/flower.yml")
        wait_for("FlowerClientOutOfMemory to fire", oom_alert, timeout=120, interval=5)
        wait_for("flowerlab_oom_failed_replies to count the OOM-named replies", oom_failures_scraped, timeout=90)
        assert restore.result(timeout=1800).returncode == 0
    restored_containers = lab_containers()
    changed = {n for n in after_containers if after_containers[n] != restored_containers.get(n)}
    assert changed == {container}, changed
    restored = inspect(container)["HostConfig"]
    assert restored["NanoCpus"] == round(float(own["cpus"]) * 1e9)
    assert restored["CpuShares"] == round(float(own["cpus"]) * 1024)
    assert restored["Memory"] == parse_memory(own["memory"])


def test_a_supernode_cut_off_from_the_superlink_turns_unhealthy_and_fires_clients_missing(lab, inventory_copy):
    """The network taken from under a SuperNode (`docker network disconnect`) after round 1 of a run: its
    healthcheck, which also asks the SuperLink's /health, turns the container unhealthy and says why; once the
    SuperLink no longer sees the node (missed heartbeats, about 46 s), the next round waits for it, the
    ServerApp publishes the lower count and FlowerClientsMissing fires (its bound is stated at the top of
    flowerlab-alerts.yml). Given its network back, the SuperNode rejoins under its node id and the run
    completes with it."""
    victim = "client-b"
    container = f"flowerlab-supernode-{victim}"
    network = inspect("flowerlab-superlink")["HostConfig"]["NetworkMode"]

    def all_online():  # (the test before recreated client-a: flower.yml ends once its healthcheck passes)
        found = registered_nodes()
        return found if sorted(found.values()) == ["online"] * len(lab["clients"]) else None

    nodes = wait_for("every client online at the SuperLink", all_online, timeout=120, interval=3)
    run_yml = inventory_copy / "group_vars" / "all" / "run.yml"
    data = yaml.safe_load(run_yml.read_text())
    data["lab_run_config"]["num-server-rounds"] = 4
    run_yml.write_text(yaml.safe_dump(data))
    before = run_ids()
    started = run_site(
        inventory_copy, "-e", "flower_run_policy=always", "-e", "flower_run_wait=false", playbook="playbooks/run.yml"
    )
    assert started.returncode == 0
    [run_id] = [r for r in run_ids() if r not in before]
    wait_for("round 1 to end", lambda: rounds_recorded(run_id) >= 1, timeout=600, interval=1)

    docker("network", "disconnect", network, container)
    cut = time.monotonic()
    try:

        def unhealthy():
            health = inspect(container)["State"].get("Health") or {}
            said = (health.get("Log") or [{}])[-1].get("Output", "")
            return health.get("Status") == "unhealthy" and "the SuperLink is out of reach" in said

        wait_for(f"{container} to turn unhealthy and say why", unhealthy, timeout=180, interval=3)

        def alert():
            return [a for a in firing_alerts() if a["labels"]["alertname"] == "FlowerClientsMissing"]

        fired = wait_for("FlowerClientsMissing to fire", alert, timeout=480, interval=5)
        print(f"FlowerClientsMissing fired {time.monotonic() - cut:.0f} s after the cut: {fired[0]['annotations']}")
        assert history(run_id)["status"] == "running", "the run must wait for the lost SuperNode, not end"
    finally:
        docker("network", "connect", network, container)

    wait_for("the run to end", lambda: history(run_id)["status"] != "running", timeout=900, interval=5)
    hist = history(run_id)
    assert hist["status"] == "completed" and len(hist["rounds"]) == 4, hist["status"]
    assert any(victim not in r["clients"] for r in hist["rounds"][1:]), "no round went without the cut-off client"
    assert victim in hist["rounds"][-1]["clients"], "the reconnected client never trained again"
    wait_for(f"{container} to be healthy again", lambda: inspect(container)["State"]["Health"]["Status"] == "healthy",
             timeout=120, interval=3)  # fmt: skip
    assert registered_nodes() == nodes, "the reconnected client must keep its node id"


def test_a_superlink_restarted_in_a_run_reports_it_failed_and_the_lab_recovers(lab, inventory_copy):
    """`docker restart` of the SuperLink while round 2 trains: its in-memory state (runs, nodes) is gone with
    the ServerApp. The exporter and flowerlab-report call the lost run failed and FlowerRunFailed names it
    (within about a minute: the exporter polls every 10 s, Prometheus scrapes and evaluates every 15 s);
    nothing on the results volume is lost; the Flower part of site.yml (flower.yml, then run.yml) finds the
    marked run unknown to the SuperLink, starts a new one once the SuperNodes have rejoined with their
    registered keys, and it completes. (It runs after the cut-off test: flower.yml also finds the link of
    the SuperNode connected again, under its new name, and gives it its bandwidth limit back.)"""
    run_yml = inventory_copy / "group_vars" / "all" / "run.yml"
    data = yaml.safe_load(run_yml.read_text())
    data["lab_run_config"]["num-server-rounds"] = 2
    run_yml.write_text(yaml.safe_dump(data))
    kept = {r: history(r)["status"] for r in run_ids()}
    assert kept and "running" not in kept.values(), kept
    started = run_site(
        inventory_copy, "-e", "flower_run_policy=always", "-e", "flower_run_wait=false", playbook="playbooks/run.yml"
    )
    assert started.returncode == 0
    [run_id] = [r for r in run_ids() if r not in kept]

    wait_for("round 1 to end", lambda: rounds_recorded(run_id) >= 1, timeout=600, interval=1)
    docker("restart", SUPERLINK)

    def exporter_says_failed():
        body = urllib.request.urlopen("http://127.0.0.1:9400/metrics", timeout=10).read().decode()
        return f'flowerlab_run_status{{run_id="{run_id}",status="failed"}} 1.0' in body

    wait_for("the exporter to call the lost run failed", exporter_says_failed, timeout=90, interval=3)
    report = docker("exec", SUPERLINK, "flowerlab-report", f"/results/{run_id}")
    assert f"run {run_id}: failed" in report, report

    def alert():
        return [a for a in firing_alerts() if a["labels"]["alertname"] == "FlowerRunFailed"]

    assert run_ids() == [], "a restarted SuperLink keeps no runs (in-memory state)"
    for old, status in kept.items():  # the results volume kept every earlier run
        assert history(old)["status"] == status, old

    # flower.yml while the alert comes (it starts no run: a new run would clear the alert), then run.yml.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        flower = pool.submit(run_site, inventory_copy, playbook="playbooks/flower.yml")
        fired = wait_for("FlowerRunFailed to fire", alert, timeout=120, interval=5)
        assert fired[0]["labels"]["run_id"] == run_id
        assert flower.result(timeout=1800).returncode == 0, "flower.yml failed after the SuperLink restarted"
    again = run_site(inventory_copy, playbook="playbooks/run.yml")
    assert again.returncode == 0, "the lab did not recover: run.yml after flower.yml failed"
    [new] = run_ids()
    assert new != run_id and history(new)["status"] == "completed" and len(history(new)["rounds"]) == 2
    assert sorted(registered_nodes().values()) == ["online"] * len(lab["clients"])
    for name, client in lab["clients"].items():  # every limited link has its tbf (a reconnected one too)
        if client.get("bandwidth"):
            assert tbf_rate_bits(f"flowerlab-supernode-{name}") == parse_rate(client["bandwidth"]), name


def test_a_failed_run_is_reported_and_started_again(lab, inventory_copy):
    """fail-at-round makes the ServerApp fail in round 2: metrics, alert, summary say so (the run and the
    summary: `playbooks/run.yml` then `playbooks/summary.yml`); `once` retries (`playbooks/run.yml`)."""
    run_yml = inventory_copy / "group_vars" / "all" / "run.yml"
    data = yaml.safe_load(run_yml.read_text())
    data["lab_run_config"]["fail-at-round"] = 2
    data["lab_run_config"]["num-server-rounds"] = 3
    run_yml.write_text(yaml.safe_dump(data))
    before = run_ids()
    proc = run_site(inventory_copy, playbook=("playbooks/run.yml", "playbooks/summary.yml"))
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
    again = run_site(inventory_copy, playbook="playbooks/run.yml")
    said = " ".join(again.stdout.split())  # the callback wraps long messages
    assert f"Run {failed[0]} of this lab configuration ended finished:failed: starting a new run" in said
    # (it fails at round 2 again: the inventory copy still asks for it)
    assert len([r for r in run_ids() if r not in before]) == 2
