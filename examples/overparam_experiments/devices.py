"""Several CPU devices on one host, for sharded runs without accelerators.

:func:`use_host_cpu_devices` is what ``examples/sharded_mlp.py --cpu-devices 8`` and the
sharding tests (``tests/sharding_checks.py``) call before jax starts its backend.
:func:`limit_blas_threads` caps the LAPACK threads of the scripts that decompose matrices.
"""

from __future__ import annotations

import os
import re
import warnings

import jax

__all__ = ["limit_blas_threads", "use_host_cpu_devices"]

_FORCE_DEVICE_COUNT = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def use_host_cpu_devices(count: int | None = None) -> int:
    """Makes jax's CPU backend ``count`` devices, with threads enough for their collectives.

    Must run before jax creates its CPU backend (before the first ``jax.devices()`` or
    computation); raises ``RuntimeError`` afterwards. With ``count=None`` the count comes
    from ``XLA_FLAGS=--xla_force_host_platform_device_count=K`` when that is set, else 1.

    Why the threads: XLA's CPU client executes all of its devices' programs on one thread
    pool, sized to the number of cores unless ``PJRT_NPROC`` says otherwise. A device that
    reaches a collective (an all-reduce, a collective permute) holds its pool thread until
    every other device arrives, so with more devices than threads the last devices never get
    a thread and the collective never completes (8 devices on 2 cores deadlocked this
    project's sharded runs). Two threads per device (one running a program, one
    dispatching the next) removes that; it is set only when ``PJRT_NPROC`` is unset.

    Args:
      count: the number of CPU devices, or ``None`` for the ``XLA_FLAGS`` count.

    Returns:
      The number of CPU devices jax will create.

    Example (a script's first lines; the sharded example does this for ``--cpu-devices``)::

      import jax
      from overparam_experiments import devices

      devices.use_host_cpu_devices(8)
      assert jax.device_count() == 8
    """
    from jax._src import xla_bridge  # the only way to ask whether backends exist yet

    if xla_bridge.backends_are_initialized():
        raise RuntimeError(
            "use_host_cpu_devices must run before jax starts its backends (before the first "
            "jax.devices() or computation)"
        )
    forced = _FORCE_DEVICE_COUNT.search(os.environ.get("XLA_FLAGS", ""))
    if count is None:
        count = int(forced.group(1)) if forced else 1
    elif forced and int(forced.group(1)) != count:
        raise ValueError(
            f"count={count} disagrees with XLA_FLAGS, which asks for {forced.group(1)} devices"
        )
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if not forced:
        jax.config.update("jax_num_cpu_devices", count)
    if count > 1:
        threads = os.environ.setdefault("PJRT_NPROC", str(max(os.cpu_count() or 1, 2 * count)))
        if not threads.isdigit() or int(threads) <= count:
            warnings.warn(
                f"PJRT_NPROC={threads} gives XLA's CPU client at most as many threads as the "
                f"{count} devices: their collectives can deadlock; unset it or use "
                f"PJRT_NPROC={2 * count}",
                stacklevel=2,
            )
    return count


def limit_blas_threads(threads: int = 1) -> int | None:
    """Caps the OpenBLAS threads of numpy and of jax's CPU LAPACK, in this process, now.

    The exact rule's SVDs run in LAPACK, whose own threads contend with XLA's for the same
    cores: on a shared 2-core CPU, a 100 x 100 SVD per step ran 3-10 times slower at
    OpenBLAS's default threads than at one. Set at run time (threadpoolctl, which the
    examples' dependencies bring), so that a user needs no environment variable; without
    threadpoolctl, ``OPENBLAS_NUM_THREADS`` is set instead, which works only before
    OpenBLAS is loaded. ``threads=0`` leaves everything as it is.

    Returns:
      how many BLAS libraries were capped (None without threadpoolctl, or for 0).
    """
    if threads < 0:
        raise ValueError(f"threads must be >= 0, got {threads!r}.")
    if threads == 0:
        return None
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:
        os.environ["OPENBLAS_NUM_THREADS"] = str(threads)
        return None
    # Load both OpenBLAS copies first (numpy's, and scipy's behind jax's LAPACK kernels):
    # threadpoolctl caps only the libraries already loaded.
    import numpy.linalg  # noqa: F401
    import scipy.linalg.cython_lapack  # noqa: F401

    threadpool_limits(threads, user_api="blas")
    return sum(info["user_api"] == "blas" for info in threadpool_info())
