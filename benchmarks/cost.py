"""What the default costs besides time: matmul FLOPs, compile time, dot ops and state memory.

* FLOPs (XLA's compiled cost analysis, per matrix and update) of the default's two branches
  for every matrix of the paper's CNN, a 2048-wide MLP (784-2048-2048-2048-10) and one
  d_model-1024 transformer block (q, k, v, o 1024 x 1024, MLP 1024 x 4096 and back): the
  tracked branch (every update) and the matmuls of the fresh branch (a thin SVD, which runs
  on LAPACK/cuSOLVER and is not counted by XLA, then the same application),
  beside ``optax.contrib.muon``'s update of the same matrix. A projection for GPU/TPU,
  where matmul FLOPs set the time; weight the fresh branch by how often it runs
  (``state.decompositions``; the fidelity and step-time records hold measured rates).
* A projection of each model's H100 step (``--sections projection``, after ``flops``): SGD's
  recorded step plus the FLOPs over the recorded throughput plus the measured rate of fresh
  decompositions times the recorded SVD time, for the default and for Muon (checked against
  Muon's recorded step).
* Compile time of the full training step (forward, backward, optimizer) on the CNN and a
  1024-wide MLP, for SGD, the default and Muon: fresh compiles, interleaved, median of 3,
  with the number of dot ops in the lowered step.
* Where that compile time goes (``--sections compile_parts``): each preconditioned matrix's
  update compiled alone, whole (the default, Muon) and in parts (the tracked arithmetic
  without its fallback; the fallback alone), with the whole step's ratio to Muon's that
  each projects.
* Memory: the bytes of the default's own state against the bytes of the matrices it
  preconditions, and against Adam's and Muon's states, on the 2048-wide MLP.
* LAPACK beside XLA's products (CPU): an LU solve of 512 x 512 run in the same jitted
  function as a 3136 x 512 product, against each alone; why the tracked update's rotations
  are matmuls only.

Usage (from the repository root):

    python benchmarks/cost.py            # ~3 CPU-minutes
    python benchmarks/cost.py --quick    # small sizes

Writes ``benchmarks/results/cost_<backend>.json``; docs/performance.md has the tables.
"""

from __future__ import annotations

import json
import pathlib
import time

from absl import flags

from overparam_experiments import flags as xflags

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The command line (absl; every value checked while parsing)."""
    flags.DEFINE_boolean("quick", False, "small sizes (a smoke run)", flag_values=flag_values)
    xflags.define_enum_list("sections", "flops,projection,compile,compile_parts,memory,lapack",
                            ("flops", "projection", "compile", "compile_parts", "memory",
                             "lapack"),
                            "what to measure (a partial run updates the sections it ran in "
                            "the record at --out)", flag_values=flag_values)  # fmt: skip
    flags.DEFINE_integer("repeats", 3, "fresh compiles per contender", lower_bound=1,
                         upper_bound=100, flag_values=flag_values)  # fmt: skip
    xflags.define_output_file("out", None, "output JSON (default: results/cost_<backend>.json)",
                              flag_values=flag_values)  # fmt: skip


def _flops(fn, *args) -> float:
    import jax

    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0]
    return float(analysis.get("flops", 0.0))


def matrix_flops(rows: int, cols: int, N: int = 3) -> dict:
    """Per-update FLOPs for one rows x cols matrix: the default's parts, and Muon's update.

    XLA counts a loop's body once, so the default is counted as its parts: ``base``, the
    frame and the application that every update runs (also the matmuls of the fresh
    branch, besides its thin SVD, which runs on LAPACK/cuSOLVER and which XLA does not
    count); ``first_round``, a Jacobi round whose q is I (no product q R); ``round``, each
    later one. An update with r >= 1 rounds costs base + first_round + (r - 1) round.
    """
    import jax
    import jax.numpy as jnp
    import optax

    from overparam_optax.methods import tracked

    m, n = max(rows, cols), min(rows, cols)
    w = jnp.ones((1, m, n), jnp.float32)
    v = jnp.eye(n, dtype=jnp.float32)[None]
    hi = jax.lax.Precision.HIGHEST
    alpha = jnp.ones((1, 1, 1), jnp.float32)
    near = tracked.near_square(w.shape)

    def frame_and_apply(w, g, v):  # the fresh branch less its SVD, and the tracked one's base
        frame = tracked.initial_frame(w, g, v, hi, near)
        return tracked.apply_frame(frame, w, g, alpha, N, hi, near)

    def first_round(y, b):  # its q is I: no product q R
        return tracked.jacobi_round(y, b, tracked.resolved_pairs(b, (m, n)), hi)

    def later_round(y, b, q):
        y, b, r = first_round(y, b)
        return y, b, jnp.matmul(q, r, precision=hi)

    muon = optax.contrib.muon(0.1)
    params = {"w": jnp.ones((rows, cols), jnp.float32)}
    state = muon.init(params)
    return {
        "shape": [rows, cols],
        "base": _flops(frame_and_apply, w, w, v),
        "first_round": _flops(first_round, w, v),
        "round": _flops(later_round, w, v, v),
        "muon": _flops(lambda g, s: muon.update(g, s, params), params, state),
    }


def tracked_flops(row: dict, rounds: float) -> float:
    """The default's FLOPs per update of a :func:`matrix_flops` row at ``rounds`` rounds per
    update on average (the first round of an update has no product q R; counted as a later
    one here, an upper bound)."""
    return row["base"] + rounds * row["round"]


def model_shapes(quick: bool) -> dict[str, list[tuple[int, int]]]:
    """The preconditioned matrices of each model (conv kernels as (H*W*I, O))."""
    if quick:
        return {"cnn": [(25, 8), (200, 16)], "mlp2048": [(784, 64), (64, 64), (64, 10)]}
    return {
        "cnn": [(25, 32), (800, 64), (3136, 512), (512, 10)],
        "mlp2048": [(784, 2048), (2048, 2048), (2048, 2048), (2048, 10)],
        "transformer_block_1024": [(1024, 1024)] * 4 + [(1024, 4096), (4096, 1024)],
    }


def flops_section(quick: bool) -> dict:
    out = {}
    for model, shapes in model_shapes(quick).items():
        rows = [matrix_flops(*shape) for shape in shapes if min(shape) > 1]
        totals = {k: sum(r[k] for r in rows) for k in ("base", "first_round", "round", "muon")}
        out[model] = {"matrices": rows, "total": totals}
        print(
            f"{model:>24}: base {totals['base']:.3g}, a round {totals['round']:.3g}, "
            f"muon {totals['muon']:.3g} FLOPs per update"
        )
    return out


#: The H100 records a projection reads (benchmarks/results/), and which fidelity task's
#: measured rates stand for each model's (the transformer has no fidelity task: the MLP's).
GPU_STEP_RECORD = "accelerator_suite_gpu_step_time.json"
GPU_LINALG_RECORD = "accelerator_suite_gpu.json"
RATES_FROM = {"cnn": "cnn_momentum", "mlp2048": "mlp_momentum",
              "transformer_block_1024": "mlp_momentum"}  # fmt: skip
#: Step-time models of the GPU record, and how many of the FLOPs section's model each holds.
GPU_MODELS = {"cnn": ("cnn", 1), "mlp2048": ("mlp", 1),
              "transformer_block_1024": ("transformer", 2)}  # fmt: skip


def _newton_flops(n: int) -> float:
    import jax.numpy as jnp

    from overparam_optax import linalg

    w = jnp.ones((n, n), jnp.float32)
    return _flops(lambda w, g: linalg.precondition_matrix(w, g, 3, method="newton"), w, w)


def _nearest(table: dict, n: int) -> float:
    """table[k] at the recorded size k closest to n in log scale."""
    import math

    return table[min(table, key=lambda k: abs(math.log(k / n)))]


def projection_section(flops: dict, fidelity: dict, results_dir=RESULTS_DIR) -> dict:
    """Each model's H100 step, projected from recorded costs, for the default and Muon.

    step = SGD's recorded H100 step + per-step matmul FLOPs / the recorded H100 throughput
    + fresh decompositions per step x the recorded H100 thin-SVD time. Throughput: the
    matmul-only ``method="newton"``'s FLOPs (counted here) over its recorded H100 time at
    the nearest recorded size, at BF16_X3 (the default's GPU precision; HIGH where BF16_X3
    has no time) for the default and DEFAULT for Muon. SVD time: the recorded one at the
    nearest size, scaled by (n / n_recorded)^3 above the largest. The default's rounds and
    decompositions per matrix update are the fidelity record's (:data:`RATES_FROM`).
    Muon's projection is checked against its recorded step.
    """
    steps = json.loads((results_dir / GPU_STEP_RECORD).read_text())
    linalg = json.loads((results_dir / GPU_LINALG_RECORD).read_text())
    rows = linalg["sections"]["linalg"]["rows"]

    def seconds(key):
        return {r["n"]: r["entries"][key]["seconds"] for r in rows
                if r["entries"].get(key, {}).get("seconds")}  # fmt: skip

    newton = {n: _newton_flops(n) for n in (256, 512, 1024)}
    throughput = {
        "default": {n: newton[n] / t for key in ("newton/HIGH", "newton/BF16_X3")
                    for n, t in seconds(key).items()},
        "muon": {n: newton[n] / t for n, t in seconds("newton/DEFAULT").items()},
    }  # fmt: skip
    svd = seconds("svd/HIGHEST")
    top = max(svd)

    def svd_seconds(n):
        return svd[top] * (n / top) ** 3 if n > top else _nearest(svd, n)

    out = {"sources": {"steps": steps["git_commit"], "linalg": linalg["git_commit"],
                       "device": steps["environment"]["device"]},
           "throughput_flops_per_second": throughput, "svd_seconds": svd, "models": {}}  # fmt: skip
    for model, entry in flops.items():
        if model not in GPU_MODELS:
            continue
        gpu_name, copies = GPU_MODELS[model]
        recorded = steps["sections"]["step_time"]["models"][gpu_name]["seconds_per_step"]
        rates = fidelity["tasks"][RATES_FROM[model]]["configs"]["default"]
        rounds = rates["rotation_rounds"] / rates["matrix_updates"]
        fresh = rates["decompositions"] / rates["matrix_updates"]
        matmuls = decompositions = muon = 0.0
        flops_default = sum(tracked_flops(row, rounds) for row in entry["matrices"])
        for row in entry["matrices"]:
            n = min(row["shape"])
            matmuls += tracked_flops(row, rounds) / _nearest(throughput["default"], n)
            decompositions += fresh * svd_seconds(n)
            muon += row["muon"] / _nearest(throughput["muon"], n)
        matmuls, decompositions, muon = copies * matmuls, copies * decompositions, copies * muon
        default = matmuls + decompositions
        sgd = recorded["sgd"]
        out["models"][model] = {
            "gpu_model": gpu_name, "copies": copies, "rates_from": RATES_FROM[model],
            "rounds_per_update": rounds, "decompositions_per_update": fresh,
            "recorded_seconds": recorded,
            "projected_seconds": {"default": sgd + default, "muon": sgd + muon},
            "default_parts_seconds": {"matmuls": matmuls, "decompositions": decompositions},
            "default_over_muon": (sgd + default) / (sgd + muon),
            "flops_over_muon": flops_default / entry["total"]["muon"],
        }  # fmt: skip
        check = f" (recorded {1e3 * recorded['muon']:.2f} ms)" if "muon" in recorded else ""
        print(f"{model:>24}: projected H100 step: default {1e3 * (sgd + default):.2f} ms, "
              f"muon {1e3 * (sgd + muon):.2f} ms{check}")  # fmt: skip
    return out


def _models(quick: bool):
    import jax
    import jax.numpy as jnp
    import optax

    from overparam_experiments.models import MLP, TutorialCNN

    key = jax.random.PRNGKey(0)
    batch = 8 if quick else 128
    cnn = TutorialCNN(dense_width=32 if quick else 512)
    x = jnp.zeros((batch, 28, 28, 1))
    y = jnp.zeros((batch,), jnp.int32)
    mlp = MLP(hidden=(64,) * 2 if quick else (1024,) * 2)

    def loss_for(model, train):
        def loss(p, x, y):
            logits = (
                model.apply({"params": p}, x, train)
                if train is not None
                else model.apply({"params": p}, x)
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        return loss

    return {
        "cnn": (loss_for(cnn, False), cnn.init(key, x, False)["params"], x, y),
        "mlp1024": (loss_for(mlp, None), mlp.init(key, x)["params"], x, y),
    }


def _contenders(params):
    import jax
    import optax

    import overparam_optax as opx

    def kernels(p):
        return jax.tree_util.tree_map_with_path(
            lambda path, leaf: getattr(path[-1], "key", None) == "kernel", p
        )

    def muon_dims(p):
        def spec(path, leaf):
            if getattr(path[-1], "key", None) != "kernel":
                return None
            return optax.contrib.MuonDimensionNumbers(tuple(range(leaf.ndim - 1)), leaf.ndim - 1)

        return jax.tree_util.tree_map_with_path(spec, p)

    return {
        "sgd": lambda: optax.sgd(0.01),
        "default": lambda: optax.chain(
            opx.overparam_precondition(3, mask=kernels), optax.sgd(0.01)
        ),
        "muon": lambda: optax.contrib.muon(0.01, muon_weight_dimension_numbers=muon_dims),
    }


def compile_section(quick: bool, repeats: int) -> dict:
    """Fresh compiles of each model's training step, interleaved; median seconds, dot ops."""
    import jax

    from overparam_experiments import timing

    out = {}
    for model, (loss, params, x, y) in _models(quick).items():
        makers = _contenders(params)
        seconds = {name: [] for name in makers}
        dots = {}
        for _ in range(repeats):
            for name, make in makers.items():
                tx = make()  # a new closure each time: nothing is reused from a cache
                state = tx.init(params)
                step = timing.train_step(loss, tx)
                start = time.perf_counter()
                lowered = step.lower((params, state), x, y)
                lowered.compile()
                seconds[name].append(time.perf_counter() - start)
                dots[name] = lowered.as_text().count("dot_general")
        medians = {name: timing.median(v) for name, v in seconds.items()}
        out[model] = {"seconds": seconds, "median_seconds": medians, "dot_ops": dots,
                      "default_over_muon": medians["default"] / medians["muon"]}  # fmt: skip
        print(f"{model:>10}: compile " + ", ".join(f"{k} {v:.2f} s ({dots[k]} dots)"
              for k, v in medians.items()))  # fmt: skip
    del jax
    return out


def _per_matrix_updates(rows: int, cols: int) -> dict:
    """One matrix's update, whole and in parts: name -> (function, args) to compile.

    ``default`` and ``muon`` are the transforms' updates of {"w": W}; ``tracked_only`` is the
    default's arithmetic without its fallback (the frame, the rounds' loop and the
    application: no residual test, no ``lax.cond``, no SVD); ``fresh_only`` is the fallback
    alone (a thin SVD, its frame and the same application).
    """
    import jax.numpy as jnp
    import optax

    import overparam_optax as opx
    from overparam_optax import numerics
    from overparam_optax.methods import tracked

    params = {"w": jnp.ones((rows, cols), jnp.float32)}
    default, muon = opx.overparam_precondition(3), optax.contrib.muon(0.01)
    m, n = max(rows, cols), min(rows, cols)
    w = jnp.ones((1, m, n), jnp.float32)
    v = jnp.zeros((1, n, n), jnp.float32)
    near = tracked.near_square(w.shape)

    def scaled(fn):  # the default's normalization around a frame -> (P, basis) function
        def run(w, g, v):
            alpha, beta = numerics.max_abs(w), numerics.max_abs(g)
            frame = fn(w / alpha, g / beta, v)
            out, v_new = tracked.apply_frame(frame, w / alpha, g / beta, alpha, 3, None, near)
            return out * beta, v_new

        return run

    def rotated(w, g, v):
        frame = tracked.initial_frame(w, g, v, None, near)
        return tracked.rotate(frame, (m, n), 3, tracked.DEFAULT_TOLERANCE, None)[0]

    # The params are arguments, not captured constants (which XLA would fold at compile time).
    return {
        "default": (default.update, (params, default.init(params), params)),
        "muon": (muon.update, (params, muon.init(params), params)),
        "tracked_only": (scaled(rotated), (w, w, v)),
        "fresh_only": (scaled(lambda w, g, v: tracked.fresh_frame(w, g, None, near)), (w, w, v)),
    }


def compile_parts_section(quick: bool, repeats: int) -> dict:
    """Where the compile time goes: each preconditioned matrix's update, whole and in parts.

    Fresh compiles (``jit(...).lower(...).compile()``), interleaved, median of ``repeats``,
    per matrix of the compile section's models, beside the model's SGD step. The projection
    ``(sgd step + sum of a part) / (sgd step + sum of Muon's)`` estimates the whole step's
    ratio to Muon's were the rest free; ``default`` projected this way checks the estimate
    against the compile section's measured ratio.
    """
    import jax
    import optax

    from overparam_experiments import timing

    shapes = {"cnn": [(25, 32), (800, 64), (3136, 512), (512, 10)],
              "mlp1024": [(784, 1024), (1024, 1024), (1024, 10)]}  # fmt: skip
    if quick:
        shapes = {"cnn": [(25, 8), (200, 16)], "mlp1024": [(784, 64), (64, 64)]}
    models = _models(quick)
    out = {}
    for model, matrices in shapes.items():
        loss, params, x, y = models[model]
        sgd_seconds = []
        parts = {shape: _per_matrix_updates(*shape) for shape in matrices}
        per_matrix = {f"{r}x{c}": {name: [] for name in p} for (r, c), p in parts.items()}
        for _ in range(repeats):
            sgd = optax.sgd(0.01)
            start = time.perf_counter()
            timing.train_step(loss, sgd).lower((params, sgd.init(params)), x, y).compile()
            sgd_seconds.append(time.perf_counter() - start)
            for shape, fns in parts.items():
                for name, (fn, args) in fns.items():
                    start = time.perf_counter()
                    jax.jit(lambda *a, fn=fn: fn(*a)).lower(*args).compile()
                    per_matrix["{}x{}".format(*shape)][name].append(time.perf_counter() - start)
        medians = {s: {k: timing.median(v) for k, v in d.items()} for s, d in per_matrix.items()}
        sgd = timing.median(sgd_seconds)
        names = ("default", "muon", "tracked_only", "fresh_only")
        total = {k: sum(d[k] for d in medians.values()) for k in names}
        projected = {k: (sgd + total[k]) / (sgd + total["muon"])
                     for k in ("default", "tracked_only", "fresh_only")}  # fmt: skip
        out[model] = {"sgd_step_seconds": sgd, "median_seconds": medians,
                      "summed_seconds": total, "projected_over_muon": projected}  # fmt: skip
        print(f"{model:>10}: sgd step {sgd:.2f} s; summed over matrices "
              + ", ".join(f"{k} {v:.2f} s" for k, v in total.items())
              + "; projected / muon " + ", ".join(f"{k} {v:.2f}" for k, v in projected.items()))
    return out


def memory_section(quick: bool) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    import overparam_optax as opx
    from overparam_experiments.models import MLP

    width = 64 if quick else 2048
    params = MLP(hidden=(width,) * 3).init(jax.random.PRNGKey(0), jnp.zeros((1, 784)))["params"]

    def nbytes(tree):
        return int(sum(x.nbytes for x in jax.tree.leaves(tree)))

    kernels = [x for p, x in jax.tree_util.tree_leaves_with_path(params) if p[-1].key == "kernel"]
    matrices = int(sum(x.nbytes for x in kernels if min(x.shape) > 1))
    states = {
        "default": opx.overparam_precondition(3).init(params),
        "adam": optax.adam(1e-3).init(params),
        "muon": optax.contrib.muon(1e-3).init(params),
        "sgd_momentum": optax.sgd(1e-3, momentum=0.9).init(params),
    }
    out = {"params_bytes": nbytes(params), "preconditioned_matrix_bytes": matrices,
           "state_bytes": {k: nbytes(v) for k, v in states.items()}}  # fmt: skip
    out["default_state_over_matrices"] = out["state_bytes"]["default"] / matrices
    print(f"memory (MLP {width}): default state / preconditioned matrices = "
          f"{out['default_state_over_matrices']:.3f}")  # fmt: skip
    return out


def lapack_section(quick: bool, repeats: int = 20) -> dict:
    """A LAPACK call beside XLA's products, in one jitted function and alone (median ms).

    On CPU, XLA runs its products on its own thread pool and LAPACK (an LU solve here) on
    OpenBLAS's: the tracked update is matmul-only because the two contend (docs/performance.md).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from overparam_experiments import timing

    m, n = (392, 64) if quick else (3136, 512)
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
    eye = jnp.eye(n, dtype=jnp.float32)
    hi = jax.lax.Precision.HIGHEST

    def gram(w):  # the tracked update's largest product: W^T [W W]
        return jnp.matmul(w.T, jnp.concatenate([w, w], axis=1), precision=hi)[:, :n] / m

    def solve(b):
        return jnp.linalg.solve(eye + b, eye)

    def four_products(b):
        bb = jnp.matmul(b, b, precision=hi)
        return jnp.matmul(jnp.matmul(bb, bb, precision=hi), bb, precision=hi)

    cases = {
        "products_alone": (gram, w),
        "solve_alone": (solve, eye),
        "four_nxn_products_alone": (four_products, eye),
        "products_then_solve": (lambda w: solve(gram(w)), w),
        "products_then_four_nxn_products": (lambda w: four_products(gram(w)), w),
    }
    out = {}
    for name, (fn, arg) in cases.items():
        fn = jax.jit(fn)
        jax.block_until_ready(fn(arg))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn(arg))
            times.append(time.perf_counter() - start)
        out[name] = 1e3 * timing.median(times)
        print(f"{name:>32}: {out[name]:.1f} ms")
    extra = out["products_then_solve"] - out["products_alone"] - out["solve_alone"]
    print(f"LAPACK beside the products costs {extra:.1f} ms more than the two apart")
    return {"shape": [m, n], "median_ms": out, "solve_extra_ms_beside_products": extra}


def main(args) -> None:
    import jax

    from overparam_experiments import timing

    suffix = "_quick" if args.quick else ""
    out = pathlib.Path(args.out or RESULTS_DIR / f"cost_{jax.default_backend()}{suffix}.json")
    record = json.loads(out.read_text()) if out.exists() else {}
    fidelity = RESULTS_DIR / f"fidelity_{jax.default_backend()}.json"
    runs = {"flops": lambda: flops_section(args.quick),
            "projection": lambda: projection_section(
                record["flops"], json.loads(fidelity.read_text())),
            "compile": lambda: compile_section(args.quick, args.repeats),
            "compile_parts": lambda: compile_parts_section(args.quick, args.repeats),
            "memory": lambda: memory_section(args.quick),
            "lapack": lambda: lapack_section(args.quick)}  # fmt: skip
    for section in args.sections:
        record[section] = runs[section]()
        record.setdefault("environments", {})[section] = timing.environment()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    xflags.run(define_flags, main)
