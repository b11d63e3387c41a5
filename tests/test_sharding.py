"""Sharded (multi-device SPMD) use of the transform, on 8 host CPU devices.

The checks live in ``tests/sharding_checks.py``. They need 8 devices, which jax's CPU backend
only makes when told before it starts, and the rest of the suite has started it in this
process already. So one subprocess (shared by all tests of this file) runs every check and
writes the results as JSON; each check is then one test here, failing with the check's
message. A crash or a hang of the subprocess fails every test with its output.

The subprocess spends most of its minute compiling, on one core. conftest.py starts it as
soon as collection has picked a test of this file (:func:`start_checks`), so that it runs
beside the rest of the suite instead of after it.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from tests import sharding_checks

REPO = pathlib.Path(__file__).resolve().parents[1]
# A few minutes on 2 cores beside the rest of the suite (the tracked default's checks
# decompose and carry bases; ~6 min measured on a loaded machine); the margin is for busy CI
# machines. Counted from the start of the subprocess.
TIMEOUT_S = 900

_RUN = {}  # the one subprocess of the session: "proc", "folder", "log", "start"


def start_checks() -> None:
    """Starts ``python -m tests.sharding_checks`` in the background, once per session."""
    if _RUN:
        return
    folder = pathlib.Path(tempfile.mkdtemp(prefix="sharding_checks_"))
    env = dict(os.environ)
    flags = [
        # On a busy machine a device thread can miss XLA's default 40 s collective
        # deadline, which aborts the process; a slow run should be slow, not fail.
        "--xla_cpu_collective_call_terminate_timeout_seconds=600",
        "--xla_cpu_collective_timeout_seconds=600",
    ]
    env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), *flags]).strip()
    env["JAX_PLATFORMS"] = "cpu"
    log = open(folder / "output.txt", "w+")  # noqa: SIM115 - closed by stop_checks
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.sharding_checks", "--json", str(folder / "results.json")],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    _RUN.update(proc=proc, folder=folder, log=log, start=time.monotonic())


def stop_checks() -> None:
    """Kills the subprocess if it still runs (an interrupted session) and removes its files."""
    if _RUN:
        if _RUN["proc"].poll() is None:
            _RUN["proc"].kill()
            _RUN["proc"].wait()
        _RUN["log"].close()
        shutil.rmtree(_RUN["folder"], ignore_errors=True)
        _RUN.clear()


@pytest.fixture(scope="module")
def results():
    start_checks()  # already started by conftest.py, unless this file is run on its own
    proc, out, log = _RUN["proc"], _RUN["folder"] / "results.json", _RUN["log"]
    try:
        proc.wait(timeout=max(1.0, TIMEOUT_S - (time.monotonic() - _RUN["start"])))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        log.seek(0)
        pytest.fail(
            f"tests.sharding_checks did not finish in {TIMEOUT_S} s on {os.cpu_count()} cores "
            f"(a stuck collective? see docs/scaling.md).\noutput:\n{log.read()[-8000:]}"
        )
    log.seek(0)
    output = log.read()
    if not out.exists():
        pytest.fail(
            f"tests.sharding_checks exited {proc.returncode} without results.\n"
            f"output:\n{output[-8000:]}"
        )
    return json.loads(out.read_text())["results"]


@pytest.mark.parametrize("name", list(sharding_checks.CHECKS))
def test_sharded(results, name):
    assert name in results, f"check {name} did not run"
    result = results[name]
    assert result["ok"], f"{name}:\n{result['detail']}"


def test_every_check_reported(results):
    assert set(results) == set(sharding_checks.CHECKS)
