"""End to end with real processes: one flower-superlink, two flower-supernodes of different tiers on
loopback (TLS, SuperNode authentication), `flwr run` of this app for 2 rounds on the offline dataset;
then SuperNodes with an unregistered key or another CA are refused, and registered keys follow the
key directory."""

import csv
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from flowerlab_app.loopback import LoopbackLab, write_tls

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("loopback")
    with LoopbackLab(work, clients=2) as lab:
        run_id = lab.run({"num-server-rounds": 2, "data-sample-percentage": 40.0, "model-alpha": 0.35})
        status = lab.wait(run_id, timeout=1500)
        scrape = urllib.request.urlopen(f"http://127.0.0.1:{lab.metrics_port}/metrics", timeout=10).read().decode()
        yield {
            "lab": lab,
            "run_id": run_id,
            "status": status,
            "metrics": scrape,
            "history": lab.history(run_id),
            "zombies": lasting(flower_zombies),
        }


def lasting(find, seconds: float = 5.0) -> list[str]:
    """What `find` still reports after `seconds`: a child that exited just now is a zombie until its
    parent's reaper (which polls every second) waits for it; one that stays is a defect."""
    found = find()
    deadline = time.monotonic() + seconds
    while found and time.monotonic() < deadline:
        time.sleep(0.5)
        found = [z for z in find() if z in found]
    return found


def flower_zombies() -> list[str]:
    """Finished processes whose Flower parent never waited for them (state Z), as 'pid name (parent ...)'.
    Only this PID namespace's: the processes of a lab's containers on the same machine are not this test's."""
    found = []
    own_namespace = os.readlink("/proc/self/ns/pid")
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            if os.readlink(status.parent / "ns" / "pid") != own_namespace:
                continue
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
            if fields.get("State", "").startswith("Z"):
                parent = (Path("/proc") / fields["PPid"].strip() / "cmdline").read_bytes().replace(b"\0", b" ")
                if b"flower" in parent or b"flwr" in parent:
                    parent_text = parent.decode(errors="replace")[:80]
                    found.append(f"{status.parent.name} {fields['Name'].strip()} (parent {parent_text})")
        except OSError:
            continue
    return found


def test_run_finished(finished_run):
    assert finished_run["status"] == "finished:completed"
    assert finished_run["history"]["status"] == "completed"


def test_finished_clientapp_and_serverapp_processes_are_reaped(finished_run):
    assert finished_run["zombies"] == []


def test_both_clients_trained_with_their_own_batch_sizes(finished_run):
    lab = finished_run["lab"]
    expected = {c["client"]: c for c in lab.node_configs}
    assert len({c["batch-size"] for c in expected.values()}) == 2
    for r in finished_run["history"]["rounds"]:
        assert set(r["clients"]) == set(expected)
        for name, client in r["clients"].items():
            assert client["batch-size"] == expected[name]["batch-size"]
            assert client["tier"] == expected[name]["tier"]
            assert client["fit-seconds"] > 0 and client["num-examples"] > 0


def test_results_have_both_rounds(finished_run):
    lab, run_id = finished_run["lab"], finished_run["run_id"]
    history = finished_run["history"]
    assert [r["round"] for r in history["rounds"]] == [1, 2]
    for r in history["rounds"]:
        assert r["round_seconds"] >= r["slowest_fit_seconds"] > 0
        assert 0.0 <= r["accuracy"] <= 1.0 and r["central_accuracy"] is not None
    directory = lab.results_dir / run_id
    with open(directory / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["round"] for r in rows} == {"1", "2"}
    assert (directory / "model.keras").stat().st_size > 0


def test_metrics_endpoint_served_the_run(finished_run):
    text = finished_run["metrics"]
    assert "model_accuracy " in text and "model_loss " in text
    assert "flowerlab_round 2.0" in text and "flowerlab_run_active 0.0" in text
    for client in finished_run["lab"].node_configs:
        label = f'client="{client["client"]}",host="loopback",tier="{client["tier"]}"'
        for name in ("flowerlab_client_fit_seconds", "flowerlab_client_samples_per_second",
                     "flowerlab_client_memory_limit_bytes", "flowerlab_client_cpu_limit_cores"):  # fmt: skip
            assert f"{name}{{{label}}}" in text, (name, label)


def refused(lab, tmp_path, **identity) -> str:
    """Output of a SuperNode started against the lab's SuperLink with another key or CA (it must exit)."""
    from flowerlab_app.loopback import free_port

    proc = subprocess.run(
        lab.supernode("intruder", free_port(), **identity),
        env=lab.env("intruder"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def test_a_supernode_with_an_unregistered_key_is_refused(finished_run, tmp_path):
    write_tls(tmp_path, ["intruder"])
    out = refused(finished_run["lab"], tmp_path, key=str(tmp_path / "intruder.key"))
    assert "Failed to activate SuperNode" in out, out


def test_a_supernode_that_trusts_another_ca_is_refused(finished_run, tmp_path):
    write_tls(tmp_path, [])
    lab = finished_run["lab"]
    out = refused(lab, tmp_path, key=str(lab.tls / "client-0.key"), ca=str(tmp_path / "ca.crt"))
    assert "CERTIFICATE_VERIFY_FAILED" in out, out


def test_a_supernode_that_crashes_in_a_round_is_recorded_missing_and_the_run_completes(finished_run):
    """client-1's processes SIGKILLed while round 2 trains, then started again at once with the same key (as a
    restart policy would): round 2 closes without its reply and records it; the run completes, and round 3
    has client-1 again."""
    lab = finished_run["lab"]
    log = lab.work / "supernode-1.log"

    def clientapps_started() -> int:  # one per train message (no evaluate messages in these runs)
        return log.read_text(errors="replace").count("flwr-clientapp` process")

    before = clientapps_started()
    # Twelve local epochs: client-1 trains seconds per round even on an idle machine, so the kill below
    # lands inside its round-2 training ("round 1 recorded, then kill" could come after its round-2 reply).
    run_id = lab.run({"num-server-rounds": 3, "data-sample-percentage": 40.0, "model-alpha": 0.35, "local-epochs": 12})
    assert wait_until(lambda: clientapps_started() >= before + 2, seconds=600), "client-1 never got round 2"
    time.sleep(1)  # its ClientApp has handed the message to the warm trainer, which trains for seconds
    lab.crash("supernode-1")
    assert lab.wait(run_id, timeout=900) == "finished:completed"
    second, third = lab.history(run_id)["rounds"][1:3]
    # Closed by the reply guard (missing) or by the SuperLink, which reports the old session's message failed
    # once its heartbeats expired (about a minute): whichever comes first. The guard is not shortened here:
    # the restarted SuperNode is refused until the old session expired, and round 3 must have it back.
    lost = second["missing"] + [f["client"] for f in second["failed"]]
    assert lost == ["client-1"] and set(second["clients"]) == {"client-0"}, second
    assert second["reply_guard_seconds"] >= 60.0
    # The restarted SuperNode was refused until then, retried inside its supervisor, and trains round 3.
    assert set(third["clients"]) == {"client-0", "client-1"}, third


def test_supernode_keys_follow_the_key_directory(finished_run, tmp_path):
    """A public key placed beside the others is registered under its name; removed, it is unregistered."""
    lab = finished_run["lab"]
    write_tls(tmp_path, ["newcomer"])
    placed = lab.tls / "keys" / "newcomer.pub"
    shutil.copy(tmp_path / "keys" / "newcomer.pub", placed)
    try:
        assert wait_until(lambda: "newcomer" in lab.registered()), lab.registered()
    finally:
        placed.unlink()
    assert wait_until(lambda: "newcomer" not in lab.registered()), lab.registered()
    assert lab.registered() == ["client-0", "client-1"]


def wait_until(condition, seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return False
