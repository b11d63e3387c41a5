"""absl flag helpers shared by the command lines of the examples and benchmarks.

Every script defines its flags in a ``define_flags(flag_values)`` function of its own, with
absl's ``DEFINE_*`` (bounds, enums) and the typed lists, paths and combination checks
below, and ends with ``flags.run(define_flags, main)``. absl checks every value and every
registered validator while it parses, before ``main`` runs: a bad value exits with status 1
and one line that names the flag and what it accepts, e.g.::

  FATAL Flags parsing error: flag --steps=0: 0 is not a positive integer

Why a function and not module-level ``DEFINE`` calls: the tests load several scripts into
one process, and two scripts defining ``--steps`` in absl's global registry would collide.
:func:`run` defines the flags into that registry only when the script runs as a program;
:func:`parse` defines them into a fresh registry, so a test can parse a command line
without touching the global one.

Nothing here imports jax: a script that imports its heavy modules inside ``main`` refuses
a bad flag in a fraction of a second.

Example::

  from absl import flags
  from overparam_experiments import flags as xflags

  def define_flags(flag_values=flags.FLAGS):
      flags.DEFINE_integer("steps", 80, "training steps", lower_bound=1,
                           flag_values=flag_values)
      xflags.define_int_list("depths", "2,3", "depths N", lower_bound=2,
                             flag_values=flag_values)
      xflags.define_output_dir("output-dir", "results", "where to write",
                               flag_values=flag_values)

  def main(args):  # args.steps, args.depths, args.output_dir
      ...

  if __name__ == "__main__":
      xflags.run(define_flags, main)
"""

from __future__ import annotations

import math
import os
import pathlib
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from absl import app, flags, logging

__all__ = [
    "define_enum_list",
    "define_float_list",
    "define_input_file",
    "define_int_list",
    "define_output_dir",
    "define_output_file",
    "define_platform_flags",
    "define_size_list",
    "fail",
    "make_output_dir",
    "parse",
    "require",
    "require_ordered",
    "require_depth_for_methods",
    "require_valid_method_depth",
    "run",
    "setup_platform",
]

FLAGS = flags.FLAGS
PLATFORMS = ("cpu", "gpu", "cuda", "rocm", "tpu")


# ------------------------------------------------------------------ typed comma lists


class _ListParser(flags.ArgumentParser):
    """Parses a non-empty comma list whose items pass ``item`` (a text -> value function)."""

    syntactic_help = "a comma-separated list"

    def __init__(self, item: Callable[[str], Any], what: str, dedupe: bool = False):
        self._item = item
        self._what = what
        self._dedupe = dedupe

    def parse(self, argument):
        if isinstance(argument, (list, tuple)):
            return list(argument)
        parts = [part.strip() for part in str(argument).split(",")]
        if not all(parts):
            raise ValueError(f"expected a comma list of {self._what}, with no empty item")
        values = []
        for part in parts:
            try:
                values.append(self._item(part))
            except ValueError:
                raise ValueError(f"expected a comma list of {self._what}; got {part!r}") from None
        return list(dict.fromkeys(values)) if self._dedupe else values

    def flag_type(self):
        return "comma list"


def _number(convert, low=None, high=None, *, low_open=False):
    """A converter of one item: ``convert`` then the bounds (NaN and inf always fail)."""

    def item(text: str):
        value = convert(text)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(text)
        if low is not None and (value <= low if low_open else value < low):
            raise ValueError(text)
        if high is not None and value > high:
            raise ValueError(text)
        return value

    return item


def _bounds_words(kind: str, low, high, low_open: bool) -> str:
    words = [kind]
    if low is not None:
        words.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        words.append(f"{'and ' if low is not None else ''}<= {high:g}")
    return " ".join(words)


def _define_list(name, default, help, parser, flag_values):
    serializer = flags.CsvListSerializer(",")
    flags.DEFINE(parser, name, default, help, flag_values=flag_values, serializer=serializer)


def define_int_list(
    name: str, default: str | None, help: str, *, lower_bound: int | None = 1,
    upper_bound: int | None = None, flag_values: flags.FlagValues = FLAGS,
) -> None:  # fmt: skip
    """A comma list of integers in ``[lower_bound, upper_bound]`` (e.g. ``--depths 2,3,4``)."""
    what = _bounds_words("integers", lower_bound, upper_bound, False)
    parser = _ListParser(_number(int, lower_bound, upper_bound), what)
    _define_list(name, default, help, parser, flag_values)


def define_float_list(
    name: str, default: str | None, help: str, *, lower_bound: float | None = None,
    positive: bool = False, flag_values: flags.FlagValues = FLAGS,
) -> None:  # fmt: skip
    """A comma list of finite numbers, all > 0 with ``positive``, else >= ``lower_bound``."""
    low = 0.0 if positive else lower_bound
    what = _bounds_words("finite numbers", low, None, positive)
    parser = _ListParser(_number(float, low, low_open=positive), what)
    _define_list(name, default, help, parser, flag_values)


def define_enum_list(
    name: str, default: str | None, enum_values: Sequence[str], help: str, *,
    flag_values: flags.FlagValues = FLAGS,
) -> None:  # fmt: skip
    """A comma list of items from ``enum_values``, each kept once in the given order."""
    choices = tuple(enum_values)

    def item(text):
        if text not in choices:
            raise ValueError(text)
        return text

    parser = _ListParser(item, "names from {" + ", ".join(choices) + "}", dedupe=True)
    _define_list(name, default, help, parser, flag_values)


def _matrix_size(text: str) -> tuple[int, int]:
    rows, sep, cols = text.lower().partition("x")
    if not sep:
        raise ValueError(text)
    return _number(int, 1)(rows), _number(int, 1)(cols)


def define_size_list(
    name: str, default: str | None, help: str, *, flag_values: flags.FlagValues = FLAGS
) -> None:
    """A comma list of matrix shapes ``MxN`` with positive M and N (``--sizes 64x64,256x32``)."""
    parser = _ListParser(_matrix_size, "MxN with positive integers M and N")
    _define_list(name, default, help, parser, flag_values)


# ------------------------------------------------------------------ paths


def _creatable(path: pathlib.Path) -> str | None:
    """Why ``path`` cannot be created (its closest existing ancestor), or None."""
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is a file"
            if not os.access(parent, os.W_OK):
                return f"{parent} is read-only"
            return None
    return None


def _output_dir_problem(text) -> str | None:
    if text is None:
        return None
    if not str(text):
        return "must be a folder path, got ''"
    path = pathlib.Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            return "is an existing file; it must be a folder (missing or writable)"
        if not os.access(path, os.W_OK | os.X_OK):
            return "is a read-only folder; it must be a writable folder"
        return None
    problem = _creatable(path)
    return problem and f"cannot be created: {problem}"


def _output_file_problem(text) -> str | None:
    if text is None:
        return None
    if not str(text):
        return "must be a file path, got ''"
    path = pathlib.Path(text).expanduser()
    if path.is_dir():
        return "is an existing folder; it must be a file path"
    if path.exists() and not os.access(path, os.W_OK):
        return "is a read-only file"
    problem = _creatable(path)
    return problem and f"cannot be created: {problem}"


def _path_validator(name, problem_of, flag_values):
    def check(value):
        problem = problem_of(value)
        if problem:
            raise flags.ValidationError(problem)
        return True

    flags.register_validator(name, check, flag_values=flag_values)


def define_output_dir(
    name: str, default: str | None, help: str, *, flag_values: flags.FlagValues = FLAGS
) -> None:
    """A folder to write into: an existing writable folder, or one that can be created.

    Refused while parsing: an empty path, an existing file, a path under a file or under a
    read-only folder (so that a long run cannot end by failing to save). ``main`` creates
    it first thing, with :func:`make_output_dir`.
    """
    flags.DEFINE_string(name, default, help, flag_values=flag_values)
    _path_validator(name, _output_dir_problem, flag_values)


def define_output_file(
    name: str, default: str | None, help: str, *, flag_values: flags.FlagValues = FLAGS
) -> None:
    """A file to write (new, or one to replace): not a folder, not under a read-only one."""
    flags.DEFINE_string(name, default, help, flag_values=flag_values)
    _path_validator(name, _output_file_problem, flag_values)


def define_input_file(
    name: str, default: str | None, help: str, *, flag_values: flags.FlagValues = FLAGS
) -> None:
    """An existing, readable file (or None when the flag is optional)."""
    flags.DEFINE_string(name, default, help, flag_values=flag_values)

    def problem(value):
        if value is None:
            return None
        path = pathlib.Path(value).expanduser()
        if not path.is_file():
            return "is not a file"
        if not os.access(path, os.R_OK):
            return "is not readable"
        return None

    _path_validator(name, problem, flag_values)


def make_output_dir(path, flag: str = "output-dir") -> pathlib.Path:
    """Creates the (already validated) output folder and writes a probe file into it.

    Call it first thing in ``main``: permissions the validator cannot see (a root user on a
    read-only mount, a full disk) exit through :func:`fail` here, before any work.
    """
    folder = pathlib.Path(path).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_probe_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        fail(flag, path, f"cannot write there ({error.strerror or error})")
    return folder


# ------------------------------------------------------------------ combinations


def require(
    names: Sequence[str], check: Callable[..., bool | str], message: str, *,
    flag_values: flags.FlagValues = FLAGS,
) -> None:  # fmt: skip
    """Registers a check of several flags: ``check(*values)`` is True, or the error text.

    ``message`` is used when ``check`` returns False; a returned string replaces it.
    """
    names = list(names)

    def validate(values: dict) -> bool:
        outcome = check(*(values[name] for name in names))
        if outcome is True or outcome is None:
            return True
        raise flags.ValidationError(outcome if isinstance(outcome, str) else message)

    flags.register_multi_flags_validator(names, validate, flag_values=flag_values)


def require_ordered(
    low: str, high: str, *, strict: bool = False, flag_values: flags.FlagValues = FLAGS
) -> None:
    """``--low`` must not exceed ``--high`` (must be below it with ``strict``)."""
    relation = "below" if strict else "at most"
    require(
        [low, high],
        lambda a, b: a is None or b is None or (a < b if strict else a <= b),
        f"--{low} must be {relation} --{high}",
        flag_values=flag_values,
    )


def _depth_problem(depths, method: str, depth_flag: str, method_text: str) -> str | None:
    """The library's objection to any of ``depths`` with ``method``, as a flag error."""
    import overparam_optax as opx  # the library's own check of N against the method

    for N in depths if isinstance(depths, list) else [depths]:
        try:
            opx.overparam_precondition(N, method=method)
        except ValueError as error:
            return f"--{depth_flag}={N} with {method_text}: {error}"
    return None


def require_valid_method_depth(
    depth: str, method: str, *, flag_values: flags.FlagValues = FLAGS
) -> None:
    """``--depth`` (an int or a list of ints) must be one the library accepts for ``--method``.

    The check is the library's own: ``overparam_precondition(N, method=...)`` is built
    (which computes nothing) and its ``ValueError`` becomes the flag error.
    """

    def check(depths, method_value):
        if method_value is None or depths is None:
            return True
        return _depth_problem(depths, method_value, depth, f"--{method}={method_value}") or True

    require([depth, method], check, "", flag_values=flag_values)


def require_depth_for_methods(
    depth: str, methods: Sequence[str], *, flag_values: flags.FlagValues = FLAGS
) -> None:
    """``--depth`` must suit every one of ``methods`` (a script that runs them all)."""

    def check(depths):
        for method in methods:
            problem = _depth_problem(depths, method, depth, f'method="{method}"')
            if problem:
                raise flags.ValidationError(problem)
        return True

    flags.register_validator(depth, check, flag_values=flag_values)


# ------------------------------------------------------------------ platform


def define_platform_flags(
    *, out_help: str = "JSON output path (default: benchmarks/results/)",
    flag_values: flags.FlagValues = FLAGS,
) -> None:  # fmt: skip
    """``--platform``, ``--blas-threads``, ``--quick`` and ``--out`` of the benchmarks."""
    flags.DEFINE_enum(
        "platform", None, PLATFORMS, "JAX platform (default: jax's own choice).",
        flag_values=flag_values,
    )  # fmt: skip
    flags.DEFINE_integer(
        "blas-threads", 0, "OPENBLAS_NUM_THREADS for jax's CPU LAPACK calls (0: leave the "
        "environment as it is).", lower_bound=0, flag_values=flag_values,
    )  # fmt: skip
    flags.DEFINE_boolean("quick", False, "tiny sizes, for CI smoke runs", flag_values=flag_values)
    define_output_file("out", None, out_help, flag_values=flag_values)


def setup_platform(args) -> None:
    """Applies ``--platform`` and ``--blas-threads`` and checks that the platform exists.

    Call it before any jax computation; an absent platform (``--platform gpu`` on a machine
    without one) exits through :func:`fail` instead of a traceback from jax's backends.
    """
    import jax

    from overparam_experiments import timing

    timing.setup_platform(args)
    if args.platform:
        try:
            jax.devices()
        except RuntimeError as error:
            first_line = str(error).strip().splitlines()[0]
            fail("platform", args.platform, f"no such backend on this machine ({first_line})")


# ------------------------------------------------------------------ parsing and running


def fail(name: str, value: Any, message: str) -> NoReturn:
    """Exits as absl does for a bad flag, for checks that need more than the flags.

    For what only the data or the machine can tell (a data folder without the files, a
    platform that is absent), checked right after parsing and still before any work.
    """
    sys.stderr.write(f"FATAL Flags parsing error: flag --{name}={value}: {message}\n")
    sys.stderr.write("Pass --helpshort or --helpfull to see help on flags.\n")
    sys.exit(1)


class _FiniteFloatParser(flags.FloatParser):
    """absl's float parser, refusing NaN and +-inf: absl's bounds compare, and NaN passes
    every comparison (no script means an infinite value either)."""

    def parse(self, argument):
        value = super().parse(argument)
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{argument!r} is not a finite number (NaN and inf are refused)")
        return value


def _define(define: Callable[[flags.FlagValues], None], flag_values) -> list[str]:
    before = set(flag_values)
    define(flag_values)
    names = sorted(set(flag_values) - before)
    for name in names:  # every float flag of every script, in one place
        flag = flag_values[name]
        if type(flag.parser) is flags.FloatParser:
            flag.parser = _FiniteFloatParser(flag.parser.lower_bound, flag.parser.upper_bound)
    return names


def _namespace(flag_values, names) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        **{name.replace("-", "_"): flag_values[name].value for name in names}
    )


def parse(
    define: Callable[[flags.FlagValues], None], argv: Sequence[str] = ()
) -> types.SimpleNamespace:
    """The values of a command line, defined by ``define`` into a fresh registry.

    For tests and for calling a script's functions from Python; flag names with ``-``
    become attributes with ``_``. Raises ``flags.Error`` on a bad value.
    """
    flag_values = flags.FlagValues()
    names = _define(define, flag_values)
    rest = flag_values(["script", *argv])
    if len(rest) > 1:
        raise flags.Error(f"unexpected arguments: {rest[1:]}")
    return _namespace(flag_values, names)


def run(define: Callable[[flags.FlagValues], None], main: Callable[[Any], Any]) -> None:
    """Defines the flags, parses ``sys.argv`` with absl's ``app.run`` and calls ``main(args)``.

    ``args`` is a namespace of the script's own flags (``-`` in names becomes ``_``).
    """
    names = _define(define, FLAGS)
    for name in names:  # --helpshort lists the main module's key flags, wherever defined
        FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[name])

    def app_main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        if not FLAGS["verbosity"].present:  # jax's INFO lines (absent TPU...) are noise here
            logging.set_verbosity(logging.WARNING)
        main(_namespace(FLAGS, names))

    app.run(app_main)
