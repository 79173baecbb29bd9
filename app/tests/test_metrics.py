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
    "clients": {
        "c1": {"tier": "iot", "host": "edge-a", "fit-seconds": 20.0, "samples-per-second": 10.0, "num-examples": 200,
               "train-loss": 1.5, "train-accuracy": 0.4, "cpu-limit-cores": 0.5, "memory-limit-bytes": 2e9,
               "memory-peak-bytes": 1e9, "cpu-seconds": 9.5, "batch-size": 16, "steps": 26},
        "c2": {"tier": "laptop", "host": "edge-b", "fit-seconds": 26.0, "samples-per-second": 8.0, "num-examples": 210,
               "train-loss": 1.4, "train-accuracy": 0.45, "cpu-limit-cores": 1.0, "memory-limit-bytes": 3e9,
               "memory-peak-bytes": 1.1e9, "cpu-seconds": 25.0, "batch-size": 32, "steps": 14},
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
    assert 'flowerlab_run_info{run_id="42"} 1.0' in text
    for name in metrics.CLIENT_GAUGES:
        assert f'{name}{{client="c1",host="edge-a",tier="iot"}}' in text, name
        assert f'{name}{{client="c2",host="edge-b",tier="laptop"}}' in text, name
    assert 'flowerlab_client_fit_seconds{client="c2",host="edge-b",tier="laptop"} 26.0' in text


class FakeWatcher:
    def __init__(self, runs):
        self.runs = runs


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
    assert 'flowerlab_run_info{run_id="42"} 1.0' in text


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
