"""The accelerator suite: step times, linalg scaling and the float32 equivalence check, in one run.

One command (issue 12, item 4) for one GPU or TPU, budgeted at 7 minutes; every section has its
own time budget (seconds, options below), prints its progress, and records what it had to
skip instead of hiding it:

(a) ``step_time`` (budget ``--step-budget``, default 180 s). Step time of a full jitted
    training step (forward, backward, optimizer) for

    * ``cnn``: the paper's MNIST CNN (``models.TutorialCNN``), batch 128, all four kernels
      preconditioned;
    * ``mlp``: ``models.MLP`` 784-2048-2048-2048-10, batch 512;
    * ``transformer``: ``--transformer-layers`` pre-LayerNorm blocks (causal attention + a
      4x MLP) with d_model 1024, 16 heads, batch 16 x 512 tokens (:class:`TransformerBlocks`);

    under plain SGD, AdamW, Muon (``optax.contrib.muon``, every kernel orthogonalized) and
    ``overparam_precondition(N)`` with its defaults chained with SGD. These four are always
    compiled and timed, whatever the budget (on a GPU compiling the defaults' step takes
    25-50 s; timing them, seconds). Contenders are interleaved step by step
    (``overparam_optax.experiments.timing.time_interleaved``) in windows of ``--chunk``
    steps (10: one recomputation of the defaults' cached factors per window); each ratio is
    the median of paired window ratios to plain SGD.

(b) ``linalg`` (budget ``--linalg-budget``, default 130 s). One jitted
    ``precondition_matrix(W, G, N, method=m, precision=p)`` call for square n x n W with
    singular values log-spaced over a condition number of ``--condition`` (default 1e3)
    and a Gaussian G, for n in ``--sizes`` (default 256 ... 8192): "svd" (the exact
    reference) and "eigh" at HIGHEST, "newton" at every matmul precision (``jax.lax.Precision``
    HIGHEST, HIGH, DEFAULT, and ``BF16_X3``, the three-pass bfloat16 algorithm
    ``jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X3``; on CPU XLA computes float32 matmuls in
    float32 at all four, so they coincide there). Reported: compile
    time, the median call time, and the relative Frobenius error against method="svd" at
    HIGHEST. Once one call of a (method, precision) pair takes longer than
    ``--call-budget`` (default 2 s), its larger sizes are skipped; an entry whose cubic
    projection from the previous size exceeds the section's remaining time is skipped too.
    Skipped entries stay in the record with the reason.

(c) ``equivalence`` (budget ``--equivalence-budget``, default 30 s). Float32 (matmuls at
    HIGHEST inside the section only): a small ReLU MLP regression trained (1) as
    the explicit depth-N model of ``FactorizedDense`` layers (``models.MLP(dense_depth=N)``,
    balanced init) by plain gradient descent and (2) as the depth-1 model from the same
    end-to-end start with ``overparam_precondition(N)`` (defaults, and each method) + SGD,
    plus (3) plain SGD on the depth-1 model as the control that must *not* match; and the
    same comparison through ``experiments.trajectories.compare_trajectories``. Reported:
    the relative trajectory gap ``||W_explicit - W_implicit||_F / ||W_implicit||_F`` over
    all kernels (final and maximum over the steps).

(d) ``step_methods`` (budget ``--methods-budget``, default 80 s; last, see below). On the
    same models, each of ``method=`` svd, eigh and newton every step, and the defaults with
    ``precision=jax.lax.Precision.HIGHEST`` (the defaults' own precision is three bfloat16
    passes on GPU, HIGH on TPU: ``linalg.PLATFORM_PRECISION``), chained with SGD and timed
    beside SGD alone, while the model's share of the budget lasts. A compilation gets what
    is left of the share and is then abandoned (on an H100 the svd-every-step step of the
    transformer had not compiled after 5 minutes); XLA cannot be interrupted, so it runs on
    in a background thread, which is why this section comes last and stops there. The
    one-step probe of each compiled contender is reported even when its windows do not fit.

Usage (from the repository root):

    python benchmarks/accelerator_suite.py            # the suite: ~7.5 min on one GPU
    python benchmarks/accelerator_suite.py --smoke    # every section in seconds on CPU (CI)
    python benchmarks/accelerator_suite.py --sections linalg --sizes 256,512 --out x.json

Writes ``benchmarks/results/accelerator_suite_<backend>.json`` (device, jax version, the
command, per-section results; rewritten after every section, so a cut-off run keeps what it
finished) and the markdown tables ``accelerator_suite_<backend>.md`` next to it. With
``--smoke`` and no ``--out`` the files go to the temporary folder, never into
``benchmarks/results/``; with ``--sections`` naming a subset, the default name gets the
sections as a suffix. Exit status 1 if anything failed: a section, a model or a linalg call
(each error is in the record, under an ``error`` key, and the rest of the suite still runs).
"""

from __future__ import annotations

import argparse
import functools
import math
import pathlib
import subprocess
import tempfile
import threading
import time
import traceback

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import overparam_optax as opx
from overparam_optax import factorized, linalg
from overparam_optax.experiments import cli, timing
from overparam_optax.experiments.models import MLP, TutorialCNN, kernel_mask
from overparam_optax.experiments.training import run_full_batch
from overparam_optax.experiments.trajectories import compare_trajectories

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
SECTIONS = ("step_time", "linalg", "equivalence", "step_methods")
MODELS = ("cnn", "mlp", "transformer")
#: The concrete methods timed (svd first: it is the error reference).
STEP_METHODS = ("svd", "eigh", "newton")
#: Matmul precisions of the linalg section: jax.lax.Precision's three, and the three-pass
#: bfloat16 algorithm named explicitly (float32-like accuracy from bf16 matrix units).
PRECISIONS = {
    "HIGHEST": jax.lax.Precision.HIGHEST,
    "HIGH": jax.lax.Precision.HIGH,
    "DEFAULT": jax.lax.Precision.DEFAULT,
    "BF16_X3": jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X3,
}
DEFAULT_SIZES = "256,512,1024,2048,4096,8192"
#: Section budgets in seconds on one accelerator (7.5 min with start-up; on a GPU most of
#: it is compilation), and with --smoke.
BUDGETS = {"step_time": 180.0, "linalg": 130.0, "equivalence": 30.0, "step_methods": 80.0}
BUDGET_FLAGS = {
    "step_time": "--step-budget",
    "linalg": "--linalg-budget",
    "equivalence": "--equivalence-budget",
    "step_methods": "--methods-budget",
}
SMOKE_BUDGET = 600.0
#: Timed together first on every model: the baselines and what users get by default. The
#: other contenders follow one at a time, each interleaved with SGD, while time is left.
CORE_CONTENDERS = ("sgd", "adamw", "muon", "overparam_default")
STEP_EXTRAS = (*(f"overparam_{m}" for m in STEP_METHODS), "overparam_default_highest")
#: With --smoke each model compiles only some contenders (compilation dominates a smoke
#: run); together they cover every contender and every model.
SMOKE_CONTENDERS = {
    "cnn": ("sgd", "overparam_default", "overparam_default_highest"),
    "mlp": ("sgd", "adamw", "muon", "overparam_svd", "overparam_eigh"),
    "transformer": ("sgd", "overparam_newton"),
}


# --------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------


def _section(text: str) -> str:
    if text not in SECTIONS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(SECTIONS)}, got {text!r}")
    return text


def _model(text: str) -> str:
    if text not in MODELS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(MODELS)}, got {text!r}")
    return text


def parse_args(argv=None) -> argparse.Namespace:
    """Parses and checks the command line (exit status 2 with a message on a bad value)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    timing.add_common_args(parser)
    parser.add_argument(
        "--smoke",
        dest="quick",
        action="store_true",
        help="every section in seconds on CPU: tiny sizes, 2-3 steps (same as --quick)",
    )
    parser.add_argument(
        "--sections", type=cli.comma_list(_section), default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)}",
    )  # fmt: skip
    parser.add_argument("--N", type=cli.positive_int, default=3, help="the depth")
    parser.add_argument(
        "--models", type=cli.comma_list(_model), default=",".join(MODELS),
        help=f"step-time models, a subset of {','.join(MODELS)}",
    )  # fmt: skip
    parser.add_argument(
        "--chunk", type=cli.positive_int, default=10,
        help="steps per window (default 10: one recomputation of the default's factors)",
    )  # fmt: skip
    parser.add_argument("--repeats", type=cli.positive_int, default=5, help="timed windows")
    parser.add_argument("--transformer-layers", type=cli.positive_int, default=2)
    parser.add_argument("--transformer-batch", type=cli.positive_int, default=16)
    parser.add_argument("--transformer-seq", type=cli.positive_int, default=512)
    parser.add_argument(
        "--sizes", type=cli.comma_list(cli.positive_int), default=DEFAULT_SIZES,
        help="square sizes n of the linalg section",
    )  # fmt: skip
    parser.add_argument(
        "--condition", type=cli.positive_float, default=1e3,
        help="condition number of the linalg section's W (>= 1)",
    )  # fmt: skip
    parser.add_argument("--linalg-repeats", type=cli.positive_int, default=5)
    parser.add_argument(
        "--call-budget", type=cli.positive_float, default=None,
        help="seconds (default 2; 1e-9 with --smoke, so that its second size shows the skip "
        "records): a (method, precision) whose call takes longer skips its larger sizes",
    )  # fmt: skip
    parser.add_argument("--equivalence-steps", type=cli.positive_int, default=200)
    parser.add_argument("--equivalence-lr", type=cli.positive_float, default=0.02)
    for section, flag in BUDGET_FLAGS.items():
        parser.add_argument(
            flag,
            dest=f"{section}_budget",
            type=cli.positive_float,
            default=None,
            help=f"seconds for the {section} section (default {BUDGETS[section]:g}; "
            f"{SMOKE_BUDGET:g} with --smoke)",
        )
    args = parser.parse_args(argv)
    if args.condition < 1:
        parser.error(f"--condition must be at least 1, got {args.condition:g}")
    args.sections = [s for s in SECTIONS if s in args.sections]  # canonical order, no repeats
    args.models = [m for m in MODELS if m in args.models]
    args.sizes = sorted(set(args.sizes))
    if args.call_budget is None:
        args.call_budget = 1e-9 if args.quick else 2.0
    for section in SECTIONS:
        if getattr(args, f"{section}_budget") is None:
            setattr(args, f"{section}_budget", SMOKE_BUDGET if args.quick else BUDGETS[section])
    return args


def output_path(args: argparse.Namespace) -> pathlib.Path:
    """Where the JSON goes: ``--out``, else results/ (full runs) or the tmp folder (smoke)."""
    if args.out:
        return pathlib.Path(args.out)
    name = f"accelerator_suite_{jax.default_backend()}"
    if args.sections != list(SECTIONS):
        name += "_" + "_".join(args.sections)
    if args.quick:
        return pathlib.Path(tempfile.gettempdir()) / f"{name}_smoke.json"
    return RESULTS_DIR / f"{name}.json"


# --------------------------------------------------------------------------------------
# Budgets and progress.
# --------------------------------------------------------------------------------------


class Budget:
    """A section's wall-clock allowance, and its progress lines ``[section  12.3/140 s] ...``."""

    def __init__(self, name: str, seconds: float):
        self.name = name
        self.seconds = float(seconds)
        self.start = time.perf_counter()

    def spent(self) -> float:
        """Seconds since the section started."""
        return time.perf_counter() - self.start

    def remaining(self) -> float:
        """Seconds left (negative once overrun)."""
        return self.seconds - self.spent()

    def log(self, message: str) -> None:
        """Prints one progress line, flushed at once."""
        print(f"[{self.name} {self.spent():6.1f}/{self.seconds:.0f} s] {message}", flush=True)


# --------------------------------------------------------------------------------------
# (a) Step time.
# --------------------------------------------------------------------------------------


class TransformerBlocks(nn.Module):
    """``layers`` pre-LayerNorm transformer blocks on (batch, seq, d_model) inputs.

    Each block: ``x + out(causal_attention(qkv(LN(x))))``, then ``x + down(gelu(up(LN(x))))``
    with ``up`` of width ``mlp_ratio * d_model``. Every weight is a 2-D Dense kernel
    (``qkv`` d x 3d, ``out`` d x d, ``up`` d x 4d, ``down`` 4d x d), so the preconditioner and
    Muon see plain matrices; attention is ``jax.nn.dot_product_attention``.

    Attributes:
      d_model: the model width.
      num_heads: attention heads (must divide ``d_model``).
      layers: the number of blocks.
      mlp_ratio: the MLP's hidden width over ``d_model``.
    """

    d_model: int = 1024
    num_heads: int = 16
    layers: int = 1
    mlp_ratio: int = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, seq, _ = x.shape
        head_dim = self.d_model // self.num_heads
        for i in range(self.layers):
            h = nn.LayerNorm(name=f"ln_attn_{i}")(x)
            qkv = nn.Dense(3 * self.d_model, name=f"qkv_{i}")(h)
            q, k, v = jnp.split(qkv.reshape(batch, seq, 3, self.num_heads, head_dim), 3, axis=2)
            attended = jax.nn.dot_product_attention(
                q[:, :, 0], k[:, :, 0], v[:, :, 0], is_causal=True
            )
            x = x + nn.Dense(self.d_model, name=f"out_{i}")(attended.reshape(batch, seq, -1))
            h = nn.LayerNorm(name=f"ln_mlp_{i}")(x)
            h = nn.gelu(nn.Dense(self.mlp_ratio * self.d_model, name=f"up_{i}")(h))
            x = x + nn.Dense(self.d_model, name=f"down_{i}")(h)
        return x



def muon_dimension_numbers(params):
    """Muon's dimension numbers: every kernel of rank >= 2 as (all but last) x last; else None."""

    def spec(path, leaf):
        if getattr(path[-1], "key", None) != "kernel" or leaf.ndim < 2:
            return None
        return optax.contrib.MuonDimensionNumbers(tuple(range(leaf.ndim - 1)), leaf.ndim - 1)

    return jax.tree_util.tree_map_with_path(spec, params)


def _problem(name: str, args: argparse.Namespace, seed: int) -> dict:
    """Model, parameters, loss, data and mask of one step-time model (tiny with --smoke).

    Two batches (numpy draws, put on the device once) alternate; the parameters come from a
    jitted ``model.init`` (one compilation instead of one per eager operation).
    """
    rng = np.random.default_rng(seed)
    key = jax.random.PRNGKey(seed)
    smoke = args.quick

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32))

    def labels(*shape):
        return jnp.asarray(rng.integers(0, 10, shape, dtype=np.int32))

    if name == "cnn":
        batch = 4 if smoke else 128
        model = TutorialCNN(dense_width=16 if smoke else 512)
        batches = [
            (normal(batch, 28, 28, 1), labels(batch), jax.random.fold_in(key, i)) for i in range(2)
        ]
        params = jax.jit(lambda k, x: model.init({"params": k}, x, False))(key, batches[0][0])

        def loss_fn(p, xb, yb, dropout_key):
            logits = model.apply({"params": p}, xb, True, rngs={"dropout": dropout_key})
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        mask = functools.partial(kernel_mask, precondition_conv=True)  # all four kernels
        shape = f"TutorialCNN(dense_width={model.dense_width}), batch {batch}"
    elif name == "mlp":
        batch, width = (8, 32) if smoke else (512, 2048)
        model = MLP(hidden=(width,) * 3)
        batches = [(normal(batch, 784), labels(batch)) for _ in range(2)]
        params = jax.jit(model.init)(key, batches[0][0])

        def loss_fn(p, xb, yb):
            logits = model.apply({"params": p}, xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        mask = None
        shape = f"MLP 784-{width}x3-10, batch {batch}"
    else:
        if smoke:
            batch, seq, d_model, heads, layers = 2, 8, 32, 2, 1
        else:
            batch, seq, d_model, heads = args.transformer_batch, args.transformer_seq, 1024, 16
            layers = args.transformer_layers
        model = TransformerBlocks(d_model=d_model, num_heads=heads, layers=layers)
        batches = [(normal(batch, seq, d_model), normal(batch, seq, d_model)) for _ in range(2)]
        params = jax.jit(model.init)(key, batches[0][0])

        def loss_fn(p, xb, yb):
            return jnp.mean((model.apply({"params": p}, xb) - yb) ** 2)

        mask = None
        shape = (
            f"{layers} transformer block(s), d_model {d_model}, {heads} heads, "
            f"batch {batch} x seq {seq}"
        )

    def data_fn(i):
        return batches[i % 2]

    return {
        "loss_fn": loss_fn,
        "params": params["params"],
        "data_fn": data_fn,
        "mask": mask,
        "shape": shape,
    }


def _optimizers(N: int, lr: float, mask) -> dict[str, optax.GradientTransformation]:
    """The contenders: baselines, the transform's defaults, then each method every step and
    the defaults at float32 matmul precision (HIGHEST), each chained with SGD."""

    def pre(**kw):
        return optax.chain(opx.overparam_precondition(N, mask=mask, **kw), optax.sgd(lr))

    return {
        "sgd": optax.sgd(lr),
        "adamw": optax.adamw(lr),
        "muon": optax.contrib.muon(lr, muon_weight_dimension_numbers=muon_dimension_numbers),
        "overparam_default": pre(),
        **{f"overparam_{m}": pre(method=m) for m in STEP_METHODS},
        "overparam_default_highest": pre(precision=jax.lax.Precision.HIGHEST),
    }


def _plan(probe: dict[str, float], chunk: int, repeats: int, remaining: float, smoke: bool):
    """Windows that fit ``remaining`` seconds: (repeats, dropped contenders).

    The interleaved run costs about sum(probe) * chunk * (repeats + 1) (one warm-up window).
    The window length stays ``chunk`` (a multiple of the default's recomputation period, so
    that every window holds one recomputation); repeats shrink to 3 (1 with --smoke), then
    the slowest contenders other than SGD are dropped until it fits.
    """
    min_repeats = 1 if smoke else min(3, repeats)
    kept = dict(probe)
    dropped = []

    def cost(r):
        return sum(kept.values()) * chunk * (r + 1)

    while True:
        r = repeats
        while r > min_repeats and cost(r) > remaining:
            r -= 1
        if cost(r) <= remaining or len(kept) <= 1:
            return r, dropped
        slowest = max((n for n in kept if n != "sgd"), key=kept.get)
        dropped.append(slowest)
        del kept[slowest]


def _compile_and_probe(step, carry, data_fn, limit: float | None = None):
    """(compiled step, carry after two steps, seconds of compile + first step, of the second).

    With ``limit``, compilation runs in a daemon thread and is abandoned after ``limit``
    seconds (XLA cannot be interrupted): the compiled step is then None and the thread
    runs on in the background until the process ends.
    """
    begin = time.perf_counter()
    if limit is None:
        compiled = step.lower(carry, *data_fn(0)).compile()
    else:
        done = {}

        def work():
            try:
                done["compiled"] = step.lower(carry, *data_fn(0)).compile()
            except Exception as error:  # re-raised in the caller's thread
                done["error"] = error

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        thread.join(limit)
        if thread.is_alive():
            return None, carry, time.perf_counter() - begin, None
        if "error" in done:
            raise done["error"]
        compiled = done["compiled"]
    carry = jax.block_until_ready(compiled(carry, *data_fn(0)))
    compile_s = time.perf_counter() - begin
    begin = time.perf_counter()
    carry = jax.block_until_ready(compiled(carry, *data_fn(1)))
    return compiled, carry, compile_s, time.perf_counter() - begin


def _empty_record(problem: dict, args: argparse.Namespace, chunk: int) -> dict:
    return {
        "shape": problem["shape"],
        "N": args.N,
        "chunk": chunk,
        "repeats": {},
        "seconds_per_step": {},
        "ratio_to_sgd": {},
        "window_seconds_per_step": {},
        "compile_and_first_step_seconds": {},
        "probe_seconds": {},
        "skipped": {},
        "failed": {},
    }


#: Per model, what section (a) built (problem, contenders, SGD's compiled step and carry),
#: so that section (d) times the other contenders beside the same SGD.
_MODEL_STATE: dict[str, dict] = {}


def _model_state(name: str, args: argparse.Namespace) -> dict:
    if name not in _MODEL_STATE:
        problem = _problem(name, args, seed=MODELS.index(name))
        txs = _optimizers(args.N, 1e-3, problem["mask"])
        if args.quick:
            txs = {n: tx for n, tx in txs.items() if n in SMOKE_CONTENDERS[name]}
        _MODEL_STATE[name] = {
            "problem": problem,
            "txs": txs,
            "steps": {},
            "carries": {},
            "probe_seconds": {},
        }
    return _MODEL_STATE[name]


def _prepare(name, tx_name, state, rec, budget, limit=None) -> str:
    """Compiles and probes one contender into ``state``: "ok", "failed" or "abandoned"."""
    problem, tx = state["problem"], state["txs"][tx_name]
    try:
        step = timing.train_step(problem["loss_fn"], tx)
        carry = (problem["params"], jax.jit(tx.init)(problem["params"]))
        compiled, carry, compile_s, probe_s = _compile_and_probe(
            step, carry, problem["data_fn"], limit
        )
    except Exception as error:  # e.g. out of memory: the others still run
        if tx_name == "sgd":
            raise
        rec["failed"][tx_name] = {"error": repr(error)}
        budget.log(f"{name}/{tx_name}: error {repr(error)[:300]}")
        return "failed"
    if compiled is None:
        rec["skipped"][tx_name] = f"compilation abandoned after {compile_s:.0f} s"
        budget.log(f"{name}/{tx_name}: compilation abandoned after {compile_s:.0f} s")
        return "abandoned"
    state["steps"][tx_name], state["carries"][tx_name] = compiled, carry
    state["probe_seconds"][tx_name] = probe_s
    rec["compile_and_first_step_seconds"][tx_name] = compile_s
    rec["probe_seconds"][tx_name] = probe_s
    budget.log(
        f"{name}/{tx_name}: compile+first step {compile_s:.1f} s, one step {1e3 * probe_s:.1f} ms"
    )
    return "ok"


def _time_group(name, names, state, rec, budget, chunk, repeats, room, smoke) -> None:
    """Times ``names`` (SGD first) interleaved; a contender whose windows do not fit
    ``room`` seconds is dropped (recorded); SGD's own numbers come from its first group."""
    probe = {n: rec["probe_seconds"][n] for n in names}
    r, dropped = _plan(probe, chunk, repeats, room, smoke)
    for tx_name in dropped:
        rec["skipped"][tx_name] = (
            f"not timed: its windows did not fit the {room:.0f} s left to this model "
            f"(slowest dropped first); one step {probe[tx_name]:.3g} s"
        )
    kept = [n for n in names if n not in dropped]
    budget.log(f"{name}: timing {kept} in {r} windows of {chunk} steps")
    medians, ratios, windows = timing.time_interleaved(
        {n: state["steps"][n] for n in kept},
        state["carries"],
        chunk,
        r,
        state["problem"]["data_fn"],
        "sgd",
    )
    for n in kept:
        if n == "sgd" and "sgd" in rec["ratio_to_sgd"]:
            continue
        rec["seconds_per_step"][n] = medians[n]
        rec["ratio_to_sgd"][n] = ratios[n]
        rec["window_seconds_per_step"][n] = windows[n]
        rec["repeats"][n] = r


def _finish(name, rec, budget, begin) -> dict:
    probe = rec["probe_seconds"]
    rec["probe_ratio_to_sgd"] = {n: t / probe["sgd"] for n, t in probe.items()}
    rec["seconds"] = time.perf_counter() - begin
    cells = "  ".join(f"{n} {v:.2f}x" for n, v in rec["ratio_to_sgd"].items())
    budget.log(f"{name}: ratio to sgd: {cells}")
    return rec


def _windows(args):
    return (1, 2) if args.quick else (args.chunk, args.repeats)


def run_step_time(args: argparse.Namespace, budget: Budget) -> dict:
    """Section (a): SGD, AdamW, Muon and the defaults, interleaved, on every model.

    These four are always compiled and timed with full windows, budget or not: they are
    what the suite is for, and timing them takes seconds once compiled.
    """
    chunk, repeats = _windows(args)
    results = {}
    for name in args.models:
        begin = time.perf_counter()
        try:
            state = _model_state(name, args)
            core = [n for n in state["txs"] if n in CORE_CONTENDERS]
            budget.log(f"{name}: {state['problem']['shape']}; {core}")
            rec = _empty_record(state["problem"], args, chunk)
            core = [n for n in core if _prepare(name, n, state, rec, budget) == "ok"]
            _time_group(name, core, state, rec, budget, chunk, repeats, math.inf, args.quick)
            results[name] = _finish(name, rec, budget, begin)
        except Exception as error:  # one model failing (e.g. out of memory) keeps the others
            traceback.print_exc()
            results[name] = {"error": repr(error), "seconds": time.perf_counter() - begin}
    return {"learning_rate": 1e-3, "models": results}


def run_step_methods(args: argparse.Namespace, budget: Budget) -> dict:
    """Section (d), last: each other contender, timed beside SGD, while time is left.

    Each model gets an equal share of what is left. A compilation is given what is left of
    the share and abandoned after that; it then runs on in a background thread, so the
    section stops there (later timings would share the machine with it).
    """
    chunk, repeats = _windows(args)
    results = {}
    stopped = None
    for index, name in enumerate(args.models):
        begin = time.perf_counter()
        share = budget.remaining() / (len(args.models) - index)

        def left(begin=begin, share=share):
            return share - (time.perf_counter() - begin)

        try:
            state = _model_state(name, args)
            rec = _empty_record(state["problem"], args, chunk)
            others = [n for n in state["txs"] if n in STEP_EXTRAS]
            budget.log(f"{name}: {others}, {share:.0f} s")
            if "sgd" not in state["steps"]:  # section (a) did not run
                _prepare(name, "sgd", state, rec, budget)
            else:
                rec["probe_seconds"]["sgd"] = state["probe_seconds"]["sgd"]
            for tx_name in others:
                if stopped:
                    rec["skipped"][tx_name] = stopped
                    continue
                if left() <= 0:
                    rec["skipped"][tx_name] = "not compiled: this model's share was spent"
                    continue
                limit = None if args.quick else left()
                outcome = _prepare(name, tx_name, state, rec, budget, limit)
                if outcome == "abandoned":
                    stopped = (
                        f"not compiled: the section stopped after the compilation of "
                        f"{name}/{tx_name} was abandoned"
                    )
                elif outcome == "ok":
                    room = 0.9 * left()
                    _time_group(
                        name, ["sgd", tx_name], state, rec, budget, chunk, repeats, room,
                        args.quick,
                    )  # fmt: skip
            results[name] = _finish(name, rec, budget, begin)
        except Exception as error:
            traceback.print_exc()
            results[name] = {"error": repr(error), "seconds": time.perf_counter() - begin}
    return {"learning_rate": 1e-3, "models": results}


# --------------------------------------------------------------------------------------
# (b) Linalg scaling.
# --------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("n", "condition"))
def conditioned_pair(key: jax.Array, n: int, condition: float) -> tuple[jax.Array, jax.Array]:
    """W = Q1 diag(s) Q2^T with s log-spaced from 1 to 1/condition (random orthogonal Q1, Q2),
    and a standard Gaussian G; both n x n float32."""
    k1, k2, k3 = jax.random.split(key, 3)
    q1, _ = jnp.linalg.qr(jax.random.normal(k1, (n, n), jnp.float32))
    q2, _ = jnp.linalg.qr(jax.random.normal(k2, (n, n), jnp.float32))
    s = jnp.logspace(0.0, -math.log10(condition), n, dtype=jnp.float32)
    w = jnp.matmul(q1 * s, q2.T, precision=jax.lax.Precision.HIGHEST)
    return w, jax.random.normal(k3, (n, n), jnp.float32)


def _time_call(w, g, N: int, method: str, precision, repeats: int, call_budget: float):
    """Compiles and times one ``precondition_matrix`` call: (entry dict, its output).

    One warm-up call, then up to ``repeats`` timed calls, stopping once they add up to
    ``call_budget`` seconds (always at least one).
    """
    call = jax.jit(
        functools.partial(linalg.precondition_matrix, N=N, method=method, precision=precision)
    )
    begin = time.perf_counter()
    compiled = call.lower(w, g).compile()
    entry = {"compile_seconds": time.perf_counter() - begin}
    out = jax.block_until_ready(compiled(w, g))
    times = []
    while len(times) < repeats and (not times or sum(times) < call_budget):
        begin = time.perf_counter()
        jax.block_until_ready(compiled(w, g))
        times.append(time.perf_counter() - begin)
    entry.update(seconds=timing.median(times), repeats=len(times))
    return entry, out


def run_linalg(args: argparse.Namespace, budget: Budget) -> dict:
    """Section (b): precondition_matrix time and error per size, method and precision."""
    sizes = [8, 16] if args.quick else args.sizes
    repeats = 2 if args.quick else args.linalg_repeats
    methods = list(linalg.STATELESS_METHODS)
    methods.sort(key=lambda m: m != "svd")  # svd first: the reference of every error
    # svd (the exact reference) and eigh at HIGHEST only: their cost is the decomposition,
    # and lower-precision Gram matrices only lose accuracy; newton is all matmuls.
    pairs = [(m, "HIGHEST") for m in methods if m != "newton"] + [
        ("newton", p) for p in PRECISIONS
    ]
    backend = jax.default_backend()
    note = (
        "on cpu XLA computes float32 matmuls in float32 at every precision: "
        "HIGHEST, HIGH and DEFAULT coincide (differences are timing noise)"
        if backend == "cpu"
        else f"on {backend} HIGH and DEFAULT may use reduced-precision matmul passes"
    )
    budget.log(note)
    too_slow: dict[tuple, int] = {}  # (method, precision) -> the size whose call was too slow
    failed_at: dict[tuple, int] = {}  # (method, precision) -> the size where it raised
    last: dict[tuple, dict] = {}  # (method, precision) -> its entry at the previous size

    def skip_reason(pair, n) -> str | None:
        if pair in failed_at:
            return f"skipped: the call failed at n={failed_at[pair]}"
        if pair in too_slow:
            return (
                f"skipped: one call at n={too_slow[pair]} took longer than the "
                f"{args.call_budget:g} s call budget"
            )
        if pair in last:  # compile + warm-up + timed calls, the call scaled by n^3
            prev = last[pair]
            call = prev["seconds"] * (n / prev["n"]) ** 3
            projected = prev["compile_seconds"] + 2 * call + min(repeats * call, args.call_budget)
            if projected > budget.remaining():
                return (
                    f"skipped: projected {projected:.1f} s (n^3 from n={prev['n']}) exceeds "
                    f"the {max(budget.remaining(), 0):.1f} s left in the section"
                )
        if budget.remaining() <= 0:
            return "skipped: section budget spent"
        return None

    rows = []
    for n in sizes:
        row = {"n": n, "entries": {}}
        rows.append(row)
        w = g = reference = None
        for m, p in pairs:
            label = f"{m}/{p}"
            reason = skip_reason((m, p), n)
            if reason:
                row["entries"][label] = {"skipped": reason}
                continue
            try:
                if w is None:  # made only for a size that runs at least one entry
                    begin = time.perf_counter()
                    w, g = jax.block_until_ready(
                        conditioned_pair(jax.random.PRNGKey(n), n, args.condition)
                    )
                    row["make_matrices_seconds"] = time.perf_counter() - begin
                entry, out = _time_call(
                    w, g, args.N, m, PRECISIONS[p], repeats, args.call_budget
                )  # fmt: skip
                if (m, p) == ("svd", "HIGHEST"):
                    reference = out
                entry["relative_error_vs_svd_highest"] = (
                    None  # no reference at this size (svd at HIGHEST was skipped)
                    if reference is None
                    else float(jnp.linalg.norm(out - reference) / jnp.linalg.norm(reference))
                )
                del out
                last[(m, p)] = {"n": n, **entry}
                if entry["seconds"] > args.call_budget:
                    too_slow[(m, p)] = n
                err = entry["relative_error_vs_svd_highest"]
                budget.log(
                    f"n={n} {label}: {1e3 * entry['seconds']:.2f} ms "
                    f"(compile {entry['compile_seconds']:.1f} s), rel. error "
                    f"{'n/a' if err is None else f'{err:.1e}'}"
                )
            except Exception as error:  # e.g. out of memory at the largest size
                entry = {"error": repr(error)}
                failed_at[(m, p)] = n
                budget.log(f"n={n} {label}: error {entry['error'][:300]}")
            row["entries"][label] = entry
        if w is None:
            budget.log(f"n={n}: every entry skipped")
        del w, g, reference
    return {
        "N": args.N,
        "condition": args.condition,
        "matrix": "W = Q1 diag(logspace(0, -log10(condition), n)) Q2^T, G Gaussian, float32",
        "methods": methods,
        "precisions": list(PRECISIONS),
        "entries": [f"{m}/{p}" for m, p in pairs],
        "call_budget_seconds": args.call_budget,
        "precision_note": note,
        "rows": rows,
    }


# --------------------------------------------------------------------------------------
# (c) Equivalence in float32.
# --------------------------------------------------------------------------------------


def _dense_names(params):
    """Renames ``FactorizedDense_i`` to ``Dense_i`` (collapsed explicit -> implicit params)."""
    return {k.replace("FactorizedDense_", "Dense_"): v for k, v in params.items()}


def _kernels(params) -> list[np.ndarray]:
    """The layers' kernels in name order, as float64 numpy arrays."""
    return [np.asarray(params[k]["kernel"], np.float64) for k in sorted(params)]


def _gap_curve(explicit_kernels, implicit_kernels) -> np.ndarray:
    """Per step ||K_explicit - K_implicit||_F / ||K_implicit||_F over all kernels together."""
    diff = sum(
        np.sum((e - i) ** 2, axis=(1, 2))
        for e, i in zip(explicit_kernels, implicit_kernels, strict=True)
    )
    norm = sum(np.sum(i**2, axis=(1, 2)) for i in implicit_kernels)
    return np.sqrt(diff / norm)


def _summary(gap: np.ndarray) -> dict:
    return {
        "final_gap": float(gap[-1]),
        "max_gap": float(np.max(gap)),
        "gap_curve_every_10": [float(v) for v in gap[::10]],
    }


def run_equivalence(args: argparse.Namespace, budget: Budget) -> dict:
    """Section (c): explicit FactorizedDense training vs the preconditioned depth-1 model."""
    N = args.N
    steps = 3 if args.quick else args.equivalence_steps
    lr = args.equivalence_lr
    hidden, d_in, d_out, samples = (8, 6, 3, 32) if args.quick else (32, 16, 8, 256)
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((samples, d_in))
    x = jnp.asarray(x_np, jnp.float32)
    y = jnp.asarray(np.tanh(x_np @ rng.standard_normal((d_in, d_out))), jnp.float32)
    k_init = jax.random.PRNGKey(0)

    explicit_model = MLP(hidden=(hidden,), num_classes=d_out, dense_depth=N)
    implicit_model = MLP(hidden=(hidden,), num_classes=d_out)

    def loss_of(model):
        return lambda p: 0.5 * jnp.mean((model.apply({"params": p}, x) - y) ** 2)

    def kernels_of(p):
        return {k: {"kernel": v["kernel"]} for k, v in p.items()}

    result = {
        "dtype": "float32",
        "matmul_precision": "highest (jax.default_matmul_precision, this section only)",
        "problem": f"MLP {d_in}-{hidden}-{d_out} (ReLU), MSE to a tanh teacher, {samples} samples",
        "N": N,
        "learning_rate": lr,
        "steps": steps,
    }
    with jax.default_matmul_precision("highest"):

        @jax.jit
        def initial(key):
            """Balanced FactorizedDense params, their collapse, and the output mismatch."""
            explicit = explicit_model.init(key, x)["params"]
            implicit = _dense_names(factorized.collapse(explicit))
            out_e = explicit_model.apply({"params": explicit}, x)
            out_i = implicit_model.apply({"params": implicit}, x)
            return explicit, implicit, jnp.linalg.norm(out_e - out_i) / jnp.linalg.norm(out_i)

        explicit_params, start, output_gap = initial(k_init)
        result["initial_output_gap"] = float(output_gap)
        _, explicit_loss, explicit_rec = run_full_batch(
            loss_of(explicit_model),
            explicit_params,
            optax.sgd(lr),
            steps,
            record_fn=lambda p: kernels_of(_dense_names(factorized.collapse(p))),
        )
        explicit_kernels = _kernels(explicit_rec)
        budget.log(
            f"explicit FactorizedDense depth {N}: loss {explicit_loss[0]:.4g} -> "
            f"{explicit_loss[-1]:.4g}"
        )
        # In order of priority, should the budget run out: the default and the control,
        # compare_trajectories, then each method.
        implicit_txs = {
            "overparam_default": opx.overparam_precondition(N),
            "plain_sgd_control": optax.identity(),
            "compare_trajectories": None,
            **{f"overparam_{m}": opx.overparam_precondition(N, method=m) for m in STEP_METHODS},
        }
        if args.quick:  # compilation dominates a smoke run: the default and the control
            implicit_txs = {n: implicit_txs[n] for n in list(implicit_txs)[:3]}
        runs = {}
        result["factorized_dense"] = runs
        result["compare_trajectories"] = {"skipped": "section budget spent"}
        for name, pre in implicit_txs.items():
            if budget.remaining() <= 0:
                if pre is not None:
                    runs[name] = {"skipped": "section budget spent"}
                continue
            if pre is None:
                cmp = compare_trajectories(loss_of(implicit_model), start, N, lr, steps, key=k_init)
                result[name] = {
                    **_summary(np.asarray(cmp.gap, np.float64)),
                    "final_balancedness": float(cmp.balancedness[-1]),
                }
                budget.log(f"{name}: final gap {result[name]['final_gap']:.2e}")
                continue
            _, losses, rec = run_full_batch(
                loss_of(implicit_model), start, optax.chain(pre, optax.sgd(lr)), steps,
                record_fn=kernels_of,
            )  # fmt: skip
            runs[name] = {
                **_summary(_gap_curve(explicit_kernels, _kernels(rec))),
                "final_loss": float(losses[-1]),
            }
            budget.log(f"FactorizedDense vs {name}: final gap {runs[name]['final_gap']:.2e}")
        control = runs.get("plain_sgd_control", {}).get("final_gap")
        default = runs.get("overparam_default", {}).get("final_gap")
        if control and default is not None:
            result["default_gap_over_control_gap"] = default / control
    return result


# --------------------------------------------------------------------------------------
# Report.
# --------------------------------------------------------------------------------------


def _fmt_ms(seconds) -> str:
    return f"{1e3 * seconds:.3g} ms"


def _step_markdown(step: dict | None, heading: str) -> list[str]:
    """The per-model tables of a step-time section (none if the section did not run)."""
    if not step:
        return []
    lines = [heading, ""]
    if "error" in step:
        lines += [f"error: `{step['error']}`", ""]
    for name, res in step.get("models", {}).items():
        lines += [f"**{name}**: {res.get('shape', '')}", ""]
        if "error" in res:
            lines += [f"error: `{res['error']}`", ""]
            continue
        lines += [
            "| contender | ms / step | / SGD | one-step probe / SGD |",
            "|---|---|---|---|",
        ]
        for tx_name, probe in res["probe_ratio_to_sgd"].items():
            if tx_name in res["ratio_to_sgd"]:
                ms = _fmt_ms(res["seconds_per_step"][tx_name])
                cells = f"{ms} | {res['ratio_to_sgd'][tx_name]:.2f}x"
            else:
                cells = f"skipped | {res['skipped'][tx_name]}"
            lines.append(f"| {tx_name} | {cells} | {probe:.2f}x |")
        for tx_name, reason in res["skipped"].items():
            if tx_name not in res["probe_ratio_to_sgd"]:
                lines.append(f"| {tx_name} | skipped | {reason} | |")
        for tx_name, failure in res["failed"].items():
            lines.append(f"| {tx_name} | error | `{failure['error'][:120]}` | |")
        windows = sorted(set(res["repeats"].values()))
        lines += [
            "",
            f"{'/'.join(map(str, windows))} windows of {res['chunk']} steps, N = {res['N']}.",
            "",
        ]
    return lines


def markdown(payload: dict) -> str:
    """The markdown tables of a suite record (what is in the JSON, for reading)."""
    env = payload["environment"]
    lines = [
        f"# Accelerator suite: {env['backend']} ({env['device']})",
        "",
        f"jax {env['jax_version']}, {env['time']}; command: `{env['command']}`",
        "",
    ]
    sections = payload["sections"]
    lines += _step_markdown(
        sections.get("step_time"),
        "## Step time / plain SGD (interleaved, median of paired window ratios)",
    )
    lin = sections.get("linalg")
    if lin:
        lines += [
            f"## precondition_matrix, n x n, condition number {lin.get('condition', 0):g}, "
            f"N = {lin.get('N')}: time (relative error vs svd at HIGHEST)",
            "",
        ]
        if "error" in lin:
            lines += [f"error: `{lin['error']}`", ""]
        labels = lin.get("entries", [])
        if labels:
            lines += [
                "| n | " + " | ".join(labels) + " |",
                "|---" * (len(labels) + 1) + "|",
            ]
        for row in lin.get("rows", []):
            cells = []
            for label in labels:
                e = row["entries"].get(label, {})
                if "seconds" in e:
                    err = e["relative_error_vs_svd_highest"]
                    cells.append(
                        f"{_fmt_ms(e['seconds'])} ({'n/a' if err is None else f'{err:.1e}'})"
                    )
                elif "error" in e:
                    cells.append("error")
                else:
                    cells.append("skipped")
            lines.append(f"| {row['n']} | " + " | ".join(cells) + " |")
        if lin.get("precision_note"):
            lines += [
                "",
                f"Note: {lin['precision_note']}. The JSON gives the reason of every skip.",
            ]
        lines.append("")
    lines += _step_markdown(
        sections.get("step_methods"),
        "## Step time of each method every step, and of the defaults at BF16_X3, / plain SGD "
        "(each interleaved with SGD alone)",
    )
    eq = sections.get("equivalence")
    if eq:
        lines += ["## Equivalence in float32: relative gap of the end-to-end kernels", ""]
        if "error" in eq:
            lines += [f"error: `{eq['error']}`", ""]
        else:
            lines += [
                f"{eq['problem']}, N = {eq['N']}, lr {eq['learning_rate']:g}, {eq['steps']} steps; "
                f"initial output gap {eq['initial_output_gap']:.1e}.",
                "",
                "| explicit model vs | final gap | max gap |",
                "|---|---|---|",
            ]
            for name, res in eq["factorized_dense"].items():
                if "final_gap" in res:
                    lines.append(
                        f"| FactorizedDense vs {name} | {res['final_gap']:.2e} | "
                        f"{res['max_gap']:.2e} |"
                    )
                else:
                    lines.append(f"| FactorizedDense vs {name} | skipped | |")
            cmp = eq.get("compare_trajectories", {})
            if "final_gap" in cmp:
                lines.append(
                    f"| compare_trajectories (default) | {cmp['final_gap']:.2e} | "
                    f"{cmp['max_gap']:.2e} |"
                )
            lines.append("")
    lines += ["## Sections", "", "| section | budget s | spent s | status |", "|---|---|---|---|"]
    for name, res in sections.items():
        status = f"{len(errors(res))} error(s)" if errors(res) else "ok"
        lines.append(f"| {name} | {res['budget_seconds']:.0f} | {res['seconds']:.1f} | {status} |")
    return "\n".join(lines) + "\n"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=pathlib.Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def errors(node, path: str = "") -> list[str]:
    """The paths (``/sections/linalg/...``) of every ``error`` entry in a record."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "error":
                found.append(path)
            else:
                found += errors(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += errors(value, f"{path}/{i}")
    return found


RUNNERS = {
    "step_time": run_step_time,
    "linalg": run_linalg,
    "equivalence": run_equivalence,
    "step_methods": run_step_methods,
}


def main(argv=None) -> dict:
    """Runs the sections asked for, rewriting JSON and markdown after each; returns the record."""
    args = parse_args(argv)
    timing.setup_platform(args)
    _MODEL_STATE.clear()  # built for these arguments only
    path = output_path(args)
    args.out = str(path)
    budgets = {section: getattr(args, f"{section}_budget") for section in SECTIONS}
    print(
        f"accelerator suite on {jax.default_backend()} ({jax.devices()[0].device_kind}); "
        f"sections {args.sections}; budgets "
        + ", ".join(f"{s} {budgets[s]:.0f} s" for s in args.sections),
        flush=True,
    )
    payload = {"git_commit": _git_commit(), "args": vars(args), "sections": {}}
    for section in args.sections:
        budget = Budget(section, budgets[section])
        try:
            result = RUNNERS[section](args, budget)
        except Exception as error:
            traceback.print_exc()
            result = {"error": repr(error)}
        result.update(budget_seconds=budget.seconds, seconds=budget.spent())
        payload["sections"][section] = result
        budget.log("done")
        timing.write_json(args, "accelerator_suite", payload, RESULTS_DIR)
        path.with_suffix(".md").write_text(
            markdown({"environment": timing.environment(), **payload})
        )
    print(f"wrote {path.with_suffix('.md')}")
    failures = errors(payload)
    if failures:
        print("errors recorded at: " + ", ".join(failures))
        raise SystemExit(1)
    return payload


if __name__ == "__main__":
    main()
