r"""Every chain-rule term of `jaxbp.chain_terms`, computed instead by autodiff at the same point.

For one example, the forward X -> Z1 -> H1 -> Z2 -> O -> E is cut at each intermediate V, and
autodiff differentiates the rest of the network, E as a function of V alone, at V's forward value:

.. math::
   \frac{dE}{dV} = \operatorname{vjp}(V \mapsto E(V))(1), \qquad V \in \{O, Z_2, H_1, Z_1\}

giving dE/dO, delta2 = dE/dZ2, dE/dH1 and delta1 = dE/dZ1 as cotangents, each found by autodiff
without using any of the manual terms. The two Jacobian factors are not cotangents: dO/dZ2 and
dH1/dZ1 are the diagonals of the sigmoid's Jacobian. For an elementwise map J = diag(s'), so the
forward-mode product J 1 = jvp(sigmoid, Z, 1) is exactly that diagonal. The parameter terms dE/dW,
dE/db, dE/df are jax.grad of the example's loss.

Per example: for a batch (N, ...) every term is stacked on axis 0, term n being the derivative of
example n's own loss E_n -- not of the batch mean (1/N) sum_n E_n, whose cotangents would carry an
extra 1/N. That factor enters only where the per-example gradients are averaged into the batch
gradient, which `jaxbp.check.compare_grads` checks separately.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxbp import ops
from jaxbp.backward import ChainTerms
from jaxbp.model import check_inputs
from jaxbp.model import loss_example
from jaxbp.params import Params
from jaxbp.spec import ConvNetSpec


def _cotangent(fn, value):
    """dE/dvalue of a scalar E = fn(value), by jax.vjp with seed dE/dE = 1."""
    E, pullback = jax.vjp(fn, value)
    return pullback(jnp.ones_like(E))[0]


def _jacobian_diagonal(elementwise_fn, value):
    """diag(J) of an elementwise map at value, as jvp(fn, value, ones): J 1 = diag(J) when J is diagonal."""
    return jax.jvp(elementwise_fn, (value,), (jnp.ones_like(value),))[1]


def autodiff_chain_terms_example(params: Params, x: jax.Array, y: jax.Array, spec: ConvNetSpec) -> ChainTerms:
    """The `ChainTerms` of one (H, W, C) example, each by autodiff of a sub-network."""
    f, W, b = params
    precision = spec.precision
    Z1 = ops.conv2d(x, f, **spec.conv_kwargs)
    H1 = ops.sigmoid(Z1)
    Z2 = ops.dense(ops.flatten(H1), W, b, precision=precision)
    O = ops.sigmoid(Z2)

    # E as a function of each intermediate alone, the rest of the network downstream of it.
    def E_of_O(O):
        return ops.half_squared_error(O, y)

    def E_of_Z2(Z2):
        return E_of_O(ops.sigmoid(Z2))

    def E_of_H1(H1):
        return E_of_Z2(ops.dense(ops.flatten(H1), W, b, precision=precision))

    def E_of_Z1(Z1):
        return E_of_H1(ops.sigmoid(Z1))

    dE_df, dE_dW, dE_db = jax.grad(loss_example)(params, x, y, spec)
    return ChainTerms(
        dE_dO=_cotangent(E_of_O, O),
        dO_dZ2=_jacobian_diagonal(ops.sigmoid, Z2),
        delta2=_cotangent(E_of_Z2, Z2),
        dE_dH1=_cotangent(E_of_H1, H1),
        dH1_dZ1=_jacobian_diagonal(ops.sigmoid, Z1),
        delta1=_cotangent(E_of_Z1, Z1),
        dE_dW=dE_dW,
        dE_db=dE_db,
        dE_df=dE_df,
    )


def autodiff_chain_terms(params: Params, x: jax.Array, y: jax.Array, spec: ConvNetSpec) -> ChainTerms:
    """`autodiff_chain_terms_example` for one example, or stacked per example for a batch."""
    x, y, batched = check_inputs(params, x, y, spec)
    if batched:
        return jax.vmap(autodiff_chain_terms_example, in_axes=(None, 0, 0, None))(params, x, y, spec)
    return autodiff_chain_terms_example(params, x, y, spec)
