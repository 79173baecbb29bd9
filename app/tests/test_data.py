import json

import numpy as np
import pytest

from flowerlab_app import data


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    manifest = data.prepare("offline:digits", 3, "iid", 0.5, 7, out)
    return out, manifest


def test_prepare_writes_partitions_test_split_and_manifest(prepared):
    out, manifest = prepared
    assert json.loads((out / data.MANIFEST).read_text()) == manifest
    assert [p["id"] for p in manifest["partitions"]] == [0, 1, 2]
    total = sum(p["train"] + p["test"] for p in manifest["partitions"]) + manifest["test"]
    assert total == 1797  # every digit exactly once
    for pid in range(3):
        x_train, y_train, x_test, y_test = data.load_partition(out, pid, 100.0, 7)
        assert x_train.dtype == np.float32 and x_train.shape[1:] == (32, 32, 3)
        assert x_train.min() >= 0.0 and x_train.max() <= 1.0
        assert y_train.dtype == np.int64 and set(np.unique(y_train)) <= set(range(10))
        assert len(x_test) == len(y_test) > 0


def test_iid_partitions_are_disjoint(prepared):
    out, _ = prepared
    seen = set()
    for pid in range(3):
        x_train, _, x_test, _ = data.load_partition(out, pid, 100.0, 7)
        rows = {x.tobytes() for x in np.concatenate([x_train, x_test])}
        # the digits data set has a few duplicate images; partitions still do not overlap noticeably
        assert len(seen & rows) <= 5
        seen |= rows


def test_sampling_is_seeded_and_applies_to_train_and_test(prepared):
    out, _ = prepared
    full = data.load_partition(out, 1, 100.0, 7)
    a = data.load_partition(out, 1, 25.0, 7)
    b = data.load_partition(out, 1, 25.0, 7)
    c = data.load_partition(out, 1, 25.0, 8)
    assert len(a[1]) == -(-len(full[1]) * 25 // 100) and len(a[3]) == -(-len(full[3]) * 25 // 100)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[2], b[2])
    assert not np.array_equal(a[1], c[1])


def test_sample_keeps_at_least_one_example():
    x, y = np.zeros((3, 2), np.float32), np.arange(3)
    assert len(data.sample(x, y, 0.001, 1)[1]) == 1


def test_dirichlet_partitioning_is_skewed_and_reproducible(tmp_path):
    m1 = data.prepare("offline:digits", 4, "dirichlet", 0.1, 3, tmp_path / "a")
    m2 = data.prepare("offline:digits", 4, "dirichlet", 0.1, 3, tmp_path / "b")
    assert m1["partitions"] == m2["partitions"]
    assert m1["dirichlet-alpha"] == 0.1
    label_sets = []
    for pid in range(4):
        _, y, _, _ = data.load_partition(tmp_path / "a", pid, 100.0, 3)
        counts = np.bincount(y, minlength=10) / len(y)
        label_sets.append(counts.max())
    assert max(label_sets) > 0.3  # alpha 0.1: some partition is dominated by few labels


def test_manifest_mismatch_is_a_clear_error(prepared):
    _, manifest = prepared
    with pytest.raises(data.DataUnavailable, match=r"num-partitions: prepared 3, run wants 4"):
        data.check_manifest(manifest, dataset="offline:digits", partitioner="iid", alpha=0.5, seed=7, num_partitions=4)
    data.check_manifest(manifest, dataset="offline:digits", partitioner="iid", alpha=0.9, seed=7, num_partitions=3)


def test_missing_manifest_names_the_prepare_command(tmp_path):
    with pytest.raises(data.DataUnavailable, match="flowerlab-data prepare"):
        data.read_manifest(tmp_path)


def test_unreachable_hub_names_the_offline_options(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants

    # HF_HUB_OFFLINE is read when these modules are imported (an earlier test may have imported them):
    # without their flags the Hub is really dialled, and the test waits for its timeouts.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(data.DataUnavailable, match="offline:digits.*parquet:.*imagefolder:"):
        data.prepare("uoft-cs/cifar10", 2, "iid", 0.5, 1, tmp_path)


def test_local_parquet_dataset(tmp_path):
    import datasets

    rng = np.random.default_rng(0)
    images = (rng.random((40, 32, 32, 3)) * 255).astype(np.uint8)
    datasets.Dataset.from_dict({"img": images, "label": rng.integers(0, 10, 40)}).to_parquet(tmp_path / "t.parquet")
    manifest = data.prepare(f"parquet:{tmp_path / 't.parquet'}", 2, "iid", 0.5, 1, tmp_path / "out")
    assert sum(p["train"] + p["test"] for p in manifest["partitions"]) == 40
    assert manifest["test"] == 0
    x, _, _, _ = data.load_partition(tmp_path / "out", 0, 100.0, 1)
    assert x.dtype == np.float32 and x.max() <= 1.0


def test_cli_reports_errors_without_a_traceback(tmp_path, capsys):
    assert data.main(["prepare", "--dataset", "offline:nope", "--num-partitions", "2", "--out", str(tmp_path)]) == 1
    assert "built-in datasets: offline:digits" in capsys.readouterr().err
