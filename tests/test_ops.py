"""Each op's hand-written VJP against jax.vjp of its forward, in float64."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from strategies import specs

from jaxbp import ops


def _cotangent_check(spec, seed):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=spec.in_shape))
    f = jnp.asarray(rng.normal(size=spec.filter_shape))
    delta = jnp.asarray(rng.normal(size=spec.h1_shape))
    conv = lambda x, f: ops.conv2d(x, f, **spec.conv_kwargs)  # noqa: E731
    z, vjp = jax.vjp(conv, x, f)
    assert z.shape == spec.h1_shape
    dx_ref, df_ref = vjp(delta)
    df = ops.conv2d_filter_vjp(x, delta, kernel_size=spec.kernel_size, **spec.conv_kwargs)
    dx = ops.conv2d_input_vjp(delta, f, in_hw=spec.in_shape[:2], **spec.conv_kwargs)
    return (dx, df), (dx_ref, df_ref)


@settings(max_examples=60)
@given(spec=specs(), seed=st.integers(0, 2**16))
def test_conv2d_vjps_equal_jax_vjp(spec, seed):
    ours, reference = jax.jit(_cotangent_check, static_argnums=(0, 1))(spec, seed)
    chex.assert_trees_all_close(ours, reference, rtol=1e-10, atol=1e-12)


def test_sigmoid_dense_flatten_loss_vjps_equal_jax_vjp():
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.normal(size=(4, 3, 2)))
    dh = jnp.asarray(rng.normal(size=z.shape))
    h, vjp = jax.vjp(ops.sigmoid, z)
    np.testing.assert_allclose(ops.sigmoid_vjp(h, dh), vjp(dh)[0], rtol=1e-12)

    flat, vjp = jax.vjp(ops.flatten, z)
    np.testing.assert_array_equal(ops.flatten_vjp(flat, z.shape), vjp(flat)[0])

    h1 = jnp.asarray(rng.normal(size=(24,)))
    W = jnp.asarray(rng.normal(size=(24, 3)))
    b = jnp.asarray(rng.normal(size=(3,)))
    delta = jnp.asarray(rng.normal(size=(3,)))
    _, vjp = jax.vjp(ops.dense, h1, W, b)
    dh_ref, dW_ref, db_ref = vjp(delta)
    dW, db, dh = ops.dense_vjp(h1, W, delta)
    chex.assert_trees_all_close((dW, db, dh), (dW_ref, db_ref, dh_ref), rtol=1e-12)

    o = jnp.asarray(rng.uniform(size=(3,)))
    y = jnp.asarray(rng.uniform(size=(3,)))
    _, vjp = jax.vjp(lambda o: ops.half_squared_error(o, y), o)
    np.testing.assert_allclose(ops.half_squared_error_vjp(o, y), vjp(1.0)[0], rtol=1e-12)
