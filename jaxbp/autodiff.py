"""The reference: `jax.grad` of the same loss the manual backward differentiates by hand."""

from __future__ import annotations

import jax

from jaxbp.model import batch_mean
from jaxbp.model import check_inputs
from jaxbp.model import loss_example
from jaxbp.network import Network
from jaxbp.params import Params
from jaxbp.spec import ConvNetSpec

value_and_autodiff_grads_example = jax.value_and_grad(loss_example)
value_and_autodiff_grads_example.__doc__ = "(E, jax.grad(E)) for one example."


def autodiff_value_and_grads(
    params: Params, x: jax.Array, y: jax.Array, spec: ConvNetSpec
) -> tuple[jax.Array, Params]:
    """(E, jax.grad(E)); for a batch, vmap of the per-example gradient, then the mean.

    `spec` may also be a `jaxbp.Network`.
    """
    if isinstance(spec, Network):
        return network_autodiff_value_and_grads(params, x, y, spec)
    x, y, batched = check_inputs(params, x, y, spec)
    if batched:
        return batch_mean(value_and_autodiff_grads_example)(params, x, y, spec)
    return value_and_autodiff_grads_example(params, x, y, spec)


def autodiff_grads(params: Params, x: jax.Array, y: jax.Array, spec: ConvNetSpec) -> Params:
    """jax.grad of `jaxbp.loss`: the reference the manual gradients are checked against."""
    return autodiff_value_and_grads(params, x, y, spec)[1]


# --- the same reference for any `jaxbp.Network` -----------------------------------------------


def network_value_and_autodiff_grads_example(params: tuple, x: jax.Array, y: jax.Array, network: Network):
    """(E, jax.grad(E)) for one example of `network`, as fn(params, x, y, network)."""
    return jax.value_and_grad(network.loss_example)(params, x, y)


def network_autodiff_value_and_grads(params: tuple, x: jax.Array, y: jax.Array, network: Network):
    """(E, jax.grad(E)) of `network`; for a batch, vmap of the per-example gradient, then the mean."""
    x, y, batched = network.check_inputs(params, x, y)
    if batched:
        return batch_mean(network_value_and_autodiff_grads_example)(params, x, y, network)
    return network_value_and_autodiff_grads_example(params, x, y, network)


def network_autodiff_grads(params: tuple, x: jax.Array, y: jax.Array, network: Network) -> tuple:
    """jax.grad of `network.loss_value`: the reference `network.manual_grads` is checked against."""
    return network_autodiff_value_and_grads(params, x, y, network)[1]
