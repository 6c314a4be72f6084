"""compare_grads on any stack of layers: a wrong layer backward is located at that layer."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbp
from jaxbp import ops


@dataclasses.dataclass(frozen=True)
class TanhMissingSquare(jaxbp.Tanh):
    def vjp(self, params, x, y, dE_dy):
        return (), dE_dy * (1 - y)  # wrong: tanh' = 1 - tanh^2


@dataclasses.dataclass(frozen=True)
class ConvUnflippedInputVjp(jaxbp.Conv2D):
    def vjp(self, params, x, y, dE_dy):
        dparams, _ = super().vjp(params, x, y, dE_dy)
        # wrong: the input cotangent correlates with the filters without flipping them
        flipped = params._replace(f=params.f[::-1, ::-1])
        _, dE_dx = super().vjp(flipped, x, y, dE_dy)
        return dparams, dE_dx


@dataclasses.dataclass(frozen=True)
class DenseNoTranspose(jaxbp.Dense):
    def vjp(self, params, x, y, dE_dy):
        dparams, dE_dx = super().vjp(params, x, y, dE_dy)
        return dparams._replace(W=jnp.outer(x, dE_dy)[::-1]), dE_dx  # wrong: rows reversed


def _problem(network, batch, seed=0):
    rng = np.random.default_rng(seed)
    params = network.init(jax.random.key(seed), jnp.float64)
    x = jnp.asarray(rng.normal(size=(batch, *network.in_shape)))
    labels = rng.integers(0, network.out_shape[0], batch)
    y = jax.nn.one_hot(labels, network.out_shape[0], dtype=jnp.float64)
    return params, x, y


def _replace_layer(network, index, layer):
    layers = list(network.layers)
    layers[index] = layer
    return jaxbp.Network(layers=tuple(layers), loss=network.loss, in_shape=network.in_shape)


LENET = jaxbp.lenet5((8, 8, 1), 10)


def test_lenet_passes_every_row_including_finite_differences():
    params, x, y = _problem(LENET, 2)
    report = jaxbp.compare_grads(params, x, y, LENET)
    assert report.ok, str(report)
    names = [row.name for row in report.rows if row.stage == "term"]
    # backward order: the loss first, then the last layer down to the first
    assert names[0] == "loss dE/da_L" and names[1].startswith("layers[11] Dense")
    assert names[-1] == "layers[0] Conv2D dE/dx"


@pytest.mark.parametrize(
    "index, layer, expected",
    [
        (4, TanhMissingSquare(), "layers[4] TanhMissingSquare dE/dx"),
        (3, ConvUnflippedInputVjp(16, (5, 5), padding="SAME"), "layers[3] ConvUnflippedInputVjp dE/dx"),
        (9, DenseNoTranspose(84), "layers[9] DenseNoTranspose dE/dW"),
    ],
)
def test_a_wrong_layer_vjp_is_located_at_that_layer(index, layer, expected):
    network = _replace_layer(LENET, index, layer)
    params, x, y = _problem(network, 2)
    report = jaxbp.compare_grads(params, x, y, network, finite_differences=False)
    assert not report.ok
    assert report.first_failure.name == expected
    failing_terms = {row.name for row in report.failures if row.stage == "term"}
    assert failing_terms == {expected}, failing_terms  # each layer is checked on its own


def test_slides_network_as_layers_passes_and_matches_chain_terms():
    spec = jaxbp.ConvNetSpec(in_shape=(7, 6, 2), n_filters=3, kernel_size=(3, 2), stride=(2, 1), n_out=2)
    network = jaxbp.slides_network(spec)
    rng = np.random.default_rng(1)
    params = jaxbp.init_params(jax.random.key(1), spec, jnp.float64)
    x = jnp.asarray(rng.normal(size=(3, *spec.in_shape)))
    y = jnp.asarray(rng.uniform(size=(3, 2)))
    report = jaxbp.compare_grads(jaxbp.params_to_network(params), x, y, network)
    assert report.ok, str(report)
    terms = jaxbp.chain_terms(params, x, y, spec)
    layer_terms = network.chain_terms(jaxbp.params_to_network(params), x, y)
    # the layer cotangents are the slides' delta2 (dense output), dE/dH1 and delta1 (conv output)
    np.testing.assert_allclose(layer_terms[3].dE_dy, terms.delta2, rtol=1e-12)
    np.testing.assert_allclose(layer_terms[1].dE_dy, terms.dE_dH1, rtol=1e-12)
    np.testing.assert_allclose(layer_terms[0].dE_dy, terms.delta1, rtol=1e-12)
    np.testing.assert_allclose(layer_terms[1].dE_dx, terms.dE_dH1 * ops.sigmoid_derivative(layer_terms[1].y))


def test_precision_is_refused_for_a_network():
    params, x, y = _problem(LENET, 1)
    with pytest.raises(ValueError, match="precision: a Network's layers carry their own precision"):
        jaxbp.compare_grads(params, x, y, LENET, precision="highest")


def test_the_slides_api_takes_a_network():
    params, x, y = _problem(LENET, 3)
    np.testing.assert_allclose(jaxbp.loss(params, x, y, LENET), LENET.loss_value(params, x, y), rtol=1e-12)
    np.testing.assert_allclose(jaxbp.forward(params, x, LENET), LENET.forward(params, x), rtol=1e-12)
    per_example = jaxbp.per_example_manual_grads(params, x, y, LENET)
    assert jax.tree.leaves(per_example)[0].shape[0] == 3
    fresh = jaxbp.init_params(jax.random.key(0), LENET, jnp.float64)
    assert jax.tree.structure(fresh) == jax.tree.structure(params)
    with pytest.raises(TypeError, match="spec must be a ConvNetSpec or a jaxbp.Network, got dict"):
        jaxbp.init_params(jax.random.key(0), {})
