"""What the chunks' loop carries: the batch gradient's running sums, in two arrays.

`jaxbp.batched.value_and_grads` and `jaxbp.batch_minor.value_and_grads` add each chunk's sums of
E and of the gradients, in the transposed layout of `jaxbp.batched.chunk_sums` ((K, kh kw C)
dE/df, (n_out, D) dE/dW), into one carry of a `lax.fori_loop`: (dE/dW)^T, and E, dE/df and dE/db
laid end to end in one vector. Each chunk adds into them with two fused kernels, started from
two broadcasts of zeros, where a carry of four arrays took four adds and three broadcasts; in the
update step reading the vector back costs one more kernel, E's slice (the others fuse into the
update). Each kernel XLA generates costs compile time on the CPU (experiments/PERFORMANCE.md).
dE/dW stays apart: in the one vector with the rest, the step ran 1.05-1.11x slower with 32
filters (batch 256, 32x32x3, 5x5: XLA's fused concatenation is slower than an add across the D
n_out numbers); the rest is at most a few thousand numbers.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxbp.params import Params

Carry = tuple[jax.Array, jax.Array]  # (E, dE/df, dE/db end to end; (dE/dW)^T)


def layout(params: Params) -> tuple[list[tuple[int, ...]], np.ndarray]:
    """The shapes of E, the transposed dE/df and dE/db in the carry's vector, and their offsets."""
    k = params.f.shape[-1]
    shapes = [(), (k, params.f.size // k), params.b.shape]
    return shapes, np.cumsum([0, *(math.prod(shape) for shape in shapes)])


def zeros(params: Params, x: jax.Array) -> Carry:
    """The carry before the first chunk.

    Typed like the chunks' sums: zeros_like keeps an array's varying mesh axes, so under
    `jax.shard_map` (`jaxbp.parallel`) the zeros vary over the axes the shard of x and the params
    vary over, as the sums do (the loop requires equal carry types). That relies on JAX's
    automatic pcast (jax_auto_pcast, on by default in jax 0.10); tests/test_mesh.py runs shards
    over one chunk, and fails if it stops holding."""
    _, offsets = layout(params)
    zero = jnp.zeros_like(x, shape=()) + jnp.zeros_like(params.f, shape=())
    return jnp.zeros(offsets[-1], x.dtype) + zero, jnp.zeros(params.W.T.shape, x.dtype) + zero


def add(total: Carry, E: jax.Array, sums: Params) -> Carry:
    """`total` plus one chunk's E and its gradients' sums in the transposed layout."""
    E_f_b, W_t = total
    return E_f_b + jnp.concatenate([E[None], sums.f.ravel(), sums.b]), W_t + sums.W


def unpack(total: Carry, params: Params) -> tuple[jax.Array, Params]:
    """(E, the gradients' sums in the transposed layout) of a carry."""
    shapes, offsets = layout(params)
    E_f_b, W_t = total
    E, f, b = (E_f_b[a:z].reshape(shape) for a, z, shape in zip(offsets[:-1], offsets[1:], shapes))
    return E, Params(f=f, W=W_t, b=b)
