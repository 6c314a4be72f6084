"""The jitted, vmapped update step: the slides' rule, optax, compile-once, and that it learns."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from strategies import problem

import jaxbp

SPEC = jaxbp.ConvNetSpec(in_shape=(10, 9, 2), n_filters=3, kernel_size=(3, 3), stride=(2, 1), n_out=2)


@pytest.mark.parametrize("grads", ["manual", "autodiff"])
def test_sgd_step_is_the_slides_update_by_hand(grads):
    params, x, y = problem(SPEC, 0, 4)
    alpha = 0.3
    opt = jaxbp.sgd(alpha)
    new, _, E = jaxbp.make_update_step(SPEC, opt, grads=grads)(params, opt.init(params), x, y)
    g = jaxbp.manual_grads(params, x, y, SPEC)
    # w = w - alpha dE/dw, for W, b and f
    np.testing.assert_allclose(new.W, params.W - alpha * g.W, rtol=1e-12)
    np.testing.assert_allclose(new.b, params.b - alpha * g.b, rtol=1e-12)
    np.testing.assert_allclose(new.f, params.f - alpha * g.f, rtol=1e-12)
    np.testing.assert_allclose(E, jaxbp.loss(params, x, y, SPEC), rtol=1e-12)


def test_jaxbp_sgd_equals_optax_sgd_over_steps_and_schedules():
    params, x, y = problem(SPEC, 1, 4)
    schedule = optax.exponential_decay(0.5, transition_steps=1, decay_rate=0.5)
    for ours, theirs in [(jaxbp.sgd(0.2), optax.sgd(0.2)), (jaxbp.sgd(schedule), optax.sgd(schedule))]:
        p1, s1, p2, s2 = params, ours.init(params), params, theirs.init(params)
        step1 = jaxbp.make_update_step(SPEC, ours)
        step2 = jaxbp.make_update_step(SPEC, theirs)
        for _ in range(3):
            p1, s1, _ = step1(p1, s1, x, y)
            p2, s2, _ = step2(p2, s2, x, y)
        chex.assert_trees_all_close(p1, p2, rtol=1e-12)


def test_any_optax_optimizer_and_custom_grads():
    params, x, y = problem(SPEC, 2, 4)
    opt = optax.adam(1e-2)
    manual = jaxbp.make_update_step(SPEC, opt, grads="manual")
    autodiff = jaxbp.make_update_step(SPEC, opt, grads="autodiff")
    custom = jaxbp.make_update_step(SPEC, opt, grads=jaxbp.backward.value_and_manual_grads_example)
    outs = [fn(params, opt.init(params), x, y) for fn in (manual, autodiff, custom)]
    chex.assert_trees_all_close(outs[0], outs[1], rtol=1e-10)
    chex.assert_trees_all_close(outs[0], outs[2], rtol=1e-12)


def test_compiler_options_reach_xla_and_keep_the_update():
    params, x, y = problem(SPEC, 4, 5)
    opt = jaxbp.sgd(0.1)
    default = jaxbp.make_update_step(SPEC, opt)(params, opt.init(params), x, y)
    options = {"xla_cpu_multi_thread_eigen": False}
    single = jaxbp.make_update_step(SPEC, opt, compiler_options=options)(params, opt.init(params), x, y)
    chex.assert_trees_all_close(single, default, rtol=1e-12)
    # An option XLA does not know is refused by XLA, so the dict does reach the compiler.
    step = jaxbp.make_update_step(SPEC, opt, compiler_options={"xla_no_such_option": True})
    with pytest.raises(Exception, match="xla_no_such_option"):
        step(params, opt.init(params), x, y)
    with pytest.raises(TypeError, match="compiler_options must be None or a dict"):
        jaxbp.make_update_step(SPEC, opt, compiler_options=[("xla_cpu_multi_thread_eigen", False)])


def test_step_compiles_once_per_input_shape():
    params, x, y = problem(SPEC, 3, 6)
    traces = []

    def counting_grads(p, xi, yi, spec):  # Python side effects run only while tracing
        traces.append(xi.shape)
        return jaxbp.backward.value_and_manual_grads_example(p, xi, yi, spec)

    opt = jaxbp.sgd(0.1)
    step = jaxbp.make_update_step(SPEC, opt, grads=counting_grads)
    state = opt.init(params)
    for _ in range(4):
        params, state, _ = step(params, state, x, y)
    assert len(traces) == 1 and step._cache_size() == 1
    for _ in range(3):
        params, state, _ = step(params, state, x[:3], y[:3])  # a new batch size: one more trace
    assert len(traces) == 2 and step._cache_size() == 2


def test_training_lowers_the_loss_float32():
    # a small learnable task: the label is whether the image's left half is brighter
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 10, 9, 2)).astype(np.float32)
    label = (x[:, :, :4].mean(axis=(1, 2, 3)) > x[:, :, 5:].mean(axis=(1, 2, 3))).astype(np.float32)
    y = np.stack([label, 1 - label], axis=1)
    params = jaxbp.init_params(jax.random.key(0), SPEC, jnp.float32)
    opt = jaxbp.sgd(2.0)
    step = jaxbp.make_update_step(SPEC, opt)
    state = opt.init(params)
    losses = []
    for _ in range(60):
        params, state, E = step(params, state, jnp.asarray(x), jnp.asarray(y))
        losses.append(float(E))
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    assert all(np.isfinite(losses))


def test_init_params_is_deterministic_and_fan_in_scaled():
    spec = jaxbp.ConvNetSpec(in_shape=(28, 28, 1), n_filters=16, kernel_size=(5, 5), n_out=10)
    a = jaxbp.init_params(jax.random.key(7), spec)
    b = jaxbp.init_params(jax.random.key(7), spec)
    chex.assert_trees_all_equal(a, b)
    assert not np.allclose(a.f, jaxbp.init_params(jax.random.key(8), spec).f)
    # truncated-normal LeCun init: variance 1 / fan_in (measured within 20% on these sizes)
    np.testing.assert_allclose(np.var(a.f), 1 / 25, rtol=0.2)
    np.testing.assert_allclose(np.var(a.W), 1 / spec.n_hidden, rtol=0.2)
    assert np.all(a.b == 0) and a.f.dtype == jnp.float32


def test_forward_shapes():
    spec = jaxbp.ConvNetSpec(in_shape=(28, 28, 1), n_filters=8, kernel_size=(5, 5), n_out=10)
    params = jaxbp.init_params(jax.random.key(0), spec)
    x = jnp.zeros((5, 28, 28, 1), jnp.float32)
    assert jaxbp.forward(params, x[0], spec).shape == (10,)
    assert jaxbp.forward(params, x, spec).shape == (5, 10)
    assert jaxbp.loss(params, x, jnp.zeros((5, 10), jnp.float32), spec).shape == ()


def test_update_step_on_any_network_manual_equals_autodiff():
    network = jaxbp.lenet5((8, 8, 1), 10, pooling="max")
    rng = np.random.default_rng(0)
    params = network.init(jax.random.key(0), jnp.float64)
    x = jnp.asarray(rng.normal(size=(4, 8, 8, 1)))
    y = jax.nn.one_hot(jnp.arange(4), 10, dtype=jnp.float64)
    opt = optax.adam(1e-2)
    outs = []
    for grads in ("manual", "autodiff"):
        step = jaxbp.make_update_step(network, opt, grads=grads)
        p, s = params, opt.init(params)
        for _ in range(3):
            p, s, E = step(p, s, x, y)
        outs.append((p, E))
    # float64: the layer VJPs agree with jax.grad to ~1e-15 (tests/test_network.py); 1e-10 as ever
    chex.assert_trees_all_close(outs[0], outs[1], rtol=1e-10, atol=1e-13)
    assert float(outs[0][1]) < float(network.loss_value(params, x, y))
    with pytest.raises(ValueError, match=r"x must be a batch"):
        jaxbp.make_update_step(network, opt)(params, opt.init(params), x[0], y[0])


def test_formulation_reaches_the_manual_step_and_keeps_the_update():
    params, x, y = problem(SPEC, 2, 4)
    opt = jaxbp.sgd(0.3)
    state = opt.init(params)
    default = jaxbp.make_update_step(SPEC, opt)(params, state, x, y)
    # The default here is the Toeplitz form for both, whole: no scan, no conv. Chunks of 2 of the 4
    # examples run in one loop (a lax.fori_loop, a scan in the jaxpr: its trip count is static);
    # XLA's conv for both convolutions shows as two convs.
    forms = ((jaxbp.Formulation("patches", "patches", 2), 1, 0), (jaxbp.Formulation("conv", "conv"), 0, 2))
    for form, scans, convs in forms:
        step = jaxbp.make_update_step(SPEC, opt, formulation=form)
        jaxpr = str(jax.make_jaxpr(step)(params, state, x, y))
        assert (jaxpr.count("= scan["), jaxpr.count("conv_general_dilated[")) == (scans, convs)
        chex.assert_trees_all_close(step(params, state, x, y), default, rtol=1e-10, atol=1e-14)
    # With a mesh the formulation reaches each device's shard (here one device, the whole batch).
    mesh = jax.sharding.Mesh(jax.devices()[:1], ("data",))
    step = jaxbp.make_update_step(SPEC, opt, mesh=mesh, formulation=forms[0][0])
    assert str(jax.make_jaxpr(step)(params, state, x, y)).count("= scan[") == 1
    chex.assert_trees_all_close(step(params, state, x, y), default, rtol=1e-10, atol=1e-14)
    for bad, message in (
        ({"grads": "autodiff"}, "formulation only applies to grads='manual'"),
        ({"grads": jaxbp.manual_value_and_grads}, "formulation only applies to grads='manual'"),
        ({"formulation": ("patches", "patches")}, "formulation must be a jaxbp.Formulation"),
    ):
        kwargs = {"formulation": jaxbp.Formulation("patches", "patches"), **bad}
        with pytest.raises((ValueError, TypeError), match=message):
            jaxbp.make_update_step(SPEC, opt, **kwargs)
