"""A byte-level text corpus that needs no download: the running Python's standard library.

Every installation of CPython carries the source of its standard library, so a language
model can be trained on real text (Python code, comments and docstrings) anywhere Python
runs. :func:`load_text_corpus` builds the corpus and its train/validation split:

* **Files** (the default source): every file matching ``*.py`` directly inside
  ``sysconfig.get_path("stdlib")`` (top level only, no sub-packages, no ``site-packages``),
  sorted by file name, read as raw bytes and concatenated in that order. For CPython 3.11.7
  that is 168 files and 4,698,388 bytes, from ``__future__.py`` to ``zipimport.py``; other
  versions hold other files, so the log of a run records the Python version, the file count
  and a SHA-256 of the corpus.
* **Any file instead**: ``text_file=PATH`` reads that one file as raw bytes.
* **Split**: the first ``floor((1 - validation_fraction) * n)`` bytes are the training
  text, the remaining bytes the validation text (10% by default). For the standard
  library this holds out the end of the alphabet: for CPython 3.11.7, 4,228,549 training
  bytes and 469,839 validation bytes, from byte 66,090 of ``turtle.py`` to the end of
  ``zipimport.py``. No validation byte is seen in training.

Tokens are the byte values 0..255 (vocabulary 256, no tokenizer). :func:`windows` cuts a
token array into (input, target) pairs of fixed length for next-token prediction. A file
that cannot be used raises :class:`~overparam_experiments.data.DataError`, as the
other loaders do.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import sys
import sysconfig
from typing import NamedTuple

import numpy as np

from overparam_experiments.data import DataError

__all__ = [
    "VOCAB_SIZE",
    "TextCorpus",
    "evenly_spaced_windows",
    "load_text_corpus",
    "stdlib_source_files",
    "windows",
]

#: The size of the byte-level vocabulary (every token is one byte).
VOCAB_SIZE = 256


class TextCorpus(NamedTuple):
    """A byte corpus split into training and validation text.

    Attributes:
      train: uint8 array, the training bytes.
      validation: uint8 array, the held-out bytes (they follow the training bytes).
      source: a human-readable description of where the bytes come from.
      files: the files read, in order (absolute paths as strings).
      sha256: hex digest of the whole corpus (train followed by validation).
    """

    train: np.ndarray
    validation: np.ndarray
    source: str
    files: list[str]
    sha256: str

    def describe(self) -> dict:
        """A JSON-ready summary (no bytes): source, file count and names, sizes, digest."""
        return {
            "source": self.source,
            "python": sys.version.split()[0],
            "num_files": len(self.files),
            "first_file": pathlib.Path(self.files[0]).name if self.files else None,
            "last_file": pathlib.Path(self.files[-1]).name if self.files else None,
            "train_bytes": int(self.train.size),
            "validation_bytes": int(self.validation.size),
            "sha256": self.sha256,
        }


def stdlib_source_files() -> list[pathlib.Path]:
    """The default corpus files: ``*.py`` directly in the stdlib directory, sorted by name.

    Returns:
      The paths, sorted by file name (byte-wise, as Python sorts strings).

    Raises:
      DataError: if the interpreter's standard-library directory holds no ``.py`` file
        (e.g. a distribution that ships only bytecode); pass a text file instead.
    """
    root = pathlib.Path(sysconfig.get_path("stdlib"))
    files = sorted((p for p in root.glob("*.py") if p.is_file()), key=lambda p: p.name)
    if not files:
        raise DataError(
            f"No *.py files in the standard-library directory {str(root)!r}; "
            "pass a text file instead (--text-file PATH)."
        )
    return files


def load_text_corpus(
    text_file: str | os.PathLike | None = None, *, validation_fraction: float = 0.1
) -> TextCorpus:
    """Reads the corpus and splits it at a byte offset into train and validation text.

    Args:
      text_file: a file to read instead of the standard library (any bytes; it need not
        be UTF-8).
      validation_fraction: the share of bytes, taken from the end, held out for
        validation; strictly between 0 and 1.

    Returns:
      A :class:`TextCorpus`.

    Raises:
      ValueError: on a bad ``validation_fraction``.
      DataError: if ``text_file`` is not a readable file, or the standard library has no
        source files.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction!r}.")
    if text_file is None:
        files = stdlib_source_files()
        source = f"Python {sys.version.split()[0]} standard library ({files[0].parent})"
    else:
        path = pathlib.Path(text_file).expanduser()
        if not path.is_file():
            raise DataError(f"{str(path)!r} is not a file.")
        files = [path]
        source = str(path)
    try:
        raw = b"".join(f.read_bytes() for f in files)
    except OSError as error:
        raise DataError(f"Could not read the corpus: {error}") from error
    tokens = np.frombuffer(raw, dtype=np.uint8)
    split = int(np.floor((1.0 - validation_fraction) * tokens.size))
    return TextCorpus(
        train=tokens[:split],
        validation=tokens[split:],
        source=source,
        files=[str(f) for f in files],
        sha256=hashlib.sha256(raw).hexdigest(),
    )


def windows(tokens: np.ndarray, context: int, stride: int | None = None):
    """(inputs, targets) windows for next-token prediction, as zero-copy views.

    Window i covers ``tokens[i * stride : i * stride + context + 1]``: its inputs are the
    first ``context`` bytes and its targets the same bytes shifted by one.

    Args:
      tokens: a 1-D token array.
      context: the sequence length of one example.
      stride: offset between consecutive windows; default ``context`` (non-overlapping
        targets, every byte after the first predicted once).

    Returns:
      ``(inputs, targets)``, two read-only arrays of shape ``(num_windows, context)`` with
      the dtype of ``tokens``.

    Raises:
      ValueError: if the text is shorter than one window, or on non-positive sizes.
    """
    stride = context if stride is None else stride
    if context < 1 or stride < 1:
        raise ValueError(f"context and stride must be positive, got {context}, {stride}.")
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or tokens.size < context + 1:
        raise ValueError(
            f"Need a 1-D text of at least context + 1 = {context + 1} tokens, got shape "
            f"{tokens.shape}."
        )
    view = np.lib.stride_tricks.sliding_window_view(tokens, context + 1)[::stride]
    return view[:, :-1], view[:, 1:]


def evenly_spaced_windows(tokens: np.ndarray, context: int, count: int):
    """``count`` (inputs, targets) windows spread evenly over a text: a fixed eval set.

    Uses non-overlapping windows (:func:`windows` with ``stride=context``) and keeps
    ``count`` of them at evenly spaced indices (all of them if there are fewer), so that
    the evaluation covers the whole validation text at a fixed, small cost.

    Returns:
      ``(inputs, targets)`` as contiguous arrays of shape ``(min(count, available), context)``.
    """
    inputs, targets = windows(tokens, context)
    if count < 1:
        raise ValueError(f"count must be positive, got {count}.")
    index = np.unique(np.linspace(0, len(inputs) - 1, min(count, len(inputs))).round().astype(int))
    return np.ascontiguousarray(inputs[index]), np.ascontiguousarray(targets[index])
