"""Fixtures shared by the test files."""

import contextlib

import jax
import pytest


@contextlib.contextmanager
def enable_x64():
    """64-bit JAX inside the block only, so float64 tests do not leak into others."""
    if hasattr(jax, "enable_x64"):  # jax >= 0.7: a config context manager
        with jax.enable_x64(True):
            yield
    else:  # older jax
        from jax.experimental import enable_x64 as legacy_enable_x64

        with legacy_enable_x64():
            yield


@pytest.fixture
def x64():
    with enable_x64():
        yield


@pytest.fixture(autouse=True)
def no_leaked_x64():
    """Fails a test that leaves float64 on: every later test would silently run in it."""
    before = jax.config.jax_enable_x64
    yield
    assert jax.config.jax_enable_x64 == before, "this test changed jax_enable_x64 globally"


@pytest.fixture(scope="module")
def tb():
    """``benchmarks/tuned_baselines.py`` as a module (its flags; the harness is in
    ``benchmarks/tuning.py``, ``tuned_mnist`` and ``tuned_report``)."""
    from tests.scripts import load_script

    return load_script("benchmarks/tuned_baselines.py")


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: only tests that will run
def pytest_collection_modifyitems(session, config, items):
    """Starts the sharding checks' subprocess now if a test of test_sharding.py will run.

    It compiles for about a minute on one core; started here, that minute overlaps the
    rest of the suite (tests/test_sharding.py waits for it). Under pytest-xdist every worker
    collects every test, so none starts it here (each would): the worker that runs
    test_sharding.py starts it, and the other workers' tests overlap it instead.
    """
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if any(item.path.name == "test_sharding.py" for item in items):
        from tests import test_sharding

        test_sharding.start_checks()


def pytest_sessionfinish(session, exitstatus):
    """Stops the sharding subprocess if the session ended before waiting for it (-x, ^C)."""
    import sys

    if "tests.test_sharding" in sys.modules:
        sys.modules["tests.test_sharding"].stop_checks()
