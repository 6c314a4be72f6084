"""Each layer's and loss's hand-written VJP against jax.vjp and central finite differences (float64)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from strategies import layer_params
from strategies import paddings
from strategies import specs

from jaxbp import layers
from jaxbp.check import finite_difference_grads
from jaxbp.check import relative_error

# The design's float64 bar (DESIGN.md): hand-written VJP == jax.vjp within rtol 1e-10. The atol
# only matters for entries that cancel to ~0 (sums of O(1) terms), where 1e-12 is ~1e4 ulps.
RTOL, ATOL = 1e-10, 1e-12


def random_problem(layer, in_shape, seed, *, ties=False):
    """(params, x, dE_dy) for one example; with ties, x takes few distinct values (many equal)."""
    rng = np.random.default_rng(seed)
    params = layer_params(layer, in_shape, rng)
    x = rng.integers(-2, 3, size=in_shape).astype(np.float64) if ties else rng.normal(size=in_shape)
    dE_dy = jnp.asarray(rng.normal(size=layer.out_shape(in_shape)))
    return params, jnp.asarray(x), dE_dy


def _ours_and_jax(layer, params, x, dE_dy):
    """(y, our (dE/dparams, dE/dx), jax.vjp's), for one example."""
    y, pullback = jax.vjp(layer.apply, params, x)
    return y, layer.vjp(params, x, y, dE_dy), pullback(dE_dy)


ours_and_jax = jax.jit(_ours_and_jax, static_argnums=0)  # one compile per layer and shape


def assert_vjp_equals_jax(layer, in_shape, seed, *, ties=False):
    params, x, dE_dy = random_problem(layer, in_shape, seed, ties=ties)
    _, (dE_dparams, dE_dx), (ref_dparams, ref_dx) = ours_and_jax(layer, params, x, dE_dy)
    chex.assert_trees_all_equal_shapes_and_dtypes(dE_dparams, params)
    chex.assert_shape(dE_dx, in_shape)
    chex.assert_trees_all_close((dE_dparams, dE_dx), (ref_dparams, ref_dx), rtol=RTOL, atol=ATOL)


# --- hypothesis sweeps of each layer's hyperparameters ---------------------------------------


@st.composite
def conv_layers(draw):
    """Conv2D over the same matrix as the slides' conv (tests/strategies.specs), plus the bias."""
    spec = draw(specs(max_hw=9))
    layer = layers.Conv2D(
        spec.n_filters,
        spec.kernel_size,
        stride=spec.stride,
        padding=spec.padding,
        dilation=spec.dilation,
        use_bias=draw(st.booleans()),
    )
    return layer, spec.in_shape


@st.composite
def pool_layers(draw, pool):
    """Windows 1-3 x 1-3, stride 1-3 or None (= window), VALID/SAME/explicit pads < window."""
    window = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = draw(st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    padding = draw(paddings)
    if not isinstance(padding, str):
        padding = tuple(tuple(min(p, w - 1) for p in pair) for pair, w in zip(padding, window))
    layer = pool(window, stride=stride, padding=padding)
    in_shape = (draw(st.integers(window[0], 8)), draw(st.integers(window[1], 8)), draw(st.integers(1, 3)))
    return layer, in_shape


shapes = st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple)


@settings(max_examples=20)
@given(case=conv_layers(), seed=st.integers(0, 2**16))
def test_conv2d_vjp_equals_jax_vjp(case, seed):
    assert_vjp_equals_jax(*case, seed)


@settings(max_examples=12)
@given(case=pool_layers(layers.AvgPool), seed=st.integers(0, 2**16))
def test_avg_pool_vjp_equals_jax_vjp(case, seed):
    assert_vjp_equals_jax(*case, seed)


@settings(max_examples=16)
@given(case=pool_layers(layers.MaxPool), seed=st.integers(0, 2**16), ties=st.booleans())
def test_max_pool_vjp_equals_jax_vjp(case, seed, ties):
    assert_vjp_equals_jax(*case, seed, ties=ties)


@settings(max_examples=12)
@given(
    layer=st.sampled_from([layers.Sigmoid(), layers.Tanh(), layers.Relu(), layers.Flatten()]),
    in_shape=shapes,
    seed=st.integers(0, 2**16),
    ties=st.booleans(),
)
def test_parameter_free_vjp_equals_jax_vjp(layer, in_shape, seed, ties):
    # With ties, x is integer-valued, so relu meets exact zeros, where both sides take slope 0.
    assert_vjp_equals_jax(layer, in_shape, seed, ties=ties)


@settings(max_examples=8)
@given(d=st.integers(1, 20), n_out=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_dense_vjp_equals_jax_vjp(d, n_out, seed):
    assert_vjp_equals_jax(layers.Dense(n_out), (d,), seed)


def test_relu_at_zero_takes_slope_zero_like_jax():
    x = jnp.array([-1.0, 0.0, 2.0])
    _, dE_dx = layers.Relu().vjp((), x, layers.Relu().apply((), x), jnp.ones(3))
    np.testing.assert_array_equal(dE_dx, [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(jax.nn.relu(x)))(x), [0.0, 0.0, 1.0])


# --- max pooling ties: the rule JAX follows, reproduced ----------------------------------------


def test_max_pool_ties_go_to_the_first_maximum_in_row_major_window_order():
    """JAX's VJP of lax.reduce_window max is select_and_scatter_add with select_prim=ge: scanning a
    window in row-major order, an entry equal to the one selected so far does not replace it, so
    the whole cotangent goes to the first maximal entry. We do the same; here with overlapping
    windows (stride 1) and SAME padding (-inf pads never win), worked out by hand."""
    pool = layers.MaxPool((2, 2), stride=(1, 1), padding=((0, 1), (0, 1)))
    x = jnp.array([[1.0, 2.0, 2.0], [2.0, 0.0, 2.0], [2.0, 2.0, 1.0]])[..., None]
    y, (_, dE_dx), (_, jax_dE_dx) = ours_and_jax(pool, (), x, jnp.ones((3, 3, 1)))
    np.testing.assert_array_equal(y[..., 0], [[2, 2, 2], [2, 2, 2], [2, 2, 1]])
    # window (i, j) sends its 1 to its first 2 in row-major order:
    # (0,0)->(0,1) (0,1)->(0,1) (0,2)->(0,2) (1,0)->(1,0) (1,1)->(1,2) (1,2)->(1,2)
    # (2,0)->(2,0) (2,1)->(2,1) (2,2)->(2,2)
    expected = [[0, 2, 1], [1, 0, 2], [1, 1, 1]]
    np.testing.assert_array_equal(dE_dx[..., 0], expected)
    np.testing.assert_array_equal(jax_dE_dx[..., 0], expected)


def test_max_pool_all_equal_window_sends_everything_to_its_top_left():
    pool = layers.MaxPool((2, 3))
    x = jnp.full((4, 6, 2), 0.5)
    dE_dy = jnp.arange(1.0, 9.0).reshape(2, 2, 2)
    _, (_, dE_dx), (_, jax_dE_dx) = ours_and_jax(pool, (), x, dE_dy)
    expected = np.zeros(x.shape)
    expected[::2, ::3] = dE_dy
    np.testing.assert_array_equal(dE_dx, expected)
    np.testing.assert_array_equal(jax_dE_dx, expected)


# --- central finite differences, a few cases per layer -----------------------------------------

FD_CASES = [
    (layers.Conv2D(3, (3, 2), stride=(2, 1), padding="SAME", dilation=(1, 2)), (6, 5, 2)),
    (layers.Conv2D(2, 2, padding=((1, 0), (2, 1)), use_bias=False), (4, 4, 3)),
    (layers.AvgPool((3, 2), stride=(2, 1), padding="SAME"), (5, 6, 2)),
    (layers.MaxPool((2, 2), stride=(1, 2), padding=((1, 1), (0, 1))), (5, 5, 2)),
    (layers.Sigmoid(), (3, 4)),
    (layers.Tanh(), (3, 4)),
    (layers.Relu(), (3, 4)),
    (layers.Flatten(), (3, 2, 2)),
    (layers.Dense(4), (7,)),
]


@pytest.mark.parametrize(
    "layer, in_shape", FD_CASES, ids=[f"{type(c[0]).__name__}{i}" for i, c in enumerate(FD_CASES)]
)
def test_layer_vjp_equals_finite_differences(layer, in_shape):
    # E = sum(r * layer(params, x)) for a fixed random r has dE/dy = r; central differences in
    # float64 with eps 1e-6 (check.finite_difference_grads) reach ~1e-10 relative.
    params, x, r = random_problem(layer, in_shape, seed=7)
    y = layer.apply(params, x)
    dE_dparams, dE_dx = layer.vjp(params, x, y, r)
    numeric = finite_difference_grads(lambda px: jnp.sum(r * layer.apply(*px)), (params, x), eps=1e-6)
    for ours, theirs in zip(jax.tree.leaves((dE_dparams, dE_dx)), jax.tree.leaves(numeric)):
        assert relative_error(ours, theirs) < 1e-7


# --- losses ----------------------------------------------------------------------------------

LOSSES = [layers.HalfSquaredError(), layers.SigmoidBinaryCrossEntropy(), layers.SoftmaxCrossEntropy()]


def _targets(loss, rng, n):
    if isinstance(loss, layers.SoftmaxCrossEntropy):
        return jax.nn.one_hot(rng.integers(n), n, dtype=jnp.float64)
    return jnp.asarray(rng.uniform(size=n))


def _loss_ours_and_jax(loss, o, y):
    E, pullback = jax.vjp(lambda o: loss.value(o, y), o)
    return E, loss.vjp(o, y), pullback(jnp.ones((), o.dtype))[0]


loss_ours_and_jax = jax.jit(_loss_ours_and_jax, static_argnums=0)


@settings(max_examples=12)
@given(
    loss=st.sampled_from(LOSSES),
    n=st.integers(1, 6),
    scale=st.sampled_from([1.0, 30.0]),
    seed=st.integers(0, 2**16),
)
def test_loss_vjp_equals_jax_vjp(loss, n, scale, seed):
    rng = np.random.default_rng(seed)
    o = jnp.asarray(scale * rng.normal(size=n))
    y = _targets(loss, rng, n)
    E, ours, theirs = loss_ours_and_jax(loss, o, y)
    assert np.isfinite(E)
    chex.assert_trees_all_close(ours, theirs, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("loss", LOSSES, ids=lambda loss: type(loss).__name__)
def test_loss_vjp_equals_finite_differences(loss):
    rng = np.random.default_rng(3)
    o, y = jnp.asarray(rng.normal(size=5)), _targets(loss, rng, 5)
    numeric = finite_difference_grads(lambda o: loss.value(o, y), o, eps=1e-6)
    assert relative_error(loss.vjp(o, y), numeric) < 1e-7


def test_cross_entropies_are_stable_for_large_logits():
    # logits of +-1000: exp would overflow; the log-sum-exp forms give the exact values
    softmax = layers.SoftmaxCrossEntropy()
    z, y = jnp.array([1000.0, 0.0, -1000.0]), jnp.array([0.0, 1.0, 0.0])
    np.testing.assert_allclose(softmax.value(z, y), 1000.0, rtol=1e-15)
    np.testing.assert_allclose(softmax.vjp(z, y), [1.0, -1.0, 0.0], atol=1e-15)
    np.testing.assert_allclose(softmax.to_output(z), [1.0, 0.0, 0.0], atol=1e-15)
    binary = layers.SigmoidBinaryCrossEntropy()
    z, y = jnp.array([1000.0, -1000.0, 1000.0]), jnp.array([0.0, 1.0, 1.0])
    np.testing.assert_allclose(binary.value(z, y), 2000.0, rtol=1e-15)
    np.testing.assert_allclose(binary.vjp(z, y), [1.0, -1.0, 0.0], atol=1e-15)


@pytest.mark.parametrize("loss", LOSSES, ids=lambda loss: type(loss).__name__)
def test_loss_rejects_targets_of_the_wrong_shape(loss):
    o = jnp.zeros(3)
    for method in (loss.value, loss.vjp):
        with pytest.raises(
            ValueError, match=r"targets y must have the network output's shape \(3,\), got \(1, 3\)"
        ):
            method(o, jnp.zeros((1, 3)))


# --- bad hyperparameters and inputs ------------------------------------------------------------


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: layers.Conv2D(0), ValueError, r"n_filters must be a positive int, got 0"),
        (lambda: layers.Conv2D(2, stride=0), ValueError, r"stride must be >= 1"),
        (lambda: layers.Conv2D(2, padding="FULL"), ValueError, r"padding must be 'VALID', 'SAME'"),
        (lambda: layers.Conv2D(2, use_bias=1), TypeError, r"use_bias must be a bool, got 1"),
        (lambda: layers.MaxPool(2.5), TypeError, r"window must be an int or a pair of ints"),
        (
            lambda: layers.AvgPool(2, padding=((2, 0), (0, 0))),
            ValueError,
            r"padding must be smaller than the window",
        ),
        (lambda: layers.Dense(0), ValueError, r"n_out must be a positive int, got 0"),
    ],
)
def test_bad_hyperparameters(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("pool", [layers.AvgPool, layers.MaxPool])
def test_pooling_window_larger_than_input(pool):
    with pytest.raises(
        ValueError, match=r"pooling window \(3, 3\) is larger than the padded input width \(2\+0\+0 = 2\)"
    ):
        pool(3).out_shape((4, 2, 1))
    with pytest.raises(ValueError, match=r"pooling window \(3, 3\)"):
        pool(3).apply((), jnp.zeros((4, 2, 1)))


def test_layers_reject_inputs_of_the_wrong_rank():
    with pytest.raises(ValueError, match=r"Conv2D takes an \(H, W, C\) image, got input shape \(4, 4\)"):
        layers.Conv2D(2).out_shape((4, 4))
    with pytest.raises(ValueError, match=r"Dense takes a flat \(D,\) input, got input shape \(2, 3\)"):
        layers.Dense(2).out_shape((2, 3))
    with pytest.raises(ValueError, match=r"kernel_size: the dilated kernel"):
        layers.Conv2D(2, 5).out_shape((4, 4, 1))


def test_layers_are_hashable_and_normalised():
    a, b = layers.Conv2D(4, 3, padding="same"), layers.Conv2D(4, (3, 3), stride=(1, 1), padding="SAME")
    assert a == b and hash(a) == hash(b)
    assert layers.MaxPool(2) == layers.MaxPool((2, 2), stride=(2, 2))
    assert layers.Sigmoid() != layers.Tanh()
