r"""How far apart two gradients are: four numbers, each answering a different question.

For a candidate a and a reference b of one shape (flattened):

.. math::
   \text{max abs} &= \max_i |a_i - b_i| \\
   \text{rel} &= \frac{\max_i |a_i - b_i|}{\max(\text{floor},\; \max_i |a_i| + \max_i |b_i|)} \\
   \cos &= \frac{\langle a, b \rangle}{\|a\|_2 \|b\|_2}, \qquad
   \text{norm ratio} = \frac{\|a\|_2}{\|b\|_2}

The relative error is CS231n's, taken with infinity norms over a whole array so that a tiny entry
next to large ones does not dominate; `floor` keeps it finite when both sides are (near) zero.
Cosine near 1 with a norm ratio away from 1 says "right direction, wrong scale" (a missing 1/N);
cosine near -1 says "wrong sign"; cosine near 0 says "a different quantity altogether".
"""

from __future__ import annotations

import jax
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


def cosine_similarity(a, b) -> float:
    r""":math:`\langle a, b\rangle / (\|a\| \|b\|)`; 1.0 when both are zero, 0.0 when one is."""
    a, b = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64))
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(np.clip(np.dot(a, b) / (na * nb), -1.0, 1.0))


def norm_ratio(a, b) -> float:
    r""":math:`\|a\|_2 / \|b\|_2`; 1.0 when both are zero, inf when only b is."""
    na = float(np.linalg.norm(np.ravel(np.asarray(a, np.float64))))
    nb = float(np.linalg.norm(np.ravel(np.asarray(b, np.float64))))
    if nb == 0:
        return 1.0 if na == 0 else float("inf")
    return na / nb


def worst_index(a, b) -> tuple[int, ...]:
    """The index of the largest |a - b| (for a stacked batch, its first entry is the example)."""
    diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    if diff.size == 0:
        return ()
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape))
