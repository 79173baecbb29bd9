"""Process supervision inside a lab container: Flower's process, its SuperExec and the warm trainer.

    flowerlab-supervise --keep 'flowerlab-superexec --insecure --runtime-api-address 127.0.0.1:9094' \\
                        --keep 'flowerlab-trainer --socket /tmp/flowerlab/trainer.sock' \\
                        -- flowerlab-supernode --isolation process ...

The main command (flower-superlink or flowerlab-supernode, started with `--isolation process`) decides
the container's life: when it exits, the supervisor stops the others and exits with its code, and
Docker's restart policy brings the container back. A kept process (SuperExec, trainer) that dies is
started again at once (with back-off), so a run never waits behind a dead SuperExec. The supervisor
writes the state of every process to a status file, which `flowerlab-supervise --check PORT` (the
container's healthcheck) reads together with the main process's /health endpoint.

`flowerlab-superexec` is Flower's flower-superexec plus a reaper: Flower's SuperExec starts a
process for every ClientApp message and ServerApp run and never waits for it, so without the reaper
every finished one stays a zombie (`<defunct>`) for the life of the container. It also starts every
ClientApp as a fork of a process that imported Flower once (`ClientAppForkServer`), and
`flowerlab-supernode` is flower-supernode polling every 0.5 s when idle instead of 3 s: together they
remove most of what a round cost besides training (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

STATUS_FILE = Path(os.environ.get("FLOWERLAB_SUPERVISOR_STATUS", "/tmp/flowerlab/supervisor.json"))
BACKOFF_MAX = 30.0
STABLE_SECONDS = 60.0
STOP_GRACE = 20.0
# With --retry-main: a main command that fails this soon after starting is started again this often.
MAIN_EARLY_SECONDS = 30.0
MAIN_RETRY_SECONDS = 5.0


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


def supervise(main_argv: list[str], keep: list[list[str]], status: Path = STATUS_FILE, retry_main: float = 0.0) -> int:
    """Run the main command and keep the others running; return the main command's exit code.

    `retry_main` > 0: a main command that fails within its first MAIN_EARLY_SECONDS is started again
    every MAIN_RETRY_SECONDS, for at most `retry_main` seconds in all. A SuperNode that crashed and came
    back at once is refused by the SuperLink ("Failed to activate SuperNode") until the SuperLink has
    seen its previous session's heartbeats stop (about a minute): it waits here, warm, instead of in
    Docker's growing restart back-off.
    """
    processes = [Process(main_argv, main=True)] + [Process(argv) for argv in keep]
    retry_until = time.monotonic() + retry_main
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
        if main.proc is None and time.monotonic() >= main.next_start:
            main.restarts += 1
            main.start()
            write_status(processes, status)
        elif main.proc is not None and main.proc.poll() is not None:
            code = main.proc.returncode
            now = time.monotonic()
            if code != 0 and now - main.started < MAIN_EARLY_SECONDS and now + MAIN_RETRY_SECONDS < retry_until:
                print(
                    f"supervisor: {main.name} failed with {code} {now - main.started:.0f} s after starting; "
                    f"starting it again in {MAIN_RETRY_SECONDS:.0f} s",
                    flush=True,
                )
                main.proc, main.next_start = None, now + MAIN_RETRY_SECONDS
                write_status(processes, status)
                stopping.wait(0.5)
                continue
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


def health(address: str, root_certificates: str | None = None, timeout: float = 4.0) -> str | None:
    """None when /health at `address` (HOST:PORT) answers (over TLS verified by `root_certificates` when given)."""
    if root_certificates:
        url, context = f"https://{address}/health", ssl.create_default_context(cafile=root_certificates)
    else:
        url, context = f"http://{address}/health", None
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context):
            return None
    except OSError as err:
        return f"/health at {address} does not answer: {err}"


def check(
    port: int,
    status: Path = STATUS_FILE,
    root_certificates: str | None = None,
    superlink: str | None = None,
    superlink_root_certificates: str | None = None,
) -> str | None:
    """None when the main process answers /health, every supervised process runs and (for a SuperNode,
    `superlink` given) the SuperLink answers /health from here; else what is wrong."""
    problem = health(f"127.0.0.1:{port}", root_certificates)
    if problem:
        return problem
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
    if down:
        return f"not running: {', '.join(down)}"
    if superlink:
        problem = within(SUPERLINK_PROBE_SECONDS, lambda: health(superlink, superlink_root_certificates, timeout=2.0))
        if problem:
            return f"the SuperLink is out of reach: {problem}"
    return None


# Docker kills a healthcheck after its timeout (10 s in the lab) and records only "Health check exceeded
# timeout": the SuperLink probe, name resolution included (which the socket timeout does not bound; a
# container without its network waits for the resolver), gets this long to say what is wrong itself.
SUPERLINK_PROBE_SECONDS = 3.0


def within(seconds: float, probe: Callable[[], str | None]) -> str | None:
    """What `probe` returns, or a message when it has not returned within `seconds` (it goes on in a
    daemon thread that dies with the checking process)."""
    outcome: list[str | None] = []
    worker = threading.Thread(target=lambda: outcome.append(probe()), daemon=True)
    worker.start()
    worker.join(seconds)
    if not outcome:
        return f"no answer within {seconds:.0f} s"
    return outcome[0]


def _reap_children(interval: float = 1.0) -> None:
    """Wait for every finished child of this process (the SuperExec never does)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            pid = 0
        if pid == 0:
            time.sleep(interval)


# Imported once by the fork server; every ClientApp process starts as a fork of it.
CLIENTAPP_PRELOAD = ["flwr.supernode.cli"]
# The SuperNode sleeps this long when the SuperLink had no message for it (Flower: 3 s).
SUPERNODE_IDLE_SECONDS = float(os.environ.get("FLOWERLAB_SUPERNODE_IDLE_SECONDS", "0.5"))
FLOWER_IDLE_SECONDS = 3


def _run_clientapp(argv: list[str]) -> None:
    """A ClientApp process: Flower's flwr-clientapp with these arguments (runs in a fork of the fork server)."""
    from flwr.supernode.cli import flwr_clientapp

    sys.argv = argv
    flwr_clientapp()


def _noop() -> None:
    pass


class ClientAppForkServer:
    """Starts ClientApp processes as forks of one process that has imported Flower already.

    Flower's SuperExec starts `flwr-clientapp` as a new Python process for every message; importing
    Flower costs 2-4 CPU s each time, paid under the client's CPU budget. A multiprocessing fork server
    imports it once (before any gRPC channel exists) and forks a child per message.
    """

    def __init__(self):
        import multiprocessing

        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(CLIENTAPP_PRELOAD)
        self.children: list = []
        warm = self.ctx.Process(target=_noop)  # starts the fork server (and its imports) now, not in round 1
        warm.start()
        warm.join()

    def launch(self, argv: list[str]) -> None:
        child = self.ctx.Process(target=_run_clientapp, args=(argv,), name="flwr-clientapp")
        child.start()
        self.children = [c for c in self.children if c.is_alive()] + [child]


class _ForkingSubprocess:
    """The `subprocess` module as Flower's SubprocessExecutor sees it: flwr-clientapp goes to the fork server.

    The fork server starts with the first ClientApp (a SuperLink's SuperExec, which starts only
    ServerApps, never needs one).
    """

    def __init__(self, server_factory=ClientAppForkServer):
        self._factory = server_factory
        self._server = None
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(subprocess, name)

    def Popen(self, args, **kwargs):  # noqa: N802 - the name Flower calls
        if args and args[0] == "flwr-clientapp":
            with self._lock:
                if self._server is None:
                    self._server = self._factory()
                self._server.launch(list(args))
            return None
        return subprocess.Popen(args, **kwargs)


def superexec_main() -> None:
    """`flowerlab-superexec`: Flower's flower-superexec with a reaper thread, and ClientApps forked warm."""
    from flwr.supercore.cli.flower_superexec import flower_superexec
    from flwr.supercore.superexec.executor import subprocess_executor

    if os.environ.get("FLOWERLAB_CLIENTAPP_FORKSERVER", "1") != "0":
        subprocess_executor.subprocess = _ForkingSubprocess()
    threading.Thread(target=_reap_children, name="reaper", daemon=True).start()
    sys.argv[0] = "flower-superexec"
    flower_superexec()


class _ShortIdle:
    """The `time` module as Flower's SuperNode loop sees it: its idle sleep shortened."""

    def __getattr__(self, name):
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(SUPERNODE_IDLE_SECONDS if seconds == FLOWER_IDLE_SECONDS else seconds)


def supernode_main() -> None:
    """`flowerlab-supernode`: Flower's flower-supernode asking for messages every 0.5 s when idle, not 3 s."""
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    start_client_internal.time = _ShortIdle()
    sys.argv[0] = "flower-supernode"
    flower_supernode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flowerlab-supervise", description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="append", default=[], metavar="COMMAND", help="a command to keep running")
    parser.add_argument("--check", type=int, metavar="PORT", help="healthcheck: /health on PORT and every process")
    parser.add_argument("--root-certificates", metavar="CA", help="with --check: ask /health over TLS verified by CA")
    parser.add_argument(
        "--superlink", metavar="HOST:PORT", help="with --check: the SuperLink must answer /health from here too"
    )
    parser.add_argument(
        "--superlink-root-certificates", metavar="CA", help="with --superlink: ask over TLS verified by CA"
    )
    parser.add_argument(
        "--retry-main",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="start a main command that fails soon after starting again, for at most SECONDS",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the main command")
    args = parser.parse_args(argv)
    if args.check is not None:
        problem = check(
            args.check,
            root_certificates=args.root_certificates,
            superlink=args.superlink,
            superlink_root_certificates=args.superlink_root_certificates,
        )
        if problem:
            print(problem, file=sys.stderr)
            return 1
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("the main command is missing (after --)")
    return supervise(command, [shlex.split(k) for k in args.keep], retry_main=args.retry_main)


if __name__ == "__main__":
    sys.exit(main())
