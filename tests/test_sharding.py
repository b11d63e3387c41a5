"""Sharded (multi-device SPMD) use of the transform, on 8 host CPU devices.

The checks live in ``tests/sharding_checks.py``. They need 8 devices, which XLA only
provides when ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` is set before jax
starts, and the rest of the suite has started jax in this process already. So one
subprocess (shared by all tests of this file) runs every check with that flag and writes
the results as JSON; each check is then one test here, failing with the check's message.
A crash of the subprocess fails every test with its stderr.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests import sharding_checks

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding") / "results.json"
    env = dict(os.environ)
    flags = [
        f"--xla_force_host_platform_device_count={sharding_checks.DEVICES_NEEDED}",
        # 8 fake devices share 2 cores: on a busy machine a device thread can miss XLA's
        # default 40 s collective rendezvous deadline, which aborts the process.
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
        # XLA's CPU runtime can deadlock in a collective when 8 fake devices share fewer
        # cores (seen on 2 cores, also with nothing else running). That is a limitation of
        # the test bed, not a wrong result, so it skips loudly instead of failing CI.
        stderr = (timeout.stderr or b"")
        stderr = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
        pytest.skip(
            f"8-fake-device run did not finish in {TIMEOUT_S} s on {os.cpu_count()} cores "
            f"(XLA CPU collective deadlock; see docs/scaling.md). stderr tail: {stderr[-500:]}"
        )
    if not out.exists() and "RendezvousKey" in proc.stderr:
        pytest.skip(
            "8-fake-device run aborted in a stuck XLA CPU collective rendezvous "
            f"(see docs/scaling.md): {proc.stderr[-500:]}"
        )
    if not out.exists():
        pytest.fail(
            f"tests.sharding_checks exited {proc.returncode} without results.\n"
            f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-8000:]}"
        )
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", list(sharding_checks.CHECKS))
def test_sharded(results, name):
    assert name in results, f"check {name} did not run"
    result = results[name]
    assert result["ok"], f"{name}:\n{result['detail']}"


def test_every_check_reported(results):
    assert set(results) == set(sharding_checks.CHECKS)
