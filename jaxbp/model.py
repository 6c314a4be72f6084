"""The slides' forward pass and loss, composed from `jaxbp.ops`.

Per-example functions (`forward_example`, `loss_example`) are the math; `forward` and `loss`
accept one example or a batch (leading axis N) and batch with `jax.vmap`; a batch loss is the
mean over examples.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxbp import ops
from jaxbp.network import Network
from jaxbp.params import Params
from jaxbp.params import check_params
from jaxbp.spec import ConvNetSpec


def check_inputs(params: Params, x, y, spec: ConvNetSpec) -> tuple[jax.Array, jax.Array | None, bool]:
    """Validate (params, x, y) against `spec` at trace time; return (x, y, batched).

    x must be (H, W, C) or (N, H, W, C) of the params' floating dtype; y, when given, (n_out,) or
    (N, n_out) to match. Shapes are static under jit, so this raises while tracing.
    """
    check_params(params, spec)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be a floating-point array, got dtype {x.dtype}; convert it, e.g. x / 255.0")
    if x.dtype != params.f.dtype:
        raise TypeError(
            f"x has dtype {x.dtype} but params have dtype {params.f.dtype}; cast one to the other"
        )
    in_shape = tuple(spec.in_shape)
    if x.ndim == 3 and x.shape == in_shape:
        batched = False
    elif x.ndim == 4 and x.shape[1:] == in_shape:
        batched = True
    else:
        raise ValueError(f"x must have shape {in_shape} or (N, *{in_shape}), got {x.shape}")
    if y is not None:
        y = jnp.asarray(y)
        expected = (x.shape[0], spec.n_out) if batched else (spec.n_out,)
        if y.shape != expected:
            raise ValueError(f"y must have shape {expected} to match x of shape {x.shape}, got {y.shape}")
        if not jnp.issubdtype(y.dtype, jnp.floating):
            y = y.astype(x.dtype)
        if y.dtype != x.dtype:
            raise TypeError(f"y has dtype {y.dtype} but x has dtype {x.dtype}; cast one to the other")
    return x, y, batched


def batch_mean(per_example_fn):
    """Turn fn(params, x, y, spec) -> pytree into the mean over a leading batch axis of x and y."""

    def mean_fn(params, x, y, spec):
        per_example = jax.vmap(per_example_fn, in_axes=(None, 0, 0, None))(params, x, y, spec)
        return jax.tree.map(lambda leaf: jnp.mean(leaf, axis=0), per_example)

    return mean_fn


def forward_example(params: Params, x: jax.Array, spec: ConvNetSpec) -> jax.Array:
    """O = sigmoid(W^T flatten(sigmoid(conv(X, f))) + b) for one (H, W, C) image; returns (n_out,)."""
    Z1 = ops.conv2d(x, params.f, **spec.conv_kwargs)
    H1 = ops.sigmoid(Z1)
    Z2 = ops.dense(ops.flatten(H1), params.W, params.b, precision=spec.precision)
    return ops.sigmoid(Z2)


def loss_example(params: Params, x: jax.Array, y: jax.Array, spec: ConvNetSpec) -> jax.Array:
    """E = sum((O - Y)^2) / 2 for one example."""
    return ops.half_squared_error(forward_example(params, x, spec), y)


def forward(params: Params, x: jax.Array, spec: ConvNetSpec) -> jax.Array:
    """O for x of shape (H, W, C) -> (n_out,), or (N, H, W, C) -> (N, n_out).

    For a `jaxbp.Network`, its `forward` (the last layer's output).
    """
    if isinstance(spec, Network):
        return spec.forward(params, x)
    x, _, batched = check_inputs(params, x, None, spec)
    if batched:
        return jax.vmap(forward_example, in_axes=(None, 0, None))(params, x, spec)
    return forward_example(params, x, spec)


def loss(params: Params, x: jax.Array, y: jax.Array, spec: ConvNetSpec) -> jax.Array:
    """E for one example, or the mean of per-example E over a batch (also for a `jaxbp.Network`)."""
    if isinstance(spec, Network):
        return spec.loss_value(params, x, y)
    x, y, batched = check_inputs(params, x, y, spec)
    if batched:
        return jnp.mean(jax.vmap(loss_example, in_axes=(None, 0, 0, None))(params, x, y, spec))
    return loss_example(params, x, y, spec)
