"""The examples in docs/api.md and in the core docstrings run and say what they claim."""

import doctest
import pathlib
import re

import pytest

import overparam_optax.experiments.training
import overparam_optax.linalg
import overparam_optax.transform

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"


def test_api_md_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / "api.md").read_text(), re.S)
    assert len(blocks) >= 5
    namespace = {}
    for block in blocks:  # one namespace: later blocks use names defined by earlier ones
        exec(compile(block, "docs/api.md", "exec"), namespace)


@pytest.mark.parametrize(
    "module",
    [overparam_optax.linalg, overparam_optax.transform, overparam_optax.experiments.training],
)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0
