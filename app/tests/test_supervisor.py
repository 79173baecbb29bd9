"""The container's process supervisor, with real processes."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from flowerlab_app import supervisor

PY = sys.executable


def wait_until(check, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def start(tmp_path, main, *keep):
    status = tmp_path / "status.json"
    argv = [PY, "-m", "flowerlab_app.supervisor"]
    for k in keep:
        argv += ["--keep", k]
    proc = subprocess.Popen([*argv, "--", *main], env=dict(os.environ, FLOWERLAB_SUPERVISOR_STATUS=str(status)))
    assert wait_until(status.exists)
    return proc, status


def test_a_kept_process_that_dies_is_started_again(tmp_path):
    proc, status = start(tmp_path, ["sleep", "60"], "sleep 61")
    try:
        main = next(s for s in json.loads(status.read_text()) if s["main"])
        kept = next(s for s in json.loads(status.read_text()) if not s["main"])
        os.kill(kept["pid"], signal.SIGKILL)

        def restarted():
            now = [s for s in json.loads(status.read_text()) if not s["main"]][0]
            return now["pid"] not in (None, kept["pid"]) and now["restarts"] == 1

        assert wait_until(restarted), status.read_text()
        assert proc.poll() is None
        assert next(s for s in json.loads(status.read_text()) if s["main"])["pid"] == main["pid"]
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0 or proc.returncode == -signal.SIGTERM


def test_the_supervisor_exits_with_the_main_process_and_stops_the_others(tmp_path):
    proc, status = start(tmp_path, [PY, "-c", "import time, sys; time.sleep(1); sys.exit(3)"], "sleep 62")
    assert proc.wait(timeout=30) == 3
    kept = [s for s in json.loads(status.read_text()) if not s["main"]]
    assert kept[0]["pid"] is None


class Health(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def health_port():
    server = HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def test_check_needs_health_and_every_process(tmp_path, health_port):
    status = tmp_path / "status.json"
    alive = subprocess.Popen(["sleep", "30"])
    try:
        status.write_text(json.dumps([{"name": "flower-supernode", "main": True, "pid": alive.pid, "restarts": 0}]))
        assert supervisor.check(health_port, status) is None
        status.write_text(
            json.dumps(
                [
                    {"name": "flower-supernode", "main": True, "pid": alive.pid, "restarts": 0},
                    {"name": "flowerlab-superexec", "main": False, "pid": None, "restarts": 2},
                ]
            )
        )
        assert supervisor.check(health_port, status) == "not running: flowerlab-superexec"
    finally:
        alive.kill()
        alive.wait()
    status.write_text(json.dumps([{"name": "flower-supernode", "main": True, "pid": alive.pid, "restarts": 0}]))
    assert supervisor.check(health_port, status) == "not running: flower-supernode"
    problem = supervisor.check(1, status)
    assert problem and problem.startswith("/health on port 1 does not answer")
