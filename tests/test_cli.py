"""Tests of overparam_optax.experiments.cli: the argument checks of every script."""

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
