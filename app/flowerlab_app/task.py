"""Model and training: MobileNetV2 for 32x32x3 images, sized to the device's CPU budget."""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from .telemetry import tf_threads  # noqa: E402

NUM_CLASSES = 10
_configured = False


def configure_tensorflow(threads: int | None = None) -> int:
    """Size TensorFlow's thread pools to the CPU quota; call before any TensorFlow op."""
    global _configured
    import tensorflow as tf

    threads = threads or tf_threads()
    if not _configured:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:  # TensorFlow already initialised in this process
            pass
        _configured = True
    return threads


def build_model(alpha: float, seed: int):
    """MobileNetV2 (weights=None) for 32x32x3 inputs and 10 classes."""
    import keras

    keras.utils.set_random_seed(seed)
    return keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=alpha, weights=None, classes=NUM_CLASSES, classifier_activation="softmax"
    )


def compile_model(model, learning_rate: float) -> None:
    """A fresh optimizer on every call: no optimizer state leaks between rounds or runs."""
    import keras

    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=learning_rate, momentum=0.9),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )


def fit(model, x: np.ndarray, y: np.ndarray, *, epochs: int, batch_size: int, learning_rate: float) -> dict:
    compile_model(model, learning_rate)
    started = time.perf_counter()
    history = model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0, shuffle=True)
    seconds = time.perf_counter() - started
    return {
        "train-loss": float(history.history["loss"][-1]),
        "train-accuracy": float(history.history["accuracy"][-1]),
        "fit-seconds": seconds,
        "samples-per-second": len(y) * epochs / seconds if seconds > 0 else 0.0,
    }


def evaluate(model, x: np.ndarray, y: np.ndarray, batch_size: int = 64) -> tuple[float, float]:
    compile_model(model, 0.01)  # evaluation only: the learning rate is not used
    loss, accuracy = model.evaluate(x, y, batch_size=batch_size, verbose=0)
    return float(loss), float(accuracy)
