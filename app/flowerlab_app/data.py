"""Data of the lab: sources, partitioning with flwr-datasets, preparation once per host.

`flowerlab-data prepare` writes one file per partition plus a manifest into a directory that the
client containers mount read-only; a ClientApp only reads its own partition and never downloads.

Datasets: a Hugging Face Hub id (default `uoft-cs/cifar10`), `parquet:/path/file.parquet`,
`imagefolder:/path/dir`, or `offline:digits` (scikit-learn's real handwritten digits, shipped inside
the package, brought to 32x32x3) for labs with no network at all.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
OFFLINE_DATASETS = ("offline:digits",)
TEST_FRACTION = 0.2
IMAGE_SIZE = 32


class DataUnavailable(RuntimeError):
    """The dataset cannot be loaded, or the prepared data does not match the run."""


def offline_options() -> str:
    return (
        "offline options: dataset = 'offline:digits' (built in, no network), "
        "'parquet:/path/train.parquet' or 'imagefolder:/path/dir' (local files)"
    )


def make_partitioner(kind: str, num_partitions: int, alpha: float, seed: int):
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if kind == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if kind == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions, partition_by="label", alpha=alpha, min_partition_size=1, seed=seed
        )
    raise DataUnavailable(f"partitioner {kind!r} is unknown; allowed: iid, dirichlet")


def digits_dataset(seed: int):
    """scikit-learn's 1797 handwritten digits as 32x32x3 float32 images, split train/test (seeded)."""
    from datasets import Dataset
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # 8x8, values 0..16
    images = np.kron(images, np.ones((1, IMAGE_SIZE // 8, IMAGE_SIZE // 8), dtype=np.float32))
    images = np.repeat(images[..., None], 3, axis=-1)
    ds = Dataset.from_dict({"img": images, "label": digits.target.astype(np.int64)})
    split = ds.train_test_split(test_size=TEST_FRACTION, seed=seed, stratify_by_column=None)
    return split["train"], split["test"]


def _label_column(ds) -> str:
    for name in ("label", "fine_label", "labels"):
        if name in ds.column_names:
            return name
    raise DataUnavailable(f"dataset has no label column (columns: {ds.column_names})")


def _image_column(ds) -> str:
    for name in ("img", "image", "images"):
        if name in ds.column_names:
            return name
    raise DataUnavailable(f"dataset has no image column (columns: {ds.column_names})")


def to_arrays(ds) -> tuple[np.ndarray, np.ndarray]:
    """Images as float32 (N, 32, 32, 3) in [0, 1] and labels as int64."""
    labels = np.asarray(ds[_label_column(ds)], dtype=np.int64)
    column = ds[_image_column(ds)]
    if len(column) and hasattr(column[0], "convert"):  # PIL images
        size = (IMAGE_SIZE, IMAGE_SIZE)
        images = np.stack([np.asarray(im.convert("RGB").resize(size), dtype=np.uint8) for im in column])
        images = images.astype(np.float32) / 255.0
    else:
        images = np.asarray(column, dtype=np.float32)
        if images.max(initial=0) > 1.0:
            images /= 255.0
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise DataUnavailable(f"images have shape {images.shape[1:]}; expected (32, 32, 3)")
    return images, labels


def partitions(dataset: str, num_partitions: int, partitioner: str, alpha: float, seed: int):
    """Yield (partition id, HF dataset) for every partition, then ('test', dataset or None)."""
    part = make_partitioner(partitioner, num_partitions, alpha, seed)
    if dataset == "offline:digits":
        train, test = digits_dataset(seed)
        part.dataset = train
        for pid in range(num_partitions):
            yield pid, part.load_partition(pid)
        yield "test", test
        return
    if dataset.startswith("offline:"):
        raise DataUnavailable(f"dataset {dataset!r} is unknown; built-in datasets: {', '.join(OFFLINE_DATASETS)}")

    from flwr_datasets import FederatedDataset

    if dataset.startswith("parquet:"):
        kwargs = {"dataset": "parquet", "data_files": {"train": dataset.removeprefix("parquet:")}}
    elif dataset.startswith("imagefolder:"):
        kwargs = {"dataset": "imagefolder", "data_dir": dataset.removeprefix("imagefolder:")}
    else:
        kwargs = {"dataset": dataset}
    try:
        fds = FederatedDataset(partitioners={"train": part}, seed=seed, **kwargs)
        first = fds.load_partition(0)
    except Exception as err:  # the Hub or the files could not be read
        raise DataUnavailable(f"cannot load dataset {dataset!r}: {err}. {offline_options()}") from err
    yield 0, first
    for pid in range(1, num_partitions):
        yield pid, fds.load_partition(pid)
    try:
        test = fds.load_split("test")
    except (KeyError, ValueError):  # the source has no test split
        test = None
    yield "test", test


def prepare(dataset: str, num_partitions: int, partitioner: str, alpha: float, seed: int, out: Path) -> dict:
    """Write every partition (train/test split of each) and the central test split into `out`."""
    import datasets

    datasets.disable_progress_bars()
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    manifest: dict = {
        "format": 1,
        "dataset": dataset,
        "partitioner": partitioner,
        "dirichlet-alpha": alpha if partitioner == "dirichlet" else None,
        "num-partitions": num_partitions,
        "seed": seed,
        "partitions": [],
        "test": 0,
    }
    for pid, ds in partitions(dataset, num_partitions, partitioner, alpha, seed):
        if pid == "test":
            if ds is not None and len(ds):
                x, y = to_arrays(ds)
                np.savez(out / "test.npz", x=x, y=y)
                manifest["test"] = len(y)
            continue
        split = ds.train_test_split(test_size=TEST_FRACTION, seed=seed) if len(ds) > 1 else {"train": ds, "test": ds}
        x_train, y_train = to_arrays(split["train"])
        x_test, y_test = to_arrays(split["test"])
        np.savez(out / f"partition-{pid}.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
        manifest["partitions"].append({"id": pid, "train": len(y_train), "test": len(y_test)})
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(data_dir: Path) -> dict:
    path = data_dir / MANIFEST
    if not path.exists():
        raise DataUnavailable(f"{path} does not exist: run `flowerlab-data prepare --out {data_dir}` first")
    return json.loads(path.read_text())


def check_manifest(manifest: dict, *, dataset: str, partitioner: str, alpha: float, seed: int, num_partitions: int):
    """Fail clearly when the prepared data was made with other settings than this run's."""
    wanted = {
        "dataset": dataset,
        "partitioner": partitioner,
        "num-partitions": num_partitions,
        "seed": seed,
        "dirichlet-alpha": alpha if partitioner == "dirichlet" else None,
    }
    wrong = [f"{k}: prepared {manifest.get(k)!r}, run wants {v!r}" for k, v in wanted.items() if manifest.get(k) != v]
    if wrong:
        raise DataUnavailable(
            "the prepared data does not match this run (" + "; ".join(wrong) + "); prepare it again with "
            "`flowerlab-data prepare` using the run's settings"
        )


def sample(x: np.ndarray, y: np.ndarray, percentage: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded, reproducible share of the examples (at least one)."""
    if percentage >= 100:
        return x, y
    n = max(1, math.ceil(len(y) * percentage / 100))
    idx = np.sort(np.random.default_rng(seed).permutation(len(y))[:n])
    return x[idx], y[idx]


def load_partition(data_dir: Path, partition_id: int, percentage: float, seed: int):
    """(x_train, y_train, x_test, y_test) of one partition, sampled; float32 images."""
    with np.load(data_dir / f"partition-{partition_id}.npz") as f:
        x_train, y_train, x_test, y_test = (f[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    x_train, y_train = sample(x_train, y_train, percentage, seed + partition_id)
    x_test, y_test = sample(x_test, y_test, percentage, seed + 1000 + partition_id)
    return x_train.astype(np.float32), y_train, x_test.astype(np.float32), y_test


def load_test(data_dir: Path, percentage: float, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    path = data_dir / "test.npz"
    if not path.exists():
        return None
    with np.load(path) as f:
        x, y = f["x"], f["y"]
    x, y = sample(x, y, percentage, seed)
    return x.astype(np.float32), y


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flowerlab-data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="write the partitions of a dataset into a directory")
    prep.add_argument("--dataset", default="uoft-cs/cifar10")
    prep.add_argument("--num-partitions", type=int, required=True)
    prep.add_argument("--partitioner", choices=["iid", "dirichlet"], default="iid")
    prep.add_argument("--dirichlet-alpha", type=float, default=0.5)
    prep.add_argument("--seed", type=int, default=42)
    prep.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.num_partitions < 1:
        parser.error("--num-partitions must be >= 1")
    try:
        manifest = prepare(
            args.dataset, args.num_partitions, args.partitioner, args.dirichlet_alpha, args.seed, args.out
        )
    except DataUnavailable as err:
        print(f"flowerlab-data: {err}", file=sys.stderr)
        return 1
    sizes = ", ".join(f"{p['id']}: {p['train']}+{p['test']}" for p in manifest["partitions"])
    print(f"prepared {args.dataset} into {args.out}: partitions (train+test) {sizes}; central test {manifest['test']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
