"""The matmul-only method against Muon's Newton-Schulz, and every method on the CNN shapes.

Issue 12 (item 2) asks for ``method="newton"`` (factors + apply, matmuls only) in at most 2x
the time of optax.contrib's 5-step Newton-Schulz orthogonalization of the same matrix
(``optax.contrib._muon.orthogonalize_via_newton_schulz`` with its default coefficients),
at <= 1e-3 relative error (Frobenius) for spectra of condition number up to 1e3 and every
N <= 8. Sections (each can be skipped):

* ``ratio``: for 1024 x 1024 and 3136 x 512 float32, N = 2..8: time of one jitted
  ``Newton().apply(Newton().factors(W, N, p), G, N, p)`` (``overparam_optax.methods``,
  ``p`` the matmul precision) divided by the time of
  Muon's Newton-Schulz on G (same shape), measured interleaved (Muon, then every N, in
  each repeat; the median of the per-repeat ratios), side by side with the relative error
  against the exact float64 P_W(G) for spectra of condition number 1, 1e1, 1e2, 1e3
  (log-spaced singular values, random singular vectors), and the traced matmul count.
  ``--ratio-precisions`` (default HIGHEST) times and checks the method at each matmul
  precision named (``jax.lax.Precision`` or ``jax.lax.DotAlgorithmPreset`` names; on a GPU
  these are real lower-precision passes). Muon is also timed at "highest" precision.
* ``precision``: the same errors with every matmul of the method computed from inputs
  rounded to bfloat16 (one bf16 pass, XLA's DEFAULT on TPU), to bf16 hi+lo with three
  products (HIGH on TPU) and to 10 mantissa bits (TF32, DEFAULT on NVIDIA GPUs), then
  accumulated in float32. This is an emulation on CPU (``jax.lax.reduce_precision`` of
  the operands), not a measurement on the hardware.
* ``tune`` (not run by default; needs scipy): recomputes the coefficient tables of
  the matmul-only method (``methods.newton``, greedy minimax steps) and prints the largest
  difference.
* ``depth``: the error of every method for N = 9 .. 1000 on a 96 x 64 matrix of condition
  number 1e3 ("newton" also beyond methods.newton.NEWTON_MAX_DEPTH, which it refuses in the API,
  to show why the limit is where it is).
* ``cnn``: every method (factors + apply, ``precondition_matrix`` jitted) and Muon's
  Newton-Schulz on the paper's CNN kernels (25x32, 800x64, 3136x512, 512x10), N = 3,
  float32, in subprocesses: OPENBLAS_NUM_THREADS unset (what users get) or 1, each with
  0 and 1 (``--busy-processes``) busy processes (``python -c "while True: pass"``) beside it.

Usage (from the repository root):

    python benchmarks/matmul_method.py            # all sections, ~10 min on 2 CPU cores
    python benchmarks/matmul_method.py --quick    # smoke run (small shapes), seconds
    python benchmarks/matmul_method.py --sections ratio --repeats 7

Writes benchmarks/results/matmul_method_<backend>.json (device, jax version, command), or
with --sections other than the default, matmul_method_<sections>_<backend>.json, so that a
partial run never replaces the full record (--out overrides both).
This script leaves OPENBLAS_NUM_THREADS alone in the main process (the cnn section sets
it per subprocess); --blas-threads is refused.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile

from absl import flags

from matmul_sections import (
    muon_ns,
    section_depth,
    section_precision,
    section_ratio,
    section_tune,
    time_calls_interleaved,
)
from overparam_experiments import flags as xflags
from overparam_experiments import timing as common

REPO = pathlib.Path(__file__).resolve().parents[1]
CNN_SHAPES = ((25, 32), (800, 64), (3136, 512), (512, 10))
DEFAULT_SECTIONS = ("ratio", "precision", "depth", "cnn")
ALL_SECTIONS = (*DEFAULT_SECTIONS, "tune")
ERROR_DEPTHS = (9, 16, 32, 64, 128, 200, 500, 1000)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The command line; absl checks every value (depths against newton) while parsing."""
    fv = flag_values
    xflags.define_platform_flags(flag_values=fv)
    xflags.require(["blas-threads"], lambda threads: threads == 0, "--blas-threads is not "
                   "supported here: the cnn section sets OPENBLAS_NUM_THREADS per subprocess, "
                   "and the main process leaves it as users have it", flag_values=fv)
    xflags.define_enum_list("sections", ",".join(DEFAULT_SECTIONS), ALL_SECTIONS,
                            "sections to run", flag_values=fv)  # fmt: skip
    xflags.define_int_list("depths", "2,3,4,5,6,7,8", "ratio: depths N", flag_values=fv)
    xflags.require_depth_for_methods("depths", ("newton",), flag_values=fv)
    xflags.define_float_list("conditions", "1,1e1,1e2,1e3", "ratio: condition numbers",
                             lower_bound=1.0, flag_values=fv)  # fmt: skip
    xflags.define_size_list("shapes", None, "e.g. 1024x1024,3136x512", flag_values=fv)
    flags.DEFINE_integer("repeats", 5, "timed calls", lower_bound=1, flag_values=fv)
    xflags.define_enum_list(
        "ratio-precisions", "HIGHEST", _precision_names(), "ratio: matmul precisions of the "
        "timed method, names of jax.lax.Precision or jax.lax.DotAlgorithmPreset (e.g. "
        "HIGHEST,BF16_BF16_F32_X3,TF32_TF32_F32,DEFAULT)", flag_values=fv,
    )  # fmt: skip
    xflags.define_int_list("precision-depths", "2,3,5,8", "precision: depths N", flag_values=fv)
    xflags.require_depth_for_methods("precision-depths", ("newton",), flag_values=fv)
    xflags.define_int_list(
        "error-depths", ",".join(map(str, ERROR_DEPTHS)), "depth: depths N of the error "
        "table (newton beyond its limit too, through the private path)", flag_values=fv,
    )  # fmt: skip
    flags.DEFINE_integer("cnn-repeats", 15, "cnn: timed calls", lower_bound=1, flag_values=fv)
    xflags.define_int_list("busy-processes", "0,1", "cnn: spinning processes beside the "
                           "timing", lower_bound=0, upper_bound=64, flag_values=fv)  # fmt: skip
    flags.DEFINE_string("cnn-worker", None, "(internal) the cnn worker's JSON path",
                        flag_values=fv)  # fmt: skip


def _precision_names() -> tuple[str, ...]:
    import jax

    names = (*jax.lax.Precision.__members__, *jax.lax.DotAlgorithmPreset.__members__)
    return tuple(dict.fromkeys(names))


def result_name(sections) -> str:
    """The results file's stem: "matmul_method", suffixed with the sections of a subset."""
    if list(sections) == list(DEFAULT_SECTIONS):
        return "matmul_method"
    return "_".join(("matmul_method", *sections))


def cnn_worker(args) -> None:
    """Times every method on the CNN shapes in this process's environment (a subprocess)."""
    import jax
    import jax.numpy as jnp

    from overparam_optax import linalg

    muon = muon_ns()
    shapes = CNN_SHAPES if not args.quick else ((25, 32),)
    methods = ("svd", "eigh", "newton")
    calls = {}
    for m, n in shapes:
        key = jax.random.PRNGKey(m * n)
        w = jax.random.normal(key, (m, n), jnp.float32) / (max(m, n) ** 0.5)
        g = jax.random.normal(jax.random.fold_in(key, 1), (m, n), jnp.float32)
        for method in methods:
            fn = jax.jit(
                lambda w, g, method=method: linalg.precondition_matrix(w, g, 3, method=method)
            )
            calls[f"{method}/{m}x{n}"] = (fn, (w, g))
        calls[f"muon/{m}x{n}"] = (muon, (g,))
    first = next(iter(calls))
    seconds, _ = time_calls_interleaved(calls, args.cnn_repeats, first)
    totals = {}
    for contender in (*methods, "muon"):
        totals[contender] = sum(seconds[f"{contender}/{m}x{n}"] for m, n in shapes)
    payload = {
        "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "load_average": os.getloadavg(),
        "seconds": seconds,
        "total_seconds": totals,
    }
    pathlib.Path(args.cnn_worker).write_text(json.dumps(payload))


def _cnn_subprocess(args, blas: str | None, busy: int) -> dict:
    """Runs the cnn worker with OPENBLAS_NUM_THREADS=blas (None: unset) and `busy` spinners."""
    env = dict(os.environ)
    env.pop("OPENBLAS_NUM_THREADS", None)
    if blas is not None:
        env["OPENBLAS_NUM_THREADS"] = blas
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = pathlib.Path(tmp) / "cnn.json"
            command = [sys.executable, __file__, "--cnn-worker", str(out)]
            command += ["--cnn-repeats", str(2 if args.quick else args.cnn_repeats)]
            command += ["--quick"] if args.quick else []
            command += ["--platform", args.platform] if args.platform else []
            subprocess.run(command, env=env, check=True, timeout=1800)
            payload = json.loads(out.read_text())
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    payload["busy_processes"] = busy
    return payload


def section_cnn(args):
    busy_counts = args.busy_processes
    configurations = [(blas, busy) for blas in (None, "1") for busy in busy_counts]
    if args.quick:  # one subprocess, no busy process: a smoke run
        configurations = [(None, 0)]
    results = []
    for blas, busy in configurations:
        payload = _cnn_subprocess(args, blas, busy)
        results.append(payload)
        totals = "  ".join(f"{k} {1e3 * v:7.1f}" for k, v in payload["total_seconds"].items())
        label = f"OPENBLAS_NUM_THREADS={blas or 'unset'}, {busy} busy process(es)"
        print(f"{label:38s} total ms: {totals}", flush=True)
    return results


def main(args) -> dict:
    """Runs the chosen sections, saving the record after each."""
    xflags.setup_platform(args)  # jax is imported already: the environment alone is too late
    if args.cnn_worker:
        cnn_worker(args)
        return {}
    sections, depths, conditions = args.sections, args.depths, args.conditions
    if args.shapes:
        shapes = args.shapes
    elif args.quick:
        shapes = [(48, 24)]
    else:
        shapes = [(1024, 1024), (3136, 512)]
    if args.quick:
        depths, conditions = depths[:2], conditions[-1:]
    payload = {"args": _recorded_args(args)}

    def save():
        common.write_json(args, result_name(sections), payload, REPO / "benchmarks" / "results")

    if "ratio" in sections:

        def save_rows(rows):
            payload["ratio"] = rows
            save()

        payload["ratio"] = section_ratio(args, shapes, depths, conditions, save_rows)
    if "precision" in sections:
        precision_depths = args.precision_depths
        payload["precision"] = section_precision(
            args, shapes, precision_depths[:1] if args.quick else precision_depths
        )
    if "tune" in sections:
        payload["tune"] = section_tune(args)
    if "depth" in sections:
        payload["depth"] = section_depth(args)
    if "cnn" in sections:
        payload["cnn"] = section_cnn(args)
    save()
    return payload


def _recorded_args(args) -> dict:
    """The flags as the record has always stored them: lists as comma text."""
    def text(value):
        if isinstance(value, list):
            return ",".join("x".join(map(str, v)) if isinstance(v, tuple) else f"{v:g}"
                            if isinstance(v, float) else str(v) for v in value)  # fmt: skip
        return value

    return {name: text(value) for name, value in vars(args).items()}


if __name__ == "__main__":
    xflags.run(define_flags, main)
