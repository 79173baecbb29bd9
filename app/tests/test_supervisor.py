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


def test_retry_main_starts_an_early_failing_main_command_again_within_its_budget(tmp_path):
    """Like a SuperNode refused by the SuperLink while its previous session has not expired: the main
    command fails twice at once, then runs; the supervisor waits it out instead of exiting."""
    count = tmp_path / "attempts"
    flaky = (
        f"import pathlib, sys, time; p = pathlib.Path({str(count)!r});"
        " n = int(p.read_text() or 0) if p.exists() else 0;"
        " p.write_text(str(n + 1)); sys.exit(1) if n < 2 else time.sleep(60)"
    )
    status = tmp_path / "status.json"
    env = dict(os.environ, FLOWERLAB_SUPERVISOR_STATUS=str(status))
    argv = [PY, "-m", "flowerlab_app.supervisor", "--retry-main", "60", "--", PY, "-c", flaky]
    proc = subprocess.Popen(argv, env=env)
    try:
        main = lambda: next(s for s in json.loads(status.read_text()) if s["main"])  # noqa: E731
        assert wait_until(lambda: status.exists() and main()["restarts"] == 2 and main()["pid"], timeout=30)
        assert wait_until(lambda: count.read_text() == "3")
        time.sleep(1)
        assert proc.poll() is None and main()["pid"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # Without the option (or past its budget) the first failure ends the supervisor with its code.
    count.unlink()
    assert subprocess.run([PY, "-m", "flowerlab_app.supervisor", "--", PY, "-c", flaky], env=env).returncode == 1


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
    assert problem and problem.startswith("/health at 127.0.0.1:1 does not answer")


def test_a_supernode_check_fails_while_the_superlink_is_out_of_reach(tmp_path, health_port):
    status = tmp_path / "status.json"
    status.write_text(json.dumps([{"name": "flower-supernode", "main": True, "pid": os.getpid(), "restarts": 0}]))
    reachable = f"127.0.0.1:{health_port}"
    assert supervisor.check(health_port, status, superlink=reachable) is None
    problem = supervisor.check(health_port, status, superlink="127.0.0.1:1")
    assert problem and problem.startswith("the SuperLink is out of reach: /health at 127.0.0.1:1"), problem
    # Over TLS the SuperLink must present a certificate the CA signed: a plaintext server does not pass.
    ca = tmp_path / "ca.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1"]
        + ["-subj", "/CN=lab CA", "-keyout", str(tmp_path / "ca.key"), "-out", str(ca)],
        check=True,
        capture_output=True,
    )
    problem = supervisor.check(health_port, status, superlink=reachable, superlink_root_certificates=str(ca))
    assert problem and "out of reach" in problem, problem


def test_clientapps_start_as_forks_of_a_server_that_imported_flower():
    server = supervisor.ClientAppForkServer()
    server.launch(["flwr-clientapp", "--help"])  # Flower's own CLI, in a fork: prints its usage and exits 0
    child = server.children[-1]
    child.join(timeout=60)
    assert child.exitcode == 0


def test_superexec_sends_only_clientapps_to_the_fork_server():
    launched = []

    class Server:
        def launch(self, argv):
            launched.append(argv)

    proxy = supervisor._ForkingSubprocess(Server)
    assert proxy._server is None  # started with the first ClientApp only
    assert proxy.Popen(["flwr-clientapp", "--token", "t"]) is None
    assert launched == [["flwr-clientapp", "--token", "t"]]
    proc = proxy.Popen(["true"])
    assert proc.wait(timeout=10) == 0 and launched == [["flwr-clientapp", "--token", "t"]]
    assert proxy.DEVNULL == subprocess.DEVNULL


def test_the_supernode_idle_sleep_that_flowerlab_supernode_shortens_is_still_flowers():
    import inspect

    from flwr.supernode import start_client_internal

    assert f"time.sleep({supervisor.FLOWER_IDLE_SECONDS})" in inspect.getsource(start_client_internal)
    started = time.monotonic()
    supervisor._ShortIdle().sleep(supervisor.FLOWER_IDLE_SECONDS)
    assert time.monotonic() - started < 1.5


def test_the_superlink_probe_says_what_is_wrong_before_dockers_timeout(tmp_path, health_port, monkeypatch):
    """A SuperNode without its network waits for the resolver longer than Docker's 10 s check timeout;
    the probe gives up after SUPERLINK_PROBE_SECONDS and the check says why itself."""
    status = tmp_path / "status.json"
    status.write_text(json.dumps([{"name": "sleep", "pid": os.getpid(), "main": True}]))
    real_health = supervisor.health

    def hanging(address, root_certificates=None, timeout=4.0):
        if address.startswith("127.0.0.1"):
            return real_health(address, root_certificates, timeout)
        time.sleep(30)  # a name that never resolves
        return None

    monkeypatch.setattr(supervisor, "health", hanging)
    started = time.monotonic()
    problem = supervisor.check(health_port, status, superlink="flowerlab-superlink:8000")
    took = time.monotonic() - started
    assert problem == f"the SuperLink is out of reach: no answer within {supervisor.SUPERLINK_PROBE_SECONDS:.0f} s"
    assert supervisor.SUPERLINK_PROBE_SECONDS <= took < supervisor.SUPERLINK_PROBE_SECONDS + 2
