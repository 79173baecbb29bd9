"""Run the app alone on loopback: one flower-superlink, N flower-supernode processes, `flwr run`.

    python -m flowerlab_app.loopback --clients 2 --rounds 2

Prepares the offline dataset, starts the processes on free ports the way the lab's containers do
(each under `flowerlab-supervise` with its SuperExec, and a warm trainer per SuperNode), runs the
app, waits for the run, prints per-round figures (round seconds, per-client fit seconds, overhead =
round seconds minus the slowest client's fit seconds) and stops every process. Used by the
end-to-end test and the benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from . import control, data

APP_DIR = Path(__file__).resolve().parents[1]
CONNECTION = "loopback"
# (tier, batch size, learning rate) of the emulated devices, cycled over the clients.
TIERS = [("small", 16, 0.01), ("large", 64, 0.02), ("medium", 32, 0.01)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bin_path(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else str(value)


class LoopbackLab:
    """The processes of a lab on 127.0.0.1, in a work directory; a context manager that stops them."""

    def __init__(self, work: Path, clients: int = 2, metrics_port: int | None = None):
        self.work = work
        self.clients = clients
        self.superlink_port = free_port()
        self.metrics_port = metrics_port or free_port()
        self.data_dir = work / "data"
        self.results_dir = work / "results"
        self.procs: list[subprocess.Popen] = []
        self.node_configs: list[dict] = []
        # Unix socket paths must stay short (108 bytes): not under a deep test directory.
        self.sockets = Path(tempfile.mkdtemp(prefix="flowerlab-"))

    def env(self, name: str) -> dict:
        home = self.work / "flwr-home" / name
        home.mkdir(parents=True, exist_ok=True)
        return dict(
            os.environ,
            FLOWERLAB_SUPERVISOR_STATUS=str(self.sockets / f"{name}.json"),
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # flower-superexec
            FLWR_HOME=str(home),
            FLWR_TELEMETRY_ENABLED="0",
            FLWR_DISABLE_UPDATE_CHECK="1",
            FLOWERLAB_DATA_DIR=str(self.data_dir),
            FLOWERLAB_RESULTS_DIR=str(self.results_dir),
        )

    def start(self, name: str, cmd: list[str], env: dict | None = None) -> None:
        log = open(self.work / f"{name}.log", "wb")  # noqa: SIM115 - closed when the process ends
        env = {**self.env(name), **(env or {})}
        self.procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True))

    def supervised(self, runtime_port: int, *main: str, trainer: str | None = None) -> list[str]:
        """The main Flower command under flowerlab-supervise, with its SuperExec (and trainer), as in the lab."""
        keep = [f"{bin_path('flowerlab-superexec')} --insecure --runtime-api-address 127.0.0.1:{runtime_port}"]
        if trainer:
            keep.append(f"{bin_path('flowerlab-trainer')} --socket {trainer}")
        return [bin_path("flowerlab-supervise"), *(a for k in keep for a in ("--keep", k)), "--", *main]

    def wait_health(self, port: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"nothing healthy on port {port} after {timeout:.0f} s (logs in {self.work})")

    def __enter__(self) -> LoopbackLab:
        data.prepare("offline:digits", self.clients, "iid", 0.5, 42, self.data_dir)
        self.start(
            "superlink",
            self.supervised(
                self.superlink_port,
                bin_path("flower-superlink"), "--insecure", "--host", "127.0.0.1",
                "--port", str(self.superlink_port), "--isolation", "process",
                "--disable-runtime-dependency-installation",
            ),
        )  # fmt: skip
        self.wait_health(self.superlink_port)
        for i in range(self.clients):
            tier, batch_size, lr = TIERS[i % len(TIERS)]
            config = {
                "partition-id": i,
                "num-partitions": self.clients,
                "client": f"client-{i}",
                "tier": tier,
                "host": "loopback",
                "batch-size": batch_size,
                "learning-rate": lr,
            }
            self.node_configs.append(config)
            node_port = free_port()
            trainer = str(self.sockets / f"trainer-{i}.sock")
            self.start(
                f"supernode-{i}",
                self.supervised(
                    node_port,
                    bin_path("flower-supernode"), "--insecure", "--isolation", "process",
                    "--superlink", f"127.0.0.1:{self.superlink_port}",
                    "--host", "127.0.0.1", "--port", str(node_port),
                    "--node-config", " ".join(f"{k}={toml_value(v)}" for k, v in config.items()),
                    trainer=trainer,
                ),
                env={"FLOWERLAB_TRAINER_SOCKET": trainer},
            )  # fmt: skip
            self.wait_health(node_port)
        cli_home = self.work / "flwr-home" / "cli"
        cli_home.mkdir(parents=True, exist_ok=True)
        (cli_home / "config.toml").write_text(
            f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.superlink_port}"\ninsecure = true\n'
        )
        return self

    def flwr(self, *args: str) -> str:
        proc = subprocess.run(
            [bin_path("flwr"), *args], env=self.env("cli"), capture_output=True, text=True, timeout=300
        )
        if proc.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed: {proc.stdout}\n{proc.stderr}")
        return proc.stdout

    def run(self, overrides: dict) -> str:
        config = {"min-nodes": self.clients, "dataset": "offline:digits", "metrics-port": self.metrics_port}
        config.update(overrides)
        arg = " ".join(f"{k}={toml_value(v)}" for k, v in config.items())
        out = self.flwr("run", str(APP_DIR), CONNECTION, "--format", "json", "-c", arg)
        return str(json.loads(out)["run-id"])

    def status(self, run_id: str) -> str:
        """The run's `flwr ls` status, read in this process (a `flwr` CLI process costs about 2 CPU s)."""
        runs = control.list_runs(f"127.0.0.1:{self.superlink_port}")
        return next(r["status"] for r in runs if r["run-id"] == run_id)

    def wait(self, run_id: str, timeout: float = 1200) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status(run_id)
            if status.startswith("finished"):
                return status
            time.sleep(3)
        raise TimeoutError(f"run {run_id} not finished after {timeout:.0f} s (logs in {self.work})")

    def history(self, run_id: str) -> dict:
        return json.loads((self.results_dir / run_id / "history.json").read_text())

    def __exit__(self, *exc) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(self.sockets, ignore_errors=True)
        pid_file = self.results_dir / "exporter.pid"
        if pid_file.exists():  # the metrics exporter outlives runs by design; stop it with the lab
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGTERM)


def report(history: dict) -> str:
    lines = []
    for r in history["rounds"]:
        fits = ", ".join(
            f"{name} ({c['tier']}, batch {c.get('batch-size')}) {c['fit-seconds']:.1f} s"
            for name, c in sorted(r["clients"].items())
        )
        lines.append(
            f"round {r['round']}: {r['round_seconds']:.1f} s, slowest fit {r['slowest_fit_seconds']:.1f} s, "
            f"overhead {r['overhead_seconds']:.1f} s, accuracy {r['accuracy'] or 0:.3f}; fit: {fits}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sample-percentage", type=float, default=100.0)
    parser.add_argument("--model-alpha", type=float, default=0.35)
    parser.add_argument("--work", type=Path, help="keep logs and results here (default: a temp dir)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="flowerlab-loopback-"))
    work.mkdir(parents=True, exist_ok=True)
    with LoopbackLab(work, clients=args.clients) as lab:
        started = time.monotonic()
        run_id = lab.run(
            {
                "num-server-rounds": args.rounds,
                "data-sample-percentage": args.sample_percentage,
                "model-alpha": args.model_alpha,
            }
        )
        status = lab.wait(run_id)
        print(f"run {run_id}: {status} in {time.monotonic() - started:.1f} s (work dir {work})")
        if status != "finished:completed":
            return 1
        print(report(lab.history(run_id)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
