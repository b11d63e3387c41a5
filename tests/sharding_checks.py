"""Sharded-training checks, run on 8 host CPU devices in a subprocess by test_sharding.py.

A process gets its CPU devices once, when jax starts its CPU backend, and the rest of the
test session has started it with one device long before this file's tests run. So
``tests/test_sharding.py`` runs this module in a subprocess as
``python -m tests.sharding_checks --json F``; it makes its 8 devices with
:func:`overparam_experiments.devices.use_host_cpu_devices`. Each check is a function
that raises AssertionError on failure; the results (ok, a message, and the measured differences) are
written as JSON, and every check becomes one pytest test that fails with the check's
message. Run it by hand with

    JAX_PLATFORMS=cpu python -m tests.sharding_checks

Checks are written over the whole optimizer state pytree, whatever it holds (the step
count, momentum, the default's tracked bases), so that they keep covering
the state as the transform grows.

The mesh is 4 x 2, axes ("data", "model"): FSDP-style row sharding over "data",
tensor-parallel column (and row) sharding over "model", both at once, a conv kernel sharded
on its output channels, and a stack of layers sharded along the stack axis.

Tolerance for "equals the single-device result": max |sharded - single| <= 1e-5 * max
|single|, per leaf, in float32. The sharded program computes the same decomposition (XLA
gathers a matrix before an SVD/eigh; batch axes stay split), but its matmuls reduce partial
sums across devices in another order. Each output entry is a sum of O(n) products, n <= 64
here, so a reordering moves it by at most ~n * eps * max|terms| ~ 64 * 1.2e-7 ~ 8e-6 of the
largest entry; 1e-5 is that bound. What is measured (printed and stored) is typically
~1e-7 to 1e-6.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

import numpy as np

DEVICES_NEEDED = 8
RTOL = 1e-5
# With the default, every basis is computed afresh on the first step, then carried over
# (rotated); with tolerance=1e-6 a few are computed afresh again on the third.
STEPS = 3
# Small enough that the bases can be carried over: at 0.05 every step moves the weights so
# far that every update decomposes afresh and the tracked path is never run.
LEARNING_RATE = 1e-4

CONFIGS = {
    "exact": {"method": "svd"},  # decomposes afresh on every update, no cache
    "defaults": {},  # method="tracked": a basis per matrix carried from update to update
    "tight": {"tolerance": 1e-6},  # tracked, but more updates decompose afresh
    "blocks16": {"block_size": 16},
}


def _options(config: str) -> dict:
    """CONFIGS[config] as keyword options of overparam_precondition."""
    import overparam_optax as opx

    options = dict(CONFIGS[config])
    if "tolerance" in options:
        options["method"] = opx.methods.Tracked(tolerance=options.pop("tolerance"))
    return options


def _setup():
    import jax
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import overparam_optax as opx
    from overparam_experiments.devices import use_host_cpu_devices

    if jax.config.jax_platforms in (None, "", "cpu"):
        # 8 CPU devices, and a thread pool large enough that their collectives cannot
        # deadlock (use_host_cpu_devices says why).
        use_host_cpu_devices(DEVICES_NEEDED)
    if jax.device_count() < DEVICES_NEEDED:
        raise AssertionError(f"needs {DEVICES_NEEDED} devices, got {jax.device_count()}")
    rng = np.random.default_rng(0)
    shapes_specs = {
        "fsdp_rows": ((64, 48), P("data", None)),
        "tp_cols": ((48, 32), P(None, "model")),
        "tp_rows": ((32, 24), P("model", None)),
        "both": ((64, 40), P("data", "model")),
        "conv": ((3, 3, 8, 16), P(None, None, None, "model")),
        "stack": ((4, 16, 12), P("data", None, None)),
        "bias": ((48,), P("model")),
        "head": ((24, 1), P()),
    }
    params = {
        k: (rng.normal(size=s) * 0.3).astype(np.float32) for k, (s, _) in shapes_specs.items()
    }
    grads = {k: rng.normal(size=s).astype(np.float32) for k, (s, _) in shapes_specs.items()}
    dims = {k: None for k in shapes_specs}
    dims.update(
        {
            k: opx.MatrixDimensionNumbers(tuple(range(len(s) - 1)), len(s) - 1)
            for k, (s, _) in shapes_specs.items()
            if len(s) >= 2
        }
    )
    dims["stack"] = opx.MatrixDimensionNumbers(reduction_axis=1, output_axis=2)

    def mesh_and_shardings(axis_type):
        mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type,) * 2)
        return mesh, {k: NamedSharding(mesh, spec) for k, (_, spec) in shapes_specs.items()}

    return {
        "jax": jax,
        "opx": opx,
        "params": params,
        "grads": grads,
        "dims": dims,
        "mesh_and_shardings": mesh_and_shardings,
        "AxisType": AxisType,
        "NamedSharding": NamedSharding,
        "P": P,
    }


def _make_tx(env, config):
    import optax

    pre = env["opx"].overparam_precondition(3, dimension_numbers=env["dims"], **_options(config))
    return optax.chain(pre, optax.sgd(LEARNING_RATE, momentum=0.9))


def _train(jax, tx, params, grads_seq, state_sharding):
    import optax

    @jax.jit
    def step(grads, state, params):
        # The parameter update is inside the same program: an eager add of two differently
        # sharded arrays dispatches its own resharding program, which deadlocked the fake
        # CPU devices (seen here, stuck in apply_updates).
        updates, state = tx.update(grads, state, params)
        # The state keeps the sharding it starts with, so every step runs the program the
        # first one compiled (otherwise the second step compiles it again for the state
        # shardings XLA chose). Updates and params are left to XLA: their shardings are
        # what check_updates_keep_param_shardings looks at.
        state = jax.lax.with_sharding_constraint(state, state_sharding)
        return updates, state, optax.apply_updates(params, updates)

    state = jax.device_put(tx.init(params), state_sharding)
    history = []
    for grads in grads_seq:
        updates, state, params = step(grads, state, params)
        history.append((updates, params))
    return history, state


def _grads_seq(env):
    rng = np.random.default_rng(1)
    return [
        {k: (g * (1 + 0.1 * i) + 0.01 * rng.normal(size=g.shape)).astype(np.float32)
         for k, g in env["grads"].items()}
        for i in range(STEPS)
    ]


def _max_rel_diff(jax, a_tree, b_tree):
    worst = {}
    for path, a in jax.tree_util.tree_flatten_with_path(a_tree)[0]:
        b = b_tree
        for key in path:
            b = b[key.key] if hasattr(key, "key") else b[key.idx]
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = max(np.abs(b).max(), 1e-30)
        worst[jax.tree_util.keystr(path)] = float(np.abs(a - b).max() / scale)
    return worst


def _memo(env, key, fn):
    """Both training runs are shared by the checks that look at them (compiles are slow)."""
    cache = env.setdefault("memo", {})
    if key not in cache:
        cache[key] = fn()
    return cache[key]


def _single_device(env, config):
    return _memo(env, ("single", config), lambda: _single_device_run(env, config))


def _sharded(env, config, axis_type):
    return _memo(env, ("sharded", config, str(axis_type)),
                 lambda: _sharded_run(env, config, axis_type))


def _single_device_run(env, config):
    jax = env["jax"]
    dev = jax.devices()[0]
    tx = _make_tx(env, config)
    seq = [jax.device_put(g, dev) for g in _grads_seq(env)]
    params = jax.device_put(env["params"], dev)
    history, state = _train(jax, tx, params, seq, jax.sharding.SingleDeviceSharding(dev))
    return history, state


def _sharded_run(env, config, axis_type):
    jax = env["jax"]
    mesh, shardings = env["mesh_and_shardings"](axis_type)
    tx = _make_tx(env, config)
    params = jax.device_put(env["params"], shardings)
    seq = [jax.device_put(g, shardings) for g in _grads_seq(env)]
    replicated = env["NamedSharding"](mesh, env["P"]())
    state_sharding = env["opx"].state_shardings(tx, env["params"], shardings, replicated)
    with jax.set_mesh(mesh):
        history, state = _train(jax, tx, params, seq, state_sharding)
    return history, state, shardings, mesh


def check_matches_single_device(env, config, axis_type_name):
    """tx.update under jit on sharded params/grads == the same steps on one device."""
    jax = env["jax"]
    single, single_state = _single_device(env, config)
    sharded, state, _, _ = _sharded(env, config, getattr(env["AxisType"], axis_type_name))
    worst = {}
    for step, ((u1, p1), (us, ps)) in enumerate(zip(single, sharded, strict=True)):
        for name, value in _max_rel_diff(jax, us, u1).items():
            worst[f"update{name}"] = max(worst.get(f"update{name}", 0.0), value)
        for name, value in _max_rel_diff(jax, ps, p1).items():
            worst[f"param{name}"] = max(worst.get(f"param{name}", 0.0), value)
        del step
    bad = {k: v for k, v in worst.items() if v > RTOL}
    assert not bad, f"sharded differs from single-device by more than {RTOL} (relative): {bad}"
    # The same bases were computed afresh (the tracked ones decide it per update), and
    # with a tracked basis, not all of them on every step (the carried-over path ran).
    decompositions = [int(s[0].decompositions) for s in (single_state, state)]
    assert decompositions[0] == decompositions[1], f"decompositions {decompositions}"
    matrices = sum(len(v) for v in jax.tree.leaves(state[0].factors) if v.ndim == 3)
    if matrices:
        assert decompositions[0] < STEPS * matrices, f"{decompositions[0]} of {matrices} x {STEPS}"
    return {
        "max_rel_diff": max(worst.values()),
        "per_leaf": worst,
        "decompositions": decompositions[0],
    }


def check_updates_keep_param_shardings(env, config, axis_type_name):
    """The update of each leaf comes back sharded like the parameter (no gather-to-all)."""
    sharded, _, shardings, _ = _sharded(env, config, getattr(env["AxisType"], axis_type_name))
    mismatched = []
    for updates, params in sharded:
        for name, sharding in shardings.items():
            for kind, leaf in (("update", updates[name]), ("param", params[name])):
                if not leaf.sharding.is_equivalent_to(sharding, leaf.ndim):
                    mismatched.append(f"{kind} {name}: {leaf.sharding} vs {sharding.spec}")
    assert not mismatched, "; ".join(sorted(set(mismatched)))
    return {}


def _abstract(jax, params, shardings):
    return {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in params.items()
    }


def check_state_follows_params(env, config, axis_type_name):
    """Optimizer state sharding follows the params, generically over the state pytree.

    With the shardings of the documented recipe, ``opx.state_shardings``, pinned on init
    and update (as a sharded training step does), (1) init and update produce exactly those
    shardings, (2) leaves shaped like a parameter (momentum) are sharded like it, (3) no
    state leaf at least as large as the largest weight matrix is fully replicated, and (4)
    each device holds 1/k of the rows of a cached factor matrix whose parameter is split k
    ways (every such row count here divides).
    """
    jax = env["jax"]
    mesh, shardings = env["mesh_and_shardings"](getattr(env["AxisType"], axis_type_name))
    tx = _make_tx(env, config)
    with jax.set_mesh(mesh):
        abstract_params = _abstract(jax, env["params"], shardings)
        replicated = env["NamedSharding"](mesh, env["P"]())
        state_sh = env["opx"].state_shardings(tx, abstract_params, shardings, replicated)
        params = jax.device_put(env["params"], shardings)
        state = jax.block_until_ready(jax.jit(tx.init, out_shardings=state_sh)(params))
        grads = jax.device_put(env["grads"], shardings)
        update = jax.jit(
            tx.update,
            in_shardings=(shardings, state_sh, shardings),
            out_shardings=(shardings, state_sh),
        )
        _, new_state = update(grads, state, params)

    problems, report = [], {}
    split_ways = {k: sh.num_devices // _copies(sh) for k, sh in shardings.items()}
    param_shapes = {tuple(v.shape): shardings[k] for k, v in env["params"].items() if v.ndim >= 2}
    large = max(int(np.prod(v.shape)) for v in env["params"].values() if v.ndim >= 2)
    for (path, leaf), new_leaf, expected in zip(
        jax.tree_util.tree_flatten_with_path(state)[0],
        jax.tree.leaves(new_state),
        jax.tree.leaves(state_sh),
        strict=True,
    ):
        name = jax.tree_util.keystr(path)
        report[name] = [list(leaf.shape), str(getattr(leaf.sharding, "spec", leaf.sharding))]
        for what, got in (("init", leaf), ("update", new_leaf)):
            if not got.sharding.is_equivalent_to(expected, leaf.ndim):
                problems.append(f"{name}: {what} gave {got.sharding}, asked {expected}")
        cached_factor = ".factors[" in name
        if leaf.size >= large and leaf.sharding.is_fully_replicated:
            problems.append(f"{name} {leaf.shape}: fully replicated")
        if cached_factor and leaf.ndim == 3:
            param = next(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
            ways = split_ways[param]
            for what, got in (("init", leaf), ("update", new_leaf)):
                rows = got.addressable_shards[0].data.shape[1]
                if rows * ways != leaf.shape[1]:
                    problems.append(f"{name}: {what} holds {rows} of {leaf.shape[1]} rows "
                                    f"per device, its param is split {ways} ways")
        if tuple(leaf.shape) in param_shapes and leaf.ndim >= 2 and not cached_factor:
            like = param_shapes[tuple(leaf.shape)]
            if not leaf.sharding.is_equivalent_to(like, leaf.ndim):
                problems.append(f"{name}: {leaf.sharding.spec}, its param has {like.spec}")
    assert not problems, "; ".join(problems)
    factors = [leaf for name, leaf in zip(report, jax.tree.leaves(new_state), strict=True)
               if ".factors[" in name]
    return {
        "state_leaves": report,
        # What one device holds of the cached factors, against a replicated copy.
        "factor_bytes_per_device": sum(f.addressable_shards[0].data.nbytes for f in factors),
        "factor_bytes": sum(f.nbytes for f in factors),
    }


def _copies(sharding) -> int:
    """How many devices hold each element of an array with this sharding."""
    spec = [e for e in sharding.spec if e is not None]
    used = {a for e in spec for a in (e if isinstance(e, tuple) else (e,))}
    return int(np.prod([n for a, n in sharding.mesh.shape.items() if a not in used]))


def check_state_memory(env, config, axis_type_name):
    """Per device, the cached factors split like FSDP params take 1/8 of the replicated ones.

    Eight 64 x 64 kernels split by rows over 8 devices, ``CONFIGS[config]``, momentum: XLA's
    compiled memory analysis of one jitted training step (state and params donated), with
    the state's shardings from ``opx.state_shardings`` and with the cached factors
    replicated instead (the rule before they were split). The temporaries (each group's
    factors, params and gradients gathered for the update) may grow a little, but the
    total, arguments and temporaries, must shrink.
    """
    import optax

    jax, P, NamedSharding = env["jax"], env["P"], env["NamedSharding"]
    rng = np.random.default_rng(3)
    params = {f"w{i}": (rng.normal(size=(64, 64)) * 0.1).astype(np.float32) for i in range(8)}
    mesh = jax.make_mesh((8,), ("data",), axis_types=(getattr(env["AxisType"], axis_type_name),))
    param_sh = {k: NamedSharding(mesh, P("data", None)) for k in params}
    replicated = NamedSharding(mesh, P())
    pre = env["opx"].overparam_precondition(3, **_options(config))
    tx = optax.chain(pre, optax.sgd(0.01, momentum=0.9))

    def step(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    def abstract(tree, shardings):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            tree, shardings)  # fmt: skip

    split = env["opx"].state_shardings(tx, params, param_sh, replicated)
    whole = (split[0]._replace(factors=jax.tree.map(lambda _: replicated, split[0].factors)),
             *split[1:])  # fmt: skip
    report = {}
    with jax.set_mesh(mesh):
        abstract_state = jax.eval_shape(tx.init, params)
        for name, state_sh in (("split", split), ("replicated", whole)):
            compiled = jax.jit(
                step, in_shardings=(param_sh, state_sh, param_sh),
                out_shardings=(param_sh, state_sh), donate_argnums=(1, 2),
            ).lower(abstract(params, param_sh), abstract(abstract_state, state_sh),
                    abstract(params, param_sh)).compile()  # fmt: skip
            memory = compiled.memory_analysis()
            report[name] = {"argument_bytes": int(memory.argument_size_in_bytes),
                            "temp_bytes": int(memory.temp_size_in_bytes)}  # fmt: skip
    factors = jax.tree.leaves(abstract_state[0].factors)
    factor_bytes = sum(x.size * x.dtype.itemsize for x in factors)
    saved = {kind: report["replicated"][kind] - report["split"][kind] for kind in report["split"]}
    # Split 8 ways, all but an eighth of the tracked bases (7/8 of their bytes) leave each
    # device.
    assert saved["argument_bytes"] >= 0.85 * factor_bytes, (factor_bytes, report)
    assert sum(saved.values()) > 0, report
    return {"memory": report, "factor_bytes": factor_bytes}


def check_abstract_init_and_update(env, config, axis_type_name):
    """init/update on ShapeDtypeStructs with shardings, as with jax.eval_shape."""
    jax = env["jax"]
    mesh, shardings = env["mesh_and_shardings"](getattr(env["AxisType"], axis_type_name))
    tx = _make_tx(env, config)
    with jax.set_mesh(mesh):
        abstract_params = _abstract(jax, env["params"], shardings)
        abstract_state = jax.eval_shape(tx.init, abstract_params)
        updates, new_state = jax.eval_shape(
            tx.update, abstract_params, abstract_state, abstract_params
        )
    concrete_state = tx.init(env["params"])
    shapes = lambda t: jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), t)  # noqa: E731
    assert shapes(abstract_state) == shapes(concrete_state)
    assert shapes(new_state) == shapes(concrete_state)
    assert shapes(updates) == shapes(env["params"])
    return {}


def _flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
        analysis = analysis[0]
    return float(analysis["flops"])


def check_decompositions_spread_over_the_mesh(env, method, axis_type_name):
    """With 8 same-shaped matrices, each device computes about 1/8 of the decompositions.

    XLA's compiled cost analysis gives the FLOPs of the per-device program; LAPACK calls
    (svd, eigh) count no FLOPs there, so the matmul-only "newton" method shows the whole
    saving, "eigh" its matmul part (the Gram matrix and the application to G) and the
    default "tracked" (two updates: a basis computed afresh, then one rotated) its rotations
    and application. The updates must equal the single-device ones to 1e-5 relative (5e-5
    for "newton").
    """
    jax = env["jax"]
    rng = np.random.default_rng(2)
    params = {f"w{i}": (rng.normal(size=(64, 48)) * 0.3).astype(np.float32) for i in range(8)}
    grads = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
    tx = env["opx"].overparam_precondition(3, method=method)
    updates = 2 if method == "tracked" else 1

    def update(g, p):
        state = tx.init(p)
        for _ in range(updates):  # tracked: one update that decomposes, one that rotates
            out, state = tx.update(g, state, p)
        return out

    one = jax.devices()[0]
    single = jax.jit(update).lower(
        jax.device_put(grads, one), jax.device_put(params, one)
    ).compile()
    expected = single(jax.device_put(grads, one), jax.device_put(params, one))
    axis_type = getattr(env["AxisType"], axis_type_name)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    with jax.set_mesh(mesh):
        replicated = env["NamedSharding"](mesh, env["P"]())
        p_sh, g_sh = jax.device_put(params, replicated), jax.device_put(grads, replicated)
        sharded = jax.jit(update).lower(g_sh, p_sh).compile()
        got = sharded(g_sh, p_sh)
    ratio = _flops(sharded) / _flops(single)
    worst = max(_max_rel_diff(jax, got, expected).values())
    # The matmul-only method chains ~50 products, each reordered by the partitioner: its
    # round-off bound is a few times that of the single SVD/eigh programs.
    tolerance = 5 * RTOL if method == "newton" else RTOL
    assert worst <= tolerance, f"max rel diff {worst:.2e} > {tolerance}"
    assert ratio < 0.2, f"per-device FLOPs are {ratio:.3f} of one device's (want ~1/8)"
    return {"max_rel_diff": worst, "flops_ratio": ratio}


CHECKS = {}
for _method in ("newton", "eigh", "tracked"):
    for _mode in ("Auto", "Explicit"):
        CHECKS[f"decompositions_spread[{_method}-{_mode}]"] = (
            check_decompositions_spread_over_the_mesh, _method, _mode,
        )
for _config in CONFIGS:
    for _mode in ("Auto", "Explicit"):
        CHECKS[f"matches_single_device[{_config}-{_mode}]"] = (
            check_matches_single_device, _config, _mode,
        )
        CHECKS[f"updates_keep_param_shardings[{_config}-{_mode}]"] = (
            check_updates_keep_param_shardings, _config, _mode,
        )
        CHECKS[f"abstract_init_and_update[{_config}-{_mode}]"] = (
            check_abstract_init_and_update, _config, _mode,
        )
    CHECKS[f"state_follows_params[{_config}-Auto]"] = (check_state_follows_params, _config, "Auto")
# The tracked bases' shardings are part of their types under Explicit axes.
CHECKS["state_follows_params[defaults-Explicit]"] = (
    check_state_follows_params, "defaults", "Explicit",
)  # fmt: skip
CHECKS["state_memory[defaults-Auto]"] = (check_state_memory, "defaults", "Auto")


def run_all(names=None) -> dict:
    results = {}
    try:
        env = _setup()
    except Exception:  # every check fails with the same reason
        reason = traceback.format_exc()
        return {name: {"ok": False, "detail": reason} for name in (names or CHECKS)}
    for name in names or CHECKS:
        fn, config, mode = CHECKS[name]
        try:
            info = fn(env, config, mode)
            results[name] = {"ok": True, "detail": "", **(info or {})}
        except Exception as exc:  # noqa: BLE001 - reported to pytest, which fails the test
            detail = str(exc) if isinstance(exc, AssertionError) else traceback.format_exc()
            results[name] = {"ok": False, "detail": detail}
        status = "ok" if results[name]["ok"] else "FAILED"
        extra = results[name].get("max_rel_diff")
        flops = results[name].get("flops_ratio")
        print(f"{status:6s} {name}" + (f"  max rel diff {extra:.2e}" if extra is not None else "")
              + (f"  per-device FLOPs ratio {flops:.3f}" if flops is not None else ""),
              flush=True)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None,
                        help="write the results here, with the machine, jax version and "
                        "command (benchmarks/results/sharding_checks_cpu.json is quoted by "
                        "docs/scaling.md)")
    parser.add_argument("names", nargs="*", help="checks to run (default: all)")
    args = parser.parse_args(argv)
    results = run_all(args.names or None)
    if args.json:
        from overparam_experiments.timing import environment

        with open(args.json, "w") as f:
            json.dump({"environment": environment(), "results": results}, f, indent=1)
    failed = [n for n, r in results.items() if not r["ok"]]
    for name in failed:
        print(f"--- {name}\n{results[name]['detail']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
