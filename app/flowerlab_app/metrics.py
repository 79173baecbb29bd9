"""Prometheus metrics of the ServerApp.

Flower starts a new ServerApp process for every run, so the endpoint cannot live in that process
alone: the ServerApp writes a snapshot file after every round, and one exporter process serves that
file. In the lab that is its own container (`flowerlab-serverapp-metrics`, which also watches the
SuperLink's run statuses; the SuperLink's environment names it in FLOWERLAB_METRICS_EXPORTER). Run
anywhere else (loopback, `flwr run` by hand), the ServerApp makes sure one exporter process
(prometheus_client, started from the ServerApp and outliving it) serves the file on `metrics-port`;
a second run reuses it instead of failing on a busy port, and the values of a finished run stay
readable until the next run replaces them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, GaugeMetricFamily
from prometheus_client.registry import Collector

from .control import RUN_STATUSES, lab_status, latest, list_runs

SNAPSHOT = "metrics-snapshot.json"
# Set (to the serving container's name) where something else serves the snapshot: the lab's
# serverapp-metrics container. The ServerApp then starts no exporter of its own.
EXPORTER_ENV = "FLOWERLAB_METRICS_EXPORTER"
RUNS = "runs.json"
MARKER = "flowerlab_exporter_info"
CLIENT_LABELS = ["client", "tier", "host"]

# name -> (snapshot key, help)
RUN_GAUGES = {
    "model_accuracy": ("accuracy", "Accuracy of the global model after the last round (central, else federated)"),
    "model_loss": ("loss", "Loss of the global model after the last round (central, else federated)"),
    "flowerlab_received_accuracy": (
        "received_accuracy",
        "The clients' accuracy of the model they received in the last round (the previous round's global model)",
    ),
    "flowerlab_central_accuracy": ("central_accuracy", "Accuracy of the global model on the central test split"),
    "flowerlab_central_loss": ("central_loss", "Loss of the global model on the central test split"),
    "flowerlab_round": ("round", "Last completed round of the current run"),
    "flowerlab_rounds_total": ("num_rounds", "Rounds configured for the current run"),
    "flowerlab_round_duration_seconds": ("round_seconds", "Wall-clock seconds of the last round"),
    "flowerlab_round_overhead_seconds": ("overhead_seconds", "Round seconds minus the slowest client's fit seconds"),
    "flowerlab_run_active": ("active", "1 while the current run is pending, starting or running, 0 once it ended"),
    "flowerlab_nodes_connected": ("nodes", "SuperNodes connected when the last round (or the run) started"),
    "flowerlab_run_progress_unix": (
        "progress_unix",
        "Unix time of the current run's last completed round (its start before round 1 ends)",
    ),
    "flowerlab_round_idle_fraction": (
        "idle_fraction",
        "Straggler idle fraction of the last round: sum(slowest fit - own fit) / (clients x round seconds)",
    ),
    "flowerlab_round_budget_seconds": (
        "budget_seconds",
        "Training seconds each client was given in the last round (straggler-policy deadline; 0: local-epochs)",
    ),
    "flowerlab_dropped_replies": (
        "dropped",
        "Train replies the current run's rounds closed without (a straggler past the deadline, a SuperNode that "
        "died or restarted during the round)",
    ),
    "flowerlab_failed_replies": (
        "failed",
        "Train replies of the current run that were errors (a SuperNode found unavailable, a ClientApp that failed)",
    ),
    "flowerlab_oom_failed_replies": (
        "oom_failures",
        "Train replies of the current run that failed because the client's container ran out of memory",
    ),
}
CLIENT_GAUGES = {
    "flowerlab_client_fit_seconds": ("fit-seconds", "Seconds the client spent in local training (last round)"),
    "flowerlab_client_samples_per_second": ("samples-per-second", "Training throughput of the client"),
    "flowerlab_client_examples": ("num-examples", "Training examples of the client"),
    "flowerlab_client_train_loss": ("train-loss", "Training loss of the client (mean over its last round)"),
    "flowerlab_client_train_accuracy": ("train-accuracy", "Training accuracy of the client (mean over its last round)"),
    "flowerlab_client_steps": ("steps", "Optimizer steps the client took in its last round"),
    "flowerlab_client_cpu_limit_cores": ("cpu-limit-cores", "CPU budget of the client's cgroup, in cores"),
    "flowerlab_client_memory_limit_bytes": ("memory-limit-bytes", "Memory limit of the client's cgroup"),
    "flowerlab_client_memory_peak_bytes": ("memory-peak-bytes", "Peak memory of the client's cgroup"),
    "flowerlab_client_cpu_seconds": ("cpu-seconds", "CPU seconds the client used during its last fit"),
    "flowerlab_client_batch_size": ("batch-size", "Batch size the client trained with"),
    "flowerlab_client_idle_seconds": ("idle-seconds", "Seconds the client waited for the slowest client (last round)"),
    "flowerlab_client_samples_trained": ("samples-trained", "Samples the client trained on in its last round"),
    "flowerlab_client_oom_kills": ("oom-kills", "Processes the OOM killer killed in the client's container so far"),
}


class RunWatcher:
    """Polls the SuperLink's runs in the background: a run that dies without a word is seen as failed.

    Every answer is also written to `runs_file` (RUNS beside the snapshot), which `flowerlab-report`
    reads, so nothing else needs to ask the SuperLink while a run trains.
    """

    def __init__(
        self, address: str, runs_file: Path | None = None, interval: float = 10.0, root_certificates: str | None = None
    ):
        self.address = address
        self.root_certificates = root_certificates
        self.runs_file = runs_file
        self.interval = interval
        self.runs: list[dict] | None = None  # None: the SuperLink did not answer the last poll
        self.polled = 0.0  # when `runs` was read (unix time)
        threading.Thread(target=self._loop, name="run-watcher", daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                polled = time.time()
                self.runs, self.polled = list_runs(self.address, self.root_certificates), polled
            except BaseException as err:  # noqa: BLE001 - Flower's CLI helpers exit on errors
                if isinstance(err, KeyboardInterrupt):
                    raise
                self.runs = None
            if self.runs is not None and self.runs_file is not None:
                write_json(self.runs_file, {"polled_unix": time.time(), "runs": self.runs})
            time.sleep(self.interval)


class SnapshotCollector(Collector):
    """Turns the snapshot file (and the SuperLink's run statuses, when watched) into gauges at every scrape."""

    def __init__(self, path: Path, watcher: RunWatcher | None = None):
        self.path = path
        self.watcher = watcher

    def read(self) -> dict:
        try:
            snap = json.loads(self.path.read_text())
            snap["_written"] = self.path.stat().st_mtime
            return snap
        except (OSError, ValueError):
            return {}

    @staticmethod
    def status(snap: dict, runs: list[dict] | None, polled: float = 0.0) -> tuple[str, str] | None:
        """(run id, status) of the latest run: the SuperLink's word when it answered, else the snapshot's.

        A run the snapshot shows running that a SuperLink polled after the snapshot was written does not
        know is failed: the SuperLink restarted with an empty state during it, and nothing will end it.
        A SuperLink that knows no run at all (restarted) leaves the snapshot's word for its run.
        """
        if runs is not None:
            run_id = str(snap.get("run_id") or "")
            lost = polled > snap.get("_written", float("inf")) and all(str(r["run-id"]) != run_id for r in runs)
            if run_id and snap.get("status") == "running" and lost:
                return run_id, "failed"
            last = latest(runs)
            if last:
                return str(last["run-id"]), lab_status(last["status"])
        if snap.get("run_id"):
            return str(snap["run_id"]), str(snap.get("status", "running" if snap.get("active") else "completed"))
        return None

    def collect(self):
        snap = self.read()
        info = GaugeMetricFamily(MARKER, "Exporter of the lab's ServerApp metrics", labels=["snapshot"])
        info.add_metric([str(self.path)], 1)
        yield info
        # Read once: the watcher replaces them meanwhile.
        runs, polled = (self.watcher.runs, self.watcher.polled) if self.watcher else (None, 0.0)
        if self.watcher:
            yield GaugeMetricFamily(
                "flowerlab_superlink_up",
                "1 when the SuperLink's Control API answered the exporter's last poll",
                value=0 if runs is None else 1,
            )
            if runs is not None:
                counts = GaugeMetricFamily("flowerlab_runs", "Runs the SuperLink knows, by status", labels=["status"])
                for status in RUN_STATUSES:
                    n = sum(1 for r in runs if lab_status(r["status"]) == status)
                    counts.add_metric([status], n)
                yield counts
        current = self.status(snap, runs, polled)
        if current:
            run_id, status = current
            family = GaugeMetricFamily(
                "flowerlab_run_status",
                "Status of the latest run: 1 for its status, 0 for the others",
                labels=["run_id", "status"],
            )
            for name in dict.fromkeys((*RUN_STATUSES, status)):
                family.add_metric([run_id, name], 1 if name == status else 0)
            yield family
            if snap.get("run_id") == run_id:
                snap["active"] = 1 if status in ("pending", "starting", "running") else 0
        if not snap:
            return
        run = GaugeMetricFamily(
            "flowerlab_run_info", "The run whose values the other series show", labels=["run_id", "policy"]
        )
        run.add_metric([str(snap.get("run_id", "")), str(snap.get("policy", "static"))], 1)
        yield run
        for name, (key, doc) in RUN_GAUGES.items():
            if snap.get(key) is not None:
                yield GaugeMetricFamily(name, doc, value=float(snap[key]))
        clients = snap.get("clients", {})
        for name, (key, doc) in CLIENT_GAUGES.items():
            family = GaugeMetricFamily(name, doc, labels=CLIENT_LABELS)
            for client, values in sorted(clients.items()):
                if values.get(key) is not None:
                    family.add_metric([client, values.get("tier", ""), values.get("host", "")], float(values[key]))
            yield family


def write_json(path: Path, value) -> Path:
    """Atomically replace a JSON file (readers never see half of it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)
    return path


def write_snapshot(directory: Path, snapshot: dict) -> Path:
    """Atomically replace the snapshot the exporter serves."""
    return write_json(directory / SNAPSHOT, snapshot)


def exporter_snapshot(port: int, host: str = "127.0.0.1") -> str | None:
    """The snapshot path served by a lab exporter on `port`, or None when none answers there."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=2) as resp:
            body = resp.read().decode()
    except OSError:
        return None
    for line in body.splitlines():
        if line.startswith(MARKER + "{"):
            return line.split('snapshot="', 1)[1].split('"', 1)[0]
    return None


def ensure_exporter(port: int, directory: Path, wait: float = 15.0) -> bool:
    """Make sure an exporter serves `directory`'s snapshot on `port`; never raises.

    Returns False (and the run goes on without an endpoint) when the port is held by something else.
    Where EXPORTER_ENV names the exporter (the lab's own container), starts nothing.
    """
    served_by = os.environ.get(EXPORTER_ENV)
    if served_by:
        print(f"metrics: the snapshot in {directory} is served by {served_by}", flush=True)
        return True
    wanted = str(directory / SNAPSHOT)
    served = exporter_snapshot(port)
    if served == wanted:
        return True
    if served is not None:
        print(f"metrics: port {port} serves another snapshot ({served}); not serving {wanted}", file=sys.stderr)
        return False
    directory.mkdir(parents=True, exist_ok=True)
    log = open(directory / "exporter.log", "ab")  # noqa: SIM115 - handed to the child process
    subprocess.Popen(
        [sys.executable, "-m", "flowerlab_app.metrics", "--port", str(port), "--snapshot", wanted],
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if exporter_snapshot(port) == wanted:
            return True
        time.sleep(0.2)
    print(f"metrics: no exporter answered on port {port} (see {directory / 'exporter.log'})", file=sys.stderr)
    return False


def serve(
    port: int,
    snapshot: Path,
    address: str = "0.0.0.0",
    superlink: str | None = None,
    root_certificates: str | None = None,
) -> None:
    """Serve the snapshot forever (the exporter process); with `superlink`, also its runs' statuses."""
    watcher = RunWatcher(superlink, snapshot.parent / RUNS, root_certificates=root_certificates) if superlink else None
    REGISTRY.register(SnapshotCollector(snapshot, watcher))
    start_http_server(port, addr=address)
    (snapshot.parent / "exporter.pid").write_text(f"{os.getpid()}\n")
    while True:
        time.sleep(3600)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve the lab's ServerApp metrics snapshot")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--snapshot", type=Path, required=True)
    parser.add_argument("--address", default="0.0.0.0")
    parser.add_argument("--superlink", help="HOST:PORT of the SuperLink whose run statuses to export")
    parser.add_argument("--root-certificates", help="CA certificate of the SuperLink's TLS (default: insecure)")
    args = parser.parse_args(argv)
    try:
        serve(args.port, args.snapshot, args.address, args.superlink, args.root_certificates)
    except OSError as err:  # port taken: the ServerApp reports it, the run goes on
        print(f"metrics exporter: cannot listen on {args.address}:{args.port}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
