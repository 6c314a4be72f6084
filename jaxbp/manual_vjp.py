r"""`jaxbp.loss` with the hand-written backward registered as its VJP (`jax.custom_vjp`).

``jax.grad(loss_with_manual_vjp)`` then runs the slides' formulas instead of differentiating the
forward, and so does everything built on it: `jax.jit`, `jax.vmap`, `jax.value_and_grad`, optax
training loops. The backward returns cotangents for all three array arguments, each from the
chain-rule terms of `jaxbp.chain_terms`, per example:

.. math::
   \frac{dE}{d\theta} = \text{manual grads}, \qquad
   \frac{dE}{dX} = \operatorname{conv}^T(\delta_1, f), \qquad
   \frac{dE}{dY} = -(O - Y)

and for a batch loss :math:`\bar E = \frac1N \sum_n E_n`, the parameter cotangent is the mean of
the per-example gradients while example n's X and Y cotangents carry the factor 1/N. Everything is
scaled by the incoming cotangent g = d(outer)/dE.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxbp import ops
from jaxbp.backward import value_and_chain_terms_example
from jaxbp.model import check_inputs
from jaxbp.params import Params
from jaxbp.spec import ConvNetSpec


def loss_with_manual_vjp(params: Params, x: jax.Array, y: jax.Array, spec: ConvNetSpec) -> jax.Array:
    """`jaxbp.loss` (E of one example, or the batch mean), differentiated by the manual backward.

    Args:
      params: `Params(f, W, b)`.
      x: (H, W, C) or (N, H, W, C).
      y: (n_out,) or (N, n_out); integer targets are cast to x's dtype (as `jaxbp.loss` does).
      spec: the network (static).

    Returns:
      The scalar loss; ``jax.grad`` of it (w.r.t. params, x or y) runs `_backward`, and its params
      gradient equals `jaxbp.manual_grads`.
    """
    y = jnp.asarray(y)
    if not jnp.issubdtype(y.dtype, jnp.floating):
        y = y.astype(jnp.asarray(x).dtype)
    return _loss(params, x, y, spec)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _loss(params, x, y, spec):
    return _forward(params, x, y, spec)[0]


def _forward(params, x, y, spec):
    """(E, residuals): E and the per-example chain terms the backward reads."""
    x, y, batched = check_inputs(params, x, y, spec)
    fn = functools.partial(value_and_chain_terms_example, spec=spec)
    if batched:
        E, terms = jax.vmap(fn, in_axes=(None, 0, 0))(params, x, y)
        E = jnp.mean(E)
    else:
        E, terms = fn(params, x, y)
    return E, (params, terms)


def _backward(spec, residuals, g):
    """Cotangents (params, x, y) of the loss, from the hand-written chain-rule terms."""
    params, terms = residuals

    def dE_dx(delta1):
        return ops.conv2d_input_vjp(delta1, params.f, in_hw=spec.in_shape[:2], **spec.conv_kwargs)

    if terms.dE_dO.ndim == 2:  # a batch: terms are stacked per example
        grads = Params(*(g * jnp.mean(t, axis=0) for t in (terms.dE_df, terms.dE_dW, terms.dE_db)))
        scale = g / terms.dE_dO.shape[0]  # d(mean)/dE_n = 1/N
        x_bar = scale * jax.vmap(dE_dx)(terms.delta1)
    else:
        grads = Params(g * terms.dE_df, g * terms.dE_dW, g * terms.dE_db)
        scale = g
        x_bar = scale * dE_dx(terms.delta1)
    return grads, x_bar, -scale * terms.dE_dO


_loss.defvjp(_forward, _backward)
