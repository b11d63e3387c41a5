"""Timing and result records shared by the performance benchmarks.

Used by ``benchmarks/step_time.py``, ``benchmarks/linalg_scaling.py``,
``benchmarks/cost.py`` and ``benchmarks/fidelity.py``:

* :func:`setup_platform` — the effect of the ``--platform`` and ``--blas-threads`` flags
  (defined with :func:`overparam_experiments.flags.define_platform_flags`).
* :func:`time_interleaved` and :func:`median` — paired step timing robust to machine load.
* :func:`environment` and :func:`write_json` — the record of the machine, the versions,
  the command and the git commit (:func:`git_state`) stored next to every result.

Nothing here knows where the repository is: a benchmark passes its own results folder
(``benchmarks/results/``, computed from the script's path) to :func:`write_json`.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import platform as _platform
import shlex
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

import jax

__all__ = [
    "train_step",
    "background_load",
    "environment",
    "git_state",
    "median",
    "setup_platform",
    "time_interleaved",
    "write_json",
]

PLATFORMS = ("cpu", "gpu", "cuda", "rocm", "tpu")


def train_step(loss_fn: Callable, tx) -> Callable:
    """A jitted ``step((params, opt_state), *batch) -> (params, opt_state)`` for timing.

    The full training step (forward, backward, optimizer, apply), as the step-time
    benchmarks measure it; ``tx.update`` gets the params, as every transform here needs.

    Example::

      step = train_step(lambda p, x: jnp.sum((x @ p) ** 2), optax.sgd(0.1))
      params, opt_state = step((params, opt_state), x)
    """
    import optax

    @jax.jit
    def step(carry, *batch):
        params, opt_state = carry
        grads = jax.grad(loss_fn)(params, *batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


@contextlib.contextmanager
def background_load(processes: int):
    """Runs ``processes`` CPU-bound busy loops beside the block (a shared, busy machine).

    Each is a separate Python process spinning in a loop (one core's worth of load). They
    are killed when the block ends, also on an exception. ``processes=0`` does nothing.
    """
    busy = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(processes)
    ]
    try:
        yield
    finally:
        for process in busy:
            process.kill()
        for process in busy:
            process.wait()


def setup_platform(args) -> None:
    """Applies ``--platform`` and ``--blas-threads``; call it before any jax computation.

    The platform goes to ``jax.config`` (and to ``JAX_PLATFORMS``, for subprocesses). The
    thread count goes to ``OPENBLAS_NUM_THREADS``, which the OpenBLAS behind jax's CPU
    LAPACK kernels (SVD, eigh; loaded with ``scipy.linalg`` at the first such call) reads
    when it loads. On a busy 2-core machine threaded OpenBLAS LAPACK was measured 10-25x
    slower than single-threaded (spin-waiting threads; docs/performance.md), while XLA's own
    matmuls do not use OpenBLAS.

    Raises:
      RuntimeError: if jax has started its backends already.
    """
    from jax._src import xla_bridge  # the only way to ask whether backends exist yet

    if xla_bridge.backends_are_initialized():
        raise RuntimeError("setup_platform must run before the first jax computation")
    if args.platform:
        os.environ["JAX_PLATFORMS"] = args.platform
        jax.config.update("jax_platforms", args.platform)
    if args.blas_threads > 0:
        if "scipy.linalg" in sys.modules:
            warnings.warn(
                "OpenBLAS is loaded already; --blas-threads has no effect on it", stacklevel=2
            )
        os.environ["OPENBLAS_NUM_THREADS"] = str(args.blas_threads)


def time_interleaved(
    steps: dict[str, Callable],
    carries: dict,
    chunk: int,
    repeats: int,
    data_fn: Callable[[int], tuple],
    base: str,
) -> tuple[dict, dict, dict]:
    """Per contender: seconds per step, and the median of paired ratios to ``base``.

    Contenders are interleaved step by step (each step timed on its own with
    ``jax.block_until_ready``), so neighbouring measurements see the same machine load.
    Step times are averaged over windows of ``chunk`` consecutive steps (one recomputation
    of a contender that caches every ``chunk`` steps); a ratio is a contender's window time
    over the base's window time at the same step indices, and the median over the
    ``repeats`` windows is kept. Compilation and one warm-up window are excluded.

    Args:
      steps: name -> ``step(carry, *batch) -> carry`` (jitted).
      carries: name -> the initial carry; updated in place to the last carry.
      chunk: steps per window.
      repeats: timed windows.
      data_fn: ``data_fn(i) -> batch`` for step i, shared by all contenders.
      base: the name of the contender every ratio divides by.

    Returns:
      ``(medians, ratios, windows)``: per name, the median over windows of the seconds per
      step; the median paired ratio to ``base``; the list of window means.
    """
    for name in steps:  # compile + one warm-up window
        for i in range(chunk):
            carries[name] = jax.block_until_ready(steps[name](carries[name], *data_fn(i)))
    per_step = {name: [] for name in steps}
    for i in range(chunk, chunk * (repeats + 1)):
        batch = data_fn(i)
        for name in steps:
            begin = time.perf_counter()
            carries[name] = jax.block_until_ready(steps[name](carries[name], *batch))
            per_step[name].append(time.perf_counter() - begin)
    windows = {
        name: [sum(ts[r * chunk : (r + 1) * chunk]) / chunk for r in range(repeats)]
        for name, ts in per_step.items()
    }
    medians = {name: median(ws) for name, ws in windows.items()}
    ratios = {
        name: median([a / b for a, b in zip(ws, windows[base], strict=True)])
        for name, ws in windows.items()
    }
    return medians, ratios, windows


def environment() -> dict:
    """The machine, the jax backend and versions, the load, the command line and the git
    commit the code ran on (``git_commit``, ``git_dirty``: :func:`git_state`), as a dict."""
    devices = jax.devices()
    cpu_model = None
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": cpu_model,
        "backend": jax.default_backend(),
        "device": str(devices[0].device_kind),
        "num_devices": len(devices),
        "jax_version": jax.__version__,
        "python": sys.version.split()[0],
        "machine": _platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **git_state(),
    }


def git_state(where: str | os.PathLike | None = None) -> dict:
    """The commit the code ran on: ``{"git_commit": sha or None, "git_dirty": bool or None}``.

    ``git_commit`` is ``git rev-parse HEAD`` of the checkout holding ``where`` (default: the
    running script's folder, else the current one); ``git_dirty`` says whether tracked files
    differed from that commit (``git status --porcelain --untracked-files=no``), i.e.
    whether the run's code was the commit's. Local git only, no network; both are None
    outside a git checkout or without git.
    """
    if where is None:
        script = pathlib.Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
        where = script.resolve().parent if script is not None and script.exists() else "."
    try:
        run = {"cwd": where, "capture_output": True, "text": True, "timeout": 30, "check": True}
        commit = subprocess.run(["git", "rev-parse", "HEAD"], **run).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run)
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": commit, "git_dirty": bool(status.stdout.strip())}


def write_json(
    args, name: str, payload: dict, results_dir: str | os.PathLike
) -> pathlib.Path:
    """Writes ``{"environment": environment(), **payload}`` as indented JSON.

    The path is ``args.out`` if given, else ``<results_dir>/<name>_<backend>[_quick].json``.

    Returns:
      The path written.
    """
    if args.out:
        path = pathlib.Path(args.out)
    else:
        suffix = "_quick" if args.quick else ""
        path = pathlib.Path(results_dir) / f"{name}_{jax.default_backend()}{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": environment(), **payload}, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def median(values) -> float:
    """The median of a non-empty sequence of numbers (the mean of the middle two if even)."""
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
