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
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from . import data, metrics, policy, task
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
    "policy",
    "budget_seconds",
    "idle_fraction",
    "idle_seconds",
    "samples_trained",
    "step_seconds",
    "reply_seconds",
]
# Node id -> client name of every client that ever replied (results root).
NODE_NAMES = "node-names.json"
# How a ClientApp's error says its container ran out of memory (telemetry.oom_note).
OOM_MARKER = re.compile(r"\[oom-kills=(\d+)\]")
# Poll interval for replies (Flower's Grid.send_and_receive sleeps 3 s between polls).
REPLY_POLL_SECONDS = 0.5
# What is kept of a reply that came after its round closed (drop-stragglers).
LATE_KEYS = ("fit-seconds", "steps", "samples-trained", "step-seconds", "num-examples", "batch-size")


class InjectedFailure(RuntimeError):
    """The run config asked the ServerApp to fail (run config key 'fail-at-round')."""


class NodesMissing(RuntimeError):
    """Fewer SuperNodes than the run expects connected in time."""


def wait_for_nodes(
    grid: Grid,
    expected: int,
    timeout: float,
    poll: float = 2.0,
    when: str = "",
    counted: Callable[[int], None] | None = None,
) -> int:
    """Block until `expected` SuperNodes are connected, at most `timeout` seconds (then NodesMissing).

    Before round 1 (so it never starts with a subset) and before every later round (Flower's sampling
    would otherwise wait without end for a SuperNode that never comes back). `counted` hears every new
    count while waiting (flowerlab_nodes_connected shows a lost SuperNode while the run waits for it).
    """
    deadline = time.monotonic() + timeout
    waited = False
    last = None
    while True:
        connected = len(list(grid.get_node_ids()))
        if counted is not None and connected != last:
            counted(connected)
            last = connected
        if connected >= expected:
            if waited or not when:
                print(f"{connected} of {expected} expected SuperNodes connected; starting{when}", flush=True)
            return connected
        if time.monotonic() > deadline:
            raise NodesMissing(
                f"only {connected} of the {expected} expected SuperNodes connected within {timeout:.0f} s{when} "
                "(run config keys 'min-nodes', 'node-wait-timeout'); check the SuperNodes' logs and their "
                "--superlink address"
            )
        if not waited and when:
            print(f"waiting for SuperNodes{when}: {connected} of {expected} connected", flush=True)
        waited = True
        time.sleep(poll)


class FastPollGrid:
    """A Grid whose send_and_receive polls for replies every REPLY_POLL_SECONDS instead of 3 s.

    It also notes when each reply arrived (`reply_seconds`, by the id of the message it answers), which
    node each message went to (`sent_to`), and can close one exchange early (`close_at`: drop-stragglers'
    deadline, or the reply guard of every round): the nodes still unanswered then are `unanswered`, their
    messages are remembered as late, and their replies, when they come during a later exchange, go to
    `on_late` instead of to the caller.
    """

    def __init__(self, grid: Grid, poll: float = REPLY_POLL_SECONDS):
        self._grid = grid
        self._poll = poll
        self._close_after: tuple[int, float] | None = None
        self.late: dict[str, tuple[int, float]] = {}  # message id -> (round, sent at)
        self.reply_seconds: dict[str, float] = {}
        self.sent_to: dict[str, int] = {}  # message id -> the node it was sent to
        self.unanswered: list[int] = []  # nodes whose reply the last exchange closed without
        self.on_late = None  # callable(round, reply, seconds after sending)

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def close_at(self, server_round: int, seconds: float) -> None:
        """The next exchange (round `server_round`) returns `seconds` after sending, replies or not."""
        self._close_after = (server_round, seconds)

    def _collect_late(self) -> None:
        if not self.late:
            return
        for msg in self._grid.pull_messages(list(self.late)):
            server_round, sent = self.late.pop(msg.metadata.reply_to_message_id)
            if self.on_late is not None:
                self.on_late(server_round, msg, time.time() - sent)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        closing, self._close_after = self._close_after, None
        if closing is not None:
            timeout = closing[1] if timeout is None else min(timeout, closing[1])
        sent = time.time()
        messages = list(messages)
        ids = list(self._grid.push_messages(messages))
        self.sent_to.update(zip(ids, (m.metadata.dst_node_id for m in messages), strict=True))
        pending = set(ids)
        replies: list[Message] = []
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending and (deadline is None or time.monotonic() < deadline):
            got = list(self._grid.pull_messages(pending))
            for msg in got:
                self.reply_seconds[msg.metadata.reply_to_message_id] = time.time() - sent
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            self._collect_late()
            if pending:
                time.sleep(self._poll)
        if closing is not None:
            self.late.update(dict.fromkeys(pending, (closing[0], sent)))
        self.unanswered = sorted(self.sent_to[i] for i in pending)
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
            "policy": run.straggler_policy,
            "status": "running",
            "started_unix": time.time(),
            "rounds": [],
        }
        self.current: dict = {}
        self.nodes: int | None = None  # connected SuperNodes; unknown (not exported) until first counted
        self.dropped = 0
        self.failed = 0
        self.oom_failures = 0
        # node id -> client name, learned from replies and kept beside the runs: with SuperNode
        # authentication a client keeps its node id, so an error reply of a client that has not
        # answered in this run yet (an OOM in round 1) is still named.
        try:
            known = json.loads((root / NODE_NAMES).read_text())
        except (OSError, ValueError):
            known = {}
        self.node_names: dict[int, str] = {int(k): str(v) for k, v in known.items()}
        # Each client's latest measured entry (speed, reply seconds): what the policy plans the next round from.
        self.latest: dict[str, dict] = {}
        self.save()
        self.publish()

    def set_nodes(self, nodes: int) -> None:
        """SuperNodes connected before round 1 (flowerlab_nodes_connected is correct from the run's start),
        and while a later round waits for a lost one."""
        self.nodes = nodes
        self.publish()

    def start_round(self, server_round: int, nodes: int, plan: dict | None = None) -> None:
        """A round starts; `plan` is what the policy set for it (budget_seconds, deadline_seconds)."""
        self.nodes = nodes
        self.current = {
            "round": server_round,
            "started": time.monotonic(),
            "sent_unix": time.time(),
            **(plan or {}),
            "clients": {},
            "dropped": 0,
            "missing": [],
            "failed": [],
            "late": [],
        }
        self.publish()

    @staticmethod
    def _entry(msg: Message) -> tuple[str, dict]:
        device = msg.content["device"]
        return str(device["client"]), {"tier": str(device["tier"]), "host": str(device["host"])}

    def add_clients(self, replies: Iterable[Message], key: str, reply_seconds: dict | None = None) -> None:
        for msg in replies:
            if msg.has_error():
                continue
            name, device = self._entry(msg)
            if self.node_names.get(msg.metadata.src_node_id) != name:
                self.node_names[msg.metadata.src_node_id] = name
                metrics.write_json(self.root / NODE_NAMES, {str(k): v for k, v in self.node_names.items()})
            values = dict(msg.content["metrics"])
            entry = self.current["clients"].setdefault(name, device)
            entry.update({f"{key}{k}" if k == "num-examples" and key else k: v for k, v in values.items()})
            seconds = (reply_seconds or {}).get(msg.metadata.reply_to_message_id)
            if seconds is not None and not key:
                entry["reply-seconds"] = seconds
            self.latest[name] = {**self.latest.get(name, {}), **entry}

    def add_speeds(self, replies: Iterable[Message], seconds: float) -> None:
        """What the clients answered to the speed query before round 1 (straggler-policy deadline)."""
        measured = {}
        for msg in replies:
            if msg.has_error():
                continue
            name, device = self._entry(msg)
            measured[name] = {**device, **dict(msg.content["metrics"])}
            self.latest[name] = {**self.latest.get(name, {}), **measured[name]}
        self.history["calibration"] = {"seconds": seconds, "clients": measured}
        self.save()
        print(
            f"speeds measured in {seconds:.1f} s: "
            + ", ".join(f"{name} {m['step-seconds']:.3f} s/step" for name, m in sorted(measured.items())),
            flush=True,
        )

    def client_of(self, node_id: int | None) -> str:
        return self.node_names.get(node_id, f"node {node_id}")

    def add_missing(self, unanswered: Iterable[int], failed: Iterable[tuple[int | None, str]]) -> None:
        """This round's train messages that got no reply before the round closed (its policy's deadline or
        the reply guard: a straggler, or a SuperNode that died or restarted), and those answered with an
        error (a SuperNode the SuperLink found unavailable, a ClientApp that failed), by client."""
        missing = [self.client_of(node) for node in unanswered]
        errors = [{"client": self.client_of(node), "error": error} for node, error in failed]
        for e in errors:  # a ClientApp whose trainer was OOM-killed says so (telemetry.oom_note)
            found = OOM_MARKER.search(e["error"])
            if found:
                e["oom_kills"] = int(found.group(1))
                self.oom_failures += 1
        self.current.update(dropped=len(missing), missing=missing, failed=errors)
        self.dropped += len(missing)
        self.failed += len(errors)
        for name in missing:
            print(f"round {self.current['round']}: no reply from {name} when the round closed", flush=True)
        for e in errors:
            print(f"round {self.current['round']}: {e['client']} failed: {e['error']}", flush=True)

    def add_late(self, server_round: int, msg: Message, seconds: float) -> None:
        """A reply that came after its round closed: discarded, counted in that round's history."""
        if msg.has_error():
            return
        name, device = self._entry(msg)
        values = {k: v for k, v in dict(msg.content["metrics"]).items() if k in LATE_KEYS}
        entry = {"client": name, **device, **values, "reply-seconds": seconds}
        self.latest[name] = {**self.latest.get(name, {}), **values, "reply-seconds": seconds}
        for rnd in (*self.history["rounds"], self.current):
            if rnd.get("round") == server_round:
                rnd["late"].append(entry)
        self.save()

    def end_round(self, federated: MetricRecord | None, central: MetricRecord | None) -> None:
        """Close the round: the model's accuracy is the central one when there is a test split, else federated."""
        cur = self.current
        seconds = time.monotonic() - cur.pop("started")
        ended = time.time()
        clients = cur["clients"].values()
        fits = {name: c["fit-seconds"] for name, c in cur["clients"].items() if c.get("fit-seconds") is not None}
        slowest = max(fits.values(), default=0.0)
        for name, idle in policy.idle_seconds(fits).items():
            cur["clients"][name]["idle-seconds"] = idle
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
            idle_fraction=policy.idle_fraction(fits, seconds),
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
                "policy": self.history["policy"],
                "idle_fraction": last.get("idle_fraction"),
                "budget_seconds": last.get("budget_seconds"),
                "dropped": self.dropped,
                "failed": self.failed,
                "oom_failures": self.oom_failures,
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
                "progress_unix": self.history["started_unix"] + (last.get("elapsed_seconds") or 0.0),
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
                            "policy": self.history["policy"],
                            "budget_seconds": r.get("budget_seconds"),
                            "idle_fraction": r.get("idle_fraction"),
                            "idle_seconds": c.get("idle-seconds"),
                            "samples_trained": c.get("samples-trained"),
                            "step_seconds": c.get("step-seconds"),
                            "reply_seconds": c.get("reply-seconds"),
                        }
                    )


def aggregate_packed(packed: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """The weighted mean of packed weight arrays (weights sum to 1)."""
    total = np.zeros_like(packed[0], dtype=np.float64)
    for array, weight in zip(packed, weights, strict=True):
        total += weight * array
    return total.astype(np.float32)


class RecordingFedAvg(FedAvg):
    """FedAvg under a straggler policy (policy.py) that hands every client's reply to the Recorder.

    The policy sets each round's training budget (sent as `budget-seconds` in the train config) or
    reply deadline, and the key the packed models are weighed by. Every round also waits a bounded time
    for its SuperNodes (`node_wait_timeout`, then NodesMissing) and for their replies (the reply guard,
    policy.reply_guard); what is missing or failed is recorded by client.
    """

    def __init__(
        self,
        recorder: Recorder,
        initial: ArrayRecord,
        central_eval=None,
        fail_at_round: int = 0,
        straggler_policy: policy.Policy | None = None,
        local_epochs: int = 1,
        reply_timeout: float = 0.0,
        node_wait_timeout: float = 600.0,
        **kwargs,
    ):
        self.policy = straggler_policy or policy.Policy()
        self.reply_timeout = reply_timeout
        self.node_wait_timeout = node_wait_timeout
        super().__init__(weighted_by_key=self.policy.weight_key(), **kwargs)
        self.recorder = recorder
        self.current_arrays = initial
        self.central_eval = central_eval
        self.fail_at_round = fail_at_round
        self.local_epochs = local_epochs
        self.grid: FastPollGrid | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        if server_round == self.fail_at_round:
            raise InjectedFailure(f"run config key 'fail-at-round' is {server_round}: failing as asked")
        if server_round > 1:
            wait_for_nodes(
                grid,
                self.min_available_nodes,
                self.node_wait_timeout,
                when=f" round {server_round}",
                counted=self.recorder.set_nodes,
            )
        budget = self.policy.train_budget(self.recorder.latest, self.local_epochs)
        deadline = self.policy.reply_deadline(self.recorder.latest)
        guard = policy.reply_guard(self.recorder.latest, self.reply_timeout)
        config = ConfigRecord({**dict(config), "budget-seconds": budget})
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if isinstance(grid, FastPollGrid):
            self.grid = grid
            grid.on_late = self.recorder.add_late
            closes = [s for s in (deadline, guard) if s is not None]
            if closes:
                grid.close_at(server_round, min(closes))
        plan = {"budget_seconds": budget, "deadline_seconds": deadline, "reply_guard_seconds": guard}
        self.recorder.start_round(server_round, len(list(grid.get_node_ids())), plan)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        self.recorder.add_clients(replies, key="", reply_seconds=self.grid.reply_seconds if self.grid else None)
        if self.grid is not None:
            failed = [
                (self.grid.sent_to.get(r.metadata.reply_to_message_id), f"{r.error.code}: {r.error.reason}")
                for r in replies
                if r.has_error()
            ]
            self.recorder.add_missing(self.grid.unanswered, failed)
        valid = [r for r in replies if not r.has_error()]
        if not valid:
            return None, None
        weights = policy.aggregation_weights([r.content["metrics"] for r in valid], self.policy.weight_key())
        packed = aggregate_packed([r.content["arrays"].to_numpy_ndarrays()[0] for r in valid], weights)
        arrays = ArrayRecord([packed])
        train_metrics = aggregate_metricrecords([r.content for r in valid], self.policy.weight_key())
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
    model = task.build_model(run.model_alpha, run.model_seed())
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
    straggler_policy = run.policy()
    strategy = RecordingFedAvg(
        recorder,
        initial,
        central_eval,
        fail_at_round=run.fail_at_round,
        straggler_policy=straggler_policy,
        local_epochs=run.local_epochs,
        reply_timeout=run.reply_timeout,
        node_wait_timeout=run.node_wait_timeout,
        fraction_train=run.fraction_train,
        fraction_evaluate=run.fraction_evaluate,
        min_train_nodes=run.min_nodes,
        min_evaluate_nodes=run.min_nodes,
        min_available_nodes=run.min_nodes,
    )
    recorder.set_nodes(wait_for_nodes(grid, run.min_nodes, run.node_wait_timeout))
    if straggler_policy.name == "deadline":
        measure_speeds(grid, recorder, initial, run.round_timeout)
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


def measure_speeds(grid, recorder: Recorder, arrays: ArrayRecord, timeout: float) -> None:
    """Ask every connected client for its seconds per step (a query message), so round 1 has a budget too.

    A client's trainer answers from its last fit, or measures a few steps when it has none yet.
    """
    started = time.monotonic()
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({})})
    messages = [Message(content=content, message_type=MessageType.QUERY, dst_node_id=n) for n in grid.get_node_ids()]
    replies = grid.send_and_receive(messages, timeout=timeout)
    recorder.add_speeds(replies, time.monotonic() - started)


def _has_data_dir() -> bool:
    return bool(os.environ.get("FLOWERLAB_DATA_DIR")) and (data_dir() / data.MANIFEST).exists()
