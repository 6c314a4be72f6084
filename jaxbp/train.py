"""Training: the slides' update rule as an optax transformation, and the jitted update step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Union

import jax
import optax

from jaxbp.autodiff import value_and_autodiff_grads_example
from jaxbp.backward import value_and_manual_grads_example
from jaxbp.model import batch_mean
from jaxbp.model import check_inputs
from jaxbp.params import Params
from jaxbp.spec import ConvNetSpec

GradsFn = Callable[[Params, jax.Array, jax.Array, ConvNetSpec], tuple[jax.Array, Params]]
GRADS = {"manual": value_and_manual_grads_example, "autodiff": value_and_autodiff_grads_example}


def sgd(learning_rate: Union[float, optax.Schedule]) -> optax.GradientTransformation:
    r"""The slides' update, :math:`w \leftarrow w - \alpha\, dE/dw`, as an optax transformation.

    Args:
      learning_rate: alpha, a float or an optax schedule of the step count.

    Returns:
      An `optax.GradientTransformation`; its update is ``-alpha * g`` (apply with
      `optax.apply_updates`). Equal to `optax.sgd(alpha)`, written out to show the rule.
    """
    if not callable(learning_rate) and not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}")

    def init(params):
        del params
        return optax.ScaleByScheduleState(count=jax.numpy.zeros([], jax.numpy.int32))

    def update(grads, state, params=None):
        del params
        alpha = learning_rate(state.count) if callable(learning_rate) else learning_rate
        updates = jax.tree.map(lambda g: -alpha * g, grads)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def make_update_step(
    spec: ConvNetSpec,
    optimizer: optax.GradientTransformation,
    *,
    grads: Union[str, GradsFn] = "manual",
):
    """Build the jitted update step for `spec`.

    The step computes the per-example (E, gradient) with `grads`, batched by `jax.vmap` and
    averaged over the batch, then applies `optimizer`; all of it is one `jax.jit`, compiled once
    per input shape and dtype.

    Args:
      spec: the network.
      optimizer: any optax transformation (`jaxbp.sgd` for the slides' rule).
      grads: "manual" (the slides' backward), "autodiff" (jax.grad), or a per-example function
        ``(params, x, y, spec) -> (E, Params)`` of your own.

    Returns:
      ``step(params, opt_state, x, y) -> (params, opt_state, E)`` with x (N, H, W, C), y (N, n_out)
      and E the batch's mean loss at the params before the update.
    """
    if not isinstance(spec, ConvNetSpec):
        raise TypeError(f"spec must be a ConvNetSpec, got {type(spec).__name__}")
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}")
    if isinstance(grads, str):
        if grads not in GRADS:
            raise ValueError(f"grads must be one of {sorted(GRADS)} or a callable, got {grads!r}")
        value_and_grads_example = GRADS[grads]
    elif callable(grads):
        value_and_grads_example = grads
    else:
        raise TypeError(f"grads must be one of {sorted(GRADS)} or a callable, got {grads!r}")
    value_and_grads = batch_mean(value_and_grads_example)

    @jax.jit
    def step(params: Params, opt_state, x: jax.Array, y: jax.Array):
        x, y, batched = check_inputs(params, x, y, spec)
        if not batched:
            raise ValueError(f"x must be a batch (N, *{spec.in_shape}), got {x.shape}")
        E, g = value_and_grads(params, x, y, spec)
        updates, opt_state = optimizer.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, E

    return step
