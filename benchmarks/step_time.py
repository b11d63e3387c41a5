"""Training-step time of the implicit (preconditioned) model vs its competitors, side by side.

Target 1: the MNIST tutorial CNN of examples/mnist_cnn.py
(``overparam_experiments.models.TutorialCNN``: conv5x5x32, pool, conv5x5x64, pool,
dense 3136->512, dense 512->10), batch 128, N = 3, all four kernels preconditioned.
Contenders, each a jitted full training step (forward, backward, optimizer):

* ``sgd``            plain SGD (the denominator of every ratio);
* ``default``        overparam_precondition(N) with no option: what users get (the tracked
                     basis, recomputed when it cannot hold its tolerance);
* ``svd``            method="svd": the exact thin SVD every step;
* ``muon``           optax.contrib.muon, with every conv and dense kernel orthogonalized.

Nothing is set that users would not set: OPENBLAS_NUM_THREADS is left as the environment has
it unless ``--blas-threads`` says otherwise, and ``--background-load K`` runs K busy-loop
processes beside the timing to measure a shared machine.

Target 2: an MLP 784-2048-2048-2048-10 (three hidden layers of width 2048), batch 512, N = 3.
The implicit model (``models.MLP``: plain ``nn.Dense`` + the transform) against the explicit
depth-3 factorized model (``MLP(dense_depth=3)``: ``FactorizedDense(depth=3)``, balanced
init, hidden width ``min(in, out)``, i.e. 2048 for the hidden layers) trained with plain
SGD. Reports step
times and memory: the bytes of params + grads + optimizer state (from the arrays' nbytes)
and XLA's compiled memory analysis of each step (arguments, outputs, temporaries). By
default only the explicit model, the cached fast configuration and plain SGD on the
implicit model are timed for target 2 (the every-step decompositions of two 2048 x 2048
matrices take seconds per step on 2 cores); --mlp-all times them too. The state bytes of
every contender are recorded, with the default's decompositions per matrix update.

Target 3: the byte-level transformer LM of ``models.TransformerLM`` (2 layers, d_model
1024, 16 heads, context 512; batch 16), its attention heads and MLP kernels preconditioned
through ``models.transformer_dimension_numbers``, against SGD, AdamW and Muon (the same
kernels orthogonalized). Run by ``benchmarks/accelerator_suite.py``; on 2 CPU cores a step
of it takes seconds.

Timing (``overparam_experiments.timing.time_interleaved``): contenders are interleaved
step by step, each step timed alone with jax.block_until_ready (state carried, so a cached
contender's fresh decompositions fall where its tolerance asks for them); compilation and
one warm-up window are excluded. Each ratio is the median over windows (of --every steps)
of (contender's window time / baseline's window time at the same step indices): on a
shared, busy machine neighbouring steps see the same load, while absolute times drift by
2x or more (docs/performance.md).

Usage (from the repository root):

    python benchmarks/step_time.py                  # targets 1 and 2, a few minutes on 2 cores
    python benchmarks/step_time.py --quick          # smoke run (small sizes)
    python benchmarks/step_time.py --platform gpu --targets 1,2,3   # on a GPU/TPU

Writes benchmarks/results/step_time_<backend>.json; docs/performance.md has the tables.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import optax
from absl import flags

import overparam_optax as opx
from overparam_experiments import flags as xflags
from overparam_experiments import timing, training
from overparam_experiments.models import (
    MLP,
    TransformerLM,
    TutorialCNN,
    kernel_mask,
    transformer_dimension_numbers,
)

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"


TARGETS = ("1", "2", "3")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The command line; absl checks every value while parsing."""
    fv = flag_values
    xflags.define_platform_flags(flag_values=fv)
    flags.DEFINE_integer("N", 3, "the depth", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("every", 10, "steps per timing window", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("repeats", 5, "timed windows", lower_bound=1, flag_values=fv)
    xflags.define_enum_list("targets", "1,2", TARGETS, "the targets to run: 1 (CNN), 2 (MLP), "
                            "3 (transformer)", flag_values=fv)  # fmt: skip
    flags.DEFINE_integer("mlp-repeats", 2, "timed windows of target 2", lower_bound=1,
                         flag_values=fv)  # fmt: skip
    flags.DEFINE_integer("background-load", 0, "busy-loop processes to run beside the timing "
                         "(a shared machine)", lower_bound=0, flag_values=fv)  # fmt: skip
    flags.DEFINE_boolean("mlp-all", False, "also time the every-step implicit contenders of "
                         "target 2 (minutes per step on CPU)", flag_values=fv)  # fmt: skip



def _decompositions(state) -> dict:
    """The default's fresh decompositions over the timed steps, per matrix update (the
    records' keys: ``count`` is ``decompositions``)."""
    counts = training.tracked_decompositions(state)
    return {"count": counts["decompositions"], "matrix_updates": counts["matrix_updates"]}


def _nbytes(tree) -> int:
    return int(sum(leaf.nbytes for leaf in jax.tree.leaves(tree)))


def cnn_target(args) -> dict:
    """Target 1: step times of the tutorial CNN per contender, and ratios to plain SGD."""
    batch = 8 if args.quick else 128
    model = TutorialCNN()
    key = jax.random.PRNGKey(0)
    images = jax.random.normal(key, (8, batch, 28, 28, 1), jnp.float32)
    labels = jax.random.randint(key, (8, batch), 0, 10)
    params = model.init({"params": key}, images[0], False)["params"]

    def loss_fn(params, x, y, rng):
        logits = model.apply({"params": params}, x, True, rngs={"dropout": rng})
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def kernels_only(p):  # all conv and dense kernels; biases pass through
        return kernel_mask(p, precondition_conv=True)

    def muon_dims(p):
        def spec(path, leaf):
            if path[-1].key != "kernel":
                return None
            return optax.contrib.MuonDimensionNumbers(tuple(range(leaf.ndim - 1)), leaf.ndim - 1)

        return jax.tree_util.tree_map_with_path(spec, p)

    N, k, lr = args.N, (2 if args.quick else args.every), 0.01

    def pre(**kw):
        return optax.chain(opx.overparam_precondition(N, mask=kernels_only, **kw), optax.sgd(lr))

    txs = {
        "sgd": optax.sgd(lr),
        "default": pre(),  # what the one-line README usage gets
        "svd": pre(method="svd"),
        "muon": optax.contrib.muon(lr, muon_weight_dimension_numbers=muon_dims),
    }
    if args.quick:  # smoke run: the default and the two baselines only
        txs = {name: txs[name] for name in ("sgd", "default", "muon")}
    steps = {name: timing.train_step(loss_fn, tx) for name, tx in txs.items()}
    carries = {name: (params, tx.init(params)) for name, tx in txs.items()}

    def data_fn(i):
        return images[i % 8], labels[i % 8], jax.random.fold_in(key, i)

    repeats = 1 if args.quick else args.repeats
    medians, ratios, raw = timing.time_interleaved(steps, carries, k, repeats, data_fn, "sgd")
    print(f"\nTarget 1: tutorial CNN, batch {batch}, N={N}, {repeats} windows of {k} steps")
    print(f"{'contender':>14} {'ms/step':>9} {'/ sgd':>7}  (median of paired window ratios)")
    for name in txs:
        print(f"{name:>14} {1e3 * medians[name]:9.1f} {ratios[name]:7.2f}")
    print(
        f"default / sgd = {ratios['default']:.2f}; muon / sgd = {ratios['muon']:.2f} "
        f"(default {'lower' if ratios['default'] < ratios['muon'] else 'NOT lower'})"
    )
    return _record(carries, medians, ratios, raw, batch=batch, N=N, every=k, repeats=repeats)


def transformer_target(args) -> dict:
    """Target 3: step times of the transformer LM per contender, and ratios to plain SGD."""
    if args.quick:
        model, batch = TransformerLM(context=16, d_model=32, num_heads=2), 2
    else:
        model, batch = TransformerLM(context=512, d_model=1024, num_heads=16), 16
    key = jax.random.PRNGKey(0)
    tokens = jax.random.randint(key, (2, batch, model.context + 1), 0, model.vocab_size)
    params = model.init(key, tokens[0, :, :-1])["params"]

    def loss_fn(params, window):
        logits = model.apply({"params": params}, window[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, window[:, 1:]).mean()

    dims = transformer_dimension_numbers(params)

    def muon_dims(p):  # the same matrices as the transform's, orthogonalized
        return jax.tree.map(
            lambda d: optax.contrib.MuonDimensionNumbers(d.reduction_axis, d.output_axis),
            dims,
            is_leaf=lambda d: isinstance(d, opx.MatrixDimensionNumbers),
        )

    N, k, lr = args.N, (2 if args.quick else args.every), 0.01
    txs = {
        "sgd": optax.sgd(lr),
        "adamw": optax.adamw(1e-3),
        "muon": optax.contrib.muon(lr, muon_weight_dimension_numbers=muon_dims),
        "default": optax.chain(
            opx.overparam_precondition(N, dimension_numbers=dims), optax.sgd(lr)
        ),
    }
    steps = {name: timing.train_step(loss_fn, tx) for name, tx in txs.items()}
    carries = {name: (params, tx.init(params)) for name, tx in txs.items()}
    repeats = 1 if args.quick else args.repeats
    medians, ratios, raw = timing.time_interleaved(
        steps, carries, k, repeats, lambda i: (tokens[i % 2],), "sgd"
    )
    print(f"\nTarget 3: transformer LM d_model {model.d_model}, context {model.context}, "
          f"batch {batch}, N={N}, {repeats} windows of {k} steps")  # fmt: skip
    for name in txs:
        print(f"{name:>14} {1e3 * medians[name]:9.1f} {ratios[name]:7.2f}")
    return _record(
        carries, medians, ratios, raw, d_model=model.d_model, context=model.context,
        batch=batch, N=N, every=k, repeats=repeats,
    )  # fmt: skip


def _record(carries, medians, ratios, raw, **config) -> dict:
    """A target's JSON entry: its configuration, then the timings and state sizes."""
    return {
        "default_decompositions": _decompositions(carries["default"][1]),
        **config,
        "seconds_per_step": medians,
        "ratio_to_sgd": ratios,
        "window_seconds_per_step": raw,
        "state_bytes": {name: _nbytes(c[1]) for name, c in carries.items()},
    }


def mlp_target(args) -> dict:
    """Target 2: the implicit MLP against the explicit factorized one: time and memory."""
    width, batch = (64, 16) if args.quick else (2048, 512)
    N, k, lr = args.N, (2 if args.quick else args.every), 0.01

    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (2, batch, 784), jnp.float32)
    y = jax.random.randint(key, (2, batch), 0, 10)

    def loss_for(model):
        def loss_fn(params, xb, yb):
            logits = model.apply({"params": params}, xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        return loss_fn

    implicit = MLP(hidden=(width,) * 3)
    explicit = MLP(hidden=(width,) * 3, dense_depth=N)
    p_imp = implicit.init(key, x[0])["params"]
    p_exp = explicit.init(key, x[0])["params"]

    def pre(**kw):
        return optax.chain(opx.overparam_precondition(N, **kw), optax.sgd(lr))

    contenders = {
        "explicit_sgd": (loss_for(explicit), optax.sgd(lr), p_exp),
        "implicit_svd": (loss_for(implicit), pre(method="svd"), p_imp),
        "implicit_eigh": (loss_for(implicit), pre(method="eigh"), p_imp),
        "implicit_default": (loss_for(implicit), pre(), p_imp),
        "implicit_sgd": (loss_for(implicit), optax.sgd(lr), p_imp),
    }
    steps, carries, memory = {}, {}, {}
    for name, (loss_fn, tx, params) in contenders.items():
        steps[name] = timing.train_step(loss_fn, tx)
        state = tx.init(params)
        carries[name] = (params, state)
        p_bytes, s_bytes = _nbytes(params), _nbytes(state)
        entry = {
            "params_bytes": p_bytes,
            "grads_bytes": p_bytes,
            "opt_state_bytes": s_bytes,
            "params_grads_state_bytes": 2 * p_bytes + s_bytes,
        }
        try:
            compiled = steps[name].lower((params, state), x[0], y[0]).compile()
            analysis = compiled.memory_analysis()
            entry["compiled"] = {
                "argument_bytes": int(analysis.argument_size_in_bytes),
                "output_bytes": int(analysis.output_size_in_bytes),
                "temp_bytes": int(analysis.temp_size_in_bytes),
                "peak_estimate_bytes": int(
                    analysis.argument_size_in_bytes
                    + analysis.output_size_in_bytes
                    + analysis.temp_size_in_bytes
                    - analysis.alias_size_in_bytes
                ),
            }
        except Exception as error:  # memory analysis is not available on every backend
            entry["compiled"] = {"unavailable": repr(error)}
        memory[name] = entry

    repeats = 1 if args.quick else args.mlp_repeats
    timed = [
        name
        for name in contenders
        if args.quick or args.mlp_all or name not in ("implicit_svd", "implicit_eigh")
    ]
    steps = {name: steps[name] for name in timed}
    medians, ratios, raw = timing.time_interleaved(
        steps, carries, k, repeats, lambda i: (x[i % 2], y[i % 2]), "explicit_sgd"
    )
    print(f"\nTarget 2: MLP 784-{width}x3-10, batch {batch}, N={N}, chunk {k}, {repeats} repeats")
    columns = ("contender", "ms/step", "/ explicit", "p+g+state MB", "/ explicit")
    print(" ".join(f"{c:>{w}}" for c, w in zip(columns, (22, 9, 10, 13, 10), strict=True)))
    mem_base = memory["explicit_sgd"]["params_grads_state_bytes"]
    for name in contenders:
        mem = memory[name]["params_grads_state_bytes"]
        ms = f"{1e3 * medians[name]:9.1f} {ratios[name]:10.2f}" if name in medians else " " * 20
        print(f"{name:>22} {ms} {mem / 2**20:13.1f} {mem / mem_base:10.2f}")
    return {
        "width": width,
        "batch": batch,
        "N": N,
        "every": k,
        "repeats": repeats,
        "seconds_per_step": medians,
        "ratio_to_explicit": ratios,
        "window_seconds_per_step": raw,
        "memory": memory,
        "memory_ratio_to_explicit": {
            name: m["params_grads_state_bytes"] / mem_base for name, m in memory.items()
        },
    }


def run(args) -> dict:
    """Times the targets ``args.targets`` asks for (the platform set up already).

    Args:
      args: the values of :func:`define_flags` (``xflags.parse(define_flags, argv)``).

    Returns:
      The record: ``args`` and, per target run, ``target1_cnn``, ``target2_mlp`` or
      ``target3_transformer``.
    """
    targets = set(args.targets)
    payload = {"args": vars(args)}
    with timing.background_load(args.background_load):
        if "1" in targets:
            payload["target1_cnn"] = cnn_target(args)
        if "2" in targets:
            payload["target2_mlp"] = mlp_target(args)
        if "3" in targets:
            payload["target3_transformer"] = transformer_target(args)
    return payload


def main(args) -> dict:
    """Runs the targets asked for; writes and returns the JSON record."""
    xflags.setup_platform(args)
    payload = run(args)
    targets = set(args.targets)
    name = "step_time" if targets >= {"1", "2"} else "step_time_target" + "".join(sorted(targets))
    timing.write_json(args, name, payload, RESULTS_DIR)
    return payload


if __name__ == "__main__":
    xflags.run(define_flags, main)
