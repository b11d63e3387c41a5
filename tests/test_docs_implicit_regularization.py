"""The numbers of docs/implicit_regularization.md match the JSON they come from.

No training: the tables between the marker comments are re-rendered from
``benchmarks/results/matrix_completion_cpu.json`` and ``implicit_regularization.json`` by
the functions that rendered them and must match exactly; every other number on the page
must be one of the tables' numbers, a setting of the runs, or a small integer.
"""

import json
import pathlib
import re

import pytest

from overparam_optax.experiments import implicit_regularization as ir
from overparam_optax.experiments import matrix_completion as mc

REPO = pathlib.Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "implicit_regularization.md"
RESULTS = REPO / "benchmarks" / "results"
NUMBER = re.compile(r"(?<![\w.])[-+]?(\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?(?:e[-+]\d+)?)(?![\w^])")
SMALL = {str(i) for i in range(11)}
# Settings of the runs and of the paper that the prose names (sizes, counts, years, tolerances,
# the paper code's lr 0.01, the 95 of "95%").
SETTINGS = {"100", "2,000", "5,000", "1e-3", "1e-6", "1e-7", "2019", "2018", "2020", "0.4",
            "0.02", "0.1", "20,000", "500", "1e-12", "250", "64", "0.3", "0.5", "0.8", "20",
            "95", "0.01"}  # fmt: skip


def _load(name):
    path = RESULTS / name
    if not path.exists():
        pytest.skip(f"{name} not present")
    return json.loads(path.read_text())


def _block(text: str, name: str) -> str:
    return text.split(f"<!-- {name} -->", 1)[1].split(f"<!-- /{name} -->", 1)[0].strip()


def test_completion_tables_are_rendered_from_the_json():
    runs = _load("matrix_completion_cpu.json")["runs"]
    assert _block(DOC.read_text(), "completion-tables") == mc.markdown_tables(runs)


def test_razin_cohen_and_field_tables_are_rendered_from_the_json():
    data = _load("implicit_regularization.json")
    text = DOC.read_text()
    assert _block(text, "razin-cohen-table") == ir.razin_cohen_table(data["razin_cohen"])
    assert _block(text, "field-table") == ir.field_table(data["update_field"])


def test_every_number_in_the_prose_comes_from_a_table_or_a_setting():
    text = DOC.read_text()
    tables = "".join(_block(text, n) for n in ("completion-tables", "razin-cohen-table",
                                               "field-table"))  # fmt: skip
    start_loss = _load("implicit_regularization.json")["razin_cohen"]["N=2 implicit"]["loss"][0]
    allowed = set(NUMBER.findall(tables)) | SMALL | SETTINGS | {f"{start_loss:.3f}"}
    prose = text
    for name in ("completion-tables", "razin-cohen-table", "field-table"):
        prose = prose.replace(_block(text, name), "")
    prose = re.sub(r"\]\([^)]*\)", "]", prose)  # link targets (file names) are not claims
    extra = [n for n in NUMBER.findall(prose) if n not in allowed]
    assert not extra, f"numbers not traced to the JSON: {extra}"
