import socket
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from flowerlab_app import metrics

SNAPSHOT = {
    "run_id": "42",
    "active": 1,
    "num_rounds": 3,
    "round": 2,
    "accuracy": 0.5,
    "loss": 1.25,
    "round_seconds": 30.0,
    "overhead_seconds": 4.0,
    "nodes": 2,
    "policy": "deadline",
    "idle_fraction": 0.05,
    "budget_seconds": 12.5,
    "dropped": 0,
    "clients": {
        "c1": {"tier": "iot", "host": "edge-a", "fit-seconds": 20.0, "samples-per-second": 10.0, "num-examples": 200,
               "train-loss": 1.5, "train-accuracy": 0.4, "cpu-limit-cores": 0.5, "memory-limit-bytes": 2e9,
               "memory-peak-bytes": 1e9, "cpu-seconds": 9.5, "batch-size": 16, "steps": 26,
               "idle-seconds": 6.0, "samples-trained": 416, "oom-kills": 0.0},
        "c2": {"tier": "laptop", "host": "edge-b", "fit-seconds": 26.0, "samples-per-second": 8.0, "num-examples": 210,
               "train-loss": 1.4, "train-accuracy": 0.45, "cpu-limit-cores": 1.0, "memory-limit-bytes": 3e9,
               "memory-peak-bytes": 1.1e9, "cpu-seconds": 25.0, "batch-size": 32, "steps": 14,
               "idle-seconds": 0.0, "samples-trained": 448, "oom-kills": 1.0},
    },
}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_registry_contents(tmp_path):
    path = metrics.write_snapshot(tmp_path, SNAPSHOT)
    registry = CollectorRegistry()
    registry.register(metrics.SnapshotCollector(path))
    text = generate_latest(registry).decode()
    assert "model_accuracy 0.5" in text and "model_loss 1.25" in text
    assert "flowerlab_round 2.0" in text and "flowerlab_rounds_total 3.0" in text
    assert "flowerlab_run_active 1.0" in text
    assert 'flowerlab_run_info{policy="deadline",run_id="42"} 1.0' in text
    assert "flowerlab_round_idle_fraction 0.05" in text and "flowerlab_round_budget_seconds 12.5" in text
    for name in metrics.CLIENT_GAUGES:
        assert f'{name}{{client="c1",host="edge-a",tier="iot"}}' in text, name
        assert f'{name}{{client="c2",host="edge-b",tier="laptop"}}' in text, name
    assert 'flowerlab_client_fit_seconds{client="c2",host="edge-b",tier="laptop"} 26.0' in text


class FakeWatcher:
    def __init__(self, runs, polled: float = 0.0):
        self.runs = runs
        self.polled = polled


def run_status(text: str) -> dict[str, str]:
    """status -> value of the flowerlab_run_status series."""
    out = {}
    for line in text.splitlines():
        if line.startswith("flowerlab_run_status{"):
            labels, value = line.rsplit(" ", 1)
            out[labels.split('status="')[1].split('"')[0]] = value
    return out


def collect(path, watcher=None) -> str:
    registry = CollectorRegistry()
    registry.register(metrics.SnapshotCollector(path, watcher))
    return generate_latest(registry).decode()


def test_run_status_comes_from_the_snapshot_without_a_superlink(tmp_path):
    path = metrics.write_snapshot(tmp_path, {**SNAPSHOT, "status": "failed", "active": 0})
    status = run_status(collect(path))
    assert status["failed"] == "1.0"
    assert {k for k, v in status.items() if v == "1.0"} == {"failed"}
    assert set(status) >= {"pending", "starting", "running", "completed", "failed", "stopped"}


def test_the_superlink_overrides_a_snapshot_that_never_heard_of_the_failure(tmp_path):
    """A ServerApp killed mid-run leaves its snapshot at 'running'; the SuperLink knows it failed."""
    path = metrics.write_snapshot(tmp_path, {**SNAPSHOT, "status": "running", "active": 1})
    runs = [
        {"run-id": "41", "status": "finished:completed", "pending-at": "2026-12-01 10:00:00Z"},
        {"run-id": "42", "status": "finished:failed", "pending-at": "2026-12-01 11:00:00Z"},
    ]
    text = collect(path, FakeWatcher(runs))
    assert run_status(text)["failed"] == "1.0" and run_status(text)["running"] == "0.0"
    assert 'flowerlab_run_status{run_id="42",status="failed"} 1.0' in text
    assert "flowerlab_run_active 0.0" in text
    assert 'flowerlab_runs{status="completed"} 1.0' in text and 'flowerlab_runs{status="failed"} 1.0' in text
    assert "flowerlab_superlink_up 1.0" in text


def test_a_running_run_that_a_restarted_superlink_no_longer_knows_is_failed(tmp_path):
    """The SuperLink restarted with an empty state during run 42: a poll after the snapshot was written
    lists no run 42, so it is failed (nothing else will end it); a poll from before the snapshot (the run
    just submitted) proves nothing."""
    path = metrics.write_snapshot(tmp_path, {**SNAPSHOT, "status": "running", "active": 1})
    written = path.stat().st_mtime
    text = collect(path, FakeWatcher([], polled=written + 5))
    assert 'flowerlab_run_status{run_id="42",status="failed"} 1.0' in text
    assert "flowerlab_run_active 0.0" in text
    earlier = collect(path, FakeWatcher([{"run-id": "41", "status": "finished:completed"}], polled=written - 5))
    assert 'flowerlab_run_status{run_id="42",status="failed"}' not in earlier
    assert "flowerlab_run_active 1.0" in earlier


def test_a_restarted_superlink_that_knows_no_run_leaves_the_snapshots_final_word(tmp_path):
    """The ServerApp recorded its run's end (or its failure as the SuperLink stopped) before the restart."""
    for status in ("failed", "completed"):
        path = metrics.write_snapshot(tmp_path, {**SNAPSHOT, "status": status, "active": 0})
        text = collect(path, FakeWatcher([], polled=path.stat().st_mtime + 5))
        assert f'flowerlab_run_status{{run_id="42",status="{status}"}} 1.0' in text, text
        assert 'flowerlab_runs{status="failed"} 0.0' in text  # what the SuperLink itself knows


def test_a_new_pending_run_is_the_latest_and_active(tmp_path):
    path = metrics.write_snapshot(tmp_path, {**SNAPSHOT, "status": "failed", "active": 0})
    runs = [
        {"run-id": "42", "status": "finished:failed", "pending-at": "2026-12-01 11:00:00Z"},
        {"run-id": "43", "status": "pending", "pending-at": "2026-12-01 12:00:00Z"},
    ]
    text = collect(path, FakeWatcher(runs))
    assert 'flowerlab_run_status{run_id="43",status="pending"} 1.0' in text
    assert run_status(text)["failed"] == "0.0"
    # The values shown stay those of run 42 (the snapshot's run), labelled as such.
    assert 'flowerlab_run_info{policy="deadline",run_id="42"} 1.0' in text
    assert "flowerlab_round_idle_fraction 0.05" in text and "flowerlab_round_budget_seconds 12.5" in text


def test_an_unreachable_superlink_is_reported_and_the_snapshot_used(tmp_path):
    path = metrics.write_snapshot(tmp_path, {**SNAPSHOT, "status": "completed", "active": 0})
    text = collect(path, FakeWatcher(None))
    assert "flowerlab_superlink_up 0.0" in text
    assert run_status(text)["completed"] == "1.0"


def test_no_snapshot_yet_serves_only_the_marker(tmp_path):
    registry = CollectorRegistry()
    registry.register(metrics.SnapshotCollector(tmp_path / "missing.json"))
    text = generate_latest(registry).decode()
    assert metrics.MARKER in text and "model_accuracy" not in text


@pytest.fixture
def exporter_dir(tmp_path):
    yield tmp_path
    pid = tmp_path / "exporter.pid"
    if pid.exists():
        import os
        import signal

        os.kill(int(pid.read_text()), signal.SIGTERM)


def test_exporter_outlives_its_run_and_is_reused(exporter_dir):
    port = free_port()
    metrics.write_snapshot(exporter_dir, SNAPSHOT)
    assert metrics.ensure_exporter(port, exporter_dir)
    pid = (exporter_dir / "exporter.pid").read_text()
    # a second run in the same place: the running exporter is reused, no busy-port crash
    assert metrics.ensure_exporter(port, exporter_dir)
    assert (exporter_dir / "exporter.pid").read_text() == pid
    metrics.write_snapshot(exporter_dir, {**SNAPSHOT, "active": 0, "round": 3})
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "flowerlab_round 3.0" in body and "flowerlab_run_active 0.0" in body and "model_accuracy 0.5" in body


def test_port_held_by_something_else_does_not_raise(tmp_path):
    class Quiet(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"not ours\n")

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert metrics.ensure_exporter(server.server_address[1], tmp_path, wait=3) is False
    finally:
        server.shutdown()


def test_no_exporter_is_started_where_the_lab_names_its_own(tmp_path, monkeypatch, capsys):
    """The lab's SuperLink names its metrics container: the ServerApp starts no second exporter."""
    monkeypatch.setenv(metrics.EXPORTER_ENV, "flowerlab-serverapp-metrics")
    started = []
    monkeypatch.setattr(metrics.subprocess, "Popen", lambda *a, **k: started.append(a))
    assert metrics.ensure_exporter(1, tmp_path) is True
    assert started == []
    assert "served by flowerlab-serverapp-metrics" in capsys.readouterr().out
