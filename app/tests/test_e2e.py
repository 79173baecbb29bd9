"""End to end with real processes: one flower-superlink, two flower-supernodes of different tiers on
loopback, `flwr run` of this app for 2 rounds on the offline dataset."""

import csv
import urllib.request
from pathlib import Path

import pytest

from flowerlab_app.loopback import LoopbackLab

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
            "zombies": flower_zombies(),
        }


def flower_zombies() -> list[str]:
    """Finished processes whose Flower parent never waited for them (state Z)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
            if fields.get("State", "").startswith("Z"):
                parent = (Path("/proc") / fields["PPid"].strip() / "cmdline").read_bytes().replace(b"\0", b" ")
                if b"flower" in parent or b"flwr" in parent:
                    found.append(f"{fields['Name'].strip()} (parent {parent.decode(errors='replace')[:80]})")
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
