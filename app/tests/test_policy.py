import numpy as np
import pytest

from flowerlab_app import policy
from flowerlab_app.server_app import aggregate_packed
from flowerlab_app.settings import ConfigError, RunSettings

# Three clients as the previous round measured them: 383 examples each.
LATEST = {
    # iot: batch 16 -> 24 steps per epoch; 0.09 s per step -> 2 epochs need 48 x 0.09 = 4.32 s
    "a": {"num-examples": 383, "batch-size": 16, "step-seconds": 0.09, "reply-seconds": 16.0},
    # phone: batch 32 -> 12 steps per epoch; 0.1 s per step -> 24 x 0.1 = 2.4 s
    "b": {"num-examples": 383, "batch-size": 32, "step-seconds": 0.1, "reply-seconds": 12.5},
    # laptop: 12 steps per epoch; 0.08 s per step -> 24 x 0.08 = 1.92 s
    "c": {"num-examples": 383, "batch-size": 32, "step-seconds": 0.08, "reply-seconds": 12.0},
}


def test_step_budget_is_the_steps_that_fit_in_the_budget():
    assert policy.step_budget(2.4, 0.09, default_steps=48) == 26  # floor(26.67)
    assert policy.step_budget(2.4, 0.08, default_steps=24) == 30
    assert policy.step_budget(0.05, 0.09, default_steps=48) == 1  # never zero steps


def test_step_budget_without_budget_or_speed_is_local_epochs():
    assert policy.step_budget(0.0, 0.09, default_steps=48) == 48
    assert policy.step_budget(2.4, None, default_steps=48) == 48


def test_auto_budget_is_the_median_clients_time_for_local_epochs():
    assert policy.needed_seconds(LATEST["a"], 2) == pytest.approx(4.32)
    assert policy.auto_budget(LATEST.values(), 2) == pytest.approx(2.4)  # median of 4.32, 2.4, 1.92
    assert policy.auto_budget([{"num-examples": 383, "batch-size": 16}], 2) == 0.0  # nothing measured yet


def test_deadline_policy_budgets_training_and_weighs_by_samples_trained():
    deadline = policy.Policy("deadline")
    assert deadline.train_budget(LATEST, 2) == pytest.approx(2.4)
    assert deadline.reply_deadline(LATEST) is None
    assert deadline.weight_key() == "samples-trained"
    assert policy.Policy("deadline", deadline_seconds=5.0).train_budget(LATEST, 2) == 5.0


def test_drop_stragglers_closes_rounds_at_the_median_reply_time_plus_slack():
    drop = policy.Policy("drop-stragglers", deadline_slack=0.2)
    assert drop.reply_deadline(LATEST) == pytest.approx(15.0)  # median 12.5 x 1.2
    assert drop.reply_deadline({}) is None  # round 1 waits for every reply
    assert policy.Policy("drop-stragglers", deadline_seconds=9.0).reply_deadline(LATEST) == 9.0
    assert drop.train_budget(LATEST, 2) == 0.0
    assert drop.weight_key() == "num-examples"


def test_static_policy_sets_nothing():
    static = policy.Policy()
    assert static.train_budget(LATEST, 2) == 0.0 and static.reply_deadline(LATEST) is None
    assert static.weight_key() == "num-examples"


def test_aggregation_weights_are_normalised():
    # deadline round: iot trained 26 x 16 = 416 samples, phone 24 x 32 = 768, laptop 30 x 32 = 960
    weights = policy.aggregation_weights(
        [{"samples-trained": 416}, {"samples-trained": 768}, {"samples-trained": 960}], "samples-trained"
    )
    assert weights == pytest.approx([416 / 2144, 768 / 2144, 960 / 2144])
    assert policy.aggregation_weights([{"n": 0}, {"n": 0}], "n") == [0.5, 0.5]
    with pytest.raises(policy.PolicyError, match="non-negative"):
        policy.aggregation_weights([{"n": -1}], "n")


def test_aggregate_packed_is_the_weighted_mean():
    packed = [np.array([1.0, 2.0], dtype=np.float32), np.array([3.0, 6.0], dtype=np.float32)]
    result = aggregate_packed(packed, [0.25, 0.75])
    assert result.dtype == np.float32
    assert result.tolist() == [2.5, 5.0]


def test_idle_fraction_by_hand():
    fits = {"a": 4.0, "b": 2.0, "c": 1.0}
    assert policy.idle_seconds(fits) == {"a": 0.0, "b": 2.0, "c": 3.0}
    # (0 + 2 + 3) / (3 clients x 10 s round)
    assert policy.idle_fraction(fits, 10.0) == pytest.approx(5 / 30)
    assert policy.idle_fraction({"a": 2.0, "b": 2.0}, 10.0) == 0.0
    assert policy.idle_fraction({}, 10.0) is None


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("straggler-policy", "fastest-first", "key 'straggler-policy' is 'fastest-first'; allowed: static, deadline"),
        ("deadline-seconds", -1.0, "key 'deadline-seconds' is -1.0"),
        ("deadline-slack", 11.0, "key 'deadline-slack' is 11.0"),
        ("deadline-seconds", "soon", "key 'deadline-seconds' is 'soon'"),
    ],
)
def test_bad_policy_settings_are_clear_errors(run_config, key, value, message):
    with pytest.raises(ConfigError, match=message):
        RunSettings.from_run_config({**run_config, key: value})


def test_policy_settings_from_the_run_config(run_config):
    settings = RunSettings.from_run_config({**run_config, "straggler-policy": "deadline", "deadline-seconds": 3})
    assert settings.policy() == policy.Policy("deadline", 3.0, 0.2)


def test_reply_guard_by_hand():
    # 3 x the slowest reply so far (50 s -> 150 s), at least 120 s (a restarted client's cold round fits);
    # a fixed reply-timeout as it is; None before any reply was measured (round 1 waits round-timeout).
    latest = {"a": {"reply-seconds": 12.0}, "b": {"reply-seconds": 50.0}, "c": {}}
    assert policy.reply_guard(latest) == 150.0
    assert policy.reply_guard({"a": {"reply-seconds": 5.0}}) == 120.0
    assert policy.reply_guard(latest, fixed=30.0) == 30.0
    assert policy.reply_guard({}) is None and policy.reply_guard({"a": {}}) is None
