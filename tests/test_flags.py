"""Tests of the scripts' command-line checks: experiments.cli (argparse, the step-time and
accelerator-suite benchmarks) and experiments.flags (absl, every other script)."""

import argparse
import math

import pytest

from overparam_optax.experiments import cli


@pytest.mark.parametrize(
    "check, text, expected",
    [
        (cli.positive_int, "3", 3),
        (cli.nonnegative_int, "0", 0),
        (cli.positive_float, "1e-3", 1e-3),
        (cli.nonnegative_float, "0", 0.0),
        (cli.finite_float, "-5", -5.0),
    ],
)
def test_good_values_convert(check, text, expected):
    value = check(text)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    "check, text, message",
    [
        (cli.positive_int, "0", "must be a positive integer, got '0'"),
        (cli.positive_int, "-5", "must be a positive integer, got '-5'"),
        (cli.positive_int, "2.5", "must be a positive integer, got '2.5'"),
        (cli.positive_int, "two", "must be a positive integer"),
        (cli.nonnegative_int, "-1", "must be a non-negative integer"),
        (cli.positive_float, "0", "must be a positive number"),
        (cli.positive_float, "-0.1", "must be a positive number"),
        (cli.positive_float, "inf", "must be a positive number"),
        (cli.nonnegative_float, "nan", "must be a non-negative number"),
        (cli.nonnegative_float, "-1e-9", "must be a non-negative number"),
        (cli.finite_float, "-inf", "must be a finite number"),
    ],
)
def test_bad_values_are_refused(check, text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        check(text)


def test_comma_list():
    depths = cli.comma_list(cli.positive_int)
    assert depths("2, 3,4") == [2, 3, 4]
    assert depths("5") == [5]
    with pytest.raises(argparse.ArgumentTypeError, match="item '0' of '2,0' must be a positive"):
        depths("2,0")
    with pytest.raises(argparse.ArgumentTypeError, match="no empty item"):
        depths("2,,3")
    with pytest.raises(argparse.ArgumentTypeError, match="no empty item"):
        depths("")
    exponents = cli.comma_list(cli.positive_float)("4,2")
    assert exponents == [4.0, 2.0] and all(math.isfinite(p) for p in exponents)


def test_output_dir(tmp_path):
    assert cli.output_dir(str(tmp_path)) == str(tmp_path)  # an existing folder
    assert cli.output_dir(str(tmp_path / "new" / "deeper")) == str(tmp_path / "new" / "deeper")
    existing = tmp_path / "file.json"
    existing.write_text("{}")
    with pytest.raises(argparse.ArgumentTypeError, match="is an existing file, not a folder"):
        cli.output_dir(str(existing))
    with pytest.raises(argparse.ArgumentTypeError, match="is a file"):
        cli.output_dir(str(existing / "below"))
    with pytest.raises(argparse.ArgumentTypeError, match="folder path"):
        cli.output_dir("")


def test_output_file(tmp_path):
    existing = tmp_path / "result.json"
    existing.write_text("{}")
    assert cli.output_file(str(existing)) == str(existing)  # replaced when the run ends
    assert cli.output_file(str(tmp_path / "sub" / "new.png")) == str(tmp_path / "sub" / "new.png")
    with pytest.raises(argparse.ArgumentTypeError, match="is an existing folder, not a file"):
        cli.output_file(str(tmp_path))
    with pytest.raises(argparse.ArgumentTypeError, match="is a file"):
        cli.output_file(str(existing / "x.png"))


def test_types_in_a_parser_exit_with_status_2(capsys):
    parser = argparse.ArgumentParser(prog="script")
    parser.add_argument("--steps", type=cli.positive_int, default=10)
    parser.add_argument("--lr-min", type=cli.finite_float, default=-5.0)
    parser.add_argument("--lr-max", type=cli.finite_float, default=0.0)
    assert parser.parse_args([]).steps == 10
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--steps", "0"])
    assert exit_info.value.code == 2
    assert "argument --steps: must be a positive integer, got '0'" in capsys.readouterr().err
    args = parser.parse_args(["--lr-min", "1", "--lr-max", "-1"])
    with pytest.raises(SystemExit) as exit_info:
        cli.require_ordered(parser, args.lr_min, args.lr_max, "--lr-min", "--lr-max")
    assert exit_info.value.code == 2
    assert "--lr-min (1) must not exceed --lr-max (-1)" in capsys.readouterr().err
    cli.require_ordered(parser, -1.0, -1.0, "--lr-min", "--lr-max")  # an empty range is fine


# --------------------------------------------------------------------------------------
# overparam_optax.experiments.flags: the absl flag helpers of the scripts
# --------------------------------------------------------------------------------------


def _define(flag_values):
    from absl import flags

    from overparam_optax.experiments import flags as xflags

    fv = flag_values
    flags.DEFINE_integer("depth", 3, "N", lower_bound=1, flag_values=fv)
    flags.DEFINE_enum("method", "svd", ("svd", "eigh", "newton"), "method", flag_values=fv)
    xflags.require_valid_method_depth("depth", "method", flag_values=fv)
    xflags.define_int_list("depths", "2,3", "depths", lower_bound=2, flag_values=fv)
    xflags.define_float_list("rates", "0.1,1e-3", "rates", positive=True, flag_values=fv)
    xflags.define_enum_list("modes", "a,b", ("a", "b", "c"), "modes", flag_values=fv)
    xflags.define_size_list("shapes", "4x3", "shapes", flag_values=fv)
    flags.DEFINE_float("low", -5.0, "low", flag_values=fv)
    flags.DEFINE_float("high", 0.0, "high", flag_values=fv)
    xflags.require_ordered("low", "high", flag_values=fv)
    xflags.define_output_dir("output-dir", None, "folder", flag_values=fv)
    xflags.define_output_file("out", None, "file", flag_values=fv)


def test_flags_parse_good_values():
    from overparam_optax.experiments import flags as xflags

    args = xflags.parse(_define, [])
    assert (args.depths, args.rates, args.modes, args.shapes) == ([2, 3], [0.1, 1e-3],
                                                                  ["a", "b"], [(4, 3)])
    args = xflags.parse(_define, ["--depths", "4, 5", "--modes=c,a,c", "--shapes", "8x2,3X1",
                                  "--depth", "200", "--method", "eigh"])  # fmt: skip
    assert (args.depths, args.modes, args.shapes) == ([4, 5], ["c", "a"], [(8, 2), (3, 1)])
    assert xflags.parse(_define, ["--low", "-1", "--high", "-1"]).low == -1.0  # empty range


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--depths", "1,2"], "flag --depths=1,2: expected a comma list of integers >= 2; got '1'"),
        (["--depths", "2,,3"], "no empty item"),
        (["--depths", "x"], "got 'x'"),
        (["--rates", "0.1,0"], "finite numbers > 0; got '0'"),
        (["--rates", "inf"], "got 'inf'"),
        (["--modes", "a,z"], "names from {a, b, c}; got 'z'"),
        (["--shapes", "10x0"], "MxN with positive integers M and N; got '10x0'"),
        (["--low", "1", "--high", "-1"], "--low must be at most --high"),
        (["--depth", "200", "--method", "newton"], 'method="newton" supports N <= '),
        (["--depth", "0"], "flag --depth=0"),
    ],
)
def test_flags_refuse_bad_values_naming_the_flag(argv, message):
    from absl import flags

    from overparam_optax.experiments import flags as xflags

    with pytest.raises(flags.Error) as error:
        xflags.parse(_define, argv)
    assert message in str(error.value)


def test_flags_output_paths(tmp_path):
    from absl import flags

    from overparam_optax.experiments import flags as xflags

    existing = tmp_path / "file.json"
    existing.write_text("{}")
    assert xflags.parse(_define, ["--output-dir", str(tmp_path / "new" / "deeper")]).output_dir
    assert xflags.parse(_define, ["--out", str(existing)]).out == str(existing)  # replaced
    for argv, message in (
        (["--output-dir", str(existing)], "is an existing file"),
        (["--output-dir", str(existing / "below")], "is a file"),
        (["--output-dir", ""], "must be a folder path"),
        (["--out", str(tmp_path)], "is an existing folder"),
        (["--out", str(existing / "x.png")], "is a file"),
    ):
        with pytest.raises(flags.Error, match=message):
            xflags.parse(_define, argv)
    made = xflags.make_output_dir(tmp_path / "made" / "here")
    assert made.is_dir() and list(made.iterdir()) == []  # the write probe is removed


def test_flags_parse_leaves_the_global_registry_alone():
    from absl import flags

    from overparam_optax.experiments import flags as xflags

    before = set(flags.FLAGS)
    xflags.parse(_define, ["--depth", "4"])
    assert set(flags.FLAGS) == before
