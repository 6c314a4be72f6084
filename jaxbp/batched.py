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
shape of the work XLA sees, and on a CPU that is where the time goes (measured by
``python experiments/bench.py --formulations``, results in experiments/results/):

* **Chunks of the batch.** Examples are independent until the gradient sums, so the batch is cut
  into chunks of ``chunk`` examples, run one after another in a loop (`lax.fori_loop`), each
  adding its partial sums. A chunk's temporaries (patches, Z1, H1, delta1) stay a few MB and are
  reused from chunk to chunk; one pass over the whole batch writes hundreds of MB of fresh
  buffers per step at batch 1024, and on this CPU writing and page-faulting those cost more than
  the arithmetic (at the largest grid point the patches of the whole batch are 240 MB; the step
  took 165 ms in chunks of 32 against 422 ms unchunked,
  experiments/results/bench_formulations.md, and jax.grad's step 290-321 ms in the bench.md
  runs).
* **Weight-gradient sums written small axis first.** dE/dW = H1^T delta2 and dE/df = P^T delta1
  contract over the examples; written as (n_out, D) and (K, kh kw C) they ran 1.2-3x faster
  than in the params' (D, n_out) and (kh kw C, K), so the chunks' sums stay transposed and are
  transposed back once per step (the whole step 1.1-1.5x faster with 8 and 32 filters).

The two convolutions run in one of four forms (`jaxbp.conv_forms`); which form, and in what
chunks, is chosen by measurement (`jaxbp.formulations`). Nothing here calls an autodiff transform.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from jaxbp import batch_minor
from jaxbp import carry
from jaxbp import ops
from jaxbp.conv_forms import ConvForm
from jaxbp.conv_forms import conv_forward
from jaxbp.conv_forms import conv_patches
from jaxbp.conv_forms import filter_grad_conv
from jaxbp.conv_forms import filter_grad_patches
from jaxbp.conv_forms import filter_grad_rows
from jaxbp.conv_forms import filter_grad_taps
from jaxbp.conv_forms import filter_grad_toeplitz
from jaxbp.conv_forms import toeplitz_rows
from jaxbp.formulations import Formulation
from jaxbp.formulations import check_formulation
from jaxbp.formulations import choose_formulation
from jaxbp.formulations import per_example_formulation
from jaxbp.formulations import w_delta2_as_terms
from jaxbp.model import check_inputs
from jaxbp.params import Params
from jaxbp.spec import ConvNetSpec


def slide_terms(
    params: Params,
    x: jax.Array,
    y: jax.Array,
    spec: ConvNetSpec,
    forward: ConvForm,
    n: int,
    *,
    patches: jax.Array | None = None,
    rows: jax.Array | None = None,
    contract_channels: bool | None = None,
    w_delta2_terms: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    r"""(H1, O, delta2, delta1) of m examples: the slides' forward and their per-example deltas,
    nothing contracted over the examples yet, delta2 carrying a mean's 1/n (n = 1: none).
    ``patches``, ``rows`` and ``contract_channels`` are `jaxbp.conv_forms.conv_forward`'s;
    ``w_delta2_terms`` writes delta2 W^T as n_out broadcast products instead of a matmul.

    .. math::
       \delta_2 = (O - Y) \odot O (1 - O) / n, \qquad
       \delta_1 = (\delta_2 W^T) \odot H_1 (1 - H_1)

    Returns:
      H1 (m, D), O (m, n_out), delta2 (m, n_out) and delta1 (m, Ho, Wo, K).
    """
    m = x.shape[0]
    Z1 = conv_forward(
        x, params.f, spec, forward, patches=patches, rows=rows, contract_channels=contract_channels
    )
    # H1 and delta1 are kept as (m, D) matrices: with few filters the (m, Ho, Wo, K) layout has
    # a minor axis of 1 to 8 numbers, and XLA's CPU loops over it ran 3.5x slower (measured at
    # batch 256, 28x28x1, 5x5, one filter: 8.9 ms against 2.5 ms for the whole gradient).
    Z1 = Z1.reshape(m, -1)
    if forward != "taps" and jax.default_backend() == "cpu":
        # A matmul's or conv's Z1 is written out anyway; the barrier keeps the sigmoid on this
        # (m, D) view. Without it XLA moves the reshape past the sigmoid, onto the product's
        # (rows, jb K) or (rows, K) shape, and XLA's CPU compiler took 0.25 s for a sigmoid whose
        # minor axis is 32 numbers (16: 0.11 s, 24: 0.17 s) against 0.03-0.05 s for the other
        # widths tried, 4-256 (tanh and exp: 0.03-0.04 s at every width). With it the gradient
        # compiled in 0.24-0.40 s against 0.54-0.68 s with 8 filters in the Toeplitz form or 32
        # filters (experiments/results/bench_compile_sigmoid.md); the steps' run time stayed
        # within the noise (0.97x the run before's, median, bench_amd_epyc_sigmoid.md). The
        # taps' Z1 is never written: it stays fused. Only on the CPU: the slow compile is its
        # LLVM backend's, and an accelerator's XLA may fuse the sigmoid into the product
        # (unmeasured).
        Z1 = lax.optimization_barrier(Z1)
    H1 = ops.sigmoid(Z1)
    O = ops.sigmoid(jnp.dot(H1, params.W, precision=spec.precision) + params.b[None, :])
    delta2 = (O - y) * (O * (1 - O)) / n  # (m, n_out): dE/dZ2 (of the mean loss for n > 1)
    if w_delta2_terms:
        # (delta2 W^T)[m, d] = sum_o delta2[m, o] W[d, o], n_out products of a column of delta2
        # and a column of W: elementwise, so XLA fuses the sum into whatever reads delta1 (with
        # dE/df as XLA's conv in parts, the copies that lay each part of delta1 out for its conv)
        # instead of writing the (m, D) matmul and reading it back (`jaxbp.formulations`,
        # W_DELTA2_TERMS_FILTER_GRADS). Where delta1 is read in its own (m, D) order by one kernel
        # (the patches dE/df) the step ran 1.12-1.37x slower with the products than the matmul.
        products = (delta2[:, o, None] * params.W[None, :, o] for o in range(params.W.shape[1]))
        dE_dH1 = functools.reduce(jnp.add, products)
    else:
        # W delta2 as (m, D), contracting W's minor (n_out) axis as it is stored. Written with an
        # explicit W.T, at m = 1 XLA's CPU made this dot a loop fusion over W instead of a library
        # dot, and the batch-1 step with 32 filters took 1.15-1.45x as long at 3 of the 4 points
        # (28x28x1, 5x5: 0.337 ms against 0.232) and 0.94x at the fourth; from m = 32 on XLA
        # compiles both forms to the same program.
        dE_dH1 = lax.dot_general(delta2, params.W, (((1,), (1,)), ((), ())), precision=spec.precision)
    delta1 = (dE_dH1 * (H1 * (1 - H1))).reshape(m, *spec.h1_shape)  # dE/dZ1, one fused pass
    return H1, O, delta2, delta1


def chunk_sums(
    params: Params,
    x: jax.Array,
    y: jax.Array,
    spec: ConvNetSpec,
    form: Formulation,
    n: int,
    transposed: bool = True,
) -> tuple[jax.Array, Params]:
    """(sum of E, sums of dE/dparams) over the examples of one chunk, each already divided by n.

    The slides' per-example terms, with the examples of the chunk as one more contracted axis.
    With ``transposed`` the two weight gradients come small axis first, f as (K, kh kw C) and W
    as (n_out, D) (see `untranspose`): faster for sums over several examples, and slower for a
    single vmapped example, where the transpose back is one per example (per-example gradients,
    batch 256, 28x28x1, 8 filters: 52 ms transposed against 29).
    """
    forms = (form.forward, form.filter_grad)
    patches = conv_patches(x, spec) if "patches" in forms else None
    rows = toeplitz_rows(x, spec) if "toeplitz" in forms else None
    H1, O, delta2, delta1 = slide_terms(
        params,
        x,
        y,
        spec,
        form.forward,
        n,
        patches=patches,
        rows=rows,
        contract_channels=form.contract_channels,
        w_delta2_terms=w_delta2_as_terms(form, n if transposed else 1, spec.n_out),
    )
    E = 0.5 * jnp.sum((O - y) ** 2) / n
    if transposed:
        # (dE/dW)^T = sum_n delta2[n] H1[n]^T written (n_out, D): the same contraction over the
        # m examples with a 10-wide output minor axis, H1^T delta2, ran 2.4-3x slower (chunk of
        # 32 x 25088: 0.16-0.17 ms against 0.42-0.48).
        dE_dW = jnp.dot(delta2.T, H1, precision=spec.precision)
    else:
        dE_dW = jnp.dot(H1.T, delta2, precision=spec.precision)  # sum_n H1[n] delta2[n]^T
    dE_db = jnp.sum(delta2, axis=0)
    if form.filter_grad == "patches":
        dE_df = filter_grad_patches(patches, delta1, spec, transposed)
    elif form.filter_grad == "toeplitz":
        dE_df = filter_grad_toeplitz(rows, delta1, spec, transposed)
    else:
        if form.filter_grad == "taps":
            dE_df = filter_grad_taps(x, delta1, spec)
        else:
            dE_df = filter_grad_conv(x, delta1, spec, form.conv_parts)
        dE_df = filters_first(dE_df) if transposed else dE_df
    return E, Params(f=dE_df, W=dE_dW, b=dE_db)


def filters_first(f: jax.Array) -> jax.Array:
    """(kh, kw, C, K) -> (K, kh kw C): `chunk_sums`' transposed layout of dE/df."""
    return f.reshape(-1, f.shape[-1]).T


def untranspose(sums: Params, spec: ConvNetSpec) -> Params:
    """The gradients in the params' shapes from `chunk_sums`' transposed (K, kh kw C) dE/df and
    (n_out, D) dE/dW: one transpose per step, after the last chunk, of a few thousand numbers."""
    kh, kw = spec.kernel_size
    f = sums.f.T.reshape(kh, kw, spec.in_shape[2], spec.n_filters)
    return Params(f=f, W=sums.W.T, b=sums.b)


def add_chunks(add: Callable, total, x: jax.Array, y: jax.Array, chunk: int):
    """`total` after ``total = add(total, x_chunk, y_chunk)`` for each chunk of `chunk` examples of
    x and y in turn, in a `lax.fori_loop` over the whole chunks, then the remainder (n not a
    multiple of chunk) as one more, smaller chunk.

    The whole chunks are rows of x (and of y) flattened chunk by chunk, indexed by the loop.
    Scanning over x as (whole, chunk, H, W, C) made XLA copy all of x first where C = 1 (the
    layouts it gave the unit axis differed), and slicing x at i chunk made the kernels that read
    the slice slower (the step 1.14-1.28x at batch 256 and 1024 of 32x32x3 with 3x3, one
    filter); a row of a matrix does neither. (With a remainder, x's whole chunks are still
    copied out once, as the scan did.) No negative indices: JAX's wrap of them puts a select
    into every kernel that reads the row, and the step took 1.16-1.19x as long with it at those
    two points (standalone timings, not committed).
    """
    n = x.shape[0]
    whole = n // chunk
    x_rows = x[: whole * chunk].reshape(whole, -1)
    y_rows = y[: whole * chunk].reshape(whole, -1)

    def add_whole_chunk(i, total):
        x_chunk, y_chunk = (
            lax.dynamic_index_in_dim(rows, i, keepdims=False, allow_negative_indices=False).reshape(
                chunk, *a.shape[1:]
            )
            for rows, a in ((x_rows, x), (y_rows, y))
        )
        return add(total, x_chunk, y_chunk)

    total = lax.fori_loop(0, whole, add_whole_chunk, total)
    if whole * chunk < n:
        total = add(total, x[whole * chunk :], y[whole * chunk :])
    return total


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
      formulation: how to compute the two convolutions and in what chunks; None picks
        `jaxbp.formulations.choose_formulation`.

    Returns:
      (E, Params(dE/df, dE/dW, dE/db)), E the mean of the per-example losses
      :math:`\tfrac12 \sum_j (O_j - Y_j)^2` and each gradient the mean of the per-example ones.
    """
    x, y, batched = check_inputs(params, x, y, spec)
    if not batched:
        raise ValueError(f"x must be a batch (N, *{spec.in_shape}), got {x.shape}")
    n = x.shape[0]
    if n == 0:
        raise ValueError(f"x must hold at least one example, got shape {x.shape}")
    if formulation is None:
        form = choose_formulation(spec, n, itemsize=x.dtype.itemsize)
    else:
        form = check_formulation(formulation)
    chunk = n if form.chunk is None else min(form.chunk, n)
    if n == 1:  # one example (what vmap sees for per-example gradients): no sum to transpose
        return chunk_sums(params, x, y, spec, form, n, transposed=False)  # channels last
    if form.batch_minor:
        E, sums = batch_minor.value_and_grads(params, x, y, spec, chunk, form.conv_parts)
        return E, untranspose(sums, spec)
    if chunk == n:
        E, sums = chunk_sums(params, x, y, spec, form, n)
        return E, untranspose(sums, spec)

    # The loop carries two arrays (`jaxbp.carry`): (dE/dW)^T, and E, dE/df and dE/db end to end.
    def add_chunk(total, x_chunk, y_chunk):
        return carry.add(total, *chunk_sums(params, x_chunk, y_chunk, spec, form, n))

    E, sums = carry.unpack(add_chunks(add_chunk, carry.zeros(params, x), x, y, chunk), params)
    return E, untranspose(sums, spec)


def value_and_grads_example(
    params: Params,
    x: jax.Array,
    y: jax.Array,
    spec: ConvNetSpec,
    *,
    formulation: Formulation | None = None,
) -> tuple[jax.Array, Params]:
    """(E, dE/dparams) for one (H, W, C) example: `value_and_grads` of a batch of one.

    Equal to `jaxbp.backward.value_and_manual_grads_example`; meant to be `jax.vmap`-ed: the taps
    and patches vmap into batched dots, where vmapping the per-example convolution of
    `jaxbp.backward` (dE/df = conv(X, delta1) with C as the conv's batch) gives a grouped
    convolution per example, which XLA's CPU backend runs slowly (experiments/bench.py,
    per_ex_manual). None takes `jaxbp.formulations.per_example_formulation`. The taps forward
    keeps its per-channel loop unless the formulation's ``contract_channels`` is set, as
    `per_example_grads_taps` does: vmapped, `jaxbp.conv_forms.conv_forward_tap_products` writes
    U for every example of the batch.
    """
    if formulation is None:
        formulation = per_example_formulation(spec, 1, itemsize=jnp.asarray(x).dtype.itemsize)
    formulation = check_formulation(formulation)
    if formulation.contract_channels is None:
        formulation = formulation._replace(contract_channels=False)
    return value_and_grads(params, x[None], y[None], spec, formulation=formulation)


def per_example_grads(params: Params, x: jax.Array, y: jax.Array, spec: ConvNetSpec) -> Params:
    """Per-example gradients of a batch, each leaf with a leading axis N, nothing summed over N.

    After the taps forward (one filter on few channels, `jaxbp.formulations.per_example_formulation`)
    `per_example_grads_taps`, the whole batch at once; otherwise `jax.vmap` of
    `value_and_grads_example` over the whole batch (the patches or the Toeplitz form: batched
    dots). With 8 or more filters most of the time goes into writing the output: the
    per-example dE/dW alone is N x D x n_out numbers (experiments/bench.py times that write
    alone as ``per_ex_dW_write``).
    """
    form = per_example_formulation(spec, x.shape[0], itemsize=x.dtype.itemsize)
    if form.forward == "taps":
        return per_example_grads_taps(params, x, y, spec)
    return jax.vmap(lambda x, y: value_and_grads_example(params, x, y, spec, formulation=form)[1])(x, y)


def per_example_grads_taps(
    params: Params,
    x: jax.Array,
    y: jax.Array,
    spec: ConvNetSpec,
    max_terms: int | None = None,
    contract_channels: bool = False,
) -> Params:
    """Per-example gradients after the taps forward: the slides' terms of the whole batch at once
    (`slide_terms` with n = 1), dE/dW = H1 delta2^T and dE/db = delta2 of each example, and
    dE/df by `jaxbp.conv_forms.filter_grad_rows` (``max_terms`` is its).

    The taps forward keeps the per-channel loop unless ``contract_channels``: over the whole batch
    `jaxbp.conv_forms.conv_forward_tap_products` writes U, kh kw K numbers per input pixel (K = 1
    here) for all N examples (105 MB at batch 1024 of 32x32x3 with 5x5). There this path took 1.5-3.0x as long
    with it (3x3 and 5x5), and 0.96-1.05x in `lax.map` chunks; at batch 32 and 256 of 32x32x3
    0.92-1.25x, in chunks 0.86-1.25x (experiments/results/bench_per_example_products.md,
    ``products`` and ``products_chunks``): no rule for it.

    With one filter, vmapping `value_and_grads_example` (the Toeplitz form's dE/df, a few
    numbers per batched dot) took 0.95-2.15x the batch gradient at batch 32-1024, the better of
    the whole batch and `lax.map` chunks, where this took 0.95-1.74x, within 1.2x at 8 of the 12
    points, and was 1.02-2.99x faster than the vmapped whole batch
    (experiments/results/bench_per_example.md; rerun with an untimed call before each sample
    and the batch step's channels contracted first, bench_per_example_warm.md: 0.95-2.35x,
    within 1.2x at 6 of 12, all on 28x28x1). At batch 4096 each call writes 94-147 MB of
    fresh per-example dE/dW (N x D x n_out numbers), and this took 2.2-3.0x (2.82-3.42x in the
    rerun). The same path
    under `lax.map` in chunks of `jaxbp.formulations.working_set_chunk` examples (``rows_chunks`` there) took
    1.16-2.3x the whole batch's time with 28x28x1 at batch 256-4096, 0.92-1.09x with 32x32x3
    and 3x3 filters, and 0.83-0.94x with 32x32x3 and 5x5: no rule for chunks.
    """
    H1, _, delta2, delta1 = slide_terms(params, x, y, spec, "taps", 1, contract_channels=contract_channels)
    dE_dW = H1[:, :, None] * delta2[:, None, :]  # H1[n] delta2[n]^T, (N, D, n_out)
    return Params(f=filter_grad_rows(x, delta1, spec, max_terms), W=dE_dW, b=delta2)
