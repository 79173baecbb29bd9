"""ClientApp: trains on this device's partition with this device's tier settings.

A thin client of the SuperNode's warm trainer (see trainer.py): this process never imports
TensorFlow when FLOWERLAB_TRAINER_SOCKET is set. A train message also evaluates the received global
model on the local test split, so a round needs one message per client, not two.
"""

from __future__ import annotations

import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from . import data, telemetry, trainer
from .settings import NodeSettings, RunSettings, data_dir

app = ClientApp()
_local_trainer = None


def _request(msg: Message, context: Context) -> tuple[NodeSettings, dict]:
    """This device's settings and the trainer request for the received global model."""
    node = NodeSettings.from_node_config(context.node_config)
    run = RunSettings.from_run_config(context.run_config)
    directory = data_dir()
    data.check_manifest(
        data.read_manifest(directory),
        dataset=run.dataset,
        partitioner=run.partitioner,
        alpha=run.dirichlet_alpha,
        seed=run.seed,
        num_partitions=node.num_partitions,
    )
    config = msg.content.get("config", {})
    request = {
        "data_dir": str(directory),
        "partition_id": node.partition_id,
        "percentage": run.data_sample_percentage,
        "seed": run.seed,
        "training_seed": run.model_seed(),
        "alpha": run.model_alpha,
        "batch_size": node.batch_size,
        "learning_rate": node.learning_rate,
        "epochs": int(config.get("local-epochs", run.local_epochs)),
        "server_round": int(config.get("server-round", 0)),
        # Seconds this device may train this round (straggler-policy deadline; 0: local-epochs).
        "budget_seconds": float(config.get("budget-seconds", 0.0)),
        "packed": msg.content["arrays"].to_numpy_ndarrays()[0],  # one flat array (task.get_packed)
    }
    return node, request


def _call(op: str, request: dict) -> dict:
    """Ask the SuperNode's warm trainer, or train in this process when there is none."""
    global _local_trainer
    path = trainer.socket_path()
    if path is not None:
        try:
            return trainer.call(path, op, request)
        except trainer.TrainerError as err:
            raise trainer.TrainerError(f"{err}{telemetry.oom_note()}") from err
    if _local_trainer is None:
        from .task import Trainer

        _local_trainer = Trainer()
    return getattr(_local_trainer, op)(request)


def _device(node: NodeSettings) -> ConfigRecord:
    return ConfigRecord({"client": node.client, "tier": node.tier, "host": node.host})


@app.train()
def train(msg: Message, context: Context) -> Message:
    node, request = _request(msg, context)
    called = time.time()
    answer = _call("train", request)
    metrics = {
        "batch-size": node.batch_size,
        **{k: v for k, v in answer["metrics"].items() if v is not None},
        # Where the round's time goes besides training (see server_app.Recorder.end_round).
        "trainer-called-unix": called,
        "trainer-answered-unix": time.time(),
    }
    content = RecordDict(
        {
            "arrays": ArrayRecord([answer["packed"]]),
            "metrics": MetricRecord(metrics),
            "device": _device(node),
        }
    )
    return Message(content=content, reply_to=msg)


def _metrics_reply(op: str, msg: Message, context: Context) -> Message:
    """Ask the trainer for `op` on the received model; reply with its metrics and this device."""
    node, request = _request(msg, context)
    answer = _call(op, request)
    content = RecordDict({"metrics": MetricRecord(answer["metrics"]), "device": _device(node)})
    return Message(content=content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """This device's training speed (seconds per step), measured by its trainer: a deadline budget's input."""
    return _metrics_reply("speed", msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _metrics_reply("evaluate", msg, context)
