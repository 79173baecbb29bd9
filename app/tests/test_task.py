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
