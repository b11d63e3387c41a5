"""The numbers about the default in docs/performance.md and README.md match their JSON."""

import json
import pathlib

import pytest

import default_report

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PERFORMANCE = (REPO / "docs" / "performance.md").read_text()
README = " ".join((REPO / "README.md").read_text().split())


def _load(name):
    path = RESULTS / name
    if not path.exists():
        pytest.skip(f"{name} not present")
    return json.loads(path.read_text())


def _block(start: str, end: str) -> str:
    return PERFORMANCE.split(start, 1)[1].split(end, 1)[0].strip()


def test_fidelity_table_is_the_json_rendered():
    record = _load("fidelity_cpu.json")
    rendered = default_report.fidelity_table(record)
    assert _block("<!-- fidelity-table-start -->", "<!-- fidelity-table-end -->") == rendered


def test_precision_table_is_the_json_rendered():
    record = _load("fidelity_precision_cpu.json")
    rendered = default_report.precision_table(record)
    assert _block("<!-- precision-table-start -->", "<!-- precision-table-end -->") == rendered


def test_cost_tables_are_the_json_rendered():
    record = _load("cost_cpu.json")
    rendered = default_report.cost_tables(record)
    assert _block("<!-- cost-tables-start -->", "<!-- cost-tables-end -->") == rendered


def _step_time_records():
    return _load("step_time_tracked_idle_cpu.json"), _load("step_time_tracked_busy1_cpu.json")


def test_step_time_table_is_the_json_rendered():
    rendered = default_report.step_time_table(*_step_time_records())
    assert _block("<!-- step-time-table-start -->", "<!-- step-time-table-end -->") == rendered


def test_readme_fidelity_sentence_matches_the_json():
    assert default_report.fidelity_sentence(_load("fidelity_cpu.json")) in README


def test_readme_step_time_sentence_matches_the_json():
    assert default_report.step_time_sentence(*_step_time_records()) in README


def test_readme_cost_sentence_matches_the_json():
    assert default_report.cost_sentence(_load("cost_cpu.json")) in README


# Issue 36, item 13: the README's sentence on the precision record, and performance.md's options.
_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}


def _precision_sentence(record: dict) -> str:
    """What fidelity_precision_cpu.json shows for bf16x3 and TF32, as the README says it."""
    tasks = record["tasks"].values()
    fresh = [(t["configs"]["default_bf16x3"]["decompositions"],
              t["configs"]["default"]["decompositions"]) for t in tasks]  # fmt: skip
    same = sum(a == b for a, b in fresh)
    others = " and ".join(f"{a} against {b}" for a, b in fresh if a != b)
    worst = max(t["configs"]["default_bf16x3"]["ratio_to_exact_gap"] for t in tasks)
    tf32 = max(t["configs"]["default_tf32"]["decompositions"] / t["configs"]["default"]
               ["decompositions"] for t in tasks)  # fmt: skip
    return (f"(on CPU, {len(fresh)} of those tasks), three bfloat16 passes kept the default "
            f"within {worst:.3f}x of the exact rule's distance, with as many fresh "
            f"decompositions as float32 on {same} tasks and {others} on the other "
            f"{_WORDS[len(fresh) - same]}; TF32 decomposed up to {tf32:.0f}x as often, one "
            "bfloat16 pass on nearly every update")  # fmt: skip


def test_readme_precision_sentence_matches_the_json():
    record = _load("fidelity_precision_cpu.json")
    assert _precision_sentence(record) in README
    bf16 = [t["configs"]["default_bf16"] for t in record["tasks"].values()]
    fresh = sum(c["decompositions"] for c in bf16) / sum(c["matrix_updates"] for c in bf16)
    assert fresh > 0.95  # "nearly every update"


def test_readme_fidelity_claim_names_the_runs_it_rests_on():
    """The fidelity tasks are 100-500-step full-batch runs, not whole trainings."""
    assert "Over whole trainings" not in README
    assert "On 100-500-step full-batch trainings (the fidelity benchmark)" in README


def _options_section() -> str:
    return " ".join(PERFORMANCE.split("\n## The options\n", 1)[1].split("\n## ", 1)[0].split())


def test_options_section_states_the_real_tolerance_and_precision():
    from overparam_optax import methods, numerics

    options = _options_section()
    tolerance = f"{methods.Tracked().tolerance:.0e}".replace("e-0", "e-")  # 3e-6
    assert f"`method=methods.Tracked(tolerance=...)` sets its only knob (default {tolerance})" \
        in options
    assert "`precision=None` (the default) picks the matmul precision per platform" in options
    assert "on every platform" not in options
    assert "(default 1e-3)" not in options
    names = {"cpu": "`HIGHEST`", "cuda": "`BF16_BF16_F32_X3`", "tpu": "`HIGH`"}
    for platform, precision in numerics.PLATFORM_PRECISION.items():
        assert precision.name in names[platform], platform
        assert names[platform] in options, platform


def test_performance_md_opens_with_the_defaults_summary():
    """Issue 36, item 20: the page opens with what the default bounds and costs, from JSON."""
    summary = " ".join(_block("<!-- summary-start -->", "<!-- summary-end -->").split())
    assert PERFORMANCE.index("<!-- summary-start -->") < PERFORMANCE.index("\n## ")
    assert default_report.fidelity_sentence(_load("fidelity_cpu.json")) in summary
    assert default_report.step_time_sentence(*_step_time_records()) in summary
    assert default_report.cost_sentence(_load("cost_cpu.json")) in summary
    from overparam_optax import methods

    tolerance = f"{methods.Tracked().tolerance:.0e}".replace("e-0", "e-")
    assert f"relative error within the tolerance (default {tolerance}), to first order" in summary
