r"""Central finite differences of a scalar loss: elementwise, or along random directions.

.. math:: D_v E(p) = \frac{E(p + \epsilon v) - E(p - \epsilon v)}{2 \epsilon}
          = \langle \nabla E(p), v \rangle + O(\epsilon^2 \|E'''\|) + O(u |E| / \epsilon)

With v = e_i (elementwise) this is one entry of the gradient, 2 evaluations each: exact enough
to compare entry by entry, but too costly for large leaves. There, as `jax.test_util.check_grads`
does in rev mode, the gradient g is tested through its dot products with k random unit
directions v_j: the k numbers <g, v_j> are compared with the k differences D_{v_j} E. A wrong
entry of g shows in <g, v_j> unless it is orthogonal to every v_j, which random directions make
improbable.

The truncation term shrinks as eps^2 and the round-off term grows as u / eps, so the error is
V-shaped in eps (experiments/fd_eps.py); in float64 (u = 1.1e-16) its bottom lies near
eps = 1e-5 (measured: 8e-11 relative at its best eps 1.8e-5, 3e-10 at 1e-5, 2e-9 at 1e-6), the
default of `float64_differences`. Evaluations are batched with `jax.vmap`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxbp.check.report import leaf_names

# Perturbed copies of a leaf evaluated in one vmapped call (bounds the memory of one call).
CHUNK = 256


def central_differences(fn: Callable, leaf, steps) -> jax.Array:
    r"""(fn(leaf + s_j) - fn(leaf - s_j)) / (2 |s_j|) for each step s_j = eps v_j, v_j a unit vector.

    Args:
      fn: scalar function of one array of leaf's shape (vmap-able).
      leaf: (*shape) the point.
      steps: (k, *shape) the steps s_j.

    Returns:
      (k,) derivatives along the unit vectors s_j / |s_j|, evaluated `CHUNK` steps at a time.
    """
    steps = jnp.asarray(steps, leaf.dtype)
    sizes = jnp.sqrt(jnp.sum(steps.reshape(steps.shape[0], -1) ** 2, axis=1))
    diffs = jax.lax.map(lambda step: fn(leaf + step) - fn(leaf - step), steps, batch_size=CHUNK)
    return diffs / (2 * sizes)


def finite_difference_grads(fn: Callable, params, *, eps: float = 1e-6):
    r"""Central differences of a scalar fn(params), element by element, in params' own dtype:

    .. math:: \partial_i f \approx \frac{f(p + \epsilon e_i) - f(p - \epsilon e_i)}{2 \epsilon}

    Costs 2 evaluations per parameter entry: meant for small parameter trees.
    """
    leaves, treedef = jax.tree.flatten(params)
    grads = []
    for index, leaf in enumerate(leaves):
        leaf = jnp.asarray(leaf)

        def leaf_fn(value, index=index):
            return fn(jax.tree.unflatten(treedef, [*leaves[:index], value, *leaves[index + 1 :]]))

        basis = eps * jnp.eye(leaf.size, dtype=leaf.dtype).reshape(leaf.size, *leaf.shape)
        grads.append(jax.jit(central_differences, static_argnums=0)(leaf_fn, leaf, basis).reshape(leaf.shape))
    return jax.tree.unflatten(treedef, grads)


@dataclasses.dataclass(frozen=True)
class LeafDifferences:
    """Finite differences of one parameter leaf, and how to compare a gradient with them.

    Attributes:
      name: the leaf's name.
      shape: the leaf's shape.
      eps: the step.
      values: elementwise: the (*shape) numerical gradient; directional: the (k,) differences.
      directions: None (elementwise), or the (k, size) unit directions.
      seed: the seed the directions were drawn with.
    """

    name: str
    shape: tuple[int, ...]
    eps: float
    values: np.ndarray
    directions: np.ndarray | None = None
    seed: int | None = None

    @property
    def method(self) -> str:
        """How the values were computed, for the report."""
        if self.directions is None:
            return f"FD elementwise, eps={self.eps:g}"
        return f"FD {len(self.directions)} random directions (seed {self.seed}), eps={self.eps:g}"

    def project(self, grad) -> np.ndarray:
        """What to compare with `values`: grad itself, or its dot products <grad, v_j>."""
        grad = np.asarray(grad, np.float64)
        if self.directions is None:
            return grad
        return self.directions @ grad.reshape(-1)


def float64_differences(
    loss_fn: Callable,
    params,
    *,
    eps: float = 1e-5,
    max_elementwise: int = 256,
    n_directions: int = 8,
    seed: int = 0,
) -> list[LeafDifferences]:
    """Central differences of loss_fn(params) in float64, for every leaf of params.

    Leaves with at most `max_elementwise` entries are differenced entry by entry; larger ones
    along `n_directions` random unit directions (normal, normalised; drawn with NumPy from `seed`
    and the leaf's position, so reproducible). loss_fn is called with float64 params inside
    ``jax.enable_x64(True)``, so this works whatever the global x64 setting; build any arrays it
    closes over (x, y) as float64 inside the same context.

    Args:
      loss_fn: scalar function of a params pytree.
      params: the point (any floating dtype; cast to float64).

    Returns:
      One `LeafDifferences` per leaf, in tree order.
    """
    leaves = jax.tree.leaves(params)
    directions = []
    for index, leaf in enumerate(leaves):
        size = int(np.prod(np.shape(leaf)))
        if size <= max_elementwise:
            directions.append(None)
        else:
            v = np.random.default_rng([seed, index]).normal(size=(n_directions, size))
            directions.append(v / np.linalg.norm(v, axis=1, keepdims=True))
    with jax.enable_x64(True):
        params64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        values = jax.device_get(
            jax.jit(_all_differences, static_argnums=0)(loss_fn, params64, eps, directions)
        )
    out = []
    for name, leaf, d, v in zip(leaf_names(params), leaves, values, directions):
        shape = tuple(np.shape(leaf))
        if v is None:
            out.append(LeafDifferences(name, shape, eps, np.asarray(d).reshape(shape)))
        else:
            out.append(LeafDifferences(name, shape, eps, np.asarray(d), directions=v, seed=seed))
    return out


def _all_differences(loss_fn, params, eps, directions):
    """Central differences of every leaf, in one traced function (one compilation)."""
    leaves, treedef = jax.tree.flatten(params)
    out = []
    for index, (leaf, v) in enumerate(zip(leaves, directions)):

        def leaf_fn(value, index=index):
            return loss_fn(jax.tree.unflatten(treedef, [*leaves[:index], value, *leaves[index + 1 :]]))

        if v is None:  # elementwise: the steps are eps e_i
            steps = eps * jnp.eye(leaf.size, dtype=leaf.dtype).reshape(leaf.size, *leaf.shape)
        else:
            steps = eps * jnp.asarray(v, leaf.dtype).reshape(v.shape[0], *leaf.shape)
        out.append(central_differences(leaf_fn, leaf, steps))
    return out
