r"""The taps and conv batch gradient with the examples as the minor axis of every array.

The same sums as `jaxbp.batched.value_and_grads` with the taps forward and XLA's conv for dE/df
(`Formulation(..., batch_minor=True)`), in another memory layout. Each chunk of m examples is
split into P parts of q = m / P and transposed once:

.. math::
   X^T[p, c, h, w, s] = X_{pad}[p q + s,\, h,\, w,\, c]

and every term after it keeps the example s as its minor axis:

.. math::
   Z_1[p, i, j, k, s] &= \textstyle\sum_{a, b, c}
     X^T[p, c,\, a d_h + i s_h,\, b d_w + j s_w, s]\, f[a, b, c, k] \\
   Z_2[p, o, s] &= \textstyle\sum_d W[d, o]\, H_1[p, d, s] + b[o], \qquad
   \delta_2 = (O - Y) \odot O (1 - O) / N \\
   \frac{dE}{dW}[d, o] &= \textstyle\sum_{p, s} H_1[p, d, s]\, \delta_2[p, o, s], \qquad
   \delta_1[p, d, s] = \big(\textstyle\sum_o W[d, o]\, \delta_2[p, o, s]\big)\, H_1 (1 - H_1) \\
   \frac{dE}{df}[a, b, c, k] &= \textstyle\sum_p \mathrm{conv}(X^T[p], \delta_1[p])
     \quad\text{(c the conv's batch, s its contracted feature axis)}

with d = (i, j, k) as in the params' W. Why (measured on a 2-core AMD EPYC with a 16 MB L3,
one filter, 32x32x3 and 28x28x1, standalone interleaved timings, not committed; the benchmark's
formulation tables time it beside the rest):

* dE/df's conv needs the examples as the minor axis of its operands. In the channels-last layout
  XLA transposes each part of x inside the conv's operand (`jaxbp.ops.conv2d_filter_vjp_sum`):
  at batch 1024 of 32x32x3 with 3x3 those transposes took 5.9 of the step's 18 ms (jax.profiler).
  Here x is transposed once per chunk, and every part is a contiguous row of the result.
* The transpose is made one loop step ahead and carried: computed in the step that uses it, XLA
  fused it into each of its consumers again (the taps' loop read x through it, and each part
  was its own strided copy), and as a carried (P, C, H, W, q) array XLA's layout assignment
  kept x's layout and moved the transpose back into the parts' slices. Carried as P flat rows,
  whose layout a reshape fixes, it is one kernel per chunk.
* With the examples minor the taps' loop reads contiguous runs of q numbers: the forward of a
  chunk took 2.2 against 4.8 ms per step at that point.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxbp import carry
from jaxbp import ops
from jaxbp.params import Params
from jaxbp.spec import ConvNetSpec


def split_parts(m: int, parts: int) -> int:
    """P: the most parts, at most `parts`, that split m examples evenly (1 for a prime m)."""
    return max(p for p in range(1, min(parts, m) + 1) if m % p == 0)


def transposed_chunk(x: jax.Array, spec: ConvNetSpec, parts: int) -> jax.Array:
    """X^T of m examples as P flat rows: row p is X_pad[p q:(p + 1) q] as (C, Hp, Wp, q).

    Flat, so that the transpose is done where it is written: XLA's layout assignment may give a
    (P, C, Hp, Wp, q) array any physical layout, the original one included, but a reshape to
    rows only keeps it a bitcast in this one."""
    m, h, w, c = x.shape
    q = m // parts
    (top, bottom), (left, right) = spec.pads
    xt = x.reshape(parts, q, h, w, c).transpose(0, 4, 2, 3, 1)
    return jnp.pad(xt, ((0, 0), (0, 0), (top, bottom), (left, right), (0, 0))).reshape(parts, -1)


def chunk_sums(
    params: Params, xt: jax.Array, y: jax.Array, spec: ConvNetSpec, n: int
) -> tuple[jax.Array, Params]:
    """(E, Params(dE/df as (K, kh kw C), (dE/dW)^T, dE/db)) of one chunk from its
    `transposed_chunk`, each a sum over the chunk's examples divided by n."""
    kh, kw = spec.kernel_size
    (sh, sw), (dh, dw) = spec.stride, spec.dilation
    ho, wo, k = spec.h1_shape
    c = spec.in_shape[2]
    (top, bottom), (left, right) = spec.pads
    parts = xt.shape[0]
    hp, wp = spec.in_shape[0] + top + bottom, spec.in_shape[1] + left + right
    xt = xt.reshape(parts, c, hp, wp, -1)
    q = xt.shape[-1]
    # Z1 as (P, Ho, Wo, K, q): kh kw C broadcast multiply-adds of (P, Ho, Wo, 1, q) taps by a
    # row f[a, b, c] of K numbers, one elementwise loop over contiguous runs of q examples.
    z = None
    for a in range(kh):
        for b in range(kw):
            for ci in range(c):
                start = (0, ci, a * dh, b * dw, 0)
                stop = (parts, ci + 1, a * dh + (ho - 1) * sh + 1, b * dw + (wo - 1) * sw + 1, q)
                tap = lax.slice(xt, start, stop, (1, 1, sh, sw, 1))  # (P, 1, Ho, Wo, q)
                term = tap[:, 0, :, :, None, :] * params.f[a, b, ci][None, None, None, :, None]
                z = term if z is None else z + term
    H1 = ops.sigmoid(z.reshape(parts, ho * wo * k, q))  # (P, D, q), d = (i, j, k) as W's rows
    # The dense layer per part as batched matmuls (W shared): the examples stay minor.
    W = jnp.broadcast_to(params.W, (parts, *params.W.shape))  # (P, D, n_out)
    Z2 = lax.dot_general(W, H1, (((1,), (1,)), ((0,), (0,))), precision=spec.precision)  # (P, n_out, q)
    O = ops.sigmoid(Z2 + params.b[None, :, None])
    yt = y.reshape(parts, q, -1).transpose(0, 2, 1)  # (P, n_out, q)
    delta2 = (O - yt) * (O * (1 - O)) / n
    E = 0.5 * jnp.sum((O - yt) ** 2) / n
    dW_t = lax.dot_general(delta2, H1, (((2,), (2,)), ((0,), (0,))), precision=spec.precision).sum(0)
    db = jnp.sum(delta2, axis=(0, 2))
    dE_dH1 = lax.dot_general(W, delta2, (((2,), (1,)), ((0,), (0,))), precision=spec.precision)
    delta1 = (dE_dH1 * (H1 * (1 - H1))).reshape(parts, ho, wo, k, q)
    delta1 = delta1.transpose(0, 1, 2, 4, 3)  # (P, Ho, Wo, q, K): a bitcast for one filter
    # dE/df[a, b, c, k] = sum_p sum_{i, j, s} X^T[p, c, a dh + i sh, b dw + j sw, s] delta1[p, i, j, s, k]:
    # per part one conv with c as its batch and s as its contracted feature axis
    # (`jaxbp.ops.conv2d_filter_vjp_sum`, its operands already laid out); XLA's CPU runtime
    # runs the parts' convs at once.
    convs = [
        lax.conv_general_dilated(
            xt[p],
            delta1[p],
            window_strides=spec.dilation,
            padding="VALID",
            rhs_dilation=spec.stride,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=spec.precision,
        )[:, :kh, :kw]
        for p in range(parts)
    ]
    dE_df = functools.reduce(jnp.add, convs)  # (C, kh, kw, K)
    return E, Params(f=dE_df.transpose(3, 1, 2, 0).reshape(k, -1), W=dW_t, b=db)


def value_and_grads(
    params: Params, x: jax.Array, y: jax.Array, spec: ConvNetSpec, chunk: int, parts: int
) -> tuple[jax.Array, Params]:
    """(E, sums of dE/dparams in `jaxbp.batched.chunk_sums`' transposed layout) of a checked
    batch, in chunks of `chunk` examples (the remainder as one more) split into at most `parts`.

    The whole chunks run in a `lax.fori_loop` whose step transposes the next chunk
    (`transposed_chunk`) after using the one it was given; the last step transposes its own
    chunk again, unused (at batch 256 in chunks of 128, one transpose in three). Carries what
    `jaxbp.batched.value_and_grads`' loop does (`jaxbp.carry`): (dE/dW)^T, and E, dE/df and
    dE/db in one vector. With one chunk XLA removes the one-step loop, and fuses the transpose
    into its consumers again: whole, at batch 32, the layout took 0.92-1.32x the faster
    channels-last side's time (`jaxbp.formulations`), and the rule takes it in chunks only."""
    n = x.shape[0]
    whole = n // chunk
    p_whole = split_parts(chunk, parts)
    total = carry.zeros(params, x)
    if whole > 0:
        x_rows = x[: whole * chunk].reshape(whole, -1)
        y_rows = y[: whole * chunk].reshape(whole, -1)

        def row(rows, i, shape):
            return lax.dynamic_index_in_dim(rows, i, keepdims=False, allow_negative_indices=False).reshape(
                shape
            )

        def transposed(i):
            return transposed_chunk(row(x_rows, i, (chunk, *x.shape[1:])), spec, p_whole)

        def step(i, state):
            total, xt = state
            sums = chunk_sums(params, xt, row(y_rows, i, (chunk, y.shape[1])), spec, n)
            return carry.add(total, *sums), transposed(jnp.minimum(i + 1, whole - 1))

        total, _ = lax.fori_loop(0, whole, step, (total, transposed(0)))
    if whole * chunk < n:
        rest, y_rest = x[whole * chunk :], y[whole * chunk :]
        xt = transposed_chunk(rest, spec, split_parts(rest.shape[0], parts))
        total = carry.add(total, *chunk_sums(params, xt, y_rest, spec, n))
    return carry.unpack(total, params)
