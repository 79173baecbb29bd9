"""ServerApp: waits for every expected device, runs FedAvg, records what heterogeneity costs.

One message per client and round: the train message also evaluates the received global model on
the client's test split. The aggregated model of every round is evaluated on the central test split
when the server host has one (`central-evaluation`); `fraction-evaluate` > 0 adds Flower's separate
evaluate phase (one more ClientApp process per client and round).
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from . import data, metrics, task
from .report import round_line
from .settings import RunSettings, data_dir

app = ServerApp()

CSV_FIELDS = [
    "round",
    "accuracy",
    "loss",
    "central_accuracy",
    "federated_accuracy",
    "received_accuracy",
    "round_seconds",
    "slowest_fit_seconds",
    "overhead_seconds",
    "client",
    "tier",
    "host",
    "fit_seconds",
    "examples",
    "samples_per_second",
    "batch_size",
    "cpu_limit_cores",
    "memory_limit_bytes",
    "memory_peak_bytes",
    "cpu_seconds",
    "steps",
    "dispatch_seconds",
    "return_seconds",
]
# Poll interval for replies (Flower's Grid.send_and_receive sleeps 3 s between polls).
REPLY_POLL_SECONDS = 0.5


class InjectedFailure(RuntimeError):
    """The run config asked the ServerApp to fail (run config key 'fail-at-round')."""


class NodesMissing(RuntimeError):
    """Fewer SuperNodes than the run expects connected in time."""


def wait_for_nodes(grid: Grid, expected: int, timeout: float, poll: float = 2.0) -> int:
    """Block until `expected` SuperNodes are connected: round 1 never starts with a subset."""
    deadline = time.monotonic() + timeout
    while True:
        connected = len(list(grid.get_node_ids()))
        if connected >= expected:
            print(f"{connected} of {expected} expected SuperNodes connected; starting")
            return connected
        if time.monotonic() > deadline:
            raise NodesMissing(
                f"only {connected} of the {expected} expected SuperNodes connected within {timeout:.0f} s "
                "(run config key 'min-nodes'); check the SuperNodes' logs and their --superlink address"
            )
        time.sleep(poll)


class FastPollGrid:
    """A Grid whose send_and_receive polls for replies every REPLY_POLL_SECONDS instead of 3 s."""

    def __init__(self, grid: Grid, poll: float = REPLY_POLL_SECONDS):
        self._grid = grid
        self._poll = poll

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        pending = set(self._grid.push_messages(messages))
        replies: list[Message] = []
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending and (deadline is None or time.monotonic() < deadline):
            got = list(self._grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if pending:
                time.sleep(self._poll)
        return replies


def weighted_mean(entries: Iterable[dict], key: str, weight: str) -> float | None:
    """Mean of entries[key] weighted by entries[weight], over the entries that have both."""
    pairs = [(e[key], e[weight]) for e in entries if e.get(key) is not None and e.get(weight)]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


class Recorder:
    """Per-round history (JSON + CSV) and the metrics snapshot of one run."""

    def __init__(self, run_id: int, run: RunSettings, config: dict, root: Path):
        self.root = root
        self.directory = root / str(run_id)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.history = {
            "run_id": str(run_id),
            "num_rounds": run.num_server_rounds,
            "config": config,
            "status": "running",
            "started_unix": time.time(),
            "rounds": [],
        }
        self.current: dict = {}
        self.nodes = 0
        self.save()
        self.publish()

    def start_round(self, server_round: int, nodes: int) -> None:
        self.nodes = nodes
        self.current = {"round": server_round, "started": time.monotonic(), "sent_unix": time.time(), "clients": {}}
        self.publish()

    def add_clients(self, replies: Iterable[Message], key: str) -> None:
        for msg in replies:
            if msg.has_error():
                continue
            device = msg.content["device"]
            values = dict(msg.content["metrics"])
            entry = self.current["clients"].setdefault(
                str(device["client"]), {"tier": str(device["tier"]), "host": str(device["host"])}
            )
            entry.update({f"{key}{k}" if k == "num-examples" and key else k: v for k, v in values.items()})

    def end_round(self, federated: MetricRecord | None, central: MetricRecord | None) -> None:
        """Close the round: the model's accuracy is the central one when there is a test split, else federated."""
        cur = self.current
        seconds = time.monotonic() - cur.pop("started")
        ended = time.time()
        clients = cur["clients"].values()
        slowest = max((c.get("fit-seconds", 0.0) for c in clients), default=0.0)
        for c in clients:  # before the trainer was called, and after it answered (see client_app)
            if c.get("trainer-called-unix"):
                c["dispatch-seconds"] = c["trainer-called-unix"] - cur["sent_unix"]
                c["return-seconds"] = ended - c["trainer-answered-unix"]
        fed_accuracy = federated.get("eval-accuracy") if federated else None
        fed_loss = federated.get("eval-loss") if federated else None
        central_accuracy = central.get("accuracy") if central else None
        central_loss = central.get("loss") if central else None
        cur.update(
            accuracy=central_accuracy if central else fed_accuracy,
            loss=central_loss if central else fed_loss,
            round_seconds=seconds,
            slowest_fit_seconds=slowest,
            overhead_seconds=seconds - slowest,
            central_accuracy=central_accuracy,
            central_loss=central_loss,
            federated_accuracy=fed_accuracy,
            federated_loss=fed_loss,
            # The clients' evaluation of the model they received (the previous round's global model).
            received_accuracy=weighted_mean(clients, "received-eval-accuracy", "eval-examples"),
            elapsed_seconds=ended - self.history["started_unix"],
        )
        self.history["rounds"].append(cur)
        self.save()
        self.publish()
        print(round_line(cur), flush=True)

    def finish(self, status: str, error: str | None = None) -> None:
        self.history["status"] = status
        if error:
            self.history["error"] = error
        self.save()
        self.publish()

    def publish(self) -> None:
        last = self.history["rounds"][-1] if self.history["rounds"] else {}
        metrics.write_snapshot(
            self.root,
            {
                "run_id": self.history["run_id"],
                "status": self.history["status"],
                "active": 1 if self.history["status"] == "running" else 0,
                "num_rounds": self.history["num_rounds"],
                "round": last.get("round", 0),
                "accuracy": last.get("accuracy"),
                "loss": last.get("loss"),
                "central_accuracy": last.get("central_accuracy"),
                "central_loss": last.get("central_loss"),
                "round_seconds": last.get("round_seconds"),
                "overhead_seconds": last.get("overhead_seconds"),
                "nodes": self.nodes,
                "clients": last.get("clients", {}),
            },
        )

    def save(self) -> None:
        (self.directory / "history.json").write_text(json.dumps(self.history, indent=2) + "\n")
        with open(self.directory / "history.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            writer.writeheader()
            for r in self.history["rounds"]:
                for name, c in sorted(r["clients"].items()):
                    writer.writerow(
                        {
                            "round": r["round"],
                            "accuracy": r["accuracy"],
                            "loss": r["loss"],
                            "round_seconds": round(r["round_seconds"], 3),
                            "slowest_fit_seconds": round(r["slowest_fit_seconds"], 3),
                            "overhead_seconds": round(r["overhead_seconds"], 3),
                            "client": name,
                            "tier": c["tier"],
                            "host": c["host"],
                            "fit_seconds": c.get("fit-seconds"),
                            "examples": c.get("num-examples"),
                            "samples_per_second": c.get("samples-per-second"),
                            "batch_size": c.get("batch-size"),
                            "cpu_limit_cores": c.get("cpu-limit-cores"),
                            "memory_limit_bytes": c.get("memory-limit-bytes"),
                            "memory_peak_bytes": c.get("memory-peak-bytes"),
                            "cpu_seconds": c.get("cpu-seconds"),
                            "central_accuracy": r.get("central_accuracy"),
                            "federated_accuracy": r.get("federated_accuracy"),
                            "received_accuracy": r.get("received_accuracy"),
                            "steps": c.get("steps"),
                            "dispatch_seconds": c.get("dispatch-seconds"),
                            "return_seconds": c.get("return-seconds"),
                        }
                    )


class RecordingFedAvg(FedAvg):
    """FedAvg (weighted by examples) that hands every client's reply to the Recorder."""

    def __init__(self, recorder: Recorder, initial: ArrayRecord, central_eval=None, fail_at_round: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.recorder = recorder
        self.current_arrays = initial
        self.central_eval = central_eval
        self.fail_at_round = fail_at_round

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        if server_round == self.fail_at_round:
            raise InjectedFailure(f"run config key 'fail-at-round' is {server_round}: failing as asked")
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.recorder.start_round(server_round, len(list(grid.get_node_ids())))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        self.recorder.add_clients(replies, key="")
        arrays, train_metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            self.current_arrays = arrays
        return arrays, train_metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        """Called after every round, with no replies when there is no evaluate phase (fraction-evaluate 0)."""
        replies = list(replies)
        self.recorder.add_clients(replies, key="eval-")
        aggregated = super().aggregate_evaluate(server_round, replies) if replies else None
        central = self.central_eval(self.current_arrays) if self.central_eval else None
        self.recorder.end_round(aggregated, central)
        return aggregated


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = RunSettings.from_run_config(context.run_config)
    root = run.results_root()
    recorder = Recorder(context.run_id, run, dict(context.run_config), root)
    try:
        metrics.ensure_exporter(run.metrics_port, root)
        _train(FastPollGrid(grid), run, recorder)
    except BaseException as err:
        recorder.finish("failed", f"{type(err).__name__}: {err}")
        raise
    recorder.finish("completed")


def _train(grid, run: RunSettings, recorder: Recorder) -> None:
    task.configure_tensorflow()
    model = task.build_model(run.model_alpha, run.seed)
    task.compile_model(model, 0.01)

    central_eval = None
    test = data.load_test(data_dir(), run.data_sample_percentage, run.seed) if _has_data_dir() else None
    if run.central_evaluation and test is not None:
        x_test, y_test = test

        def central_eval(arrays: ArrayRecord) -> MetricRecord:
            task.set_packed(model, arrays.to_numpy_ndarrays()[0])
            loss, accuracy = task.evaluate(model, x_test, y_test)
            return MetricRecord({"accuracy": accuracy, "loss": loss})
    elif run.central_evaluation:
        print("central evaluation off: no prepared test split on this host (FLOWERLAB_DATA_DIR)")

    initial = ArrayRecord([task.get_packed(model)])
    strategy = RecordingFedAvg(
        recorder,
        initial,
        central_eval,
        fail_at_round=run.fail_at_round,
        fraction_train=run.fraction_train,
        fraction_evaluate=run.fraction_evaluate,
        min_train_nodes=run.min_nodes,
        min_evaluate_nodes=run.min_nodes,
        min_available_nodes=run.min_nodes,
    )
    wait_for_nodes(grid, run.min_nodes, run.node_wait_timeout)
    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=run.num_server_rounds,
        timeout=run.round_timeout,
        train_config=ConfigRecord({"local-epochs": run.local_epochs}),
    )
    task.set_packed(model, result.arrays.to_numpy_ndarrays()[0])
    model.save(recorder.directory / "model.keras")
    print(f"results: {recorder.directory} (history.json, history.csv, model.keras)")


def _has_data_dir() -> bool:
    return bool(os.environ.get("FLOWERLAB_DATA_DIR")) and (data_dir() / data.MANIFEST).exists()
