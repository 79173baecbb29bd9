"""ServerApp: waits for every expected device, runs FedAvg, records what heterogeneity costs."""

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
from .settings import RunSettings, data_dir

app = ServerApp()

CSV_FIELDS = [
    "round",
    "accuracy",
    "loss",
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
]


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


class Recorder:
    """Per-round history (JSON + CSV) and the metrics snapshot of one run."""

    def __init__(self, run_id: int, run: RunSettings, config: dict, root: Path):
        self.root = root
        self.directory = root / str(run_id)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.history = {"run_id": str(run_id), "num_rounds": run.num_server_rounds, "config": config, "rounds": []}
        self.current: dict = {}
        self.nodes = 0
        self.publish(active=True)

    def start_round(self, server_round: int, nodes: int) -> None:
        self.nodes = nodes
        self.current = {"round": server_round, "started": time.monotonic(), "clients": {}}

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

    def end_round(self, accuracy: float | None, loss: float | None, central: MetricRecord | None) -> None:
        cur = self.current
        seconds = time.monotonic() - cur.pop("started")
        slowest = max((c.get("fit-seconds", 0.0) for c in cur["clients"].values()), default=0.0)
        cur.update(
            accuracy=accuracy,
            loss=loss,
            round_seconds=seconds,
            slowest_fit_seconds=slowest,
            overhead_seconds=seconds - slowest,
            central_accuracy=central.get("accuracy") if central else None,
            central_loss=central.get("loss") if central else None,
        )
        self.history["rounds"].append(cur)
        self.save()
        self.publish(active=True)
        clients = ", ".join(f"{n} {c.get('fit-seconds', 0):.1f}s" for n, c in sorted(cur["clients"].items()))
        print(
            f"round {cur['round']}: {seconds:.1f} s (slowest fit {slowest:.1f} s, overhead {seconds - slowest:.1f} s); "
            f"accuracy {accuracy}, loss {loss}; fit seconds: {clients}"
        )

    def publish(self, active: bool) -> None:
        last = self.history["rounds"][-1] if self.history["rounds"] else {}
        metrics.write_snapshot(
            self.root,
            {
                "run_id": self.history["run_id"],
                "active": 1 if active else 0,
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
                        }
                    )


class RecordingFedAvg(FedAvg):
    """FedAvg (weighted by examples) that hands every client's reply to the Recorder."""

    def __init__(self, recorder: Recorder, initial: ArrayRecord, central_eval=None, **kwargs):
        super().__init__(**kwargs)
        self.recorder = recorder
        self.current_arrays = initial
        self.central_eval = central_eval

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self.recorder.start_round(server_round, len(list(grid.get_node_ids())))
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        self.recorder.add_clients(replies, key="")
        arrays, train_metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            self.current_arrays = arrays
        return arrays, train_metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        self.recorder.add_clients(replies, key="eval-")
        aggregated = super().aggregate_evaluate(server_round, replies)
        central = self.central_eval(self.current_arrays) if self.central_eval else None
        accuracy = aggregated.get("eval-accuracy") if aggregated else None
        loss = aggregated.get("eval-loss") if aggregated else None
        self.recorder.end_round(accuracy, loss, central)
        return aggregated


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = RunSettings.from_run_config(context.run_config)
    root = run.results_root()
    recorder = Recorder(context.run_id, run, dict(context.run_config), root)
    metrics.ensure_exporter(run.metrics_port, root)
    task.configure_tensorflow()
    model = task.build_model(run.model_alpha, run.seed)

    central_eval = None
    test = data.load_test(data_dir(), run.data_sample_percentage, run.seed) if _has_data_dir() else None
    if run.central_evaluation and test is not None:
        x_test, y_test = test

        def central_eval(arrays: ArrayRecord) -> MetricRecord:
            model.set_weights(arrays.to_numpy_ndarrays())
            loss, accuracy = task.evaluate(model, x_test, y_test)
            return MetricRecord({"accuracy": accuracy, "loss": loss})
    else:
        print("central evaluation off: no prepared test split on this host (FLOWERLAB_DATA_DIR)")

    initial = ArrayRecord(model.get_weights())
    strategy = RecordingFedAvg(
        recorder,
        initial,
        central_eval,
        fraction_train=run.fraction_train,
        fraction_evaluate=run.fraction_evaluate,
        min_train_nodes=run.min_nodes,
        min_evaluate_nodes=run.min_nodes,
        min_available_nodes=run.min_nodes,
    )
    try:
        wait_for_nodes(grid, run.min_nodes, run.node_wait_timeout)
        result = strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=run.num_server_rounds,
            timeout=run.round_timeout,
            train_config=ConfigRecord({"local-epochs": run.local_epochs}),
        )
        model.set_weights(result.arrays.to_numpy_ndarrays())
        model.save(recorder.directory / "model.keras")
        print(f"results: {recorder.directory} (history.json, history.csv, model.keras)")
    finally:
        recorder.publish(active=False)


def _has_data_dir() -> bool:
    return bool(os.environ.get("FLOWERLAB_DATA_DIR")) and (data_dir() / data.MANIFEST).exists()
