"""ClientApp: trains on this device's partition with this device's tier settings."""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from . import data, task
from .settings import NodeSettings, RunSettings, data_dir
from .telemetry import Cgroup, FitMeter

app = ClientApp()


def _setup(msg: Message, context: Context):
    """Settings, data and the global model of this message."""
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
    arrays = data.load_partition(directory, node.partition_id, run.data_sample_percentage, run.seed)
    cgroup = Cgroup()
    threads = task.configure_tensorflow(task.tf_threads(cgroup))
    model = task.build_model(run.model_alpha, run.seed)
    model.set_weights(msg.content["arrays"].to_numpy_ndarrays())
    return node, run, arrays, model, cgroup, threads


def _device(node: NodeSettings) -> ConfigRecord:
    return ConfigRecord({"client": node.client, "tier": node.tier, "host": node.host})


@app.train()
def train(msg: Message, context: Context) -> Message:
    node, run, (x_train, y_train, _, _), model, cgroup, threads = _setup(msg, context)
    epochs = int(msg.content["config"].get("local-epochs", run.local_epochs))
    with FitMeter(cgroup) as meter:
        results = task.fit(
            model, x_train, y_train, epochs=epochs, batch_size=node.batch_size, learning_rate=node.learning_rate
        )
    metrics = {
        "num-examples": len(y_train),
        "batch-size": node.batch_size,
        "tf-threads": threads,
        **results,
        **meter.metrics(),
    }
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.get_weights()),
            "metrics": MetricRecord(metrics),
            "device": _device(node),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    node, _, (_, _, x_test, y_test), model, _, _ = _setup(msg, context)
    loss, accuracy = task.evaluate(model, x_test, y_test, batch_size=node.batch_size)
    content = RecordDict(
        {
            "metrics": MetricRecord({"num-examples": len(y_test), "eval-loss": loss, "eval-accuracy": accuracy}),
            "device": _device(node),
        }
    )
    return Message(content=content, reply_to=msg)
