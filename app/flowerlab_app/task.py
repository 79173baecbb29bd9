"""Model and training: MobileNetV2 for 32x32x3 images, sized to the device's CPU budget.

`Trainer` keeps what is expensive to make across rounds: TensorFlow, one compiled model per width
(with its traced train and evaluate functions) and the loaded partitions. A round only sets the
received weights, zeroes the optimizer state and trains, so fit seconds measure training alone.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from .policy import step_budget, steps_per_epoch  # noqa: E402
from .telemetry import Cgroup, FitMeter, tf_threads  # noqa: E402

NUM_CLASSES = 10
# Keras' default BatchNormalization momentum (0.99) keeps the moving statistics near their initial
# values for the few hundred steps a federated run takes, so inference-mode accuracy stays at chance
# while training accuracy climbs. 0.9 follows the data within a round.
BATCHNORM_MOMENTUM = 0.9
_configured = False
# Steps a trainer takes to measure its speed when a run asks for it before training (straggler-policy deadline).
CALIBRATION_STEPS = 10


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
    """MobileNetV2 (weights=None) for 32x32x3 inputs and 10 classes, BatchNorm momentum 0.9."""
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=alpha, weights=None, classes=NUM_CLASSES, classifier_activation="softmax"
    )
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = BATCHNORM_MOMENTUM
    return model


def get_packed(model) -> np.ndarray:
    """Every weight of the model in one flat float32 array.

    Flower sends each array of an ArrayRecord as objects of their own (MobileNetV2 has 262 arrays:
    about 500 HTTP requests per hop and message); one array is a handful. FedAvg's weighted mean is
    element-wise, so it aggregates the packed array exactly as it would the separate ones.
    """
    return np.concatenate([np.asarray(w, dtype=np.float32).ravel() for w in model.get_weights()])


def set_packed(model, packed: np.ndarray) -> None:
    """Load weights packed by get_packed into a model of the same architecture."""
    shapes = [tuple(w.shape) for w in model.weights]
    sizes = [int(np.prod(shape)) for shape in shapes]
    if packed.ndim != 1 or packed.size != sum(sizes):
        raise ValueError(f"packed weights hold {packed.size} values; this model has {sum(sizes)}")
    offsets = np.cumsum([0, *sizes])
    model.set_weights(
        [packed[a:b].reshape(shape) for a, b, shape in zip(offsets[:-1], offsets[1:], shapes, strict=True)]
    )


def compile_model(model, learning_rate: float) -> None:
    import keras

    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=learning_rate, momentum=0.9),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )


def reset_optimizer(model, learning_rate: float) -> None:
    """Zero the optimizer's state (momentum, iterations) and set the learning rate, without re-compiling.

    Re-compiling would discard the traced train function (about 15 CPU s to trace again).
    """
    optimizer = model.optimizer
    for variable in optimizer.variables:
        variable.assign(np.zeros(variable.shape, dtype=variable.dtype))
    optimizer.learning_rate.assign(learning_rate)


def shuffled(x: np.ndarray, y: np.ndarray, seed: int, epochs: int) -> tuple[np.ndarray, np.ndarray]:
    """`epochs` seeded permutations of (x, y), one after another.

    Seeding numpy instead of TensorFlow keeps TensorFlow's kernel cache (its seeding clears it).
    """
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(y)) for _ in range(epochs)])
    return x[order], y[order]


def step_timer(stop_after: float | None = None):
    """A Keras callback timing steps: `seconds_per_step()` over a fit, not counting its first step (may trace).

    With `stop_after`, it ends the fit after the step during which that many seconds have passed.
    """
    import keras

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.started = time.perf_counter()
            self.ends: list[float] = []
            self.stopped = False

        def on_train_batch_end(self, batch, logs=None):
            self.ends.append(time.perf_counter())
            if stop_after is not None and self.ends[-1] - self.started >= stop_after:
                self.stopped = True
                self.model.stop_training = True

        def seconds_per_step(self) -> float | None:
            if len(self.ends) < 2:
                return None
            return (self.ends[-1] - self.ends[0]) / (len(self.ends) - 1)

    return StepTimer()


def fit(
    model,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    steps: int | None = None,
    stop_after: float | None = None,
) -> dict:
    """Train a compiled model for `epochs` over (x, y), or for `steps` full batches; time only training.

    `steps` (a step budget) draws the batches from seeded permutations of the partition, one after
    another, so a budget larger than an epoch goes on into the next one. `stop_after` seconds end the
    fit early when the device runs slower than the steps were planned for (a busy machine, a stall).
    """
    reset_optimizer(model, learning_rate)
    if steps is None:
        xs, ys = shuffled(x, y, seed, epochs)
    else:
        xs, ys = shuffled(x, y, seed, -(-steps * batch_size // len(y)))
        xs, ys = xs[: steps * batch_size], ys[: steps * batch_size]
    timer = step_timer(stop_after)
    started = time.perf_counter()
    history = model.fit(xs, ys, epochs=1, batch_size=batch_size, verbose=0, shuffle=False, callbacks=[timer])
    seconds = time.perf_counter() - started
    done = len(timer.ends)
    samples = min(done * batch_size, len(ys))
    return {
        "train-loss": float(history.history["loss"][-1]),
        "train-accuracy": float(history.history["accuracy"][-1]),
        "fit-seconds": seconds,
        "samples-per-second": samples / seconds if seconds > 0 else 0.0,
        "steps": done,
        "planned-steps": -(-len(ys) // batch_size),
        "stopped-at-budget": int(timer.stopped),
        "samples-trained": samples,
        "step-seconds": timer.seconds_per_step(),
    }


def evaluate(model, x: np.ndarray, y: np.ndarray, batch_size: int = 64) -> tuple[float, float]:
    loss, accuracy = model.evaluate(x, y, batch_size=batch_size, verbose=0)
    return float(loss), float(accuracy)


class Trainer:
    """Warm training for one device: models, traced functions and partitions cached across rounds."""

    def __init__(self, threads: int | None = None):
        self.cgroup = Cgroup()
        self.threads = configure_tensorflow(threads or tf_threads(self.cgroup))
        self._models: dict[float, object] = {}
        self._partitions: dict[tuple, tuple[np.ndarray, ...]] = {}
        # Measured seconds per training step, per (model width, batch size): the speed a step budget uses.
        self._step_seconds: dict[tuple[float, int], float] = {}

    def model(self, alpha: float, packed: np.ndarray):
        """The compiled model of width `alpha` holding the `packed` weights; built and compiled once per width."""
        model = self._models.get(alpha)
        if model is None:
            model = build_model(alpha, seed=0)  # the received weights replace the initial ones
            compile_model(model, 0.01)
            self._models[alpha] = model
        set_packed(model, packed)
        return model

    def partition(self, data_dir: Path, partition_id: int, percentage: float, seed: int):
        from . import data

        key = (str(data_dir), (data_dir / data.MANIFEST).stat().st_mtime_ns, partition_id, percentage, seed)
        if key not in self._partitions:
            self._partitions.clear()
            self._partitions[key] = data.load_partition(data_dir, partition_id, percentage, seed)
        return self._partitions[key]

    def train(self, request: dict) -> dict:
        """Evaluate the received global model on the local test split, then train it; new weights and metrics."""
        x_train, y_train, x_test, y_test = self.partition(
            Path(request["data_dir"]), request["partition_id"], request["percentage"], request["seed"]
        )
        started = time.perf_counter()
        model = self.model(request["alpha"], request["packed"])
        metrics: dict[str, float] = {}
        if len(y_test):
            evaluated = time.perf_counter()
            loss, accuracy = evaluate(model, x_test, y_test, batch_size=request["batch_size"])
            metrics.update(
                {
                    "received-eval-loss": loss,
                    "received-eval-accuracy": accuracy,
                    "eval-examples": len(y_test),
                    "received-eval-seconds": time.perf_counter() - evaluated,
                }
            )
        speed_key = (request["alpha"], request["batch_size"])
        budget = float(request.get("budget_seconds") or 0.0)
        epoch_steps = steps_per_epoch(len(y_train), request["batch_size"])
        steps = step_budget(budget, self._step_seconds.get(speed_key), epoch_steps * request["epochs"])
        with FitMeter(self.cgroup) as meter:
            results = fit(
                model,
                x_train,
                y_train,
                epochs=request["epochs"],
                batch_size=request["batch_size"],
                learning_rate=request["learning_rate"],
                seed=request.get("training_seed", request["seed"]) * 1000 + request["server_round"],
                steps=steps if budget > 0 else None,
                stop_after=budget if budget > 0 else None,
            )
        if results["step-seconds"]:
            self._step_seconds[speed_key] = results["step-seconds"]
        metrics.update(results)
        metrics["budget-seconds"] = budget
        metrics.update(meter.metrics())
        packed = get_packed(model)
        # Everything the trainer did for this message (set weights, evaluate, train, pack), for the overhead.
        metrics.update(
            {"num-examples": len(y_train), "tf-threads": self.threads, "trainer-seconds": time.perf_counter() - started}
        )
        return {"packed": packed, "metrics": metrics}

    def speed(self, request: dict) -> dict:
        """This device's measured seconds per step for the request's model and batch size.

        Measured on CALIBRATION_STEPS steps from the received weights when this trainer has not trained
        that model at that batch size yet (the steps' weights are discarded: every request sets its own).
        """
        x_train, y_train, _, _ = self.partition(
            Path(request["data_dir"]), request["partition_id"], request["percentage"], request["seed"]
        )
        key = (request["alpha"], request["batch_size"])
        calibrated = key not in self._step_seconds
        if calibrated:
            model = self.model(request["alpha"], request["packed"])
            results = fit(
                model,
                x_train,
                y_train,
                epochs=1,
                batch_size=request["batch_size"],
                learning_rate=request["learning_rate"],
                seed=request["seed"],
                steps=CALIBRATION_STEPS,
            )
            self._step_seconds[key] = results["step-seconds"]
        return {
            "metrics": {
                "step-seconds": self._step_seconds[key],
                "num-examples": len(y_train),
                "batch-size": request["batch_size"],
                "calibrated": int(calibrated),
            }
        }

    def evaluate(self, request: dict) -> dict:
        _, _, x_test, y_test = self.partition(
            Path(request["data_dir"]), request["partition_id"], request["percentage"], request["seed"]
        )
        model = self.model(request["alpha"], request["packed"])
        loss, accuracy = evaluate(model, x_test, y_test, batch_size=request["batch_size"])
        return {"metrics": {"num-examples": len(y_test), "eval-loss": loss, "eval-accuracy": accuracy}}
