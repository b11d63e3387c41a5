"""Argument checks for the command lines of the examples and benchmarks.

Each function here is an argparse ``type=``: it converts the text of one argument or raises
``argparse.ArgumentTypeError``, which argparse reports as ``prog: error: argument --steps:
must be a positive integer, got '0'`` with exit status 2, before the script does any work.
Checks that involve two arguments go through :func:`require_ordered` (or a direct
``parser.error``) right after parsing.

Example::

    parser.add_argument("--steps", type=cli.positive_int, default=80)
    parser.add_argument("--depths", type=cli.comma_list(cli.positive_int), default="2,3")
    parser.add_argument("--output-dir", type=cli.output_dir, default="results")
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
from collections.abc import Callable
from typing import Any

__all__ = [
    "comma_list",
    "finite_float",
    "nonnegative_float",
    "nonnegative_int",
    "output_dir",
    "output_file",
    "positive_float",
    "positive_int",
    "require_ordered",
]


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def _float(text: str, what: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (steps, sizes, widths, depths): ``'0'``, ``'-5'`` and ``'2.5'`` fail."""
    value = _int(text, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (seeds, counts where 0 means "off")."""
    value = _int(text, "a non-negative integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return value


def finite_float(text: str) -> float:
    """Any finite number (e.g. a log10 exponent); ``'nan'`` and ``'inf'`` fail."""
    return _float(text, "a finite number")


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates, scales, loss exponents)."""
    value = _float(text, "a positive number")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def nonnegative_float(text: str) -> float:
    """A finite number >= 0 (momentum, weight decay)."""
    value = _float(text, "a non-negative number")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text!r}")
    return value


def comma_list(item: Callable[[str], Any]) -> Callable[[str], list]:
    """A ``type=`` for a non-empty comma-separated list whose items pass ``item``.

    ``comma_list(positive_int)("2,3,4") == [2, 3, 4]``; an empty item (``"2,,3"``) or a bad
    one fails with a message that names it.
    """

    def parse(text: str) -> list:
        parts = [part.strip() for part in str(text).split(",")]
        if not any(parts) or not all(parts):
            raise argparse.ArgumentTypeError(
                f"must be a comma-separated list with no empty item, got {text!r}"
            )
        values = []
        for part in parts:
            try:
                values.append(item(part))
            except argparse.ArgumentTypeError as error:
                if len(parts) == 1:
                    raise
                raise argparse.ArgumentTypeError(f"item {part!r} of {text!r} {error}") from None
        return values

    parse.__name__ = f"comma_list({getattr(item, '__name__', 'item')})"
    return parse


def _check_parents(path: pathlib.Path, text: str) -> None:
    """The closest existing ancestor of ``path`` must be a writable folder."""
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise argparse.ArgumentTypeError(f"cannot create {text!r}: {parent} is a file")
            if not os.access(parent, os.W_OK):
                raise argparse.ArgumentTypeError(f"cannot create {text!r}: {parent} is read-only")
            return


def output_dir(text: str) -> str:
    """A folder to write results into: missing (it will be created) or an existing folder.

    Fails for an empty string, an existing file, or a path under a file or a read-only
    folder, so that a long run cannot end by failing to save.
    """
    if not str(text):
        raise argparse.ArgumentTypeError("must be a folder path, got ''")
    path = pathlib.Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise argparse.ArgumentTypeError(f"{text!r} is an existing file, not a folder")
        if not os.access(path, os.W_OK):
            raise argparse.ArgumentTypeError(f"{text!r} is a read-only folder")
        return str(text)
    _check_parents(path, text)
    return str(text)


def output_file(text: str) -> str:
    """A file to write: new, or an existing file to replace; not a folder.

    Fails for an empty string, an existing folder, or a path under a file or a read-only
    folder.
    """
    if not str(text):
        raise argparse.ArgumentTypeError("must be a file path, got ''")
    path = pathlib.Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is an existing folder, not a file")
    _check_parents(path, text)
    return str(text)


def require_ordered(
    parser: argparse.ArgumentParser, low: float, high: float, low_flag: str, high_flag: str
) -> None:
    """Exits through ``parser.error`` (status 2) unless ``low <= high``.

    For ranges given as two options, e.g. ``--lr-min`` and ``--lr-max``.
    """
    if low > high:
        parser.error(f"{low_flag} ({low:g}) must not exceed {high_flag} ({high:g})")
