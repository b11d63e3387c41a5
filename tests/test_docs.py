"""The examples in docs/api.md and in the core docstrings run and say what they claim."""

import doctest
import pathlib
import re

import pytest

import overparam_optax.experiments.training
import overparam_optax.linalg
import overparam_optax.sharding
import overparam_optax.transform
from tests.scripts import load_script

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"


def test_api_md_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / "api.md").read_text(), re.S)
    assert len(blocks) >= 5
    namespace = {}
    for block in blocks:  # one namespace: later blocks use names defined by earlier ones
        exec(compile(block, "docs/api.md", "exec"), namespace)


@pytest.mark.parametrize(
    "module",
    [
        overparam_optax.linalg,
        overparam_optax.sharding,
        overparam_optax.transform,
        overparam_optax.experiments.training,
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


def test_transformer_md_recipe_is_the_library_function():
    """The copyable recipe in docs/transformer.md gives the same tree as the helper."""
    import jax
    import jax.numpy as jnp

    from overparam_optax.experiments import models

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
