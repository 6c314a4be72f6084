r"""The slides' backward pass, written term by term. No autodiff transform is called here.

For one example, with delta2 = dE/dZ2 and delta1 = dE/dZ1 (seed/READING.md):

.. math::
   \frac{dE}{dW} &= \underbrace{(O - Y)}_{dE/dO} \underbrace{O(1 - O)}_{dO/dZ_2} H_1 = H_1\,\delta_2^T \\
   \frac{dE}{db} &= (O - Y)\, O(1 - O) = \delta_2 \\
   \frac{dE}{df} &= \operatorname{conv}\big(X,\; \underbrace{W \delta_2}_{dE/dH_1}
                     \odot \underbrace{H_1(1 - H_1)}_{dH_1/dZ_1}\big) = \operatorname{conv}(X, \delta_1)

A batch gradient is the mean of the per-example gradients, matching `jaxbp.loss`, which is the
mean of per-example losses. `manual_value_and_grads` computes it with `jaxbp.batched`, which
writes that mean as one contraction over the batch (the same math, faster on XLA);
`per_example_manual_grads` keeps the per-example gradients (equal to `jax.vmap` of the functions here).
"""

from __future__ import annotations

from typing import NamedTuple

import jax

from jaxbp import ops
from jaxbp.batched import per_example_grads as batch_per_example_grads
from jaxbp.batched import value_and_grads as batch_value_and_grads
from jaxbp.model import check_inputs
from jaxbp.network import Network
from jaxbp.params import Params
from jaxbp.spec import ConvNetSpec


class ChainTerms(NamedTuple):
    """Every factor of the slides' chain rule for one example (stacked on axis 0 for a batch).

    Attributes:
      dE_dO: (n_out,) O - Y.
      dO_dZ2: (n_out,) O (1 - O), the diagonal of the sigmoid's Jacobian.
      delta2: (n_out,) dE/dZ2 = dE/dO * dO/dZ2.
      dE_dH1: (Ho, Wo, K) W delta2, reshaped to H1's shape.
      dH1_dZ1: (Ho, Wo, K) H1 (1 - H1).
      delta1: (Ho, Wo, K) dE/dZ1 = dE/dH1 * dH1/dZ1.
      dE_dW: (D, n_out) H1 delta2^T.
      dE_db: (n_out,) delta2.
      dE_df: (kh, kw, C, K) conv(X, delta1).
    """

    dE_dO: jax.Array
    dO_dZ2: jax.Array
    delta2: jax.Array
    dE_dH1: jax.Array
    dH1_dZ1: jax.Array
    delta1: jax.Array
    dE_dW: jax.Array
    dE_db: jax.Array
    dE_df: jax.Array


def value_and_chain_terms_example(
    params: Params, x: jax.Array, y: jax.Array, spec: ConvNetSpec
) -> tuple[jax.Array, ChainTerms]:
    """E and every chain-rule term for one (H, W, C) example, forward then backward."""
    # Forward, keeping what the backward reads: X, H1, O.
    Z1 = ops.conv2d(x, params.f, **spec.conv_kwargs)
    H1 = ops.sigmoid(Z1)
    O = ops.sigmoid(ops.dense(ops.flatten(H1), params.W, params.b, precision=spec.precision))
    E = ops.half_squared_error(O, y)

    # Backward, one slide factor at a time.
    dE_dO = ops.half_squared_error_vjp(O, y)  # O - Y
    dO_dZ2 = ops.sigmoid_derivative(O)  # O (1 - O)
    delta2 = dE_dO * dO_dZ2  # dE/dZ2
    dE_dW, dE_db, dE_dH1_flat = ops.dense_vjp(ops.flatten(H1), params.W, delta2, precision=spec.precision)
    dE_dH1 = ops.flatten_vjp(dE_dH1_flat, H1.shape)  # W delta2, as a (Ho, Wo, K) map
    dH1_dZ1 = ops.sigmoid_derivative(H1)  # H1 (1 - H1)
    delta1 = dE_dH1 * dH1_dZ1  # dE/dZ1
    dE_df = ops.conv2d_filter_vjp(x, delta1, kernel_size=spec.kernel_size, **spec.conv_kwargs)
    return E, ChainTerms(dE_dO, dO_dZ2, delta2, dE_dH1, dH1_dZ1, delta1, dE_dW, dE_db, dE_df)


def value_and_manual_grads_example(
    params: Params, x: jax.Array, y: jax.Array, spec: ConvNetSpec
) -> tuple[jax.Array, Params]:
    """(E, Params(dE/df, dE/dW, dE/db)) for one example."""
    E, t = value_and_chain_terms_example(params, x, y, spec)
    return E, Params(f=t.dE_df, W=t.dE_dW, b=t.dE_db)


def chain_terms(params: Params, x: jax.Array, y: jax.Array, spec: ConvNetSpec) -> ChainTerms:
    """Every named factor of the slides' chain rule; for a batch, per example along axis 0.

    For a `jaxbp.Network` (any stack of layers), each layer's `LayerTerms` instead.
    """
    if isinstance(spec, Network):
        return spec.chain_terms(params, x, y)
    x, y, batched = check_inputs(params, x, y, spec)
    fn = lambda p, xi, yi, s: value_and_chain_terms_example(p, xi, yi, s)[1]  # noqa: E731
    if batched:
        return jax.vmap(fn, in_axes=(None, 0, 0, None))(params, x, y, spec)
    return fn(params, x, y, spec)


def manual_value_and_grads(
    params: Params, x: jax.Array, y: jax.Array, spec: ConvNetSpec
) -> tuple[jax.Array, Params]:
    """(E, dE/dparams) by the slides' formulas; for a batch, both are means over examples.

    A batch goes through `jaxbp.batched.value_and_grads` (the mean as a contraction over N),
    equal to the mean of `per_example_manual_grads` (tested in tests/test_backward.py). For a
    `jaxbp.Network`, its layers' VJPs (`Network.manual_value_and_grads`).
    """
    if isinstance(spec, Network):
        return spec.manual_value_and_grads(params, x, y)
    x, y, batched = check_inputs(params, x, y, spec)
    if batched:
        return batch_value_and_grads(params, x, y, spec)
    return value_and_manual_grads_example(params, x, y, spec)


def manual_grads(params: Params, x: jax.Array, y: jax.Array, spec: ConvNetSpec) -> Params:
    """dE/dparams by the slides' formulas, as a `Params`; for a batch, the mean over examples."""
    return manual_value_and_grads(params, x, y, spec)[1]


def per_example_manual_grads(params: Params, x: jax.Array, y: jax.Array, spec: ConvNetSpec) -> Params:
    """Per-example manual gradients of a batch (N, H, W, C): each leaf gains a leading axis N.

    For a `jaxbp.Network`, its `per_example_manual_grads`.

    `jaxbp.batched.per_example_grads`: after the taps forward (one filter) the slides' terms of
    the whole batch at once, dE/df by `jaxbp.conv_forms.filter_grad_rows`; otherwise `jax.vmap` of
    `jaxbp.batched` of a batch of one (patches or Toeplitz slabs, which vmap into batched dots,
    not grouped convolutions). Equal to vmapping `value_and_manual_grads_example` (tested in
    tests/test_batched.py).
    """
    if isinstance(spec, Network):
        return spec.per_example_manual_grads(params, x, y)
    x, y, batched = check_inputs(params, x, y, spec)
    if not batched:
        raise ValueError(f"x must be a batch (N, *{spec.in_shape}), got {x.shape}")
    return batch_per_example_grads(params, x, y, spec)
