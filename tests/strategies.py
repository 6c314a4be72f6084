"""Hypothesis strategies: random valid ConvNetSpecs and data for them."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

import jaxbp
from jaxbp.spec import explicit_padding

paddings = st.one_of(
    st.sampled_from(["VALID", "SAME"]),
    st.tuples(
        st.tuples(st.integers(0, 2), st.integers(0, 2)),
        st.tuples(st.integers(0, 2), st.integers(0, 2)),
    ),
)


# The SIMD extensions (`jaxbp.machine.simd_flags`) of the two CPUs the W delta2 rule was measured
# on (`jaxbp.formulations.w_delta2_as_terms`): the Zen 2 AMD EPYC (the products) and the Zen 4
# (AVX-512: the matmul).
ZEN2_SIMD = frozenset({"avx2", "fma"})
ZEN4_SIMD = frozenset({"avx2", "fma", "avx512f", "avx512_bf16"})


@st.composite
def specs(draw, max_hw: int = 10):
    """A valid spec: stride 1-3, padding VALID/SAME/explicit asymmetric, dilation 1-2, C 1-3,
    K 1-4, n_out 1-3, non-square inputs and kernels."""
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = draw(paddings)
    hw = []
    for k, d in zip(kernel, dilation):
        hw.append(draw(st.integers(max(1, (k - 1) * d + 1 - 4), max_hw)))
    pads = explicit_padding(padding, tuple(hw), kernel, stride, dilation)
    for n, k, d, (lo, hi) in zip(hw, kernel, dilation, pads):
        if (k - 1) * d + 1 > n + lo + hi:  # the dilated kernel must fit the padded input
            hw = [max(m, (kk - 1) * dd + 1) for m, kk, dd in zip(hw, kernel, dilation)]
            break
    return jaxbp.ConvNetSpec(
        in_shape=(hw[0], hw[1], draw(st.integers(1, 3))),
        n_filters=draw(st.integers(1, 4)),
        kernel_size=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        n_out=draw(st.integers(1, 3)),
    )


def problem(spec, seed: int, batch: int | None, dtype=np.float64):
    """(params, x, y) for `spec`, drawn with NumPy (no per-shape compile): params LeCun-scaled
    normal with a non-zero bias (so dE/db is not tied to the zero init), x standard normal,
    y uniform in [0, 1]."""
    rng = np.random.default_rng(seed)
    kh, kw, c, k = spec.filter_shape
    params = jaxbp.Params(
        f=rng.normal(size=spec.filter_shape) / np.sqrt(kh * kw * c),
        W=rng.normal(size=(spec.n_hidden, spec.n_out)) / np.sqrt(spec.n_hidden),
        b=rng.normal(size=(spec.n_out,)),
    )
    params = jaxbp.Params(*(jnp.asarray(leaf, dtype) for leaf in params))
    lead = () if batch is None else (batch,)
    x = jnp.asarray(rng.normal(size=(*lead, *spec.in_shape)), dtype)
    y = jnp.asarray(rng.uniform(size=(*lead, spec.n_out)), dtype)
    return params, x, y


def layer_params(layer, in_shape, rng):
    """Params of the layer's structure, every leaf standard normal (biases non-zero too)."""
    shapes = jax.eval_shape(lambda: layer.init(jax.random.key(0), in_shape, jnp.float64))
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape)), shapes)
