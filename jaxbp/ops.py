r"""The slides' operations, each forward beside its hand-written backward (VJP).

Every function here is per example (no batch axis); `jax.vmap` adds one. A backward takes the
cotangent of the op's output (dE/d out) and returns the cotangent of its input(s): the chain
rule applied one factor at a time, micrograd-style, but as pure functions. Nothing here calls
an autodiff transform.

Shapes: x (H, W, C) image; f (kh, kw, C, K) filters (HWIO); z, h (Ho, Wo, K) feature maps;
W (D, n_out); b (n_out,); o, y (n_out,).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxbp.spec import DIMENSION_NUMBERS

Pads = tuple[tuple[int, int], tuple[int, int]]


# ---------------------------------------------------------------------------------------------
# Convolution (the deep-learning one: cross-correlation), strided, padded, dilated.
# ---------------------------------------------------------------------------------------------


def conv2d(
    x: jax.Array,
    f: jax.Array,
    *,
    stride: tuple[int, int] = (1, 1),
    padding: Pads = ((0, 0), (0, 0)),
    dilation: tuple[int, int] = (1, 1),
    precision: lax.Precision | None = None,
) -> jax.Array:
    r"""Z1 = conv(X, f).

    .. math::
       Z[i, j, k] = \sum_{a, b, c} X_{pad}[i s_h + a d_h,\; j s_w + b d_w,\; c]\, f[a, b, c, k]

    Args:
      x: (H, W, C) image.
      f: (kh, kw, C, K) filters.
      stride, padding, dilation: explicit conv hyperparameters (see `ConvNetSpec.pads`).
      precision: lax precision of the conv.

    Returns:
      (Ho, Wo, K) feature map.
    """
    return lax.conv_general_dilated(
        x[None],
        f,
        window_strides=stride,
        padding=padding,
        rhs_dilation=dilation,
        dimension_numbers=DIMENSION_NUMBERS,
        precision=precision,
    )[0]


def conv2d_filter_vjp(
    x: jax.Array,
    delta: jax.Array,
    *,
    kernel_size: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    padding: Pads = ((0, 0), (0, 0)),
    dilation: tuple[int, int] = (1, 1),
    precision: lax.Precision | None = None,
) -> jax.Array:
    r"""dE/df = conv(X, delta): the slides' filter gradient, exact for any stride/padding/dilation.

    Differentiating the forward formula by f[a, b, c, k]:

    .. math::
       \frac{\partial E}{\partial f[a,b,c,k]} = \sum_{i, j} X_{pad}[a d_h + i s_h,\; b d_w + j s_w,\; c]\,
       \delta[i, j, k]

    which is again a correlation of the padded input with the map delta in the filter's place, with
    the roles of stride and dilation swapped: delta is dilated by the forward stride, and the window
    moves by the forward dilation. The input's channels C ride along as the conv's batch axis and
    delta's K as its output features. Rows/columns of X_pad that no output position reads (when
    the stride does not tile the padded input exactly) produce extra trailing windows, cut off by
    keeping the first kh x kw.

    Args:
      x: (H, W, C) the forward input X.
      delta: (Ho, Wo, K) dE/dZ1.
      kernel_size: (kh, kw).

    Returns:
      (kh, kw, C, K) dE/df.
    """
    kh, kw = kernel_size
    # lhs x[None] (1, H, W, C) read as "CHWN": 1 input feature, C batch entries;
    # rhs delta (Ho, Wo, 1, K) read as "HWIO"; result "HWNC" = (kh', kw', C, K).
    dE_df = lax.conv_general_dilated(
        x[None],
        delta[:, :, None, :],
        window_strides=dilation,
        padding=padding,
        rhs_dilation=stride,
        dimension_numbers=("CHWN", "HWIO", "HWNC"),
        precision=precision,
    )
    return dE_df[:kh, :kw]


def conv2d_input_vjp(
    delta: jax.Array,
    f: jax.Array,
    *,
    in_hw: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    padding: Pads = ((0, 0), (0, 0)),
    dilation: tuple[int, int] = (1, 1),
    precision: lax.Precision | None = None,
) -> jax.Array:
    r"""dE/dX: a "full" correlation of delta with the flipped filters, transposed in C <-> K.

    .. math::
       \frac{\partial E}{\partial X_{pad}[p, q, c]} = \sum_{a, b, k}
       \delta_{\uparrow s}[p - a d_h, q - b d_w, k]\, f[a, b, c, k]

    where delta is dilated by the stride (zeros between entries). Reading the sum as a correlation
    of delta with f flipped in both spatial axes, padded by (dilated kernel - 1) on the low side
    minus the forward low padding, and on the high side by whatever returns X's size H exactly
    (negative pads crop what the forward padding added).

    Args:
      delta: (Ho, Wo, K) dE/dZ.
      f: (kh, kw, C, K) filters.
      in_hw: (H, W) of the forward input.

    Returns:
      (H, W, C) dE/dX.
    """
    pads = []
    for n, n_out, k, s, (lo, _), d in zip(in_hw, delta.shape[:2], f.shape[:2], stride, padding, dilation):
        effective_kernel = (k - 1) * d + 1
        pad_lo = effective_kernel - 1 - lo
        pads.append((pad_lo, n - 1 - (n_out - 1) * s + lo))
    f_flipped = jnp.swapaxes(f[::-1, ::-1], 2, 3)  # (kh, kw, K, C)
    return lax.conv_general_dilated(
        delta[None],
        f_flipped,
        window_strides=(1, 1),
        padding=pads,
        lhs_dilation=stride,
        rhs_dilation=dilation,
        dimension_numbers=DIMENSION_NUMBERS,
        precision=precision,
    )[0]


# ---------------------------------------------------------------------------------------------
# Sigmoid. Its derivative is written in terms of its output: sigma' = sigma (1 - sigma).
# ---------------------------------------------------------------------------------------------


def sigmoid(z: jax.Array) -> jax.Array:
    r"""H = sigmoid(Z) = 1 / (1 + e^{-Z}), elementwise (numerically stable form from jax.nn)."""
    return jax.nn.sigmoid(z)


def sigmoid_derivative(h: jax.Array) -> jax.Array:
    r"""dH/dZ = H (1 - H), from the output H = sigmoid(Z): the slides' O(1-O) and H1(1-H1)."""
    return h * (1 - h)


def sigmoid_vjp(h: jax.Array, dE_dh: jax.Array) -> jax.Array:
    r"""dE/dZ = dE/dH * H (1 - H)."""
    return dE_dh * sigmoid_derivative(h)


# ---------------------------------------------------------------------------------------------
# Flatten: C-order, so H1[i, j, k] becomes entry (i * Wo + j) * K + k.
# ---------------------------------------------------------------------------------------------


def flatten(h: jax.Array) -> jax.Array:
    """(Ho, Wo, K) -> (D,), C order."""
    return h.reshape(-1)


def flatten_vjp(dE_dflat: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """(D,) -> the unflattened shape: flattening is a permutation-free reshape, so is its VJP."""
    return dE_dflat.reshape(shape)


# ---------------------------------------------------------------------------------------------
# Dense: Z2 = W^T H1 + b.
# ---------------------------------------------------------------------------------------------


def dense(h: jax.Array, W: jax.Array, b: jax.Array, *, precision: lax.Precision | None = None) -> jax.Array:
    r"""Z2 = W^T H1 + b, with H1 (D,), W (D, n_out), b (n_out,)."""
    return jnp.dot(h, W, precision=precision) + b


def dense_vjp(
    h: jax.Array, W: jax.Array, delta: jax.Array, *, precision: lax.Precision | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""Cotangents of Z2 = W^T H1 + b, given delta = dE/dZ2.

    .. math::
       \frac{\partial E}{\partial W} = H_1 \delta^T, \qquad
       \frac{\partial E}{\partial b} = \delta, \qquad
       \frac{\partial E}{\partial H_1} = W \delta

    (the slides write dZ2/dW = H1 and dZ2/dH1 = W^T; with W stored (D, n_out) the transpose lands
    on the other side.)

    Returns:
      (dE/dW (D, n_out), dE/db (n_out,), dE/dH1 (D,)).
    """
    dE_dW = jnp.outer(h, delta)
    dE_db = delta
    dE_dh = jnp.dot(W, delta, precision=precision)
    return dE_dW, dE_db, dE_dh


# ---------------------------------------------------------------------------------------------
# The slides' loss, E = (O - Y)^2 / 2 summed over outputs.
# ---------------------------------------------------------------------------------------------


def half_squared_error(o: jax.Array, y: jax.Array) -> jax.Array:
    r"""E = \sum_j (O_j - Y_j)^2 / 2 for one example."""
    return 0.5 * jnp.sum((o - y) ** 2)


def half_squared_error_vjp(o: jax.Array, y: jax.Array) -> jax.Array:
    r"""dE/dO = O - Y."""
    return o - y
