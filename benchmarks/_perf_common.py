"""Shared plumbing of the performance benchmarks (step_time, linalg_scaling, quality).

`setup_platform` must run before jax is imported: it sets JAX_PLATFORMS from --platform and
pins OpenBLAS (used by jax's CPU LAPACK kernels: SVD, eigh) to a thread count. On a busy
2-core machine threaded OpenBLAS LAPACK was measured 10-25x slower than single-threaded
(spin-waiting threads; docs/performance.md), while XLA's own matmuls do not use OpenBLAS.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform as _platform
import shlex
import sys
import time

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
FIGURES_DIR = pathlib.Path(__file__).resolve().parents[1] / "docs" / "figures"


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--platform",
        default=None,
        help="JAX platform (cpu, gpu, tpu); sets JAX_PLATFORMS before jax is imported.",
    )
    parser.add_argument(
        "--blas-threads",
        type=int,
        default=1,
        help="OPENBLAS_NUM_THREADS for jax's CPU LAPACK calls (0: leave the environment).",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for CI smoke runs")
    parser.add_argument("--out", default=None, help="JSON output path (default: results/)")


def setup_platform(args) -> None:
    if args.platform:
        os.environ["JAX_PLATFORMS"] = args.platform
    if args.blas_threads > 0:
        os.environ["OPENBLAS_NUM_THREADS"] = str(args.blas_threads)


def environment() -> dict:
    import jax

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
    }


def write_json(args, name: str, payload: dict) -> pathlib.Path:
    if args.out:
        path = pathlib.Path(args.out)
    else:
        suffix = "_quick" if args.quick else ""
        path = RESULTS_DIR / f"{name}_{environment()['backend']}{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": environment(), **payload}, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def median(values) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
