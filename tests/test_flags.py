"""Tests of the scripts' command-line checks: overparam_experiments.flags (absl)."""

import pytest


def _define(flag_values):
    from absl import flags

    from overparam_experiments import flags as xflags

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
    from overparam_experiments import flags as xflags

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

    from overparam_experiments import flags as xflags

    with pytest.raises(flags.Error) as error:
        xflags.parse(_define, argv)
    assert message in str(error.value)


def test_flags_output_paths(tmp_path):
    from absl import flags

    from overparam_experiments import flags as xflags

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

    from overparam_experiments import flags as xflags

    before = set(flags.FLAGS)
    xflags.parse(_define, ["--depth", "4"])
    assert set(flags.FLAGS) == before
