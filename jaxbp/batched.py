r"""The slides' gradients for a whole batch at once: the mean written as one contraction over N.

The batch gradient is the mean of the per-example gradients (`jaxbp.backward`). Every per-example
gradient is a sum over positions of a product of a forward value and a delta, so the mean over
the batch is one more index of the same sum. With the 1/N of the mean folded into delta2 (the
derivatives are linear in delta2, so every gradient below is then already a mean):

.. math::
   \delta_2 &= (O - Y) \odot O (1 - O) / N  &&\in (N, n_{out}) \\
   \frac{dE}{dW} &= H_1^T \delta_2          &&\text{one (D x N) @ (N x n_out) matmul} \\
   \frac{dE}{db} &= \textstyle\sum_n \delta_2[n] \\
   \delta_1 &= (\delta_2 W^T) \odot H_1 (1 - H_1)  &&\in (N, H_o, W_o, K) \\
   \frac{dE}{df}[a, b, c, k] &= \sum_{n, i, j} X_{pad}[n,\, a d_h + i s_h,\, b d_w + j s_w,\, c]\,
                                 \delta_1[n, i, j, k]

Same math as `jax.vmap` of the per-example backward followed by a mean; what changes is the
shape of the work XLA sees, and that is where the time goes on a CPU:

* Under vmap, the per-example dE/df (a conv whose batch axis is C and whose features are K) becomes
  a *grouped* conv with one group per example, which XLA's CPU backend runs slowly. Here the sum
  over n is part of the contraction from the start.
* XLA's CPU conv is slow for few channels (the issue measured about 1 GFLOP/s for the forward
  with one filter). The forward is written as a shift-and-add over the kh*kw taps:
  ``Z1 = sum_{a,b} tap_ab(X) f[a, b]`` where ``tap_ab(X)`` is a strided slice of
  the padded input; XLA fuses the slices, the multiply-adds and the sigmoid into one loop, so Z1 is
  never written to memory. For the 28x28x1, 5x5, 8-filter, batch-256 config the forward went from
  about 11 ms (conv) to about 1.5 ms (taps), on a loaded 2-core machine; and in the
  formulation runs the taps forward stayed ahead up to 3 channels and 32 filters.
* dE/df is a contraction of the same taps with delta1 over M = N Ho Wo, a (kh kw C) x M times
  M x K product with a tiny output. Split into gcd(N, 16) chunks of the batch (a batched dot,
  then a sum of as many small results) it took 9-12 ms against 7-14 ms for one dot and 17-26 ms for XLA's
  backward conv at the headline config (loaded machine, noisy); the alternative, one conv with the
  batch as the contracting feature axis, is `filter_grad_conv`.

Which formulation is fastest depends on the shape; `choose_formulation` encodes the measurement
(`experiments/results/bench_formulations_*.md`). Nothing here calls an autodiff transform.
"""

from __future__ import annotations

import math
from typing import Literal
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxbp import ops
from jaxbp.model import check_inputs
from jaxbp.params import Params
from jaxbp.spec import DIMENSION_NUMBERS
from jaxbp.spec import ConvNetSpec

ConvForm = Literal["taps", "conv"]
FORMS = ("taps", "conv")


class Formulation(NamedTuple):
    """How the batch step computes the two convolutions.

    Attributes:
      forward: "taps" (shift-and-add over the kh*kw taps, fused with the sigmoid) or "conv"
        (one XLA convolution).
      filter_grad: "taps" (the taps contracted with delta1 over the batch, in chunks) or "conv"
        (one XLA convolution with the batch as the contracting axis).
    """

    forward: ConvForm
    filter_grad: ConvForm


# Measured on the 2-core CPU (experiments/results/bench_formulations_*.md: batch 256 at all 12
# filter/input/kernel points, batch 32 and 1024 with 32 filters): taps/taps was the fastest at
# 17 of 20 points and within the run's noise of the fastest at the others; conv/conv was never
# the fastest. Off the CPU, XLA's convolutions call the vendor's conv
# library (cuDNN on GPU), which the taps do not; that choice is not measured here.
def choose_formulation(spec: ConvNetSpec, batch: int, backend: str | None = None) -> Formulation:
    """The measured-fastest formulation for `spec` on this backend (see the comment above).

    Args:
      spec: the network.
      batch: N (the choice does not depend on it in the measured grid).
      backend: "cpu", "gpu", "tpu"; None for `jax.default_backend()`.
    """
    del spec, batch
    backend = jax.default_backend() if backend is None else backend
    form: ConvForm = "taps" if backend == "cpu" else "conv"
    return Formulation(forward=form, filter_grad=form)


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
    (top, bottom), (left, right) = spec.pads
    x_pad = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
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


def conv_forward_taps(x: jax.Array, f: jax.Array, spec: ConvNetSpec) -> jax.Array:
    r"""Z1 = conv(X, f) as a shift-and-add over taps and input channels.

    .. math:: Z_1[n, i, j, k] = \sum_{a, b, c} \mathrm{tap}_{ab}(X)[n, i, j, c]\, f[a, b, c, k]

    Each term is a broadcast multiply of an (N, Ho, Wo, 1) slice by a (K,) row of f, so the whole
    sum is one elementwise loop (kh*kw*C multiply-adds per output) that XLA fuses with its consumer.

    Returns:
      (N, Ho, Wo, K) Z1.
    """
    kh, kw, c_in, _ = f.shape
    taps = conv_taps(x, spec)
    z = None
    for t, tap in enumerate(taps):
        a, b = divmod(t, kw)
        for c in range(c_in):
            term = tap[..., c : c + 1] * f[a, b, c][None, None, None, :]
            z = term if z is None else z + term
    return z


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


def filter_grad_taps(x: jax.Array, delta1: jax.Array, spec: ConvNetSpec) -> jax.Array:
    r"""dE/df as the taps contracted with delta1 over M = N Ho Wo, in G chunks of the batch.

    .. math::
       \frac{dE}{df}[a, b, c, k] = \sum_{g} \sum_{m \in \text{chunk } g}
           \mathrm{tap}_{ab}(X)[m, c]\, \delta_1[m, k]

    One dot with a (kh kw C, K) output and a contraction of length M runs on one core (measured);
    G = gcd(N, 16) chunks make it a batched dot XLA spreads over cores, and the G partial sums
    are added at the end.

    Args:
      x: (N, H, W, C) batch.
      delta1: (N, Ho, Wo, K) dE/dZ1 (already carrying the batch mean's 1/N).

    Returns:
      (kh, kw, C, K) dE/df.
    """
    kh, kw = spec.kernel_size
    n, _, _, c = x.shape
    k = delta1.shape[-1]
    groups = math.gcd(n, 16)
    taps = jnp.stack(conv_taps(x, spec)).reshape(kh * kw, groups, -1, c)
    partial = jnp.einsum("tgmc,gmk->gtck", taps, delta1.reshape(groups, -1, k), precision=spec.precision)
    return jnp.sum(partial, axis=0).reshape(kh, kw, c, k)


def filter_grad_conv(x: jax.Array, delta1: jax.Array, spec: ConvNetSpec) -> jax.Array:
    r"""dE/df as one convolution in which the batch is the contracted feature axis
    (`ops.conv2d_filter_vjp_sum`: x read as "CHWN", delta1 as "IHWO", the output as "HWNC").

    Returns:
      (kh, kw, C, K) dE/df.
    """
    return ops.conv2d_filter_vjp_sum(x, delta1, kernel_size=spec.kernel_size, **spec.conv_kwargs)


CONV_FORWARD = {"taps": conv_forward_taps, "conv": conv_forward_conv}
FILTER_GRAD = {"taps": filter_grad_taps, "conv": filter_grad_conv}


def check_formulation(formulation) -> Formulation:
    """Raise unless `formulation` is a Formulation of known forms."""
    if not isinstance(formulation, Formulation):
        raise TypeError(f"formulation must be a jaxbp.batched.Formulation, got {formulation!r}")
    for name, value in zip(Formulation._fields, formulation):
        if value not in FORMS:
            raise ValueError(f"formulation.{name} must be one of {FORMS}, got {value!r}")
    return formulation


def value_and_grads(
    params: Params,
    x: jax.Array,
    y: jax.Array,
    spec: ConvNetSpec,
    *,
    formulation: Formulation | None = None,
) -> tuple[jax.Array, Params]:
    r"""(E, dE/dparams) of a batch: the means over examples, computed as contractions over N.

    Args:
      params: the network's `Params`.
      x: (N, H, W, C) batch.
      y: (N, n_out) targets.
      spec: the network.
      formulation: how to compute the two convolutions; None picks `choose_formulation`.

    Returns:
      (E, Params(dE/df, dE/dW, dE/db)), E the mean of the per-example losses
      :math:`\tfrac12 \sum_j (O_j - Y_j)^2` and each gradient the mean of the per-example ones.
    """
    x, y, batched = check_inputs(params, x, y, spec)
    if not batched:
        raise ValueError(f"x must be a batch (N, *{spec.in_shape}), got {x.shape}")
    n = x.shape[0]
    form = choose_formulation(spec, n) if formulation is None else check_formulation(formulation)

    # Forward, keeping H1 (N, D) and O (N, n_out).
    Z1 = CONV_FORWARD[form.forward](x, params.f, spec)
    H1 = ops.sigmoid(Z1)
    H1_flat = H1.reshape(n, -1)
    O = ops.sigmoid(jnp.dot(H1_flat, params.W, precision=spec.precision) + params.b[None, :])
    E = 0.5 * jnp.sum((O - y) ** 2) / n

    # Backward: the per-example slide terms, with the batch mean's 1/N folded into delta2.
    delta2 = (O - y) * (O * (1 - O)) / n  # (N, n_out): dE/dZ2 of the mean loss
    dE_dW = jnp.dot(H1_flat.T, delta2, precision=spec.precision)  # sum_n H1[n] delta2[n]^T
    dE_db = jnp.sum(delta2, axis=0)
    dE_dH1 = jnp.dot(delta2, params.W.T, precision=spec.precision).reshape(H1.shape)  # W delta2
    delta1 = dE_dH1 * (H1 * (1 - H1))  # dE/dZ1, fused by XLA into one elementwise pass
    dE_df = FILTER_GRAD[form.filter_grad](x, delta1, spec)
    return E, Params(f=dE_df, W=dE_dW, b=dE_db)


# Per-example gradients are this batch step for a batch of one, under `jax.vmap`: vmapping the
# taps turns every contraction into a batched dot, where vmapping the per-example convolution of
# `jaxbp.backward` (dE/df = conv(X, delta1) with C as the conv's batch) gives a grouped
# convolution per example, which XLA's CPU backend runs slowly (experiments/bench.py,
# per_ex_manual).
PER_EXAMPLE_FORMULATION = Formulation(forward="taps", filter_grad="taps")


def value_and_grads_example(
    params: Params,
    x: jax.Array,
    y: jax.Array,
    spec: ConvNetSpec,
    *,
    formulation: Formulation = PER_EXAMPLE_FORMULATION,
) -> tuple[jax.Array, Params]:
    """(E, dE/dparams) for one (H, W, C) example: `value_and_grads` of a batch of one.

    Equal to `jaxbp.backward.value_and_manual_grads_example`; meant to be `jax.vmap`-ed.
    """
    return value_and_grads(params, x[None], y[None], spec, formulation=formulation)
