"""The transformer's dimension numbers (one preconditioner per projection and layer), the
explicit factorized variant, and the text corpus loader."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import overparam_optax as opx
from overparam_experiments import models, text
from overparam_experiments.data import DataError
from overparam_optax import factorized
from overparam_optax.testing import reference_precondition

LAYERS, D_MODEL, HEADS, HEAD_DIM, CONTEXT = 2, 12, 3, 4, 8
MLP_HIDDEN = 2 * D_MODEL
# Per head: the head axis as a batch axis, each (d_model, head_dim) slice its own matrix.
PER_HEAD_IN = opx.MatrixDimensionNumbers(reduction_axis=-3, output_axis=-1)
PER_HEAD_OUT = opx.MatrixDimensionNumbers(reduction_axis=-2, output_axis=-1)


def _model(depth=1):
    return models.TransformerLM(
        context=CONTEXT,
        d_model=D_MODEL,
        num_heads=HEADS,
        num_layers=LAYERS,
        mlp_ratio=2,
        depth=depth,
    )


def _tokens(seed=0, batch=3):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (batch, CONTEXT)), jnp.int32)


@pytest.fixture(scope="module")
def params():
    return _model().init(jax.random.PRNGKey(0), _tokens())["params"]


def _loss(model, params, tokens):
    logits = model.apply({"params": params}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


@pytest.fixture(scope="module")
def grads(params):
    return jax.grad(lambda p: _loss(_model(), p, _tokens(1)))(params)


def _rel_err(actual, expected):
    expected = np.asarray(expected, np.float64)
    return np.abs(np.asarray(actual, np.float64) - expected).max() / np.abs(expected).max()


def test_params_have_head_shaped_kernels_and_a_layer_axis(params):
    attention = params["blocks"]["attn"]
    for name in ("query", "key", "value"):
        assert attention[name]["kernel"].shape == (LAYERS, D_MODEL, HEADS, HEAD_DIM)
    assert attention["out"]["kernel"].shape == (LAYERS, HEADS, HEAD_DIM, D_MODEL)
    assert params["blocks"]["mlp_in"]["kernel"].shape == (LAYERS, D_MODEL, MLP_HIDDEN)
    assert params["blocks"]["ln_attn"]["scale"].shape == (LAYERS, D_MODEL)  # 2-D, not a matrix
    # The layers of the scan are initialized independently.
    query = attention["query"]["kernel"]
    assert not np.allclose(query[0], query[1])


def test_dimension_numbers_tree(params):
    dims = models.transformer_dimension_numbers(params)
    blocks = dims["blocks"]
    for name in ("query", "key", "value"):
        assert blocks["attn"][name]["kernel"] == models.ATTENTION_IN
    assert blocks["attn"]["out"]["kernel"] == models.ATTENTION_OUT
    assert blocks["mlp_in"]["kernel"] == blocks["mlp_out"]["kernel"] == models.DENSE
    # Stacked biases and LayerNorm parameters are 2-D but not matrices.
    assert blocks["mlp_in"]["bias"] is None and blocks["ln_mlp"]["scale"] is None
    # The default leaves embeddings and head to the base optimizer.
    assert dims["embed"]["embedding"] is None and dims["pos_embed"] is None
    assert dims["head"]["kernel"] is None and dims["head"]["bias"] is None
    everything = models.transformer_dimension_numbers(params, embeddings=True, head=True)
    assert everything["embed"]["embedding"] == everything["pos_embed"] == models.DENSE
    assert everything["head"]["kernel"] == models.DENSE and everything["head"]["bias"] is None
    # Shapes only: works on abstract parameters too.
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    assert models.transformer_dimension_numbers(abstract) == dims


def _projection_matrices(kernel, name):
    """Per layer, the matrix that the projection multiplies its input by."""
    kernel = np.asarray(kernel, np.float64)
    if name == "out":
        return kernel.reshape(LAYERS, HEADS * HEAD_DIM, D_MODEL)
    if name in ("query", "key", "value"):
        return kernel.reshape(LAYERS, D_MODEL, HEADS * HEAD_DIM)
    return kernel


@pytest.mark.parametrize("N", [2, 3])
def test_one_preconditioner_per_projection_and_layer_matches_float64_reference(
    params, grads, N
):
    tx = opx.overparam_precondition(
        N, method="svd", dimension_numbers=models.transformer_dimension_numbers
    )
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    names = ("attn/query", "attn/key", "attn/value", "attn/out", "mlp_in", "mlp_out")
    for path in names:
        name = path.split("/")[-1]

        def get(tree, path=path):
            for key in ("blocks", *path.split("/")):
                tree = tree[key]
            return tree

        w = _projection_matrices(get(params)["kernel"], name)
        g = _projection_matrices(get(grads)["kernel"], name)
        out = _projection_matrices(get(updates)["kernel"], name)
        for layer in range(LAYERS):
            expected = reference_precondition(w[layer], g[layer], N)
            assert _rel_err(out[layer], expected) < 1e-4, (name, layer)
    # Everything else passes through untouched.
    for path in (("embed", "embedding"), ("pos_embed",), ("head", "kernel"), ("head", "bias")):
        leaf_u, leaf_g = updates, grads
        for key in path:
            leaf_u, leaf_g = leaf_u[key], leaf_g[key]
        np.testing.assert_array_equal(leaf_u, leaf_g)
    for name in ("ln_attn", "ln_mlp"):
        np.testing.assert_array_equal(
            updates["blocks"][name]["scale"], grads["blocks"][name]["scale"]
        )
    np.testing.assert_array_equal(
        updates["blocks"]["mlp_in"]["bias"], grads["blocks"]["mlp_in"]["bias"]
    )


def _per_head_dims(params):
    dims = models.transformer_dimension_numbers(params)
    attention = dict(dims["blocks"]["attn"])
    for name in ("query", "key", "value"):
        attention[name] = {"kernel": PER_HEAD_IN}
    attention["out"] = {"kernel": PER_HEAD_OUT}
    return {**dims, "blocks": {**dims["blocks"], "attn": attention}}


def test_per_head_preconditioning_is_a_different_rule(params, grads):
    """Per head is the block-diagonal rule (checked against the reference): not the same."""
    tx_head = opx.overparam_precondition(
        2, method="svd", dimension_numbers=_per_head_dims(params)
    )
    tx_proj = opx.overparam_precondition(
        2, method="svd", dimension_numbers=models.transformer_dimension_numbers
    )
    per_head, _ = tx_head.update(grads, tx_head.init(params), params)
    per_proj, _ = tx_proj.update(grads, tx_proj.init(params), params)
    w = np.asarray(params["blocks"]["attn"]["query"]["kernel"], np.float64)
    g = np.asarray(grads["blocks"]["attn"]["query"]["kernel"], np.float64)
    head_out = np.asarray(per_head["blocks"]["attn"]["query"]["kernel"])
    for layer in range(LAYERS):
        for h in range(HEADS):
            expected = reference_precondition(w[layer, :, h], g[layer, :, h], 2)
            assert _rel_err(head_out[layer, :, h], expected) < 1e-4
    proj_out = per_proj["blocks"]["attn"]["query"]["kernel"]
    assert _rel_err(head_out, proj_out) > 0.05


def test_factorized_model_computes_the_same_function(params):
    dims = models.transformer_dimension_numbers(params)
    explicit = models.factorize_params(params, 2, dims, key=jax.random.PRNGKey(3))
    query = explicit["blocks"]["attn"]["query"]
    assert set(query) == {"kernel_0", "kernel_1"}
    assert query["kernel_0"].shape == (LAYERS, D_MODEL, min(D_MODEL, HEADS * HEAD_DIM))
    assert query["kernel_1"].shape == (LAYERS, D_MODEL, HEADS * HEAD_DIM)
    # The explicit module accepts exactly this tree.
    reference_tree = _model(depth=2).init(jax.random.PRNGKey(1), _tokens())["params"]
    assert jax.tree.structure(reference_tree) == jax.tree.structure(explicit)
    assert all(
        a.shape == b.shape
        for a, b in zip(jax.tree.leaves(reference_tree), jax.tree.leaves(explicit), strict=True)
    )
    tokens = _tokens(2)
    plain_logits = _model().apply({"params": params}, tokens)
    explicit_logits = _model(depth=2).apply({"params": explicit}, tokens)
    np.testing.assert_allclose(explicit_logits, plain_logits, rtol=1e-4, atol=1e-4)
    for kernels in (query, explicit["blocks"]["mlp_out"]):
        for layer in range(LAYERS):
            pair = [kernels[f"kernel_{i}"][layer] for i in range(2)]
            assert float(factorized.pair_balancedness(pair)[0]) < 1e-5


def test_per_projection_is_the_velocity_of_the_explicit_product(params):
    """Gradient flow on the factors of W = K_0 K_1 moves W by -(K_0 K_0^T G + G K_1^T K_1),
    which is P_W(G) for the whole projection matrix (balanced factors), not per head."""
    dims = models.transformer_dimension_numbers(params)
    explicit = models.factorize_params(params, 2, dims, key=jax.random.PRNGKey(3))
    tokens = _tokens(1)
    explicit_grads = jax.grad(lambda p: _loss(_model(depth=2), p, tokens))(explicit)
    plain_grads = jax.grad(lambda p: _loss(_model(), p, tokens))(params)
    implicit = {}
    for name, dn in (("per projection", dims), ("per head", _per_head_dims(params))):
        tx = opx.overparam_precondition(2, method="svd", dimension_numbers=dn)
        implicit[name], _ = tx.update(plain_grads, tx.init(params), params)
    for name in ("query", "key", "value", "out"):
        factors = explicit["blocks"]["attn"][name]
        factor_grads = explicit_grads["blocks"]["attn"][name]
        k0, k1 = (np.asarray(factors[f"kernel_{i}"], np.float64) for i in range(2))
        g0, g1 = (np.asarray(factor_grads[f"kernel_{i}"], np.float64) for i in range(2))
        velocity = g0 @ k1 + k0 @ g1  # d(K_0 K_1) for the step -(g0, g1), per layer
        shape = params["blocks"]["attn"][name]["kernel"].shape
        projection = implicit["per projection"]["blocks"]["attn"][name]["kernel"]
        per_head = implicit["per head"]["blocks"]["attn"][name]["kernel"]
        velocity = velocity.reshape(shape)
        assert _rel_err(projection, velocity) < 1e-4, name  # measured ~5e-6
        assert _rel_err(per_head, velocity) > 0.1, name  # measured 0.27-0.38


def test_text_corpus_from_a_file(tmp_path):
    path = tmp_path / "corpus.txt"
    payload = bytes(range(256)) * 4  # 1,024 bytes, every byte value
    path.write_bytes(payload)
    corpus = text.load_text_corpus(path, validation_fraction=0.25)
    assert corpus.train.dtype == np.uint8
    assert corpus.train.size == 768 and corpus.validation.size == 256
    assert bytes(corpus.train) + bytes(corpus.validation) == payload
    assert corpus.describe()["num_files"] == 1 and corpus.files == [str(path)]
    inputs, targets = text.windows(corpus.train, 10)
    assert inputs.shape == targets.shape == ((768 - 11) // 10 + 1, 10)
    np.testing.assert_array_equal(inputs[3, 1:], targets[3, :-1])  # shifted by one
    np.testing.assert_array_equal(inputs[3], corpus.train[30:40])
    val_x, val_y = text.evenly_spaced_windows(corpus.validation, 10, 5)
    assert val_x.shape == (5, 10)
    np.testing.assert_array_equal(val_x[0], corpus.validation[:10])
    np.testing.assert_array_equal(val_y[-1], corpus.validation[241:251])  # last whole window
    with pytest.raises(ValueError, match="validation_fraction"):
        text.load_text_corpus(path, validation_fraction=1.0)
    with pytest.raises(DataError, match="not a file"):
        text.load_text_corpus(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="at least"):
        text.windows(corpus.train[:5], 10)


def test_default_corpus_is_the_sorted_stdlib_sources():
    files = text.stdlib_source_files()
    names = [f.name for f in files]
    assert names == sorted(names) and all(n.endswith(".py") for n in names)
    assert "os.py" in names and "functools.py" in names
    assert pathlib.Path(sys.modules["os"].__file__).resolve() in {f.resolve() for f in files}
    corpus = text.load_text_corpus()
    total = sum(f.stat().st_size for f in files)
    assert corpus.train.size + corpus.validation.size == total
    assert corpus.train.size == int(0.9 * total)
    assert bytes(corpus.train[: files[0].stat().st_size]) == files[0].read_bytes()


@pytest.mark.parametrize("method", ["tracked", "svd"])
def test_log_counts_the_defaults_fresh_decompositions(params, grads, method):
    """The example's log counts every layer's matrices: the first update decomposes each."""
    from overparam_experiments import training

    numbers = models.transformer_dimension_numbers(params)
    tx = optax.chain(
        opx.overparam_precondition(2, method=method, dimension_numbers=numbers), optax.adamw(1e-3)
    )
    state, update = tx.init(params), jax.jit(tx.update)
    for _ in range(2):  # the second update keeps the first's bases: W has not moved
        _, state = update(grads, state, params)
    counts = training.tracked_decompositions(state)
    if method == "svd":  # no tracked bases: nothing to count
        assert counts is None
        return
    matrices = LAYERS * 6  # q, k, v, o and the two MLP kernels of every layer
    assert counts == {"decompositions": matrices, "matrix_updates": 2 * matrices}
