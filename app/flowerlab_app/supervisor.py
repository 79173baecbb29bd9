"""Process supervision inside a lab container: Flower's process, its SuperExec and the warm trainer.

    flowerlab-supervise --keep 'flowerlab-superexec --insecure --runtime-api-address 127.0.0.1:9094' \\
                        --keep 'flowerlab-trainer --socket /tmp/flowerlab/trainer.sock' \\
                        -- flower-supernode --isolation process ...

The main command (flower-superlink or flower-supernode, started with `--isolation process`) decides
the container's life: when it exits, the supervisor stops the others and exits with its code, and
Docker's restart policy brings the container back. A kept process (SuperExec, trainer) that dies is
started again at once (with back-off), so a run never waits behind a dead SuperExec. The supervisor
writes the state of every process to a status file, which `flowerlab-supervise --check PORT` (the
container's healthcheck) reads together with the main process's /health endpoint.

`flowerlab-superexec` is Flower's flower-superexec plus a reaper: Flower's SuperExec starts a
process for every ClientApp message and ServerApp run and never waits for it, so without the reaper
every finished one stays a zombie (`<defunct>`) for the life of the container.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

STATUS_FILE = Path(os.environ.get("FLOWERLAB_SUPERVISOR_STATUS", "/tmp/flowerlab/supervisor.json"))
BACKOFF_MAX = 30.0
STABLE_SECONDS = 60.0
STOP_GRACE = 20.0


class Process:
    """One supervised command."""

    def __init__(self, argv: list[str], main: bool = False):
        self.argv = argv
        self.main = main
        self.name = Path(argv[0]).name
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.started = 0.0
        self.backoff = 1.0
        self.next_start = 0.0

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv)
        self.started = time.monotonic()
        print(f"supervisor: started {self.name} (pid {self.proc.pid})", flush=True)

    def state(self) -> dict:
        alive = self.proc is not None and self.proc.poll() is None
        return {
            "name": self.name,
            "main": self.main,
            "pid": self.proc.pid if alive else None,
            "restarts": self.restarts,
        }


def write_status(processes: list[Process], path: Path = STATUS_FILE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([p.state() for p in processes]))
    os.replace(tmp, path)


def supervise(main_argv: list[str], keep: list[list[str]], status: Path = STATUS_FILE) -> int:
    processes = [Process(main_argv, main=True)] + [Process(argv) for argv in keep]
    stopping = threading.Event()

    def stop(signum, _frame):
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for p in processes:
        p.start()
    write_status(processes, status)
    main = processes[0]
    code = 0
    while not stopping.is_set():
        changed = False
        if main.proc.poll() is not None:
            code = main.proc.returncode
            print(f"supervisor: {main.name} exited with {code}; stopping the container's processes", flush=True)
            break
        now = time.monotonic()
        for p in processes[1:]:
            if p.proc is not None and p.proc.poll() is not None:
                if now - p.started > STABLE_SECONDS:
                    p.backoff = 1.0
                print(
                    f"supervisor: {p.name} exited with {p.proc.returncode}; restarting in {p.backoff:.0f} s", flush=True
                )
                p.proc, p.next_start = None, now + p.backoff
                p.backoff = min(p.backoff * 2, BACKOFF_MAX)
                changed = True
            if p.proc is None and now >= p.next_start:
                p.restarts += 1
                p.start()
                changed = True
        if changed:
            write_status(processes, status)
        stopping.wait(0.5)
    for p in reversed(processes):
        if p.proc is not None and p.proc.poll() is None:
            p.proc.terminate()
    deadline = time.monotonic() + STOP_GRACE
    for p in processes:
        if p.proc is None:
            continue
        try:
            p.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.proc.kill()
            p.proc.wait()
    write_status(processes, status)
    return code if code is not None else 1


def check(port: int, status: Path = STATUS_FILE) -> str | None:
    """None when the main process answers /health and every supervised process runs; else what is wrong."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=4):
            pass
    except OSError as err:
        return f"/health on port {port} does not answer: {err}"
    try:
        states = json.loads(status.read_text())
    except (OSError, ValueError) as err:
        return f"no supervisor status at {status}: {err}"
    down = [s["name"] for s in states if s["pid"] is None]
    for s in states:
        if s["pid"] is not None:
            try:
                os.kill(s["pid"], 0)
            except ProcessLookupError:
                down.append(s["name"])
    return f"not running: {', '.join(down)}" if down else None


def _reap_children(interval: float = 1.0) -> None:
    """Wait for every finished child of this process (the SuperExec never does)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            pid = 0
        if pid == 0:
            time.sleep(interval)


def superexec_main() -> None:
    """`flowerlab-superexec`: Flower's flower-superexec with a reaper thread for its finished tasks."""
    from flwr.supercore.cli.flower_superexec import flower_superexec

    threading.Thread(target=_reap_children, name="reaper", daemon=True).start()
    sys.argv[0] = "flower-superexec"
    flower_superexec()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flowerlab-supervise", description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="append", default=[], metavar="COMMAND", help="a command to keep running")
    parser.add_argument("--check", type=int, metavar="PORT", help="healthcheck: /health on PORT and every process")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the main command")
    args = parser.parse_args(argv)
    if args.check is not None:
        problem = check(args.check)
        if problem:
            print(problem, file=sys.stderr)
            return 1
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("the main command is missing (after --)")
    return supervise(command, [shlex.split(k) for k in args.keep])


if __name__ == "__main__":
    sys.exit(main())
