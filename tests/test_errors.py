"""Bad input fails at once, also under jit, naming the argument, the expected and the given."""

import jax
import jax.numpy as jnp
import optax
import pytest
from strategies import problem

import jaxbp

SPEC = jaxbp.ConvNetSpec(in_shape=(8, 8, 1), n_filters=2, kernel_size=(3, 3), n_out=3)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(stride=(0, 1)), ValueError, r"stride must be >= 1.*\(0, 1\)"),
        (dict(dilation=0), ValueError, r"dilation must be >= 1.*\(0, 0\)"),
        (dict(padding="FULL"), ValueError, r"padding must be 'VALID', 'SAME'.*'FULL'"),
        (dict(padding=((1, 1),)), ValueError, r"padding must be"),
        (dict(padding=((1, -1), (0, 0))), ValueError, r"padding must be"),
        (dict(kernel_size=(9, 3)), ValueError, r"kernel_size: the dilated kernel .* height \(8\+0\+0 = 8\)"),
        (dict(kernel_size=(3, 3), dilation=(1, 4)), ValueError, r"dilated kernel \(3-1\)\*4\+1|2\*4\+1 = 9"),
        (dict(kernel_size=2.5), TypeError, r"kernel_size must be an int or a pair of ints"),
        (dict(in_shape=(8, 8)), ValueError, r"in_shape must be \(H, W, C\)"),
        (dict(n_filters=0), ValueError, r"n_filters must be a positive int, got 0"),
        (dict(n_out=-1), ValueError, r"n_out must be a positive int, got -1"),
    ],
)
def test_bad_spec(kwargs, error, match):
    base = dict(in_shape=(8, 8, 1), n_filters=2, kernel_size=(3, 3), n_out=3)
    with pytest.raises(error, match=match):
        jaxbp.ConvNetSpec(**{**base, **kwargs})


def test_spec_is_hashable_and_normalised():
    a = jaxbp.ConvNetSpec(in_shape=[8, 8, 1], n_filters=2, kernel_size=3, stride=1, padding="same", n_out=3)
    b = jaxbp.ConvNetSpec(in_shape=(8, 8, 1), n_filters=2, kernel_size=(3, 3), padding="SAME", n_out=3)
    assert a == b and hash(a) == hash(b)
    assert a.pads == ((1, 1), (1, 1)) and a.h1_shape == (8, 8, 2) and a.n_hidden == 128


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (
            lambda p, x, y: (p, x[0, 0], y),
            ValueError,
            r"x must have shape \(8, 8, 1\) or \(N, \*\(8, 8, 1\)\), got \(8, 1\)",
        ),
        (lambda p, x, y: (p, x[:, :7], y), ValueError, r"x must have shape .* got \(2, 7, 8, 1\)"),
        (
            lambda p, x, y: (p, x.astype(jnp.int32), y),
            TypeError,
            r"x must be a floating-point array, got dtype int32",
        ),
        (
            lambda p, x, y: (p, x.astype(jnp.float32), y),
            TypeError,
            r"x has dtype float32 but params have dtype float64",
        ),
        (
            lambda p, x, y: (p, x, y[:, :2]),
            ValueError,
            r"y must have shape \(2, 3\) to match x of shape \(2, 8, 8, 1\), got \(2, 2\)",
        ),
        (lambda p, x, y: (p, x, y[0]), ValueError, r"y must have shape \(2, 3\).* got \(3,\)"),
        (
            lambda p, x, y: (p._replace(W=p.W[:-1]), x, y),
            ValueError,
            r"params.W must have shape \(72, 3\) for this spec, got \(71, 3\)",
        ),
        (
            lambda p, x, y: (p._replace(f=p.f[..., :1]), x, y),
            ValueError,
            r"params.f must have shape \(3, 3, 1, 2\)",
        ),
        (lambda p, x, y: (tuple(p), x, y), TypeError, r"params must be a jaxbp.Params\(f, W, b\), got tuple"),
        (
            lambda p, x, y: (p._replace(b=p.b.astype(jnp.float32)), x, y),
            TypeError,
            r"params leaves must share one dtype",
        ),
    ],
)
def test_bad_inputs(mutate, error, match, jit):
    params, x, y = mutate(*problem(SPEC, 0, 2))
    fn = jax.jit(jaxbp.manual_grads, static_argnums=3) if jit else jaxbp.manual_grads
    with pytest.raises(error, match=match):
        fn(params, x, y, SPEC)


def test_bad_inputs_to_the_update_step():
    params, x, y = problem(SPEC, 0, 2)
    opt = jaxbp.sgd(0.1)
    step = jaxbp.make_update_step(SPEC, opt)
    with pytest.raises(ValueError, match=r"x must be a batch \(N, \*\(8, 8, 1\)\), got \(8, 8, 1\)"):
        step(params, opt.init(params), x[0], y[0])
    with pytest.raises(ValueError, match=r"y must have shape \(2, 3\)"):
        step(params, opt.init(params), x, y[:, :1])
    with pytest.raises(
        ValueError, match=r"grads must be one of \['autodiff', 'manual'\] or a callable, got 'numeric'"
    ):
        jaxbp.make_update_step(SPEC, opt, grads="numeric")
    with pytest.raises(TypeError, match=r"optimizer must be an optax.GradientTransformation, got float"):
        jaxbp.make_update_step(SPEC, 0.1)
    with pytest.raises(TypeError, match=r"spec must be a ConvNetSpec or a jaxbp.Network, got dict"):
        jaxbp.make_update_step({}, optax.sgd(0.1))
    with pytest.raises(ValueError, match=r"learning_rate must be > 0, got -1"):
        jaxbp.sgd(-1)


def test_init_params_rejects_integer_dtype():
    with pytest.raises(TypeError, match=r"dtype must be a floating dtype"):
        jaxbp.init_params(jax.random.key(0), SPEC, jnp.int32)
