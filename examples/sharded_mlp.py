"""An MLP trained data- and model-parallel with the depth-N preconditioner, vs one device.

The devices that exist are arranged in a ("data", "model") mesh: the batch is split over
"data" (data parallelism); the first layer's kernel is split by columns and the second by
rows over "model" (Megatron-style tensor parallelism), and the first kernel is also split over
"data" on its other axis (FSDP-style). The optimizer state is sharded like the params
(``overparam_optax.state_shardings``, the recipe of docs/scaling.md). The same training
then runs on one device, and the largest differences of losses and parameters are printed.

On a CPU, make 8 host devices (``--cpu-devices``, or the equivalent
``XLA_FLAGS=--xla_force_host_platform_device_count=8``):

    python examples/sharded_mlp.py --cpu-devices 8

On a machine with several accelerators, run it as is. See docs/scaling.md.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import overparam_optax as opx
from overparam_experiments import flags as xflags
from overparam_experiments.devices import use_host_cpu_devices

NUM_EXAMPLES = 4096  # the size of the synthetic data set (make_data)
INPUT_DIM = 64  # its features


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The command line; absl checks every value, and the mesh sizes, while parsing."""
    positive = {"lower_bound": 1, "flag_values": flag_values}
    flags.DEFINE_integer("steps", 50, "training steps", **positive)
    flags.DEFINE_integer("batch-size", 256, "examples per step", upper_bound=NUM_EXAMPLES,
                         **positive)  # fmt: skip
    flags.DEFINE_integer("hidden", 256, "hidden width", **positive)
    flags.DEFINE_integer("depth", 3, "N", **positive)
    flags.DEFINE_float("lr", 0.02, "learning rate", lower_bound=1e-12, upper_bound=1e3,
                       flag_values=flag_values)  # fmt: skip
    flags.DEFINE_integer("model-parallel", None, "size of 'model' (default 2 if it divides "
                         "the devices, else 1)", **positive)  # fmt: skip
    flags.DEFINE_integer("cpu-devices", None, "run on this many host CPU devices (default: "
                         "the devices jax finds)", **positive)  # fmt: skip
    xflags.require(
        ["cpu-devices", "model-parallel", "hidden", "batch-size"],
        lambda devices, *sizes: devices is None or mesh_problem(devices, *sizes) or True,
        "", flag_values=flag_values,
    )  # fmt: skip


def mesh_problem(devices: int, model: int | None, hidden: int, batch: int) -> str | None:
    """What keeps the ("data", "model") mesh from splitting the arrays evenly, or None."""
    model = model or (2 if devices % 2 == 0 else 1)
    if devices % model:
        return f"--model-parallel {model} does not divide the {devices} devices"
    data = devices // model
    if hidden % model:
        return f"--hidden {hidden} is not a multiple of --model-parallel {model}"
    if batch % data:
        return f"--batch-size {batch} is not a multiple of the data axis ({data} devices)"
    if INPUT_DIM % data:
        return f"the {INPUT_DIM} inputs do not split over the data axis ({data} devices)"
    return None


def setup_devices(args) -> list:
    """The devices (host CPUs with --cpu-devices), checked against the mesh sizes."""
    if args.cpu_devices is not None:
        jax.config.update("jax_platforms", "cpu")
        try:
            use_host_cpu_devices(args.cpu_devices)
        except (ValueError, RuntimeError) as error:  # e.g. a different count in XLA_FLAGS
            xflags.fail("cpu-devices", args.cpu_devices, str(error))
    elif "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        use_host_cpu_devices()  # the threads those CPU devices need
    devices = jax.devices()
    problem = mesh_problem(len(devices), args.model_parallel, args.hidden, args.batch_size)
    if problem:
        xflags.fail("model-parallel", args.model_parallel, problem)
    return devices


def make_data(num_examples=NUM_EXAMPLES, dim=INPUT_DIM, classes=10, seed=0):
    """A synthetic classification task: labels of a random two-layer teacher network."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_examples, dim)).astype(np.float32)
    hidden = np.tanh(x @ rng.normal(size=(dim, 128)) / np.sqrt(dim))
    y = np.argmax(hidden @ rng.normal(size=(128, classes)), axis=-1).astype(np.int32)
    return x, y


def init_params(dim, hidden, classes, seed=0):
    """A dim-hidden-classes tanh MLP: Gaussian kernels scaled by 1/sqrt(fan_in), zero bias."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return {
        "w1": jax.random.normal(k1, (dim, hidden)) / np.sqrt(dim),
        "b1": jnp.zeros((hidden,)),
        "w2": jax.random.normal(k2, (hidden, classes)) / np.sqrt(hidden),
    }


def loss_fn(params, x, y):
    """Mean softmax cross-entropy of the MLP on a batch."""
    logits = jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def param_specs():
    """The PartitionSpec of every parameter on the ("data", "model") mesh."""
    return {
        "w1": P("data", "model"),  # columns over "model" (TP), rows over "data" (FSDP)
        "b1": P("model"),
        "w2": P("model", None),  # rows over "model" (TP); its 10 columns stay whole
    }


def train(params, tx, batches, step_fn):
    """Runs ``step_fn`` over the batches; returns the final params and the losses."""
    state = tx.init(params) if step_fn.init is None else step_fn.init(params)
    losses = []
    for x, y in batches:
        params, state, loss = step_fn(params, state, x, y)
        losses.append(loss)
    return params, np.asarray(jnp.stack(losses))


class _Step:
    """A jitted train step, optionally with pinned shardings (and a matching init)."""

    def __init__(self, tx, in_shardings=None, out_shardings=None, init=None):
        def step(params, state, x, y):
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        kwargs = {}
        if in_shardings is not None:
            kwargs = {"in_shardings": in_shardings, "out_shardings": out_shardings}
        self._step = jax.jit(step, **kwargs)
        self.init = init

    def __call__(self, *args):
        return self._step(*args)


def main(args):
    """Trains on the mesh and on one device; returns the largest loss and parameter gaps."""
    devices = setup_devices(args)
    n = len(devices)
    model = args.model_parallel or (2 if n % 2 == 0 else 1)
    data = n // model
    # Auto axes: XLA's partitioner decides the collectives of the model code. (The
    # transform works on Explicit axes too: tests/sharding_checks.py.)
    mesh = jax.make_mesh((data, model), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    print(f"{n} x {devices[0].platform} devices ({devices[0].device_kind}); mesh data={data} "
          f"model={model}, axis types {mesh.axis_types}; jax {jax.__version__}")

    x_all, y_all = make_data()
    dim, classes = x_all.shape[1], int(y_all.max()) + 1
    rng = np.random.default_rng(1)
    batches = []
    for _ in range(args.steps):
        idx = rng.choice(len(y_all), size=args.batch_size, replace=False)
        batches.append((x_all[idx], y_all[idx]))
    params0 = jax.device_get(init_params(dim, args.hidden, classes))
    tx = opx.overparam_sgd(args.lr, N=args.depth, momentum=0.9)

    # --- one device ---
    one = devices[0]
    single_batches = [(jax.device_put(x, one), jax.device_put(y, one)) for x, y in batches]
    single_params, single_losses = train(
        jax.device_put(params0, one), tx, single_batches, _Step(tx)
    )

    # --- the mesh ---
    with jax.set_mesh(mesh):
        param_sh = {k: NamedSharding(mesh, s) for k, s in param_specs().items()}
        batch_sh = (NamedSharding(mesh, P("data", None)), NamedSharding(mesh, P("data")))
        abstract = {
            k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=param_sh[k])
            for k, v in params0.items()
        }
        # State shardings (docs/scaling.md): momentum follows its param, the cached
        # factors are split by rows like it, the step count is replicated.
        replicated = NamedSharding(mesh, P())
        state_sh = opx.state_shardings(tx, abstract, param_sh, replicated)
        step = _Step(
            tx,
            in_shardings=(param_sh, state_sh, *batch_sh),
            out_shardings=(param_sh, state_sh, replicated),
            init=jax.jit(tx.init, out_shardings=state_sh),
        )
        sharded_batches = [
            (jax.device_put(x, batch_sh[0]), jax.device_put(y, batch_sh[1])) for x, y in batches
        ]
        sharded_params, sharded_losses = train(
            jax.device_put(params0, param_sh), tx, sharded_batches, step
        )
        for k, v in sharded_params.items():
            print(f"  {k}: shape {v.shape} sharded {v.sharding.spec}")

    loss_diff = float(np.max(np.abs(sharded_losses - single_losses)))
    param_diff = max(
        float(np.max(np.abs(np.asarray(sharded_params[k]) - np.asarray(single_params[k]))))
        for k in params0
    )
    param_scale = max(float(np.max(np.abs(np.asarray(single_params[k])))) for k in params0)
    print(f"loss: step 0 {single_losses[0]:.4f} -> step {args.steps - 1} "
          f"{single_losses[-1]:.4f} (single device)")
    print(f"max |loss_sharded - loss_single| over {args.steps} steps: {loss_diff:.3e}")
    print(f"max |param_sharded - param_single|: {param_diff:.3e} "
          f"(max |param| {param_scale:.3f}, relative {param_diff / param_scale:.2e})")
    return loss_diff, param_diff


if __name__ == "__main__":
    xflags.run(define_flags, main)
