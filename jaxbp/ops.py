r"""The slides' operations, each forward beside its hand-written backward (VJP).

Every function here is per example (no batch axis; `jax.vmap` adds one), except
`conv2d_filter_vjp_sum`, which sums the filter gradient over a batch. A backward takes the
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
    # the sum over a batch of one example (see conv2d_filter_vjp_sum for the layout)
    return conv2d_filter_vjp_sum(
        x[None],
        delta[None],
        kernel_size=kernel_size,
        stride=stride,
        padding=padding,
        dilation=dilation,
        precision=precision,
    )


def conv2d_filter_vjp_sum(
    x: jax.Array,
    delta: jax.Array,
    *,
    kernel_size: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    padding: Pads = ((0, 0), (0, 0)),
    dilation: tuple[int, int] = (1, 1),
    precision: lax.Precision | None = None,
) -> jax.Array:
    r"""\sum_n conv(X_n, delta_n): `conv2d_filter_vjp` summed over a batch, as one conv.

    The sum over examples joins the sum over output positions as the conv's contracted axis:
    lhs x (N, H, W, C) as (C, H, W, N) (N the input features, C the batch), rhs delta
    (N, Ho, Wo, K) as (Ho, Wo, N, K) (N the input features). One conv over the batch instead of
    N grouped ones (what `jax.vmap` of the per-example form becomes, slow on XLA's CPU).

    The transposes are explicit so that the conv itself is the canonical NHWC x HWIO one. With
    the same reading given as dimension numbers ("CHWN", "IHWO", "HWNC"), XLA's CPU lays the
    operands out for Eigen's conv only at the top level of a program: inside `lax.scan` (the
    chunks of `jaxbp.batched`, as they were then) it ran the conv as written, 2-5.6x slower
    (batch 256, 32x32x3, 5x5, four filters, 16 chunks: 24 ms against 4.3; batch 1024, one filter:
    16.7 against 8.8). With `jaxbp.compiler_options()` (Eigen convs) the form as written was still
    1.25-2.5x slower per step (one or two filters, batch 256-1024; standalone, not committed).

    Args:
      x: (N, H, W, C) inputs.
      delta: (N, Ho, Wo, K) dE/dZ per example.

    Returns:
      (kh, kw, C, K) the sum over n of each example's dE/df.
    """
    kh, kw = kernel_size
    dE_df = lax.conv_general_dilated(
        jnp.transpose(x, (3, 1, 2, 0)),  # (C, H, W, N)
        jnp.transpose(delta, (1, 2, 0, 3)),  # (Ho, Wo, N, K)
        window_strides=dilation,
        padding=padding,
        rhs_dilation=stride,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=precision,
    )  # (C, kh', kw', K)
    return jnp.transpose(dE_df, (1, 2, 0, 3))[:kh, :kw]


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


# =============================================================================================
# Beyond the slides: the extra ops of `jaxbp.layers` (bias, tanh, relu, pooling, two
# classification losses), each again beside its hand-written VJP.
# =============================================================================================


def channel_bias_vjp(delta: jax.Array) -> jax.Array:
    r"""dE/db of Z = conv(X, f) + b, with b (K,) broadcast over every position of Z (Ho, Wo, K).

    .. math:: \frac{\partial E}{\partial b_k} = \sum_{i, j} \delta[i, j, k]
    """
    return jnp.sum(delta, axis=tuple(range(delta.ndim - 1)))


def tanh(z: jax.Array) -> jax.Array:
    r"""H = tanh(Z), elementwise."""
    return jnp.tanh(z)


def tanh_vjp(h: jax.Array, dE_dh: jax.Array) -> jax.Array:
    r"""dE/dZ = dE/dH (1 - H^2), from the output H = tanh(Z)."""
    return dE_dh * (1 - h * h)


def relu(z: jax.Array) -> jax.Array:
    r"""H = max(Z, 0), elementwise (`jax.nn.relu`)."""
    return jax.nn.relu(z)


def relu_vjp(z: jax.Array, dE_dh: jax.Array) -> jax.Array:
    r"""dE/dZ = dE/dH [Z > 0].

    At Z = 0, where relu has no derivative, the subgradient 0 is taken, as `jax.nn.relu` does.
    """
    return jnp.where(z > 0, dE_dh, jnp.zeros_like(dE_dh))


# ---------------------------------------------------------------------------------------------
# Pooling over (wh, ww) windows moved by (sh, sw), per channel. The output Y[i, j] reads
# X_pad[i sh + a, j sw + b] for every window offset (a, b), so dE/dX_pad[i sh + a, j sw + b]
# receives that offset's share of delta[i, j]: all offsets equally for the average, only the
# window's maximum for the max.
# ---------------------------------------------------------------------------------------------


def window_slice(
    x_pad: jax.Array, offset: tuple[int, int], stride: tuple[int, int], out_hw: tuple[int, int]
) -> jax.Array:
    r"""S[i, j, c] = X_pad[i s_h + a, j s_w + b, c] for i < Ho, j < Wo: one offset of every window."""
    (a, b), (sh, sw), (ho, wo) = offset, stride, out_hw
    limit = (a + (ho - 1) * sh + 1, b + (wo - 1) * sw + 1, x_pad.shape[2])
    return lax.slice(x_pad, (a, b, 0), limit, (sh, sw, 1))


def window_slice_vjp(
    dE_ds: jax.Array, offset: tuple[int, int], stride: tuple[int, int], padded_hw: tuple[int, int]
) -> jax.Array:
    r"""Transpose of `window_slice`: dE/dS[i, j] placed at (i s_h + a, j s_w + b) of a zero X_pad.

    A strided slice's transpose is a pad: a low, s - 1 zeros between entries (interior), and
    whatever is left to reach the padded input's size high.
    """
    (a, b), (sh, sw), (hp, wp) = offset, stride, padded_hw
    ho, wo = dE_ds.shape[:2]
    config = ((a, hp - a - (ho - 1) * sh - 1, sh - 1), (b, wp - b - (wo - 1) * sw - 1, sw - 1), (0, 0, 0))
    return lax.pad(dE_ds, jnp.zeros((), dE_ds.dtype), config)


def _crop(x_pad: jax.Array, padding: Pads, in_hw: tuple[int, int]) -> jax.Array:
    """X_pad -> X: drop the (top, left) padding and keep (H, W)."""
    (top, _), (left, _) = padding
    return x_pad[top : top + in_hw[0], left : left + in_hw[1]]


def avg_pool(x: jax.Array, *, window: tuple[int, int], stride: tuple[int, int], padding: Pads) -> jax.Array:
    r"""Average pooling, per channel; padded entries count as zeros in the mean.

    .. math:: Y[i, j, c] = \frac{1}{w_h w_w} \sum_{a < w_h,\, b < w_w} X_{pad}[i s_h + a,\; j s_w + b,\; c]

    Args:
      x: (H, W, C) input.
      window, stride: (wh, ww), (sh, sw).
      padding: explicit ((top, bottom), (left, right)), zeros.

    Returns:
      (Ho, Wo, C).
    """
    window_sum = lax.reduce_window(x, 0.0, lax.add, (*window, 1), (*stride, 1), (*padding, (0, 0)))
    return window_sum / (window[0] * window[1])


def avg_pool_vjp(
    delta: jax.Array,
    *,
    in_hw: tuple[int, int],
    window: tuple[int, int],
    stride: tuple[int, int],
    padding: Pads,
) -> jax.Array:
    r"""dE/dX of average pooling: each entry gets delta / (wh ww) from every window containing it.

    .. math::
       \frac{\partial E}{\partial X_{pad}[p, q, c]} = \frac{1}{w_h w_w}
       \sum_{a < w_h,\, b < w_w} \delta_{\uparrow s}[p - a,\; q - b,\; c]

    with delta dilated by the stride (s - 1 zeros between entries, zero outside): a window sum
    of the dilated delta, padded by w - 1 on the low side so that the window ending at p starts
    at p - (w - 1). As in `conv2d_input_vjp`, the forward padding is cropped by the pad itself
    (low w - 1 - lo, high whatever returns H), and the sum is ``lax.reduce_window``, one pass
    instead of wh * ww shifted copies (JAX's own transpose of a window sum is the same).

    Args:
      delta: (Ho, Wo, C) dE/dY.
      in_hw: (H, W) of the forward input.

    Returns:
      (H, W, C) dE/dX.
    """
    config = []
    for n, n_out, w, s, (lo, _) in zip(in_hw, delta.shape[:2], window, stride, padding):
        pad_lo = w - 1 - lo
        config.append((pad_lo, n - pad_lo - 1 - (n_out - 1) * s + w - 1, s - 1))
    share = delta / (window[0] * window[1])
    share_up = lax.pad(share, jnp.zeros((), share.dtype), (*config, (0, 0, 0)))
    return lax.reduce_window(share_up, 0.0, lax.add, (*window, 1), (1, 1, 1), "VALID")


def max_pool(x: jax.Array, *, window: tuple[int, int], stride: tuple[int, int], padding: Pads) -> jax.Array:
    r"""Max pooling, per channel; padded entries are -inf (never chosen).

    .. math:: Y[i, j, c] = \max_{a < w_h,\, b < w_w} X_{pad}[i s_h + a,\; j s_w + b,\; c]

    Shapes as `avg_pool`.
    """
    return lax.reduce_window(x, -jnp.inf, lax.max, (*window, 1), (*stride, 1), (*padding, (0, 0)))


def max_pool_vjp(
    x: jax.Array,
    y: jax.Array,
    delta: jax.Array,
    *,
    window: tuple[int, int],
    stride: tuple[int, int],
    padding: Pads,
) -> jax.Array:
    r"""dE/dX of max pooling: all of delta[i, j] goes to the maximum of window (i, j).

    .. math::
       \frac{\partial E}{\partial X_{pad}[i s_h + a,\, j s_w + b,\, c]} \mathrel{+}=
       \delta[i, j, c]\; [(a, b) = \operatorname{first\,argmax}_{(a', b')} X_{pad}[i s_h + a', j s_w + b', c]]

    Ties: when several entries of a window equal its maximum, the first in row-major window order
    (smallest a, then smallest b) takes the whole of delta, the others nothing. This is what JAX's
    own VJP of ``lax.reduce_window`` max does (``select_and_scatter_add`` with ``select_prim=ge``
    keeps the earlier entry on equality). The offsets are visited in that order, and `taken`
    marks windows whose maximum has already been found.

    Args:
      x: (H, W, C) the forward input.
      y: (Ho, Wo, C) the forward output, the window maxima.
      delta: (Ho, Wo, C) dE/dY.

    Returns:
      (H, W, C) dE/dX.
    """
    x_pad = jnp.pad(x, (*padding, (0, 0)), constant_values=-jnp.inf)
    out_hw = y.shape[:2]
    taken = jnp.zeros(y.shape, bool)
    dE_dx_pad = jnp.zeros_like(x_pad)
    for a in range(window[0]):
        for b in range(window[1]):
            is_first_max = (window_slice(x_pad, (a, b), stride, out_hw) == y) & ~taken
            taken = taken | is_first_max
            share = jnp.where(is_first_max, delta, jnp.zeros_like(delta))
            dE_dx_pad = dE_dx_pad + window_slice_vjp(share, (a, b), stride, x_pad.shape[:2])
    return _crop(dE_dx_pad, padding, x.shape[:2])


# ---------------------------------------------------------------------------------------------
# Classification losses on logits Z, numerically stable (no exp of a large positive number).
# ---------------------------------------------------------------------------------------------


def sigmoid_binary_cross_entropy(z: jax.Array, y: jax.Array) -> jax.Array:
    r"""E = -\sum_j [Y_j \log \sigma(Z_j) + (1 - Y_j) \log(1 - \sigma(Z_j))] from logits Z.

    Using :math:`-\log \sigma(z) = \log(1 + e^{-z})` and :math:`-\log(1 - \sigma(z)) = \log(1 + e^{z})`:

    .. math:: E = \sum_j \log(1 + e^{Z_j}) - Y_j Z_j

    with :math:`\log(1 + e^z)` = ``logaddexp(0, z)``, finite for any z.
    """
    return jnp.sum(jnp.logaddexp(0, z) - y * z)


def sigmoid_binary_cross_entropy_vjp(z: jax.Array, y: jax.Array) -> jax.Array:
    r"""dE/dZ = sigma(Z) - Y (the derivative of log(1 + e^z) is sigma(z))."""
    return jax.nn.sigmoid(z) - y


def log_softmax(z: jax.Array) -> jax.Array:
    r"""log softmax(Z)_j = Z_j - logsumexp(Z), the log-sum-exp taken after subtracting max(Z)."""
    return z - jax.nn.logsumexp(z)


def softmax_cross_entropy(z: jax.Array, y: jax.Array) -> jax.Array:
    r"""E = -\sum_j Y_j \log \operatorname{softmax}(Z)_j from logits Z (n,), targets Y (n,).

    .. math:: E = \Big(\sum_j Y_j\Big) \operatorname{logsumexp}(Z) - \sum_j Y_j Z_j
    """
    return -jnp.sum(y * log_softmax(z))


def softmax_cross_entropy_vjp(z: jax.Array, y: jax.Array) -> jax.Array:
    r"""dE/dZ = (sum_j Y_j) softmax(Z) - Y; for one-hot or probability targets, softmax(Z) - Y.

    .. math:: \frac{\partial E}{\partial Z_k} = \Big(\sum_j Y_j\Big) \frac{e^{Z_k}}{\sum_m e^{Z_m}} - Y_k
    """
    return jnp.sum(y) * jnp.exp(log_softmax(z)) - y
