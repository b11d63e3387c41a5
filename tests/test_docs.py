"""The examples of docs/getting_started.md and of the core docstrings run and say what they
claim; the API-coverage check of the docs site finds a missing name."""

import doctest
import pathlib
import re

import pytest

import overparam_experiments.training
import overparam_optax.linalg
import overparam_optax.sharding
import overparam_optax.testing
import overparam_optax.transform
from tests.scripts import load_script

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"


def test_getting_started_examples_run():
    text = (DOCS / "getting_started.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 8
    namespace = {}
    for block in blocks:  # one namespace: later blocks use names defined by earlier ones
        exec(compile(block, "docs/getting_started.md", "exec"), namespace)


def test_api_coverage_check_finds_a_missing_name():
    """docs/api_coverage.py: every public name counts; a re-export is covered by identity."""
    coverage = load_script("docs/api_coverage.py")
    modules = coverage.public_modules()
    assert "overparam_optax.methods.newton" in modules and "overparam_optax.testing" in modules
    public = coverage.public_names(modules)
    assert public["overparam_optax.methods.newton.NEWTON_MAX_DEPTH"] == 128
    # Documented once at the top level: the submodules' entries for the same objects count.
    documented = {name for name in public if name != "overparam_optax.numerics.safe_reciprocal"}
    documented -= {"overparam_optax.transform.overparam_precondition"}
    assert coverage.missing_entries(public, documented) == [
        "overparam_optax.numerics.safe_reciprocal"
    ]
    # A constant is not matched by value: it needs its own entry.
    documented.discard("overparam_optax.methods.newton.NEWTON_MAX_DEPTH")
    assert "overparam_optax.methods.newton.NEWTON_MAX_DEPTH" in coverage.missing_entries(
        public, documented
    )


@pytest.mark.parametrize(
    "module",
    [
        overparam_optax.linalg,
        overparam_optax.sharding,
        overparam_optax.transform,
        overparam_optax.testing,
        overparam_experiments.training,
    ],
)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0


def _load_benchmark(name):
    return load_script(f"benchmarks/{name}.py")


def test_transformer_md_tables_are_those_of_the_results_json():
    """docs/transformer.md quotes the tables that benchmarks/transformer_lm.py makes."""
    import json

    results = DOCS.parent / "benchmarks" / "results"
    result = json.loads((results / "transformer_lm_cpu.json").read_text())
    tables = _load_benchmark("transformer_lm").tables_markdown(result)
    assert tables == (results / "transformer_lm_tables.md").read_text()
    doc = (DOCS / "transformer.md").read_text()
    table_lines = [line for line in tables.splitlines() if line.startswith("|")]
    assert len(table_lines) >= 15
    missing = [line for line in table_lines if line not in doc]
    assert not missing, missing


def test_transformer_md_default_table_is_that_of_its_json():
    """docs/transformer.md quotes the default-vs-exact table of transformer_default.py."""
    import json

    record = DOCS.parent / "benchmarks" / "results" / "transformer_default_cpu.json"
    table = _load_benchmark("transformer_default").table_markdown(json.loads(record.read_text()))
    assert table in (DOCS / "transformer.md").read_text()


def test_transformer_md_recipe_is_the_library_function():
    """The copyable recipe in docs/transformer.md gives the same tree as the helper."""
    import jax
    import jax.numpy as jnp

    from overparam_experiments import models

    (block,) = [
        b
        for b in re.findall(r"```python\n(.*?)```", (DOCS / "transformer.md").read_text(), re.S)
        if "def transformer_dimension_numbers" in b
    ]
    namespace = {}
    exec(compile(block, "docs/transformer.md", "exec"), namespace)
    model = models.TransformerLM(context=8, d_model=16, num_heads=2, num_layers=2)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    for flags in ({}, {"embeddings": True, "head": True}):
        copied = namespace["transformer_dimension_numbers"](params, **flags)
        assert copied == models.transformer_dimension_numbers(params, **flags)
    assert namespace["tx"].init(params) is not None


# Issue 36, item 20: math as math, and MathJax shipped with the site.
def _prose(text: str) -> str:
    """A page without its math ($$ blocks, $ inline), code blocks and inline code."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"\$\$.*?\$\$", "", text, flags=re.S)
    text = re.sub(r"`[^`]*`", "", text)
    return re.sub(r"\$[^$\n]+\$", "", text)


def test_math_md_renders_its_formulas_as_math():
    text = (DOCS / "math.md").read_text()
    assert "```\n    " not in text and "```text" not in text, "a formula in a code block"
    assert not re.search(r"^ {4}\S", text, re.M), "a formula indented as a code block"
    assert text.count("$$") >= 14  # the 7 displayed formulas
    prose = _prose(text)
    assert not re.search(r"\w\*\w", prose), "an unescaped * between words turns text italic"
    for ascii_math in ("eta*", "||W||", "W^T", "sum_{j=1..N}", "<-"):
        assert ascii_math not in prose, ascii_math


def test_docs_site_ships_mathjax_instead_of_a_cdn():
    conf = (DOCS / "conf.py").read_text()
    assert '"sphinx-mathjax-offline"' in conf
    assert "mathjax_path =" not in conf  # the extension points it at _static/mathjax/
    pyproject = (DOCS.parent / "pyproject.toml").read_text()
    docs_extra = pyproject.split("\ndocs = [", 1)[1].split("]", 1)[0]
    assert '"sphinx-mathjax-offline' in docs_extra
