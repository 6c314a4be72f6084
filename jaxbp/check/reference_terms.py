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
from jaxbp.check.report import leaf_names
from jaxbp.model import check_inputs
from jaxbp.model import loss_example
from jaxbp.network import Network
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


# --- any stack of layers (`jaxbp.Network`) ---------------------------------------------------


def network_term_names(params: tuple, network: Network) -> list[str]:
    """Names of the terms of `network_manual_terms`, in backward order: the loss's dE/da_L, then
    per layer, last first, its dE/dparams leaves and its dE/dx."""
    names = ["loss dE/da_L"]
    for index in reversed(range(len(network.layers))):
        name = f"layers[{index}] {type(network.layers[index]).__name__}"
        names += [f"{name} dE/d{leaf}" for leaf in leaf_names(params[index])]
        names.append(f"{name} dE/dx")
    return names


def _in_backward_order(dE_da_L, per_layer) -> tuple:
    """(dE/da_L, then per layer, last first, its dE/dparams leaves and dE/dx), flat."""
    flat = [dE_da_L]
    for dE_dparams, dE_dx in reversed(per_layer):
        flat += jax.tree.leaves(dE_dparams) + [dE_dx]
    return tuple(flat)


def network_manual_terms(params: tuple, x: jax.Array, y: jax.Array, network: Network) -> tuple:
    """The manual backward of a `Network` as a tuple of terms named by `network_term_names`.

    Per example (stacked on axis 0 for a batch, without the batch mean's 1/N).
    """
    layer_terms = network.chain_terms(params, x, y)
    return _in_backward_order(layer_terms[-1].dE_dy, [(t.dE_dparams, t.dE_dx) for t in layer_terms])


def network_reference_terms(params: tuple, x: jax.Array, y: jax.Array, network: Network) -> tuple:
    r"""The terms of `network_manual_terms`, each by autodiff of one layer at the same point.

    Layer l is given the same input a_l and the same incoming cotangent dE/da_{l+1} as the
    manual backward used, and ``jax.vjp(layer.apply, theta_l, a_l)`` pulls it back:

    .. math:: (\partial E / \partial \theta_l,\ \partial E / \partial a_l) =
              \operatorname{vjp}(g_l, \theta_l, a_l)(\partial E / \partial a_{l+1})

    so each layer's hand-written VJP is checked on its own: a wrong one fails at that layer and
    the layers below it still pass (they are fed its cotangent in both columns). The loss's
    dE/da_L is jax.grad of the loss's value.
    """
    x, y, batched = network.check_inputs(params, x, y)
    layer_terms = network.chain_terms(params, x, y)

    def per_example(layer_terms, y):
        dE_da_L = jax.grad(network.loss.value)(layer_terms[-1].y, y)
        per_layer = []
        for layer, p, t in zip(network.layers, params, layer_terms):
            _, pullback = jax.vjp(layer.apply, p, t.x)
            per_layer.append(pullback(t.dE_dy))
        return _in_backward_order(dE_da_L, per_layer)

    return jax.vmap(per_example)(layer_terms, y) if batched else per_example(layer_terms, y)
