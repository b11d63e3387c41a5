"""Sharded (multi-device SPMD) use of the transform, on 8 host CPU devices.

The checks live in ``tests/sharding_checks.py``. They need 8 devices, which jax's CPU backend
only makes when told before it starts, and the rest of the suite has started it in this
process already. So one subprocess (shared by all tests of this file) runs every check and
writes the results as JSON; each check is then one test here, failing with the check's
message. A crash or a hang of the subprocess fails every test with its output.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests import sharding_checks

REPO = pathlib.Path(__file__).resolve().parents[1]
# About 1 minute on 2 idle cores, most of it compiling; the margin is for busy CI machines.
TIMEOUT_S = 420


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding") / "results.json"
    env = dict(os.environ)
    flags = [
        # On a busy machine a device thread can miss XLA's default 40 s collective
        # deadline, which aborts the process; a slow run should be slow, not fail.
        "--xla_cpu_collective_call_terminate_timeout_seconds=600",
        "--xla_cpu_collective_timeout_seconds=600",
    ]
    env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), *flags]).strip()
    env["JAX_PLATFORMS"] = "cpu"
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "tests.sharding_checks", "--json", str(out)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as timeout:
        output = [
            s.decode(errors="replace") if isinstance(s, bytes) else (s or "")
            for s in (timeout.stdout, timeout.stderr)
        ]
        pytest.fail(
            f"tests.sharding_checks did not finish in {TIMEOUT_S} s on {os.cpu_count()} cores "
            f"(a stuck collective? see docs/scaling.md).\nstdout:\n{output[0][-4000:]}\n"
            f"stderr:\n{output[1][-4000:]}"
        )
    if not out.exists():
        pytest.fail(
            f"tests.sharding_checks exited {proc.returncode} without results.\n"
            f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-8000:]}"
        )
    return json.loads(out.read_text())["results"]


@pytest.mark.parametrize("name", list(sharding_checks.CHECKS))
def test_sharded(results, name):
    assert name in results, f"check {name} did not run"
    result = results[name]
    assert result["ok"], f"{name}:\n{result['detail']}"


def test_every_check_reported(results):
    assert set(results) == set(sharding_checks.CHECKS)
