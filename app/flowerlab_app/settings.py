"""Typed views of the node config (per device) and the run config (per run)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .policy import Policy, PolicyError


class ConfigError(ValueError):
    """A node or run config value is missing or malformed."""


def _get(config: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in config:
        raise ConfigError(f"{where}: key '{key}' is missing (expected {kind.__name__})")
    value = config[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{where}: key '{key}' is {value!r} ({type(value).__name__}); expected {kind.__name__}")
    return value


@dataclass(frozen=True)
class NodeSettings:
    """What a SuperNode's --node-config says about its device."""

    partition_id: int
    num_partitions: int
    client: str
    tier: str
    host: str
    batch_size: int
    learning_rate: float

    @classmethod
    def from_node_config(cls, config: Mapping[str, Any]) -> NodeSettings:
        where = "node-config"
        settings = cls(
            partition_id=_get(config, "partition-id", int, where),
            num_partitions=_get(config, "num-partitions", int, where),
            client=_get(config, "client", str, where),
            tier=_get(config, "tier", str, where),
            host=_get(config, "host", str, where),
            batch_size=_get(config, "batch-size", int, where),
            learning_rate=_get(config, "learning-rate", float, where),
        )
        if settings.num_partitions < 1:
            raise ConfigError(f"{where}: key 'num-partitions' is {settings.num_partitions}; expected >= 1")
        if not 0 <= settings.partition_id < settings.num_partitions:
            raise ConfigError(
                f"{where}: key 'partition-id' is {settings.partition_id}; "
                f"expected 0 <= partition-id < num-partitions ({settings.num_partitions})"
            )
        if settings.batch_size < 1:
            raise ConfigError(f"{where}: key 'batch-size' is {settings.batch_size}; expected >= 1")
        if settings.learning_rate <= 0:
            raise ConfigError(f"{where}: key 'learning-rate' is {settings.learning_rate}; expected > 0")
        for key in ("client", "tier", "host"):
            if not getattr(settings, key):
                raise ConfigError(f"{where}: key '{key}' is empty; expected a name")
        return settings


PARTITIONERS = ("iid", "dirichlet")


@dataclass(frozen=True)
class RunSettings:
    """The run config ([tool.flwr.app.config] with `flwr run -c` overrides)."""

    num_server_rounds: int
    fraction_train: float
    fraction_evaluate: float
    min_nodes: int
    node_wait_timeout: float
    round_timeout: float
    local_epochs: int
    dataset: str
    data_sample_percentage: float
    partitioner: str
    dirichlet_alpha: float
    seed: int
    model_alpha: float
    metrics_port: int
    central_evaluation: bool
    results_dir: str
    fail_at_round: int = 0
    straggler_policy: str = "static"
    deadline_seconds: float = 0.0
    deadline_slack: float = 0.2
    training_seed: int = 0
    reply_timeout: float = 0.0

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> RunSettings:
        where = "run config"
        s = cls(
            num_server_rounds=_get(config, "num-server-rounds", int, where),
            fraction_train=_get(config, "fraction-train", float, where),
            fraction_evaluate=_get(config, "fraction-evaluate", float, where),
            min_nodes=_get(config, "min-nodes", int, where),
            node_wait_timeout=_get(config, "node-wait-timeout", float, where),
            round_timeout=_get(config, "round-timeout", float, where),
            local_epochs=_get(config, "local-epochs", int, where),
            dataset=_get(config, "dataset", str, where),
            data_sample_percentage=_get(config, "data-sample-percentage", float, where),
            partitioner=_get(config, "partitioner", str, where),
            dirichlet_alpha=_get(config, "dirichlet-alpha", float, where),
            seed=_get(config, "seed", int, where),
            model_alpha=_get(config, "model-alpha", float, where),
            metrics_port=_get(config, "metrics-port", int, where),
            central_evaluation=_get(config, "central-evaluation", bool, where),
            results_dir=_get(config, "results-dir", str, where),
            fail_at_round=_get(config, "fail-at-round", int, where) if "fail-at-round" in config else 0,
            **{
                field: _get(config, key, kind, where)
                for field, key, kind in (
                    ("straggler_policy", "straggler-policy", str),
                    ("deadline_seconds", "deadline-seconds", float),
                    ("deadline_slack", "deadline-slack", float),
                    ("training_seed", "training-seed", int),
                    ("reply_timeout", "reply-timeout", float),
                )
                if key in config
            },
        )
        try:
            s.policy()
        except PolicyError as err:
            raise ConfigError(str(err)) from err
        if s.partitioner not in PARTITIONERS:
            raise ConfigError(f"{where}: key 'partitioner' is {s.partitioner!r}; allowed: {', '.join(PARTITIONERS)}")
        if not 0 < s.data_sample_percentage <= 100:
            raise ConfigError(
                f"{where}: key 'data-sample-percentage' is {s.data_sample_percentage}; expected 0 < value <= 100"
            )
        if s.num_server_rounds < 1 or s.min_nodes < 1 or s.local_epochs < 1:
            raise ConfigError(f"{where}: num-server-rounds, min-nodes and local-epochs must be >= 1")
        if not 0 <= s.fraction_evaluate <= 1 or not 0 < s.fraction_train <= 1:
            raise ConfigError(f"{where}: fraction-train must be in (0, 1] and fraction-evaluate in [0, 1]")
        if s.fail_at_round < 0:
            raise ConfigError(f"{where}: key 'fail-at-round' is {s.fail_at_round}; expected 0 (never) or a round")
        if s.reply_timeout < 0:
            raise ConfigError(
                f"{where}: key 'reply-timeout' is {s.reply_timeout}; expected 0 (3x the slowest reply) or seconds > 0"
            )
        if s.metrics_port == 8000:
            raise ConfigError(f"{where}: key 'metrics-port' is 8000, the SuperLink's port; choose another")
        return s

    def model_seed(self) -> int:
        """Seed of the initial model and the local shuffling: training-seed, or seed when that is 0."""
        return self.training_seed or self.seed

    def policy(self) -> Policy:
        """The run's straggler policy (policy.py)."""
        return Policy(self.straggler_policy, self.deadline_seconds, self.deadline_slack)

    def results_root(self) -> Path:
        root = self.results_dir or os.environ.get("FLOWERLAB_RESULTS_DIR") or "~/.flowerlab/results"
        return Path(root).expanduser()


def data_dir() -> Path:
    """Where `flowerlab-data prepare` wrote the partitions of this host."""
    value = os.environ.get("FLOWERLAB_DATA_DIR")
    if not value:
        raise ConfigError(
            "FLOWERLAB_DATA_DIR is not set: point it at the directory written by `flowerlab-data prepare`"
        )
    return Path(value)
