r"""The slides' two convolutions, Z1 = conv(X, f) and dE/df = conv(X, delta1), in four forms.

Each form computes the same sums as the slides' conv (`jaxbp.ops`), for a batch (N, H, W, C),
with dE/df summed over the examples (per example in `filter_grad_rows`, or under `jax.vmap`):

.. math::
   Z_1[n, i, j, k] &= \sum_{a, b, c} X_{pad}[n,\, i s_h + a d_h,\, j s_w + b d_w,\, c]\, f[a, b, c, k] \\
   \frac{dE}{df}[a, b, c, k] &= \sum_{n, i, j} X_{pad}[n,\, a d_h + i s_h,\, b d_w + j s_w,\, c]\,
                                 \delta_1[n, i, j, k]

What changes from form to form is the shape of the work XLA sees, and on a CPU that is where the
time goes (which form runs where, and the measurements: `jaxbp.formulations`):

* **Patches (im2col), built once, used twice.** ``P`` (M x kh kw C, M = N Ho Wo) holds every
  receptive field; then Z1 = P @ f and dE/df = P^T @ delta1 are two plain matmuls, the only form
  in which XLA's CPU reaches matmul speed for more than a few filters.
* **Toeplitz row slabs: the patches' matmul with a smaller write.** Neighbouring output columns
  share most of their receptive fields, so instead of P each row of ``R`` holds the kh input
  rows under an output row across the columns that a block of jb = 4 output columns reads, and
  f becomes a banded (doubly blocked) Toeplitz matrix T with the same zeros in every block:
  Z1 = R @ T and dE/df = the band of delta1^T R, two plain matmuls. For 5x5 filters R holds 10
  numbers per output position and input channel against the patches' 25, for span / kw = 1.6x
  the multiplies.
* **Taps (shift-and-add), for one filter on few channels.** ``Z1 = sum_ab tap_ab(X) f[a, b]``
  with tap_ab a strided slice of the padded input: XLA fuses the slices, multiply-adds and the
  sigmoid into one loop, so neither P nor Z1 is written. dE/df is then XLA's conv with the
  batch as its contracted axis (Eigen's, with `jaxbp.compiler_options()`; in parts, `filter_grad_conv`),
  except for a single example on 2 or more channels, where it is the Toeplitz form's.
  With one filter P @ f is a matrix-vector product that only pays for writing P. From 3 input
  channels on the channels are contracted first, U = X_pad f (kh kw K numbers per pixel, one
  small matmul), and the fused loop adds kh*kw shifted slices of U instead of kh*kw*C products.
* **XLA's conv.** One convolution, with the batch as the contracted axis of dE/df, or a few
  over parts of the batch (`filter_grad_conv`).

Nothing here calls an autodiff transform.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxbp import ops
from jaxbp.spec import DIMENSION_NUMBERS
from jaxbp.spec import ConvNetSpec

ConvForm = Literal["taps", "patches", "toeplitz", "conv"]
FORMS = ("taps", "patches", "toeplitz", "conv")

# The measurements behind the first two are with the rules, in `jaxbp.formulations`; behind the
# third, in `filter_grad_rows`.
TAPS_CONTRACT_CHANNELS_FROM = 3
TOEPLITZ_BLOCK = 4
PER_EXAMPLE_UNROLLED_MAX_TERMS = 1024


def pad_input(x: jax.Array, spec: ConvNetSpec) -> jax.Array:
    """X_pad: the (N, H, W, C) batch with the spec's zero padding on H and W."""
    (top, bottom), (left, right) = spec.pads
    return jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))


def conv_taps(x: jax.Array, spec: ConvNetSpec) -> list[jax.Array]:
    r"""The kh*kw strided slices of the padded input that the filter taps multiply.

    .. math:: \mathrm{tap}_{ab}(X)[n, i, j, c] = X_{pad}[n,\, a d_h + i s_h,\, b d_w + j s_w,\, c]

    so that ``conv(X, f) = sum_ab tap_ab(X) @ f[a, b]``. Each tap is a slice; under jit XLA fuses
    it into its consumer instead of copying it.

    Args:
      x: (N, H, W, C) batch.
      spec: the network (padding, stride, dilation, kernel size).

    Returns:
      kh*kw arrays of shape (N, Ho, Wo, C), in row-major (a, b) order.
    """
    x_pad = pad_input(x, spec)
    (kh, kw), (sh, sw), (dh, dw) = spec.kernel_size, spec.stride, spec.dilation
    ho, wo, _ = spec.h1_shape
    n, _, _, c = x_pad.shape
    return [
        lax.slice(
            x_pad,
            (0, a * dh, b * dw, 0),
            (n, a * dh + (ho - 1) * sh + 1, b * dw + (wo - 1) * sw + 1, c),
            (1, sh, sw, 1),
        )
        for a in range(kh)
        for b in range(kw)
    ]


def conv_patches(x: jax.Array, spec: ConvNetSpec) -> jax.Array:
    r"""The im2col matrix: row m = (n, i, j) holds the receptive field of output (i, j) of example n.

    .. math:: P[(n, i, j), (a, b, c)] = X_{pad}[n,\, a d_h + i s_h,\, b d_w + j s_w,\, c]

    The column order (a, b, c) is the row-major order of the HWIO filter's first three axes, so
    ``conv(X, f) = P @ f.reshape(kh kw C, K)``. Built in two steps, the kw column shifts and then
    the kh row shifts of those, so kh + kw slices instead of the kh*kw taps: XLA compiled that
    in 0.15 s against 0.4-0.6 s for one concatenation of the kh*kw taps, and it ran 1.5-2x faster
    (batch 32, 5x5, 28x28x1 with 8 filters and 32x32x3 with 32).

    Returns:
      (N Ho Wo, kh kw C) patches.
    """
    x_pad = pad_input(x, spec)
    (kh, kw), (sh, sw), (dh, dw) = spec.kernel_size, spec.stride, spec.dilation
    ho, wo, _ = spec.h1_shape
    c = x.shape[-1]
    # cols[n, r, j, (b, c)] = X_pad[n, r, b dw + j sw, c]
    cols = [lax.slice_in_dim(x_pad, b * dw, b * dw + (wo - 1) * sw + 1, sw, axis=2) for b in range(kw)]
    cols = jnp.concatenate(cols, axis=-1)
    # P[n, i, j, (a, b, c)] = cols[n, a dh + i sh, j, (b, c)]
    rows = [lax.slice_in_dim(cols, a * dh, a * dh + (ho - 1) * sh + 1, sh, axis=1) for a in range(kh)]
    return jnp.concatenate(rows, axis=-1).reshape(-1, kh * kw * c)


def conv_forward_taps(
    x: jax.Array, f: jax.Array, spec: ConvNetSpec, contract_channels: bool | None = None
) -> jax.Array:
    r"""Z1 = conv(X, f) as a shift-and-add over taps: with ``contract_channels`` (None: from
    `TAPS_CONTRACT_CHANNELS_FROM` input channels on) over the taps of the channels' products
    (`conv_forward_tap_products`), else over taps and input channels, here:

    .. math:: Z_1[n, i, j, k] = \sum_{a, b, c} \mathrm{tap}_{ab}(X)[n, i, j, c]\, f[a, b, c, k]

    Each term is a broadcast multiply of an (N, Ho, Wo, 1) slice by a (K,) row of f, so the whole
    sum is one elementwise loop (kh*kw*C multiply-adds per output) that XLA fuses with its consumer.

    Returns:
      (N, Ho, Wo, K) Z1.
    """
    kh, kw, c_in, _ = f.shape
    if contract_channels is None:
        contract_channels = contracts_channels_first(c_in)
    if contract_channels:
        return conv_forward_tap_products(x, f, spec)
    taps = conv_taps(x, spec)
    z = None
    for t, tap in enumerate(taps):
        a, b = divmod(t, kw)
        for c in range(c_in):
            term = tap[..., c : c + 1] * f[a, b, c][None, None, None, :]
            z = term if z is None else z + term
    return z


def contracts_channels_first(channels: int) -> bool:
    """Whether the taps forward contracts the input channels first by default (``contract_channels``
    None): from `TAPS_CONTRACT_CHANNELS_FROM` channels on."""
    return channels >= TAPS_CONTRACT_CHANNELS_FROM


def conv_forward_tap_products(x: jax.Array, f: jax.Array, spec: ConvNetSpec) -> jax.Array:
    r"""Z1 = conv(X, f) as a shift-and-add over the taps of U, each pixel's products with every tap.

    .. math::
       U[n, h, w, (a, b, k)] &= \sum_c X_{pad}[n, h, w, c]\, f[a, b, c, k] \\
       Z_1[n, i, j, k] &= \sum_{a, b} U[n,\, a d_h + i s_h,\, b d_w + j s_w,\, (a, b, k)]

    The sum over c is taken first; otherwise as in `conv_forward_taps`. U is one
    (N H W, C) x (C, kh kw K) matmul of x (the padding's zeros give zeros in U), which writes
    kh kw K numbers per input pixel; the loop that XLA fuses with the sigmoid then adds the
    kh*kw taps of U (`conv_taps`) instead of kh*kw*C products. From 3 channels
    on that ran up to 1.7x faster than the per-channel loop and compiled faster; with 2 it ran
    at 0.78-1.08x the loop's speed (`TAPS_CONTRACT_CHANNELS_FROM`).

    Returns:
      (N, Ho, Wo, K) Z1.
    """
    kh, kw, c_in, k = f.shape
    taps_by_channel = f.transpose(2, 0, 1, 3).reshape(c_in, kh * kw * k)  # row c: f[:, :, c, :]
    # U of the unpadded x: U is linear in x, so `conv_taps` zero-padding U gives U of X_pad.
    u = jnp.dot(x, taps_by_channel, precision=spec.precision)  # (N, H, W, (a, b, k))
    # Tap t = (a, b) of U, restricted to its own K columns (a, b, :).
    terms = [tap[..., t * k : (t + 1) * k] for t, tap in enumerate(conv_taps(u, spec))]
    return functools.reduce(jnp.add, terms)


def conv_forward_patches(patches: jax.Array, f: jax.Array, spec: ConvNetSpec) -> jax.Array:
    """Z1 = conv(X, f) = P @ f as one (N Ho Wo, kh kw C) x (kh kw C, K) matmul.

    Returns:
      (N, Ho, Wo, K) Z1.
    """
    kh, kw, c, k = f.shape
    z = jnp.dot(patches, f.reshape(kh * kw * c, k), precision=spec.precision)
    return z.reshape(-1, *spec.h1_shape)


def conv_forward_conv(x: jax.Array, f: jax.Array, spec: ConvNetSpec) -> jax.Array:
    """Z1 = conv(X, f) as one XLA convolution over the batch (NHWC, HWIO)."""
    return lax.conv_general_dilated(
        x,
        f,
        window_strides=spec.stride,
        padding=spec.pads,
        rhs_dilation=spec.dilation,
        dimension_numbers=DIMENSION_NUMBERS,
        precision=spec.precision,
    )


def conv_forward(
    x: jax.Array,
    f: jax.Array,
    spec: ConvNetSpec,
    form: ConvForm,
    *,
    patches: jax.Array | None = None,
    rows: jax.Array | None = None,
    contract_channels: bool | None = None,
) -> jax.Array:
    """Z1 = conv(X, f) in the named form, with the patches or row slabs given (built from x if
    not), so that dE/df can reuse them; ``contract_channels`` is `conv_forward_taps`'.

    Returns:
      (N, Ho, Wo, K) Z1.
    """
    if form == "patches":
        return conv_forward_patches(conv_patches(x, spec) if patches is None else patches, f, spec)
    if form == "toeplitz":
        return conv_forward_toeplitz(toeplitz_rows(x, spec) if rows is None else rows, f, spec)
    if form == "taps":
        return conv_forward_taps(x, f, spec, contract_channels)
    return conv_forward_conv(x, f, spec)


def filter_grad_taps(x: jax.Array, delta1: jax.Array, spec: ConvNetSpec) -> jax.Array:
    r"""dE/df as kh*kw dots, each tap contracted with delta1 over M = N Ho Wo.

    .. math::
       \frac{dE}{df}[a, b, c, k] = \sum_{m} \mathrm{tap}_{ab}(X)[m, c]\, \delta_1[m, k]

    Args:
      x: (N, H, W, C) batch.
      delta1: (N, Ho, Wo, K) dE/dZ1 (already carrying the batch mean's 1/N).

    Returns:
      (kh, kw, C, K) dE/df.
    """
    kh, kw = spec.kernel_size
    c, k = x.shape[-1], delta1.shape[-1]
    d1 = delta1.reshape(-1, k)
    rows = [jnp.dot(tap.reshape(-1, c).T, d1, precision=spec.precision) for tap in conv_taps(x, spec)]
    return jnp.stack(rows).reshape(kh, kw, c, k)


def fewer_rows_first(a: jax.Array, b: jax.Array, precision=None) -> jax.Array:
    r"""a^T b for (M, p) a and (M, q) b, the M rows contracted, computed as (b^T a)^T where b has
    at most half as many columns (2 q <= p), the transpose behind `lax.optimization_barrier` (XLA
    otherwise folds it back into the dot, as the other product).

    Vmapped over examples this is a batched dot of many small products, and XLA's CPU ran the
    one with fewer output rows faster where the two sides differ by 2x or more
    (experiments/results/bench_dot_rows.md, ``fewer rows / more rows``, the order alone: 64-128
    examples, the per-example dE/df's shapes): 8 rows against the patches' 25-75 columns in
    0.48-0.67x the time in two runs, 9 against 32 in 0.57-0.61x. Nearer a tie it is noise or a
    loss (8 rows against 9 took 0.99-1.14x in the runs so far, 27 against 32 0.94-1.21x;
    and with 8 rows first the per-example gradients at batch 32-1024 of
    28x28x1 with 3x3 and 8 filters, whose patches have 9 columns, took 1.02-1.07x as long
    against the batch gradient as with 9, experiments/results/bench_amd_epyc_floor.md against
    bench_amd_epyc_reuse.md), so there a stays first. Differences under about 15% are within
    the noise of these runs. The transpose back is p q numbers per example, and a batch-1 step
    (not vmapped) takes the same order.
    """
    if 2 * b.shape[1] <= a.shape[1]:
        return lax.optimization_barrier(jnp.dot(b.T, a, precision=precision)).T
    return jnp.dot(a.T, b, precision=precision)


def filter_grad_patches(
    patches: jax.Array, delta1: jax.Array, spec: ConvNetSpec, transposed: bool = False
) -> jax.Array:
    """dE/df = P^T delta1, one (kh kw C, M) x (M, K) matmul, or its transpose delta1^T P.

    The transposed (K, kh kw C) product, filters first, ran 1.2-1.4x faster (chunks of 32 x 784
    positions, 75 columns, 32 filters: 0.88-0.94 ms against 1.07-1.32), so sums over chunks are
    kept that way and transposed back once per step (`jaxbp.batched.chunk_sums`). Untransposed
    (one example: what vmap sees for per-example gradients) it is `fewer_rows_first`'s product.

    Returns:
      (kh, kw, C, K) dE/df, or with ``transposed`` (K, kh kw C), columns in the (a, b, c) order
      of `conv_patches`.
    """
    kh, kw = spec.kernel_size
    d1 = delta1.reshape(-1, delta1.shape[-1])
    if transposed:
        return jnp.dot(d1.T, patches, precision=spec.precision)
    return fewer_rows_first(patches, d1, spec.precision).reshape(kh, kw, -1, d1.shape[-1])


def toeplitz_blocks(spec: ConvNetSpec) -> tuple[int, int, int]:
    """(jb, nb, span): output columns per block, blocks per row (the last one padded where jb
    does not divide Wo), and the input columns one block reads, (jb - 1) s_w + (kw - 1) d_w + 1."""
    _, wo, _ = spec.h1_shape
    jb = min(TOEPLITZ_BLOCK, wo)
    (_, kw), (_, sw), (_, dw) = spec.kernel_size, spec.stride, spec.dilation
    return jb, -(-wo // jb), (jb - 1) * sw + (kw - 1) * dw + 1


def toeplitz_band(f: jax.Array, spec: ConvNetSpec) -> jax.Array:
    r"""T, the banded (doubly blocked) Toeplitz matrix of the filters, (kh span C, jb K).

    .. math::
       T[(a, w, c), (j, k)] = f[a, b, c, k] \text{ where } w = j s_w + b d_w,\ \text{else } 0

    Column block j is f with its kw columns spread d_w apart and shifted down the span by j s_w:
    jb zero-padded copies of f, which XLA fuses into one loop. Written as a contraction of f with
    a 0/1 selection constant, S[b, w, j] = [w = j s_w + b d_w], T was a dot whose operands XLA
    laid out with copies, and so was the fold below (`fold_band`): one generated kernel more
    each. On the Zen 4 AMD EPYC of experiments/PERFORMANCE.md, at the 14 grid points with the
    Toeplitz form, the step now has 1-2 fewer kernels and compiled in 0.88-1.03x and 0.89-1.09x
    the time in two runs (medians 0.96x and 0.97x); it ran in 0.93-1.13x and 0.97-1.21x (medians
    0.99x, within the noise), its update the same to the bit, and the per-example gradients in
    0.84-1.02x and 0.94-0.99x (medians 0.96x and 0.97x)
    (`python experiments/bench_toeplitz_band.py --per-example`,
    experiments/results/bench_toeplitz_band.md). XLA's CPU compile time grows with the kernels it
    generates, each a few ms to tens of ms (experiments/PERFORMANCE.md).
    """
    kh, _, c, k = f.shape
    jb, _, span = toeplitz_blocks(spec)
    (_, sw), (_, dw) = spec.stride, spec.dilation
    # f's kw columns d_w apart ((kw - 1) d_w + 1 wide), j s_w zeros above and (jb - 1 - j) s_w
    # below: span = (jb - 1) s_w + (kw - 1) d_w + 1 rows of the band's column block j
    zero = jnp.zeros((), f.dtype)
    shifted = [
        lax.pad(f, zero, ((0, 0, 0), (j * sw, (jb - 1 - j) * sw, dw - 1), (0, 0, 0), (0, 0, 0)))
        for j in range(jb)
    ]
    return jnp.stack(shifted, axis=3).reshape(kh * span * c, jb * k)


def fold_band(G: jax.Array, spec: ConvNetSpec, j_axis: int, w_axis: int) -> jax.Array:
    r"""dE/df from dE/dT: each filter entry sums the jb band entries it was copied to.

    Since T[(a, w, c), (j, k)] = f[a, b, c, k] at w = j s_w + b d_w (`toeplitz_band`),

    .. math:: \frac{dE}{df}[a, b, c, k] = \sum_j \frac{dE}{dT}[(a, j s_w + b d_w, c), (j, k)]

    jb strided slices of G added, one fused loop. `G` holds dE/dT with the block's output column
    j on `j_axis` and the span's input column w on `w_axis`; the result drops `j_axis` and has
    the filter column b (kw of them) where w was.
    """
    jb, _, _ = toeplitz_blocks(spec)
    (_, kw), (_, sw), (_, dw) = spec.kernel_size, spec.stride, spec.dilation
    w_axis -= int(w_axis > j_axis)  # once the j axis is indexed away
    terms = [
        lax.slice_in_dim(
            lax.index_in_dim(G, j, j_axis, keepdims=False), j * sw, j * sw + (kw - 1) * dw + 1, dw, w_axis
        )
        for j in range(jb)
    ]
    return functools.reduce(jnp.add, terms)


def toeplitz_column_groups(x: jax.Array, spec: ConvNetSpec) -> jax.Array:
    r"""X_pad with its columns grouped g = jb s_w at a time, the step between blocks:
    ``Xg[n, r, q, (v, c)] = X_pad[n, r, q g + v, c]``.

    Returns:
      (N, Hp, nb + nt - 1, g C), nt = ceil(span / g) the groups one block's span covers. X_pad
      is widened with zeros on the right to whole groups; only a padded last block (Wo not a
      multiple of jb) reads them.
    """
    x_pad = pad_input(x, spec)
    jb, nb, span = toeplitz_blocks(spec)
    n, hp, _, c = x_pad.shape
    g = jb * spec.stride[1]
    width = (nb + -(-span // g) - 1) * g  # every column a block reads lies below (nb - 1) g + span
    if width > x_pad.shape[2]:
        x_pad = jnp.pad(x_pad, ((0, 0), (0, 0), (0, width - x_pad.shape[2]), (0, 0)))
    return x_pad[:, :, :width].reshape(n, hp, width // g, g * c)


def toeplitz_rows(x: jax.Array, spec: ConvNetSpec) -> jax.Array:
    r"""R, the row slabs: row (n, i, s) holds the kh input rows under output row i, across the
    span of input columns that block s of jb output columns reads.

    .. math:: R[(n, i, s), (a, w, c)] = X_{pad}[n,\, a d_h + i s_h,\, s\, j_b s_w + w,\, c]

    R holds kh span C / jb numbers per output position (10 per input channel for 5x5 with
    jb = 4, stride 1) where the patches hold kh kw C (25 per channel): the receptive fields of
    neighbouring output columns overlap, and one slab serves jb of them.

    Returns:
      (N Ho nb, kh span C) slabs, nb = ceil(Wo / jb) blocks per row. X_pad is widened with
      zeros on the right to whole groups of jb s_w columns; only a padded last block (Wo not a
      multiple of jb) reads them, and its extra outputs are dropped.
    """
    (kh, _), (sh, _), (dh, _) = spec.kernel_size, spec.stride, spec.dilation
    ho, _, _ = spec.h1_shape
    _, nb, span = toeplitz_blocks(spec)
    # Built in two steps, as `conv_patches` is: block s starts at input column s g (g = jb s_w),
    # so its span columns are the column groups s .. s + nt - 1 of `toeplitz_column_groups` laid
    # side by side, cut to span: nt slices of contiguous runs of g C numbers, then kh row slices
    # of those. That copied R 2x faster than stacking the kh row slabs and then the nb blocks (a
    # standalone timing, not committed: 1.36 against 2.77 ms at 128 examples of 32x32x3, 5x5;
    # 0.39 against 0.90 for 28x28x1).
    xg = toeplitz_column_groups(x, spec)
    n, c = x.shape[0], x.shape[-1]
    nt = xg.shape[2] - nb + 1  # the groups one block's span covers
    # cols[n, r, s, (w, c)] = X_pad[n, r, s g + w, c] for w < span
    cols = jnp.concatenate([xg[:, :, t : t + nb] for t in range(nt)], axis=-1)[..., : span * c]
    # R[n, i, s, (a, w, c)] = cols[n, a dh + i sh, s, (w, c)]
    rows = [lax.slice_in_dim(cols, a * dh, a * dh + (ho - 1) * sh + 1, sh, axis=1) for a in range(kh)]
    return jnp.concatenate(rows, axis=-1).reshape(n * ho * nb, kh * span * c)


def conv_forward_toeplitz(rows: jax.Array, f: jax.Array, spec: ConvNetSpec) -> jax.Array:
    r"""Z1 = conv(X, f) = R @ T(f), T the banded (doubly blocked) Toeplitz matrix of the filters.

    .. math:: T[(a, w, c), (j, k)] = f[a, (w - j s_w) / d_w, c, k] \text{ on the band, else } 0

    (`toeplitz_band`), so (R T)[(n, i, s), (j, k)] =
    sum_{a,b,c} X_pad[n, a d_h + i s_h, (s j_b + j) s_w + b d_w, c] f[a, b, c, k] =
    Z1[n, i, s j_b + j, k]: the forward formula, plus exact zeros off the band.
    One matmul of (N Ho nb, kh span C) x (kh span C, jb K) with jb K columns; the patches' is
    (N Ho Wo, kh kw C) x (kh kw C, K). It does span / kw times the multiplies (1.6x for 5x5,
    jb = 4) and writes 10 instead of 25 numbers per output position and input channel for 5x5:
    on this CPU building P took longer than its matmul (a standalone timing at the headline's
    chunk of 128 examples, not committed: 2.7 ms to build P, 1.3 for P @ f).

    Returns:
      (N, Ho, Wo, K) Z1.
    """
    k = f.shape[-1]
    jb, nb, _ = toeplitz_blocks(spec)
    z = jnp.dot(rows, toeplitz_band(f, spec), precision=spec.precision)
    ho, wo, _ = spec.h1_shape
    return z.reshape(-1, ho, nb * jb, k)[:, :, :wo]


def filter_grad_toeplitz(
    rows: jax.Array, delta1: jax.Array, spec: ConvNetSpec, transposed: bool = False
) -> jax.Array:
    r"""dE/df from R: G = delta1^T R, the gradient of the band T, folded back onto f.

    Since Z1 = R T and T is linear in f, dE/dT = R^T delta1 and dE/df[a, b, c, k] =
    sum_j dE/dT[(a, j s_w + b d_w, c), (j, k)] (`fold_band`): the sum over a block's jb output
    columns of the slabs' column j s_w + b d_w times delta1. G is computed filters first,
    (jb K, kh span C), as `filter_grad_patches` does. Untransposed (one example: what vmap sees
    for per-example gradients), where the slabs have fewer columns than jb K, G^T = R^T delta1 is
    computed instead, the product with fewer output rows, and folded with the indices read the
    other way. Vmapped, that order alone ran in 0.25-0.93x the time of the other with 18-120 slab
    columns against jb K = 128 (32 filters; two runs), 0.59-0.68x with 18 against 32
    (experiments/results/bench_dot_rows.md); with 8 filters and 40-120 slab columns delta1 stays
    first (its order: 0.82-1.05x the other's).
    delta1 is padded with zeros to nb jb columns, so the output columns of a padded last block
    (s jb + j >= Wo) contribute nothing.

    Returns:
      (kh, kw, C, K) dE/df, or with ``transposed`` (K, kh kw C).
    """
    kh, _ = spec.kernel_size
    ho, wo, k = spec.h1_shape
    jb, nb, span = toeplitz_blocks(spec)
    d1 = jnp.pad(delta1, ((0, 0), (0, 0), (0, nb * jb - wo), (0, 0))).reshape(-1, jb * k)
    if transposed or jb * k <= rows.shape[1]:
        G = jnp.dot(d1.T, rows, precision=spec.precision).reshape(jb, k, kh, span, -1)
        df = fold_band(G, spec, j_axis=0, w_axis=3)  # (K, kh, kw, C)
        return df.reshape(k, -1) if transposed else jnp.transpose(df, (1, 2, 3, 0))
    # one example, fewer slab columns than jb K: G^T, fewer output rows
    G = jnp.dot(rows.T, d1, precision=spec.precision).reshape(kh, span, -1, jb, k)
    return fold_band(G, spec, j_axis=3, w_axis=1)  # (kh, kw, C, K)


def filter_grad_conv(x: jax.Array, delta1: jax.Array, spec: ConvNetSpec, parts: int = 1) -> jax.Array:
    r"""dE/df as convolutions in which the batch is the contracted feature axis
    (`ops.conv2d_filter_vjp_sum`: x as (C, H, W, N), delta1 as (Ho, Wo, N, K), N contracted).

    dE/df is a sum over the examples, so it is also the sum of the same conv over ``parts``
    consecutive slices of them (as equal as the count allows, at most one part per example):
    independent convs, which XLA's CPU runtime runs at once, each on a core of its own
    (`jaxbp.formulations.CONV_FILTER_GRAD_PARTS`).

    Returns:
      (kh, kw, C, K) dE/df.
    """
    bounds = np.linspace(0, x.shape[0], min(parts, x.shape[0]) + 1).round().astype(int)
    sums = [
        ops.conv2d_filter_vjp_sum(x[a:b], delta1[a:b], kernel_size=spec.kernel_size, **spec.conv_kwargs)
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    return functools.reduce(jnp.add, sums)


def rows_terms(spec: ConvNetSpec) -> int:
    """kh kw Ho: the products `filter_grad_rows` writes out, Ho for each tap."""
    kh, kw = spec.kernel_size
    return kh * kw * spec.h1_shape[0]


def filter_grad_rows(
    x: jax.Array, delta1: jax.Array, spec: ConvNetSpec, max_terms: int | None = None
) -> jax.Array:
    r"""Per-example dE/df, each example its own sum: for each tap a sum over the output rows i,
    written out term by term, then a sum over the output columns j.

    .. math::
       \frac{dE}{df}[n, a, b, c, k] = \sum_j \Big( \sum_{i < H_o}
       \mathrm{tap}_{ab}(X)[n, i, j, c]\, \delta_1[n, i, j, k] \Big)

    The slides' conv(delta1, X) of one example, for every example at once. Each inner sum is Ho
    broadcast products of (N, Wo, K, C) row slices, which XLA fuses into one elementwise loop
    over the examples, as it does the taps forward's sum over taps; what is left to reduce is Wo
    numbers per output. (K, C) and not (C, K): C is the minor axis, K = 1 where this runs.
    The same contraction as one reduction over (i, j) per tap made the per-example gradients
    1.01-1.80x slower at all 16 points of experiments/results/bench_per_example.md (``reduce``;
    XLA's CPU reductions). Past ``max_terms`` written-out products (`rows_terms`, kh kw Ho: 700
    at 32x32 with 5x5; None for `PER_EXAMPLE_UNROLLED_MAX_TERMS`) it is that reduction, whose
    compile time does not grow with Ho: the written-out sums took about 2 ms of compile time a
    term (1.2 s more than the vmapped path at 600 terms, a standalone timing, not committed).

    Args:
      x: (N, H, W, C) batch.
      delta1: (N, Ho, Wo, K) dE/dZ1 of each example.
      max_terms: the most products written out.

    Returns:
      (N, kh, kw, C, K) dE/df of each example.
    """
    kh, kw = spec.kernel_size
    ho, _, k = spec.h1_shape
    n, c = x.shape[0], x.shape[-1]
    unrolled = rows_terms(spec) <= (PER_EXAMPLE_UNROLLED_MAX_TERMS if max_terms is None else max_terms)
    sums = []
    for tap in conv_taps(x, spec):  # (N, Ho, Wo, C) each
        if unrolled:
            rows = [tap[:, i, :, None, :] * delta1[:, i, :, :, None] for i in range(ho)]  # (N, Wo, K, C)
            sums.append(jnp.sum(functools.reduce(jnp.add, rows), axis=1))
        else:
            sums.append(jnp.sum(tap[:, :, :, None, :] * delta1[..., None], axis=(1, 2)))
    # sums: kh kw arrays of (N, K, C) -> (N, kh, kw, C, K)
    return jnp.stack(sums, axis=1).reshape(n, kh, kw, k, c).swapaxes(-1, -2)
