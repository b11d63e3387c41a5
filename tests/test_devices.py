"""Tests of overparam_experiments.devices (its end-to-end test: tests/test_sharding.py,
which runs tests/sharding_checks.py on 8 devices in a subprocess)."""

import os

import jax
import pytest

from overparam_experiments.devices import use_host_cpu_devices


def test_use_host_cpu_devices_refuses_after_jax_started():
    jax.devices()  # the backend exists from here on
    with pytest.raises(RuntimeError, match="before jax starts"):
        use_host_cpu_devices(8)


@pytest.fixture
def backend_not_started(monkeypatch):
    from jax._src import xla_bridge

    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    monkeypatch.setenv("PJRT_NPROC", "unset")
    monkeypatch.delenv("PJRT_NPROC")
    return monkeypatch


def test_use_host_cpu_devices_reads_xla_flags_and_sizes_the_pool(backend_not_started):
    backend_not_started.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert use_host_cpu_devices() == 8
    assert int(os.environ["PJRT_NPROC"]) >= 16  # two threads per device


def test_use_host_cpu_devices_keeps_a_given_pool_size(backend_not_started):
    backend_not_started.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    backend_not_started.setenv("PJRT_NPROC", "5")
    assert use_host_cpu_devices(4) == 4
    assert os.environ["PJRT_NPROC"] == "5"


def test_use_host_cpu_devices_warns_of_a_pool_too_small(backend_not_started):
    backend_not_started.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    backend_not_started.setenv("PJRT_NPROC", "2")
    with pytest.warns(UserWarning, match="PJRT_NPROC=2 .* can deadlock"):
        use_host_cpu_devices()


@pytest.mark.parametrize(
    "flags, count, message",
    [
        ("--xla_force_host_platform_device_count=4", 8, "disagrees with XLA_FLAGS"),
        ("", 0, "count must be >= 1"),
    ],
)
def test_use_host_cpu_devices_rejects_bad_counts(backend_not_started, flags, count, message):
    backend_not_started.setenv("XLA_FLAGS", flags)
    with pytest.raises(ValueError, match=message):
        use_host_cpu_devices(count)
