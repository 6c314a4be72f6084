"""Comparing gradients: manual against autodiff against finite differences.

The relative error used throughout is CS231n's, taken over a whole array:

    rel(a, b) = max|a - b| / max(floor, max|a| + max|b|)

(infinity norms, so a tiny entry next to large ones does not dominate the measure).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

REL_FLOOR = 1e-12


def relative_error(a, b, *, floor: float = REL_FLOOR) -> float:
    """max|a - b| / max(floor, max|a| + max|b|) over two arrays of one shape."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"relative_error: shapes differ, {a.shape} vs {b.shape}")
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(floor, np.max(np.abs(a)) + np.max(np.abs(b))))


def tree_relative_error(a, b, *, floor: float = REL_FLOOR) -> float:
    """The largest `relative_error` over matching leaves of two pytrees."""
    errors = jax.tree.leaves(jax.tree.map(lambda u, v: relative_error(u, v, floor=floor), a, b))
    return max(errors, default=0.0)


def finite_difference_grads(fn: Callable, params, *, eps: float = 1e-6):
    r"""Central differences of a scalar fn(params), element by element:

    .. math:: \partial_i f \approx \frac{f(p + \epsilon e_i) - f(p - \epsilon e_i)}{2 \epsilon}

    with truncation error O(eps^2 f''') and round-off O(u |f| / eps); in float64 (u = 1.1e-16)
    eps = 1e-6 balances the two near 1e-10 relative. Costs 2 evaluations per parameter entry:
    meant for small parameter trees.
    """
    leaves, treedef = jax.tree.flatten(params)
    fn = jax.jit(fn)
    grads = []
    for index, leaf in enumerate(leaves):
        flat = np.asarray(leaf).reshape(-1)
        g = np.zeros_like(flat)
        for i in range(flat.size):
            bumped = []
            for sign in (1.0, -1.0):
                shifted = flat.copy()
                shifted[i] += sign * eps
                trial = list(leaves)
                trial[index] = jnp.asarray(shifted.reshape(leaf.shape), leaf.dtype)
                bumped.append(float(fn(jax.tree.unflatten(treedef, trial))))
            g[i] = (bumped[0] - bumped[1]) / (2 * eps)
        grads.append(jnp.asarray(g.reshape(leaf.shape), leaf.dtype))
    return jax.tree.unflatten(treedef, grads)
