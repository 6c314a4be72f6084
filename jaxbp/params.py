"""The parameters of the slides' network: a NamedTuple pytree, and its initialisation."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxbp.spec import ConvNetSpec


class Params(NamedTuple):
    """Parameters (or gradients) of the slides' network.

    Attributes:
      f: (kh, kw, C, K) filters, HWIO.
      W: (D, n_out) dense weights, D = Ho * Wo * K (H1 flattened in C order).
      b: (n_out,) dense bias.
    """

    f: jax.Array
    W: jax.Array
    b: jax.Array


def param_shapes(spec: ConvNetSpec) -> Params:
    """The shapes each leaf must have for `spec`."""
    return Params(f=spec.filter_shape, W=(spec.n_hidden, spec.n_out), b=(spec.n_out,))


def init_params(key: jax.Array, spec: ConvNetSpec, dtype=jnp.float32) -> Params:
    r"""LeCun-normal initialisation, deterministic in `key`.

    Each weight is drawn from a truncated normal of variance 1 / fan_in (fan_in = kh*kw*C for f,
    D for W), so pre-activations Z1 and Z2 start with unit variance, where the sigmoid is near
    linear and its derivative H(1-H) is near its maximum 1/4; the bias starts at zero.

    Args:
      key: a `jax.random.key` (or legacy uint32 PRNGKey).
      spec: the network.
      dtype: a floating dtype for every leaf.
    """
    from jaxbp.network import Network  # network builds on Params: imported here, not at the top

    if isinstance(spec, Network):
        return spec.init(key, dtype)
    if not isinstance(spec, ConvNetSpec):
        raise TypeError(f"spec must be a ConvNetSpec or a jaxbp.Network, got {type(spec).__name__}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype must be a floating dtype, got {dtype!r}")
    key_f, key_W = jax.random.split(key)
    init = jax.nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3)
    f = init(key_f, spec.filter_shape, dtype)
    W = jax.nn.initializers.lecun_normal()(key_W, (spec.n_hidden, spec.n_out), dtype)
    b = jnp.zeros((spec.n_out,), dtype)
    return Params(f=f, W=W, b=b)


def check_params(params, spec: ConvNetSpec, *, name: str = "params") -> None:
    """Raise TypeError/ValueError unless `params` is a `Params` whose leaves fit `spec`."""
    if not isinstance(spec, ConvNetSpec):
        raise TypeError(f"spec must be a ConvNetSpec, got {type(spec).__name__}")
    if not isinstance(params, Params):
        raise TypeError(f"{name} must be a jaxbp.Params(f, W, b), got {type(params).__name__}")
    dtypes = set()
    for field, expected in zip(Params._fields, param_shapes(spec)):
        leaf = getattr(params, field)
        shape = getattr(leaf, "shape", None)
        if shape != tuple(expected):
            raise ValueError(f"{name}.{field} must have shape {tuple(expected)} for this spec, got {shape}")
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TypeError(f"{name}.{field} must be floating point, got dtype {leaf.dtype}")
        dtypes.add(jnp.dtype(leaf.dtype))
    if len(dtypes) != 1:
        raise TypeError(f"{name} leaves must share one dtype, got {[str(p.dtype) for p in params]}")
