"""The numbers about the default in docs/performance.md and README.md match their JSON."""

import json
import pathlib

import pytest

from overparam_optax.experiments import default_report

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
