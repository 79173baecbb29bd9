import numpy as np
import pytest

from flowerlab_app import task


@pytest.fixture(scope="module")
def model():
    return task.build_model(0.35, seed=1)


def test_batchnorm_follows_the_data_within_a_round(model):
    import keras

    momenta = {layer.momentum for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)}
    assert momenta == {task.BATCHNORM_MOMENTUM} == {0.9}


def test_packed_weights_round_trip_in_one_array(model):
    weights = model.get_weights()
    packed = task.get_packed(model)
    assert packed.ndim == 1 and packed.dtype == np.float32
    assert packed.size == sum(w.size for w in weights)
    task.set_packed(model, packed * 2)
    for before, after in zip(weights, model.get_weights(), strict=True):
        np.testing.assert_allclose(after, before * 2)
    task.set_packed(model, packed)


def test_packed_weights_of_another_model_are_refused(model):
    with pytest.raises(ValueError, match="this model has"):
        task.set_packed(model, np.zeros(10, dtype=np.float32))


def test_shuffled_is_seeded_and_covers_every_epoch():
    x = np.arange(5)[:, None].astype(np.float32)
    y = np.arange(5)
    xs, ys = task.shuffled(x, y, seed=3, epochs=2)
    assert len(ys) == 10 and sorted(ys[:5]) == sorted(ys[5:]) == list(range(5))
    assert (xs[:, 0] == ys).all()
    again = task.shuffled(x, y, seed=3, epochs=2)[1]
    assert (again == ys).all()
    assert not (task.shuffled(x, y, seed=4, epochs=2)[1] == ys).all()


@pytest.fixture(scope="module")
def tiny():
    import keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(10, activation="softmax")])
    task.compile_model(model, 0.01)
    return model


def test_local_epochs_train_every_sample_once_per_epoch(tiny):
    x, y = np.random.default_rng(0).random((50, 4)).astype(np.float32), np.arange(50) % 10
    result = task.fit(tiny, x, y, epochs=2, batch_size=8, learning_rate=0.01, seed=1)
    # 100 samples in batches of 8: 12 full batches and one of 4
    assert (result["steps"], result["planned-steps"], result["samples-trained"]) == (13, 13, 100)
    assert result["stopped-at-budget"] == 0 and result["step-seconds"] > 0


def test_a_step_budget_trains_that_many_full_batches_across_epochs(tiny):
    x, y = np.random.default_rng(0).random((50, 4)).astype(np.float32), np.arange(50) % 10
    result = task.fit(tiny, x, y, epochs=1, batch_size=8, learning_rate=0.01, seed=1, steps=9, stop_after=600)
    assert (result["steps"], result["samples-trained"], result["stopped-at-budget"]) == (9, 72, 0)


def test_a_fit_slower_than_planned_stops_at_its_time_budget(tiny):
    x, y = np.random.default_rng(0).random((50, 4)).astype(np.float32), np.arange(50) % 10
    result = task.fit(tiny, x, y, epochs=1, batch_size=8, learning_rate=0.01, seed=1, steps=9, stop_after=0.0)
    assert (result["steps"], result["samples-trained"], result["planned-steps"]) == (1, 8, 9)
    assert result["stopped-at-budget"] == 1
