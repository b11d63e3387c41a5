"""Every code example in README.md and docs/*.md runs, or is checked as far as it can be.

docs/api.md's and docs/transformer.md's Python blocks run in tests/test_docs.py. Here:

* every shell command that runs a script (``python benchmarks/x.py --flag value``) names a
  script that exists, and the script's own flags accept its arguments (parsing
  only: no benchmark runs); the extras named in ``pip install`` lines exist in pyproject.toml;
* the Python fragments of README.md, docs/equivalence.md and docs/scaling.md run, with the
  names they leave to the reader (``params``, ``grads``, ``N``, ``lr``, a mesh, a train
  step, a checkpoint path) defined first;
* the signature block of docs/performance.md shows the real keywords and defaults.
"""

import inspect
import os
import pathlib
import re
import shlex

import jax
import jax.numpy as jnp
import optax
import pytest
from absl import flags as absl_flags
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import overparam_optax as opx
from overparam_experiments import flags as xflags
from tests.scripts import load_script

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCUMENTS = ["README.md", *sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md"))]

# Placeholders the docs use for the reader's own files: (token, a real stand-in).
PLACEHOLDERS = {
    "my.txt": "LICENSE",
    "D": "docs",
    "M": "docs",
    "../shared/data/mnist": "docs",
    "../shared/data/gas_sensor_drift": "docs",
}


def _blocks(document: str, languages: tuple[str, ...]) -> list[str]:
    text = (REPO / document).read_text()
    return [
        body
        for language, body in re.findall(r"```(\w*)\n(.*?)```", text, re.S)
        if language in languages
    ]


def _commands() -> list[tuple[str, str, list[str]]]:
    """(document, script, arguments) for each script run in a shell block of the docs."""
    found = []
    for document in DOCUMENTS:
        for block in _blocks(document, ("bash", "")):
            for line in block.replace("\\\n", " ").splitlines():
                for command in re.split(r"&&|;", line.split("#")[0]):
                    words = shlex.split(command)
                    scripts = [i for i, w in enumerate(words) if w.endswith(".py")]
                    if scripts and "python" in pathlib.Path(words[scripts[0] - 1]).name:
                        i = scripts[0]
                        found.append((document, words[i], words[i + 1 :]))
    return found


COMMANDS = _commands()


def test_the_docs_run_scripts():
    assert len(COMMANDS) >= 40
    assert {doc for doc, _, _ in COMMANDS} >= {"README.md", "docs/performance.md"}


@pytest.mark.parametrize(
    "document, script, arguments", COMMANDS, ids=[" ".join([c[1], *c[2]]) for c in COMMANDS]
)
def test_documented_command_parses(monkeypatch, document, script, arguments):
    if script == "benchmarks/<script>.py":  # a pattern, not a file: the three it means are run
        pytest.skip("placeholder for any benchmark (tests/test_methods.py runs three)")
    assert (REPO / script).is_file(), f"{document} runs {script}, which does not exist"
    monkeypatch.chdir(REPO)
    environment = dict(os.environ)
    flags = jax.config.jax_platforms
    module = load_script(script, name=f"documented_{pathlib.Path(script).stem}")
    arguments = [PLACEHOLDERS.get(a, a) for a in arguments]
    try:
        if hasattr(module, "define_flags"):  # absl flags, defined into a fresh registry
            xflags.parse(module.define_flags, arguments)
        else:
            pytest.skip(f"{script} defines its absl flags at import; its own tests parse them")
    except (SystemExit, absl_flags.Error) as error:
        pytest.fail(f"{document}: `{script} {' '.join(arguments)}` is refused ({error})")
    # Parsing changed nothing global (the platform is applied later, in main).
    assert jax.config.jax_platforms == flags and dict(os.environ) == environment


def test_documented_pip_extras_exist():
    pyproject = (REPO / "pyproject.toml").read_text()
    block = pyproject.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    extras = set(re.findall(r"^(\w+) = \[", block, re.M))
    named = set()
    for document in DOCUMENTS:
        for group in re.findall(r"pip install[^\n]*?\[([\w,]+)\]", (REPO / document).read_text()):
            named.update(group.split(","))
    assert named >= {"examples", "test"}
    assert named <= extras, named - extras


def _run_block(document: str, marker: str, namespace: dict, replace=()) -> dict:
    (block,) = [b for b in _blocks(document, ("python",)) if marker in b]
    for old, new in replace:
        assert old in block
        block = block.replace(old, new)
    exec(compile(block, document, "exec"), namespace)
    return namespace


def _small_problem():
    params = {"dense": {"kernel": jnp.eye(4, 3) + 0.5, "bias": jnp.zeros(3)}}
    return params, jax.tree.map(jnp.ones_like, params)


def test_readme_quick_start_runs():
    params, grads = _small_problem()
    out = _run_block("README.md", "tx.update", {"params": params, "grads": grads})
    expected = opx.precondition_matrix(params["dense"]["kernel"], grads["dense"]["kernel"], 3)
    assert jnp.allclose(out["updates"]["dense"]["kernel"], -1e-2 * expected, atol=1e-6)


def test_equivalence_md_chain_runs():
    namespace = {"optax": optax, "overparam_optax": opx, "N": 3, "lr": 0.1}
    (block,) = [b for b in _blocks("docs/equivalence.md", ("python",)) if "optax.chain" in b]
    tx = eval(block, namespace)
    params, grads = _small_problem()
    assert tx.update(grads, tx.init(params), params)[0]["dense"]["kernel"].shape == (4, 3)


def test_scaling_md_state_shardings_recipe_runs():
    params, grads = _small_problem()
    mesh = jax.make_mesh((1,), ("data",))
    tx = optax.chain(opx.overparam_precondition(3), optax.sgd(0.1, momentum=0.9))

    def train_step(params, state, batch):
        updates, state = tx.update(jax.tree.map(lambda p: batch * p, params), state, params)
        return optax.apply_updates(params, updates), state, batch

    namespace = {
        "jax": jax, "opx": opx, "NamedSharding": NamedSharding, "P": P, "mesh": mesh, "tx": tx,
        "params": params, "abstract_params": jax.eval_shape(lambda: params),
        "param_sh": jax.tree.map(lambda _: NamedSharding(mesh, P()), params),
        "train_step": train_step,
    }  # fmt: skip
    # The "..." of the docs stands for the step's other arguments (here one batch scalar).
    out = _run_block(
        "docs/scaling.md", "state_shardings", namespace, replace=[("...)", "replicated)")]
    )
    new_params, state, _ = out["step"](params, out["state"], jnp.float32(1.0))
    assert jax.tree.map(jnp.shape, new_params) == jax.tree.map(jnp.shape, params)
    assert jax.tree.structure(state) == jax.tree.structure(out["state_sh"])


def test_scaling_md_checkpoint_recipe_runs(tmp_path):
    pytest.importorskip("orbax.checkpoint")
    params, grads = _small_problem()
    tx = optax.chain(opx.overparam_precondition(3), optax.sgd(0.1, momentum=0.9))
    opt_state = tx.update(grads, tx.init(params), params)[1]
    namespace = {
        "jax": jax, "tx": tx, "params": params, "opt_state": opt_state,
        "params0": jax.tree.map(jnp.zeros_like, params), "path": tmp_path / "checkpoint",
    }  # fmt: skip
    out = _run_block("docs/scaling.md", "serialization.to_bytes", namespace)
    saved = jax.tree.leaves({"params": params, "opt_state": opt_state})
    for leaf, want in zip(jax.tree.leaves(out["restored"]), saved, strict=True):
        assert jnp.array_equal(leaf, want)


def test_performance_md_signature_block_shows_the_real_defaults():
    (block,) = [b for b in _blocks("docs/performance.md", ("python",)) if "overparam_sgd(" in b]
    for function in (opx.overparam_precondition, opx.overparam_sgd):
        line = next(x for x in block.splitlines() if x.startswith(f"{function.__name__}("))
        parameters = inspect.signature(function).parameters
        for name, default in re.findall(r"(\w+)=([^,)]+)", line):
            assert name in parameters, f"docs/performance.md shows {name}, which is gone"
            assert repr(parameters[name].default) == default.replace('"', "'"), name
