import pytest

from flowerlab_app.settings import ConfigError, NodeSettings, RunSettings

NODE = {
    "partition-id": 1,
    "num-partitions": 3,
    "client": "phone-1",
    "tier": "phone",
    "host": "edge-a",
    "batch-size": 32,
    "learning-rate": 0.01,
}


def test_node_config_parsed():
    s = NodeSettings.from_node_config(NODE)
    assert (s.partition_id, s.num_partitions, s.client, s.tier, s.host) == (1, 3, "phone-1", "phone", "edge-a")
    assert s.batch_size == 32 and s.learning_rate == 0.01


def test_integer_learning_rate_is_accepted_as_float():
    assert NodeSettings.from_node_config({**NODE, "learning-rate": 1}).learning_rate == 1.0


@pytest.mark.parametrize("key", sorted(NODE))
def test_missing_node_config_key_is_named(key):
    config = {k: v for k, v in NODE.items() if k != key}
    with pytest.raises(ConfigError, match=f"key '{key}' is missing"):
        NodeSettings.from_node_config(config)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("batch-size", "32", r"key 'batch-size' is '32' \(str\); expected int"),
        ("batch-size", 0, r"key 'batch-size' is 0; expected >= 1"),
        ("learning-rate", "fast", r"key 'learning-rate' is 'fast' \(str\); expected float"),
        ("learning-rate", -0.1, r"expected > 0"),
        ("partition-id", 3, r"expected 0 <= partition-id < num-partitions \(3\)"),
        ("partition-id", True, r"key 'partition-id' is True \(bool\); expected int"),
        ("tier", 5, r"key 'tier' is 5 \(int\); expected str"),
        ("client", "", r"key 'client' is empty"),
    ],
)
def test_malformed_node_config_value_is_named(key, value, message):
    with pytest.raises(ConfigError, match=message):
        NodeSettings.from_node_config({**NODE, key: value})


def app_config() -> dict:
    import tomllib
    from pathlib import Path

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    return tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_run_config_is_complete_and_valid():
    run = RunSettings.from_run_config(app_config())
    assert run.dataset == "uoft-cs/cifar10"
    assert run.metrics_port != 8000


def test_pyproject_has_no_federations():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert "[tool.flwr.federations" not in text


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("partitioner", "shards", "allowed: iid, dirichlet"),
        ("data-sample-percentage", 0.0, "expected 0 < value <= 100"),
        ("metrics-port", 8000, "the SuperLink's port"),
        ("num-server-rounds", "3", r"\(str\); expected int"),
        ("reply-timeout", -5.0, r"key 'reply-timeout' is -5.0; expected 0 \(3x the slowest reply\) or seconds > 0"),
    ],
)
def test_bad_run_config(key, value, message):
    with pytest.raises(ConfigError, match=message):
        RunSettings.from_run_config({**app_config(), key: value})


def test_results_root_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FLOWERLAB_RESULTS_DIR", str(tmp_path))
    assert RunSettings.from_run_config(app_config()).results_root() == tmp_path
