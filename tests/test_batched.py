"""jaxbp.batched: the batch gradient as contractions over N, every formulation, against jax.grad."""

import dataclasses
import itertools
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from jax.extend.core import subjaxprs
from strategies import ZEN2_SIMD
from strategies import ZEN4_SIMD
from strategies import problem
from strategies import specs
from test_backward import FLOAT32_PER_KAPPA
from test_bench import bench

import jaxbp
from jaxbp import batch_minor
from jaxbp import batched
from jaxbp import conv_forms
from jaxbp import formulations
from jaxbp import machine
from jaxbp.check import tree_relative_error
from jaxbp.formulations import Formulation

# Every pair of the taps, patches and conv on the whole batch, and the Toeplitz form for both
# convolutions (sharing R), for the forward alone and for dE/df alone (each form's code is the
# same whatever the other one is); chunking is independent of the forms, so each form once in
# chunks of 2 (a batch of 3 or 5 also leaves a remainder chunk, of one example with 3 and 5), the
# mixed pairs that choose_formulation picks in chunks of 2, and chunks of one example; dE/df's
# conv split over the examples (conv_parts) with more parts than a chunk has examples, parts of
# unequal size, and a remainder chunk; the taps forward with its channels contracted first and
# not, whatever their number; the taps and conv in the batch-minor layout, in chunks of 2 (2
# parts; a remainder of one example, one part) and whole (3 parts where they divide the batch);
# W delta2 set as n_out products (the patches for both, whole; the taps and the conv, the
# patches and the conv, and the Toeplitz forward and the conv, in chunks with a remainder of one
# example, and each at a batch of one) and as the matmul (the conv dE/df after the Toeplitz and
# the patches forward, where the rule takes the products on a CPU without AVX-512): both sides
# whatever this CPU's rule.
PAIRS = [*itertools.product(("taps", "patches", "conv"), repeat=2)]
PAIRS += [("toeplitz", "toeplitz"), ("toeplitz", "conv"), ("taps", "toeplitz")]
CHUNKED = [Formulation(form, form, 2) for form in conv_forms.FORMS] + [
    Formulation("taps", "conv", 2),
    Formulation("patches", "conv", 2),
    Formulation("toeplitz", "conv", 2),
    Formulation("taps", "taps", 1),
    Formulation("taps", "conv", None, 4),
    Formulation("toeplitz", "conv", 3, 2),
    Formulation("taps", "conv", 2, 2, contract_channels=True),
    Formulation("taps", "toeplitz", None, 1, contract_channels=False),
    Formulation("taps", "conv", 2, 2, batch_minor=True),
    Formulation("taps", "conv", None, 3, batch_minor=True),
    Formulation("patches", "patches", None, w_delta2_terms=True),
    Formulation("taps", "conv", 2, 2, w_delta2_terms=True),
    Formulation("patches", "conv", 2, 2, w_delta2_terms=True),
    Formulation("toeplitz", "conv", 2, 2, w_delta2_terms=False),
    Formulation("toeplitz", "conv", 3, 2, w_delta2_terms=True),
    Formulation("patches", "conv", 2, 2, w_delta2_terms=False),
]
FORMULATIONS = [Formulation(*f) for f in PAIRS] + CHUNKED


def all_formulations(params, x, y, spec):
    return [batched.value_and_grads(params, x, y, spec, formulation=f) for f in FORMULATIONS]


all_formulations_jit = jax.jit(all_formulations, static_argnums=3)
chunked_grads_jit = jax.jit(
    lambda p, x, y, s: [batched.value_and_grads(p, x, y, s, formulation=f)[1] for f in CHUNKED],
    static_argnums=3,
)
autodiff_jit = jax.jit(jaxbp.autodiff_value_and_grads, static_argnums=3)


@settings(max_examples=40)
@given(spec=specs(), batch=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_every_formulation_equals_autodiff_float64(spec, batch, seed):
    params, x, y = problem(spec, seed, batch)
    E_ref, g_ref = autodiff_jit(params, x, y, spec)
    for formulation, (E, g) in zip(FORMULATIONS, all_formulations_jit(params, x, y, spec)):
        chex.assert_trees_all_equal_shapes_and_dtypes(g, params)
        # Measured over this sweep: largest relative difference 1.8e-14 (sums in another order);
        # the design's float64 tolerance is 1e-10.
        chex.assert_trees_all_close(g, g_ref, rtol=1e-10, atol=1e-13, custom_message=str(formulation))
        np.testing.assert_allclose(E, E_ref, rtol=1e-12)


def test_chosen_formulation_is_the_default_and_known():
    for c, k in ((1, 2), (3, 8)):
        spec = jaxbp.ConvNetSpec(in_shape=(8, 8, c), n_filters=k, kernel_size=3, n_out=2)
        form = formulations.choose_formulation(spec, 4)
        assert form in FORMULATIONS
        params, x, y = problem(spec, 0, 4)
        chex.assert_trees_all_equal(
            batched.value_and_grads(params, x, y, spec),
            batched.value_and_grads(params, x, y, spec, formulation=form),
        )


def odd_spec(channels: int, filters: int, stride=(2, 1), dilation=(2, 2)) -> jaxbp.ConvNetSpec:
    """A non-square 3x2 kernel, a stride, asymmetric padding and a dilation, on a 9x7 input."""
    return jaxbp.ConvNetSpec(
        in_shape=(9, 7, channels),
        n_filters=filters,
        kernel_size=(3, 2),
        stride=stride,
        padding=((1, 2), (0, 1)),
        dilation=dilation,
    )


def test_taps_reassemble_the_convolution():
    spec = odd_spec(2, 3)
    params, x, _ = problem(spec, 1, 3)
    taps = conv_forms.conv_taps(x, spec)
    assert len(taps) == 6 and all(t.shape == (3, *spec.h1_shape[:2], 2) for t in taps)
    conv = conv_forms.conv_forward_conv(x, params.f, spec)
    np.testing.assert_allclose(conv_forms.conv_forward_taps(x, params.f, spec), conv, rtol=1e-12)
    # The patches are the taps side by side, in the (a, b, c) order of the filter's rows.
    patches = conv_forms.conv_patches(x, spec)
    np.testing.assert_array_equal(patches, np.concatenate(taps, axis=-1).reshape(-1, 6 * 2))
    np.testing.assert_allclose(conv_forms.conv_forward_patches(patches, params.f, spec), conv, rtol=1e-12)


@pytest.mark.parametrize("channels", [2, 3, 4])
def test_taps_contract_the_channels_first_from_the_threshold_and_reassemble_the_convolution(channels):
    spec = odd_spec(channels, 2, dilation=(2, 1))  # dh != dw: the slices of U must not swap them
    params, x, _ = problem(spec, 2, 3)
    conv = conv_forms.conv_forward_conv(x, params.f, spec)
    np.testing.assert_allclose(conv_forms.conv_forward_tap_products(x, params.f, spec), conv, rtol=1e-12)
    np.testing.assert_allclose(conv_forms.conv_forward_taps(x, params.f, spec), conv, rtol=1e-12)
    # The contracted form is the only one with a matmul (U = X_pad f); the per-channel loop has
    # kh*kw*C multiplies.
    jaxpr = str(jax.make_jaxpr(lambda x, f: conv_forms.conv_forward_taps(x, f, spec))(x, params.f))
    contracted = channels >= conv_forms.TAPS_CONTRACT_CHANNELS_FROM
    assert ("dot_general" in jaxpr) == contracted
    assert jaxpr.count(" mul ") == (0 if contracted else 6 * channels)


def test_toeplitz_rows_and_band_reassemble_the_convolution():
    # Wo = 6 with a stride of 1 and a dilation of 2 in W, and 3 with a stride of 2: one block of
    # 4 and a padded one, and a single block narrower than TOEPLITZ_BLOCK.
    for stride in ((2, 1), (1, 2)):
        spec = odd_spec(2, 3, stride)
        params, x, _ = problem(spec, 1, 3)
        (kh, kw), (_, sw), (_, dw) = spec.kernel_size, spec.stride, spec.dilation
        ho, wo, _ = spec.h1_shape
        jb, nb, span = conv_forms.toeplitz_blocks(spec)
        assert (jb, nb, span) == {1: (4, 2, 6), 2: (3, 1, 7)}[sw]  # span (jb - 1) s_w + (kw - 1) d_w + 1
        rows = conv_forms.toeplitz_rows(x, spec).reshape(3, ho, nb, kh, span, 2)
        patches = conv_forms.conv_patches(x, spec).reshape(3, ho, wo, kh, kw, 2)
        # R's column j s_w + b d_w of block s is the patches' column b of output column s jb + j.
        for j, b in itertools.product(range(jb), range(kw)):
            for s in range(nb):
                if s * jb + j < wo:
                    np.testing.assert_array_equal(
                        rows[:, :, s, :, j * sw + b * dw], patches[:, :, s * jb + j, :, b]
                    )
        conv = conv_forms.conv_forward_conv(x, params.f, spec)
        np.testing.assert_allclose(
            conv_forms.conv_forward_toeplitz(conv_forms.toeplitz_rows(x, spec), params.f, spec),
            conv,
            rtol=1e-12,
        )


@pytest.mark.parametrize("p, q, rows", [(9, 8, 9), (8, 9, 8), (5, 5, 5), (16, 8, 8), (20, 8, 8)])
def test_fewer_rows_first_is_a_transpose_b_computed_with_b_first_from_twice_the_columns(p, q, rows):
    a = jax.random.normal(jax.random.key(0), (3, 11, p), jnp.float64)
    b = jax.random.normal(jax.random.key(1), (3, 11, q), jnp.float64)
    fn = jax.vmap(conv_forms.fewer_rows_first)
    np.testing.assert_allclose(fn(a, b), np.einsum("nmp,nmq->npq", a, b), rtol=1e-12)
    # The batched dot XLA compiles: q rows where a has at least twice b's columns (the order
    # fenced off by the barrier), else a's p.
    hlo = jax.jit(fn).lower(a, b).compile().as_text()
    dots = re.findall(r"= f64\[3,(\d+),(\d+)\]\{[\d,]+\} dot\(", hlo)
    assert dots == [(str(rows), str(p + q - rows))], dots


@pytest.mark.parametrize(
    "form, filters, kernel",
    [("patches", 4, 3), ("patches", 16, 3), ("toeplitz", 2, 5), ("toeplitz", 32, 5)],
)
def test_one_examples_filter_grad_either_product_equals_the_conv_float64(form, filters, kernel):
    # Per example (untransposed) dE/df is fewer_rows_first's product for the patches (9 columns
    # against 4 filters: delta1 first; against 16: the patches first), and the Toeplitz slabs'
    # 35 columns against jb K = 6 (delta1 first) and 96 (R first).
    spec = jaxbp.ConvNetSpec(in_shape=(6, 7, 1), n_filters=filters, kernel_size=kernel, n_out=3)
    params, x, y = problem(spec, 5, 4)
    _, _, _, delta1 = batched.slide_terms(params, x, y, spec, "conv", 1)
    build = conv_forms.conv_patches if form == "patches" else conv_forms.toeplitz_rows
    filter_grad = conv_forms.filter_grad_patches if form == "patches" else conv_forms.filter_grad_toeplitz
    columns = build(x[:1], spec).shape[-1]

    def grad(x, d1):  # one example: a batch of one, untransposed
        return filter_grad(build(x[None], spec), d1[None], spec)

    assert columns == {"patches": 9, "toeplitz": 35}[form]
    conv = jax.vmap(lambda x, d1: conv_forms.filter_grad_conv(x[None], d1[None], spec))
    np.testing.assert_allclose(jax.vmap(grad)(x, delta1), conv(x, delta1), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("filters", [2, 8])
def test_one_examples_toeplitz_filter_grad_either_product_with_a_padded_block_equals_the_conv(filters):
    # odd_spec with a stride of 1 and a dilation of 2 in W: Wo = 6, two blocks of 4 (the last
    # padded), span 6, so 18 slab columns against jb K = 8 (delta1 first) and 32 (R first).
    spec = odd_spec(1, filters, stride=(1, 1), dilation=(1, 2))
    assert spec.h1_shape[1] == 6 and conv_forms.toeplitz_blocks(spec) == (4, 2, 6)
    params, x, y = problem(spec, 9, 3)
    _, _, _, delta1 = batched.slide_terms(params, x, y, spec, "conv", 1)

    def grad(x, d1):  # one example: a batch of one, untransposed
        return conv_forms.filter_grad_toeplitz(conv_forms.toeplitz_rows(x[None], spec), d1[None], spec)

    conv = jax.vmap(lambda x, d1: conv_forms.filter_grad_conv(x[None], d1[None], spec))
    np.testing.assert_allclose(jax.vmap(grad)(x, delta1), conv(x, delta1), rtol=1e-10, atol=1e-14)


# Jitted: run op by op, the two per-example sweeps below took 2.4x and 3.3x as long (55 s against
# 23 and 173 against 52, each alone; most of it compiling each op for each example's shapes).
per_example_jit = jax.jit(jaxbp.per_example_manual_grads, static_argnums=3)
slides_per_example_jit = jax.jit(
    jax.vmap(jaxbp.backward.value_and_manual_grads_example, in_axes=(None, 0, 0, None)), static_argnums=3
)


@settings(max_examples=20)
@given(spec=specs(), batch=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_per_example_grads_equal_vmap_of_the_slides_per_example_backward_float64(spec, batch, seed):
    params, x, y = problem(spec, seed, batch)
    fast = per_example_jit(params, x, y, spec)
    chex.assert_trees_all_close(fast, slides_per_example_jit(params, x, y, spec)[1], rtol=1e-10, atol=1e-13)


@settings(max_examples=30)
@given(spec=specs(), batch=st.integers(1, 5), seed=st.integers(0, 2**16), one_filter=st.booleans())
def test_per_example_grads_float32_agreement(spec, batch, seed, one_filter):
    # float32 per-example gradients against float64, one filter (the batch-wide path with
    # filter_grad_rows' sums in another order) and more (vmapped). Measured over 150 such specs
    # (92 with the taps forward): at most 1.3e-7 kappa, so test_backward's 1e-5 kappa for the
    # batch gradients holds here with a 77x margin.
    if one_filter:
        spec = dataclasses.replace(spec, n_filters=1)
    params64, x64, y64 = problem(spec, seed, batch)
    reference = per_example_jit(params64, x64, y64, spec)
    O = jaxbp.forward(params64, x64, spec)
    kappa = float(jnp.max(jnp.abs(O) + jnp.abs(y64)) / jnp.max(jnp.abs(O - y64)))
    params, x, y = jax.tree.map(lambda a: a.astype(jnp.float32), (params64, x64, y64))
    got = per_example_jit(params, x, y, spec)
    chex.assert_trees_all_equal_dtypes(got, jax.tree.map(lambda p: p[None], params))
    assert tree_relative_error(got, reference) < FLOAT32_PER_KAPPA * kappa


def test_choose_formulation_by_backend_channels_filters_and_working_set():
    few = jaxbp.ConvNetSpec(in_shape=(8, 8, 3), n_filters=1, kernel_size=3, n_out=2)
    assert formulations.choose_formulation(few, 4, "cpu") == Formulation("taps", "conv", None, 4)
    # On a GPU the patches for both, the whole batch (bench_formulations_gpu.md) up to about 1 GiB
    # of temporaries; unmeasured accelerators XLA's conv for both.
    assert formulations.choose_formulation(few, 4, "gpu") == Formulation("patches", "patches", None)
    assert formulations.choose_formulation(few, 4, "tpu") == Formulation("conv", "conv", None)
    # 32x32x3, 5x5, 32 filters: 784 * (3 * 32 + 75) * 4 bytes = 536 kB per example, 2002 in 1 GiB,
    # rounded to the power of two 2048 (no cap of 128 as on the CPU).
    large = jaxbp.ConvNetSpec(in_shape=(32, 32, 3), n_filters=32, kernel_size=5, n_out=10)
    assert formulations.choose_formulation(large, 2048, "gpu").chunk is None
    assert formulations.choose_formulation(large, 4096, "gpu") == Formulation("patches", "patches", 2048)
    # The taps for one filter while C < 8; else the Toeplitz form below 8 filters, and from 8 on
    # where its band costs at most 8/5 of the patches' multiplies (nb jb span / (Wo kw), for 16x16
    # inputs: 5x5 6 4 8 / (12 5) = 1.6; 3x3 4 4 6 / (14 3) = 2.29; 5x5 dilated by 2 2 4 12 / (8 5)
    # = 2.4; 7x7 3 4 10 / (10 7) = 1.71, the padded last block included; 7x7 on 18x18, 3 4 10 /
    # (12 7) = 1.43), else the patches.
    cases = [(16, 1, 1, 3, 1, "taps"), (16, 7, 1, 5, 1, "taps"), (16, 1, 7, 3, 1, "toeplitz")]
    cases += [(16, 3, 2, 5, 1, "toeplitz"), (16, 3, 3, 3, 1, "toeplitz"), (16, 1, 8, 3, 1, "patches")]
    cases += [(16, 3, 8, 3, 1, "patches"), (16, 8, 1, 5, 1, "toeplitz"), (16, 8, 1, 3, 1, "toeplitz")]
    cases += [(16, 1, 8, 5, 1, "toeplitz")]
    cases += [(16, 1, 8, 5, 2, "patches"), (16, 1, 8, 7, 1, "patches"), (18, 1, 8, 7, 1, "toeplitz")]
    for hw, c, k, kernel, dilation, form in cases:
        spec = jaxbp.ConvNetSpec(
            in_shape=(hw, hw, c), n_filters=k, kernel_size=kernel, dilation=dilation, n_out=2
        )
        expected = Formulation(form, "conv" if form == "taps" else form, None, 4 if form == "taps" else 1)
        assert formulations.choose_formulation(spec, 4, "cpu") == expected, (hw, c, k, kernel, dilation)
    # The grid's largest point, the chunk sized by the patches' numbers per position for the
    # Toeplitz form too: 784 * (3 * 32 + 75) * 4 bytes = 536 kB per example, so about
    # 16 MB / 536 kB = 31 examples per chunk, rounded to the power of two 32.
    big = jaxbp.ConvNetSpec(in_shape=(32, 32, 3), n_filters=32, kernel_size=5, n_out=10)
    assert formulations.choose_formulation(big, 1024, "cpu") == Formulation("toeplitz", "conv", 32, 4)

    # The taps with at most 9 terms (3x3 on one channel) run the whole batch while x, Z1, H1 and
    # delta1 fit 48 MB: 28x28x1, one filter, (784 + 3 * 676) * 4 = 11248 bytes per example, so
    # 4474 examples (half as many in float64). Other taps (5x5, or 3 channels) keep the
    # working-set chunks of 128, as does the Toeplitz form with 7 filters (81120 bytes of
    # temporaries per example: 207 in 16 MB, 256, capped at 128).
    def single_filter(hw, c, kernel):
        return jaxbp.ConvNetSpec(in_shape=(hw, hw, c), n_filters=1, kernel_size=kernel, n_out=10)

    assert formulations.choose_formulation(single_filter(28, 1, 3), 1024, "cpu") == Formulation(
        "taps", "conv", None, 4
    )
    assert formulations.choose_formulation(single_filter(28, 1, 3), 4474, "cpu").chunk is None
    assert formulations.choose_formulation(single_filter(28, 1, 3), 4475, "cpu").chunk == 128
    assert formulations.choose_formulation(single_filter(28, 1, 3), 2237, "cpu", itemsize=8).chunk is None
    assert formulations.choose_formulation(single_filter(28, 1, 3), 2238, "cpu", itemsize=8).chunk == 128
    seven = jaxbp.ConvNetSpec(in_shape=(28, 28, 1), n_filters=7, kernel_size=3, n_out=10)
    assert formulations.choose_formulation(seven, 1024, "cpu") == Formulation("toeplitz", "toeplitz", 128)
    assert formulations.choose_formulation(single_filter(28, 1, 5), 1024, "cpu").chunk == 128
    assert formulations.choose_formulation(single_filter(32, 3, 3), 1024, "cpu").chunk == 128
    # dE/df by XLA's conv (in parts) from 32 filters on, after the Toeplitz forward or the patches.
    for k, kernel, expected in ((31, 5, "toeplitz"), (32, 5, "conv"), (31, 3, "patches"), (32, 3, "conv")):
        spec = jaxbp.ConvNetSpec(in_shape=(32, 32, 3), n_filters=k, kernel_size=kernel, n_out=10)
        assert formulations.choose_formulation(spec, 256, "cpu").filter_grad == expected, (k, kernel)
    assert formulations.choose_formulation(big, 1024, "cpu", itemsize=8).chunk == 16
    assert formulations.choose_formulation(big, 32, "cpu").chunk is None  # the whole batch is one chunk
    # Taps: 784 * (3 * 1 + 75) * 4 bytes = 245 kB per example, 68 in 16 MB, rounded to 64; in
    # chunks from 2 channels on (BATCH_MINOR_FROM_CHANNELS) in the batch-minor layout, whole or
    # on one channel channels last.
    one_filter = jaxbp.ConvNetSpec(in_shape=(32, 32, 3), n_filters=1, kernel_size=5, n_out=10)
    expected = Formulation("taps", "conv", 64, 4, batch_minor=True)
    assert formulations.choose_formulation(one_filter, 256, "cpu") == expected
    assert not formulations.choose_formulation(one_filter, 64, "cpu").batch_minor  # whole
    assert not formulations.choose_formulation(single_filter(28, 1, 5), 1024, "cpu").batch_minor
    assert formulations.choose_formulation(single_filter(28, 2, 5), 1024, "cpu").batch_minor
    assert formulations.BATCH_MINOR_FROM_CHANNELS == 2
    # One example: the taps forward for one filter, dE/df in the Toeplitz form from 2 channels on
    # (bench_formulations_one_filter_small_batch.md), else XLA's conv (one part: there is one
    # example); with more filters the patches for both.
    assert formulations.choose_formulation(few, 1, "cpu") == Formulation("taps", "toeplitz", None)
    two = jaxbp.ConvNetSpec(in_shape=(8, 8, 2), n_filters=1, kernel_size=3, n_out=2)
    assert formulations.choose_formulation(two, 1, "cpu") == Formulation("taps", "toeplitz", None)
    one = jaxbp.ConvNetSpec(in_shape=(8, 8, 1), n_filters=1, kernel_size=3, n_out=2)
    assert formulations.choose_formulation(one, 1, "cpu") == Formulation("taps", "conv", None, 1)
    assert formulations.choose_formulation(few, 2, "cpu") == Formulation("taps", "conv", None, 2)
    # The vmapped per-example path's formulation is what it was: the taps, the Toeplitz dE/df.
    assert formulations.per_example_formulation(few, 1) == Formulation("taps", "toeplitz", None)
    assert formulations.per_example_formulation(one, 1) == Formulation("taps", "toeplitz", None)
    # Past the taps the patches for both (as fast as the conv's dE/df on the Xeon, up to 1.9x
    # faster on the Zen 4; formulations.py), measured with 8 and 32 filters, 7 by extrapolation.
    assert formulations.choose_formulation(seven, 1, "cpu") == Formulation("patches", "patches", None)
    assert formulations.choose_formulation(big, 1, "cpu") == Formulation("patches", "patches", None)


def test_default_chunks_with_a_remainder_equal_autodiff_float64():
    # A small spec gets the largest chunk (128), so a batch of 130 runs one chunk in the loop,
    # a remainder of 2, and (per example) lax.map over a remainder too. Two input channels: 18
    # taps terms, past the 9 up to which the taps run the whole batch.
    spec = jaxbp.ConvNetSpec(in_shape=(6, 6, 2), n_filters=1, kernel_size=3, n_out=3)
    if jax.default_backend() == "cpu":  # the batch-minor layout (BATCH_MINOR_FROM_CHANNELS)
        assert formulations.choose_formulation(spec, 130) == Formulation("taps", "conv", 128, 4, None, True)
    params, x, y = problem(spec, 5, 130)
    E_ref, g_ref = jaxbp.autodiff_value_and_grads(params, x, y, spec)
    E, g = batched.value_and_grads(params, x, y, spec)
    chex.assert_trees_all_close(g, g_ref, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(E, E_ref, rtol=1e-12)
    # The same chunks named explicitly, so that they run on any backend.
    E, g = batched.value_and_grads(params, x, y, spec, formulation=Formulation("taps", "conv", 128))
    chex.assert_trees_all_close(g, g_ref, rtol=1e-10, atol=1e-13)
    slides = jax.vmap(jaxbp.backward.value_and_manual_grads_example, in_axes=(None, 0, 0, None))
    per_example = jaxbp.per_example_manual_grads(params, x, y, spec)
    chex.assert_trees_all_close(per_example, slides(params, x, y, spec)[1], rtol=1e-10, atol=1e-13)


def primitives(fn, *args):
    """Every equation in the jaxpr of fn(*args), nested ones too."""

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            yield eqn
            for value in eqn.params.values():
                inner = getattr(value, "jaxpr", value)
                if hasattr(inner, "eqns"):
                    yield from walk(inner)

    return list(walk(jax.make_jaxpr(fn)(*args).jaxpr))


def conv_group_counts(fn, *args):
    """feature_group_count of every convolution in the jaxpr of fn(*args), nested ones too."""
    return [
        e.params["feature_group_count"]
        for e in primitives(fn, *args)
        if e.primitive.name == "conv_general_dilated"
    ]


def test_filter_grad_conv_parts_are_separate_convs():
    # dE/df's conv split into conv_parts convs over slices of the examples (at most one per
    # example): that many independent convs in the program, for the runtime to run at once.
    spec = jaxbp.ConvNetSpec(in_shape=(6, 6, 1), n_filters=1, kernel_size=3, n_out=3)
    for batch, parts, expected in ((8, 4, 4), (3, 4, 3), (8, 1, 1)):
        params, x, y = problem(spec, 1, batch)
        form = Formulation("taps", "conv", None, parts)
        fn = lambda p, x, y, form=form: batched.value_and_grads(p, x, y, spec, formulation=form)  # noqa: E731
        assert len(conv_group_counts(fn, params, x, y)) == expected, (batch, parts)


@pytest.mark.parametrize(
    "channels, filters, kernel, batch, max_terms",
    [
        (3, 1, 3, 5, None),
        (3, 1, 3, 300, None),
        (3, 1, 3, 300, 0),
        (3, 2, 3, 5, None),
        (1, 8, 3, 5, None),
        (3, 8, 3, 1, None),
        (1, 8, 5, 5, None),
    ],
)
def test_per_example_grads_never_group_a_conv_and_equal_the_slides_float64(
    channels, filters, kernel, batch, max_terms, monkeypatch
):
    # One filter on several channels (taps, dE/df by filter_grad_rows: its row sums written out,
    # and with max_terms 0 as reductions), the Toeplitz form's picks (2 filters; 8 filters, 5x5)
    # and the patches (8 filters, 3x3): per example there must be no grouped conv, which is what
    # vmapping the conv dE/df would give.
    if max_terms is not None:
        monkeypatch.setattr(conv_forms, "PER_EXAMPLE_UNROLLED_MAX_TERMS", max_terms)
    spec = jaxbp.ConvNetSpec(in_shape=(6, 6, channels), n_filters=filters, kernel_size=kernel, n_out=3)
    params, x, y = problem(spec, 7, batch)
    groups = conv_group_counts(lambda p, x, y: jaxbp.per_example_manual_grads(p, x, y, spec), params, x, y)
    assert all(g == 1 for g in groups), groups
    slides = jax.vmap(jaxbp.backward.value_and_manual_grads_example, in_axes=(None, 0, 0, None))
    per_example = jaxbp.per_example_manual_grads(params, x, y, spec)
    chex.assert_trees_all_close(per_example, slides(params, x, y, spec)[1], rtol=1e-10, atol=1e-13)


def u_matmuls(fn, x, *args) -> int:
    """The dots in fn's jaxpr (loops included) whose left operand ends in the images' (H, W, C):
    U = X_pad f."""

    def u(e):
        return e.primitive.name == "dot_general" and e.invars[0].aval.shape[-3:] == x.shape[1:]

    def count(jaxpr):
        return sum(map(u, jaxpr.eqns)) + sum(map(count, subjaxprs(jaxpr)))

    return count(jax.make_jaxpr(fn)(x, *args).jaxpr)


@pytest.mark.parametrize("chunk", [None, 2])
@pytest.mark.parametrize("channels", [1, 3])
def test_the_formulation_says_whether_the_taps_contract_the_channels_first(channels, chunk):
    # None is TAPS_CONTRACT_CHANNELS_FROM's default; True and False override it either way, in
    # the batch step and (set) in the vmapped per-example function, whose None is False.
    spec = jaxbp.ConvNetSpec(in_shape=(7, 6, channels), n_filters=1, kernel_size=(3, 2), n_out=2)
    params, x, y = problem(spec, 3, 4)
    default = channels >= conv_forms.TAPS_CONTRACT_CHANNELS_FROM
    assert conv_forms.contracts_channels_first(channels) == default
    for contract in (None, True, False):
        form = Formulation("taps", "conv", chunk, 2, contract)

        def step(x, p, y, form=form):
            return batched.value_and_grads(p, x, y, spec, formulation=form)

        def example(x, p, y, form=form):
            return batched.value_and_grads_example(p, x, y, spec, formulation=form)

        assert u_matmuls(step, x, params, y) == (default if contract is None else contract), contract
        assert u_matmuls(jax.vmap(example, in_axes=(0, None, 0)), x, params, y) == bool(contract), contract


@pytest.mark.parametrize("contract_channels", [False, True])
def test_per_example_taps_with_and_without_the_channels_contracted_equal_the_slides_float64(
    contract_channels,
):
    # Three channels: the batch step contracts them first (TAPS_CONTRACT_CHANNELS_FROM); the
    # per-example path does not unless asked (its forward then has U's matmul: one more dot).
    spec = jaxbp.ConvNetSpec(in_shape=(7, 6, 3), n_filters=1, kernel_size=(3, 2), stride=(1, 2), n_out=2)
    assert 3 >= conv_forms.TAPS_CONTRACT_CHANNELS_FROM
    params, x, y = problem(spec, 11, 4)
    fn = lambda p, x, y: batched.per_example_grads_taps(p, x, y, spec, contract_channels=contract_channels)  # noqa: E731
    slides = jax.vmap(jaxbp.backward.value_and_manual_grads_example, in_axes=(None, 0, 0, None))
    chex.assert_trees_all_close(fn(params, x, y), slides(params, x, y, spec)[1], rtol=1e-10, atol=1e-13)
    dots = str(jax.make_jaxpr(fn)(params, x, y)).count("dot_general")
    shipped = str(jax.make_jaxpr(lambda *a: jaxbp.per_example_manual_grads(*a, spec))(params, x, y))
    assert dots == shipped.count("dot_general") + contract_channels
    # The vmapped per-example function keeps the per-channel loop too; a batch of one through
    # value_and_grads contracts (U's one more matmul).
    taps = Formulation("taps", "toeplitz")
    example = lambda p, x, y: batched.value_and_grads_example(p, x, y, spec, formulation=taps)  # noqa: E731
    vmapped = str(jax.make_jaxpr(jax.vmap(example, in_axes=(None, 0, 0)))(params, x, y))
    one = lambda p, x, y: batched.value_and_grads(p, x[None], y[None], spec, formulation=taps)  # noqa: E731
    assert (
        str(jax.make_jaxpr(one)(params, x[0], y[0])).count("dot_general") == vmapped.count("dot_general") + 1
    )
    chex.assert_trees_all_close(
        jax.vmap(example, in_axes=(None, 0, 0))(params, x, y)[1],
        slides(params, x, y, spec)[1],
        rtol=1e-10,
        atol=1e-13,
    )


@pytest.mark.parametrize("max_terms", [None, 0])
def test_filter_grad_rows_is_each_examples_conv_of_delta1_and_x_float64(max_terms):
    # Any filters, stride, padding and dilation: for each example the slides' dE/df,
    # conv(delta1, X) (jaxbp.ops, the example's C as the conv's batch), written-out row sums and
    # reductions alike.
    spec = jaxbp.ConvNetSpec(
        in_shape=(9, 8, 2),
        n_filters=3,
        kernel_size=(3, 2),
        stride=(2, 1),
        padding=((1, 2), (0, 1)),
        dilation=2,
    )
    _, x, _ = problem(spec, 5, 4)
    delta1 = jax.random.normal(jax.random.key(6), (4, *spec.h1_shape), x.dtype)
    got = conv_forms.filter_grad_rows(x, delta1, spec, max_terms=max_terms)
    want = jnp.stack(
        [
            jaxbp.ops.conv2d_filter_vjp_sum(
                x[n : n + 1], delta1[n : n + 1], kernel_size=spec.kernel_size, **spec.conv_kwargs
            )
            for n in range(4)
        ]
    )
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_filter_grad_rows_writes_out_the_row_sums_up_to_its_term_limit(monkeypatch):
    # kh kw Ho = 3 * 3 * 26 = 234 terms: written out (every reduction over the columns j alone)
    # at the default limit, one reduction over (i, j) per tap below it; and the per-example path
    # after the taps forward is batch-wide (no scan, no vmapped dots).
    spec = jaxbp.ConvNetSpec(in_shape=(28, 28, 1), n_filters=1, kernel_size=3, n_out=3)
    assert conv_forms.PER_EXAMPLE_UNROLLED_MAX_TERMS >= 234
    params, x, y = problem(spec, 3, 6)

    def reduced_axes():  # a new function each time: make_jaxpr caches its traces by the function
        fn = lambda p, x, y: jaxbp.per_example_manual_grads(p, x, y, spec)  # noqa: E731
        eqns = primitives(fn, params, x, y)
        assert "scan" not in {e.primitive.name for e in eqns}
        dots = [e for e in eqns if e.primitive.name == "dot_general"]
        assert dots and not any(e.params["dimension_numbers"][1][0] for e in dots)  # no batch axes
        return sorted({tuple(e.params["axes"]) for e in eqns if e.primitive.name == "reduce_sum"})

    assert reduced_axes() == [(1,)]
    monkeypatch.setattr(conv_forms, "PER_EXAMPLE_UNROLLED_MAX_TERMS", 233)
    assert reduced_axes() == [(1, 2)]


def test_bad_formulation_and_unbatched_input_raise():
    spec = jaxbp.ConvNetSpec(in_shape=(6, 6, 1), n_filters=2, kernel_size=3, n_out=2)
    params, x, y = problem(spec, 0, 2)
    with pytest.raises(ValueError, match="formulation.forward"):
        batched.value_and_grads(params, x, y, spec, formulation=Formulation("fft", "conv"))
    with pytest.raises(TypeError, match="formulation"):
        batched.value_and_grads(params, x, y, spec, formulation=("taps", "taps"))
    for chunk in (0, 2.0, True):
        form = Formulation("taps", "taps", chunk)
        with pytest.raises(ValueError, match="formulation.chunk"):
            batched.value_and_grads(params, x, y, spec, formulation=form)
    for parts in (0, 2.0, True):
        form = Formulation("taps", "conv", None, parts)
        with pytest.raises(ValueError, match="formulation.conv_parts"):
            batched.value_and_grads(params, x, y, spec, formulation=form)
    for contract in (1, 0, "yes", np.bool_(True)):
        form = Formulation("taps", "conv", None, 1, contract)
        with pytest.raises(ValueError, match="formulation.contract_channels"):
            batched.value_and_grads(params, x, y, spec, formulation=form)
    minor = Formulation("taps", "conv", None, 1, None, True)
    bad = [minor._replace(batch_minor=1), minor._replace(batch_minor=np.bool_(True))]
    bad += [minor._replace(filter_grad="taps"), minor._replace(forward="patches")]
    bad += [minor._replace(contract_channels=True)]
    for form in bad:
        with pytest.raises(ValueError, match="formulation.batch_minor"):
            batched.value_and_grads(params, x, y, spec, formulation=form)
    batched.value_and_grads(params, x, y, spec, formulation=minor._replace(contract_channels=False))
    for terms in (1, 0, "yes", np.bool_(True)):
        with pytest.raises(ValueError, match="formulation.w_delta2_terms"):
            batched.value_and_grads(
                params, x, y, spec, formulation=Formulation("patches", "conv", w_delta2_terms=terms)
            )
    with pytest.raises(ValueError, match="formulation.w_delta2_terms cannot be True with batch_minor"):
        batched.value_and_grads(params, x, y, spec, formulation=minor._replace(w_delta2_terms=True))
    batched.value_and_grads(params, x, y, spec, formulation=minor._replace(w_delta2_terms=False))
    with pytest.raises(ValueError, match="x must be a batch"):
        batched.value_and_grads(params, x[0], y[0], spec)
    with pytest.raises(ValueError, match="at least one example"):
        batched.value_and_grads(params, x[:0], y[:0], spec)


@pytest.mark.parametrize("seed", range(4))
def test_chunked_sums_in_float32_within_the_float32_error_model(seed):
    # The chunks' partial sums (kept transposed, small axis first) in float32, against float64
    # jax.grad, with test_backward's error model: relative error < FLOAT32_PER_KAPPA * kappa.
    # Measured over seeds 0-39 and these formulations: at most 1.3e-7 * kappa.
    spec = jaxbp.ConvNetSpec(in_shape=(7, 6, 3), n_filters=3, kernel_size=3, padding="SAME", n_out=4)
    params64, x64, y64 = problem(spec, seed, 7)
    reference = jaxbp.autodiff_grads(params64, x64, y64, spec)
    O = jaxbp.forward(params64, x64, spec)
    kappa = float(jnp.max(jnp.abs(O) + jnp.abs(y64)) / jnp.max(jnp.abs(O - y64)))
    params, x, y = jax.tree.map(lambda a: a.astype(jnp.float32), (params64, x64, y64))
    for formulation, g in zip(CHUNKED, chunked_grads_jit(params, x, y, spec), strict=True):
        chex.assert_trees_all_equal_dtypes(g, params)
        assert tree_relative_error(g, reference) < FLOAT32_PER_KAPPA * kappa, formulation


def w_delta2_matmuls(fn, *args) -> int:
    """The dot_generals of `fn`'s jaxpr (inner jaxprs included) of W (D, n_out) with an
    (m, n_out) delta2, contracting n_out: dE/dH1 = delta2 W^T as a matmul."""

    def w_delta2(e):
        if e.primitive.name != "dot_general":
            return False
        (_, rhs_contract), _ = e.params["dimension_numbers"]
        return e.invars[1].aval.shape == args[0].W.shape and tuple(rhs_contract) == (1,)

    def count(jaxpr):
        return sum(map(w_delta2, jaxpr.eqns)) + sum(map(count, subjaxprs(jaxpr)))

    return count(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_the_formulation_says_whether_w_delta2_is_a_matmul_or_products(backend):
    # None is the rule (`formulations.w_delta2_as_terms`): the products for dE/df as XLA's conv
    # after the patches or Toeplitz forward, on a CPU without AVX-512, from 2 examples on; True
    # and False override it, at a batch of one too. With chunks and a remainder, one W delta2
    # per body.
    spec = jaxbp.ConvNetSpec(in_shape=(7, 6, 2), n_filters=3, kernel_size=(3, 2), n_out=4)
    params, x, y = problem(spec, 3, 5)
    here = machine.simd_flags()  # what None reads
    for form, rule in (
        (Formulation("patches", "conv", 2, 2), True),
        (Formulation("toeplitz", "conv", None), True),
        (Formulation("patches", "patches", 2), False),
        (Formulation("taps", "conv", 2, 2), False),
        (Formulation("conv", "conv", 2, 2), False),
    ):
        assert formulations.w_delta2_as_terms(form, 5, 4, backend, ZEN2_SIMD) == (rule and backend == "cpu")
        assert not formulations.w_delta2_as_terms(form, 5, 4, backend, ZEN4_SIMD)  # AVX-512: the matmul
        assert formulations.w_delta2_as_terms(form, 5, 4, backend) == formulations.w_delta2_as_terms(
            form, 5, 4, backend, here
        )
        for simd in (ZEN2_SIMD, ZEN4_SIMD):
            assert not formulations.w_delta2_as_terms(form, 1, 4, backend, simd)
            max_out = formulations.W_DELTA2_TERMS_MAX_OUT
            assert not formulations.w_delta2_as_terms(form, 5, max_out + 1, backend, simd)
            for terms in (True, False):
                f = form._replace(w_delta2_terms=terms)
                assert formulations.w_delta2_as_terms(f, 1, 4, backend, simd) == terms
        if backend != jax.default_backend():
            continue
        for terms in (None, True, False):
            f = form._replace(w_delta2_terms=terms)
            bodies = 1 if f.chunk is None else 2  # the loop's and the remainder's
            uses = formulations.w_delta2_as_terms(form, 5, 4, backend, here) if terms is None else terms
            step = lambda p, x, y, f=f: batched.value_and_grads(p, x, y, spec, formulation=f)  # noqa: E731
            assert w_delta2_matmuls(step, params, x, y) == (0 if uses else bodies), f
            one = lambda p, x, y, f=f: batched.value_and_grads(p, x[:1], y[:1], spec, formulation=f)  # noqa: E731
            assert w_delta2_matmuls(one, params, x, y) == (0 if terms else 1), f


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA's CPU dot emitter; a GPU calls cuBLAS")
def test_a_batch_of_one_takes_dE_dH1_as_a_library_dot_not_a_loop_over_W():
    # W delta2 written with an explicit W.T became, at m = 1, a loop fusion over W on XLA's CPU,
    # and the batch-1 step with 32 filters took up to 1.45x as long; contracting W's stored minor
    # axis keeps it a dot (a top-level `dot(` of shape (1, D) in the optimized module).
    spec = jaxbp.ConvNetSpec(in_shape=(8, 8, 1), n_filters=4, kernel_size=(3, 3), n_out=10)
    params = jaxbp.init_params(jax.random.key(0), spec)
    x, y = jnp.ones((1, 8, 8, 1), jnp.float32), jnp.ones((1, 10), jnp.float32)
    options = jaxbp.compiler_options()
    fn = jax.jit(lambda p, x, y: batched.value_and_grads(p, x, y, spec), compiler_options=options)
    text = fn.lower(params, x, y).compile().as_text()
    D = 6 * 6 * 4
    assert len(re.findall(rf"= f32\[1,{D}\]\{{1,0\}} dot\(", text)) == 1


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA's CPU fusions; counts differ elsewhere")
def test_the_chunk_loop_neither_copies_x_nor_adds_each_sum_in_a_kernel_of_its_own():
    # Each kernel XLA generates costs compile time on the CPU. Scanning over x reshaped into
    # chunks made XLA copy all of x (one input channel) before the loop, and a carry of four sums
    # took four adds and three broadcasts of zeros; the loop now indexes rows of x flattened
    # chunk by chunk and carries two arrays. Measured with jaxlib 0.10.2: 8 kernels more than
    # the unchunked gradient (17 against 9), where the scan with four sums had 10 more, the copy
    # of x among them.
    spec = jaxbp.ConvNetSpec(in_shape=(12, 12, 1), n_filters=4, kernel_size=(3, 3), n_out=10)
    params = jaxbp.init_params(jax.random.key(0), spec)
    x, y = jnp.ones((32, 12, 12, 1), jnp.float32), jnp.ones((32, 10), jnp.float32)

    def optimized(chunk):
        form = Formulation("patches", "patches", chunk)
        fn = jax.jit(
            lambda p, x, y: batched.value_and_grads(p, x, y, spec, formulation=form),
            compiler_options=jaxbp.compiler_options(),
        )
        text = fn.lower(params, x, y).compile().as_text()
        return text, bench.generated_kernels(text)

    chunked, chunked_kernels = optimized(8)
    _, whole_kernels = optimized(None)
    assert "while(" in chunked  # the chunks are a loop
    # No fusion writes an array of x's size, whatever its shape (x in chunks, or in rows).
    shapes = re.findall(r"= f32\[([\d,]*)\]\S* fusion\(", chunked)
    assert x.size not in {math.prod(int(d) for d in shape.split(",") if d) for shape in shapes}
    assert chunked_kernels - whole_kernels <= 8, (chunked_kernels, whole_kernels)


def test_batch_minor_parts_and_the_transposed_chunk():
    assert [batch_minor.split_parts(m, 4) for m in (128, 6, 7, 3, 2, 1)] == [4, 3, 1, 3, 2, 1]
    spec = odd_spec(2, 3)  # padding ((1, 2), (0, 1)): X^T holds X_pad
    _, x, _ = problem(spec, 4, 6)
    rows = batch_minor.transposed_chunk(x, spec, 3)
    x_pad = conv_forms.pad_input(x, spec)
    assert rows.shape == (3, 2 * 12 * 8 * 2)
    for p in range(3):
        np.testing.assert_array_equal(
            rows[p].reshape(2, 12, 8, 2), x_pad[2 * p : 2 * p + 2].transpose(3, 1, 2, 0)
        )


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA's CPU fusions")
def test_batch_minor_transposes_each_chunk_once_into_rows_the_convs_read_whole():
    # The chunk's x is transposed by one kernel per loop step, carried to the next as P flat rows
    # (C Hp Wp q numbers each); nothing else in the loop writes an array of the chunk's size
    # (computed where it is used, XLA had fused the transpose into each part's copy and into the
    # taps' loop), and the convs read the rows' (C, Hp, Wp, q) parts.
    spec = jaxbp.ConvNetSpec(in_shape=(12, 12, 3), n_filters=1, kernel_size=(3, 3), n_out=10)
    params = jaxbp.init_params(jax.random.key(0), spec)
    x, y = jnp.ones((64, 12, 12, 3), jnp.float32), jnp.ones((64, 10), jnp.float32)
    form = Formulation("taps", "conv", 16, 4, batch_minor=True)
    fn = jax.jit(
        lambda p, x, y: batched.value_and_grads(p, x, y, spec, formulation=form),
        compiler_options=jaxbp.compiler_options(),
    )
    text = fn.lower(params, x, y).compile().as_text()
    body = text[text.index("%wide.region") :]  # the loop's computations come first, as printed
    body = body[: body.index("ENTRY")]
    chunk_size = 16 * 12 * 12 * 3
    writes = [
        math.prod(int(d) for d in shape.split(",") if d)
        for shape in re.findall(r"= f32\[([\d,]*)\]\S* fusion\(", body)
    ]
    assert writes.count(chunk_size) == 1, writes
    assert re.search(rf"= f32\[4,{chunk_size // 4}\]\S* fusion\(", body)
    # The convs' (C, Hp, Wp, q) parts are read out of the rows: whatever produces them in the
    # loop transposes nothing.
    parts = re.findall(r"= f32\[3,12,12,4\]\S* fusion\(.*calls=(%[\w.-]+)", body)
    assert len(parts) == 4, parts
    for name in parts:
        computation = text[text.index(f"{name} ") :]
        assert "transpose(" not in computation[: computation.index("\n}")], name


def test_batch_minor_whole_chunks_parts_that_do_not_divide_and_a_remainder_equal_autodiff_float64():
    # 11 examples in chunks of 4: two chunks in the loop, 3 parts asked of 4 examples (2 taken),
    # and a remainder of 3 in 3 parts; a stride, a dilation, padding and 2 filters.
    spec = dataclasses.replace(odd_spec(2, 2), n_out=3)
    params, x, y = problem(spec, 8, 11)
    E_ref, g_ref = jaxbp.autodiff_value_and_grads(params, x, y, spec)
    minor = Formulation("taps", "conv", 4, 3, batch_minor=True)
    E, g = batched.value_and_grads(params, x, y, spec, formulation=minor)
    chex.assert_trees_all_close(g, g_ref, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(E, E_ref, rtol=1e-12)
