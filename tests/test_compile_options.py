"""jaxbp.compiler_options: the XLA options of the jitted steps, used only where XLA accepts them."""

import chex
import jax
import jax.numpy as jnp
import jaxlib
from strategies import problem

import jaxbp
from jaxbp import compile_options

# The jaxlib the options were measured with (jaxbp/compile_options.py); later ones may differ.
MEASURED_JAXLIB = jaxlib.__version__.startswith("0.10.")
SPEC = jaxbp.ConvNetSpec(in_shape=(12, 11, 3), n_filters=2, kernel_size=(3, 3), n_out=3)


def conv_libraries(step, args) -> set[str]:
    """Which library runs the step's convolutions in the compiled HLO: "ynn" and/or "xla"."""
    lines = step.lower(*args).compile().as_text().splitlines()
    found = set()
    for line in lines:
        if "ynn_fusion" in line and ("conv" in line or "convolution" in line):
            found.add("ynn")
        if " convolution(" in line:
            found.add("xla")
    return found


def test_options_are_the_cpu_ones_where_xla_accepts_them():
    accepted = compile_options.accepts(tuple(compile_options.CPU_OPTIONS.items()), "cpu")
    if MEASURED_JAXLIB:
        assert accepted  # the jaxlib the options were measured with knows them
    assert jaxbp.compiler_options("cpu") == (compile_options.CPU_OPTIONS if accepted else {})
    assert jaxbp.compiler_options("gpu") == {} and jaxbp.compiler_options("tpu") == {}
    # A fresh dict each call: changing one changes nothing else.
    jaxbp.compiler_options("cpu")["xla_cpu_multi_thread_eigen"] = False
    assert "xla_cpu_multi_thread_eigen" not in jaxbp.compiler_options("cpu")


def test_an_option_xla_does_not_know_is_not_accepted():
    assert not compile_options.accepts((("xla_no_such_option", True),), "cpu")
    assert not compile_options.accepts((("xla_cpu_experimental_ynn_fusion_type", "NO_SUCH_TYPE"),), "cpu")


def test_step_compiles_with_them_and_an_empty_dict_gives_xlas_defaults():
    # A float32 point of the benchmark grid, only compiled: XLA hands larger convs to a library.
    spec = jaxbp.ConvNetSpec(in_shape=(32, 32, 3), n_filters=32, kernel_size=(5, 5), n_out=10)
    opt = jaxbp.sgd(0.1)
    params = jaxbp.init_params(jax.random.key(0), spec, dtype=jnp.float32)
    shapes = (
        params,
        opt.init(params),
        jax.ShapeDtypeStruct((256, 32, 32, 3), jnp.float32),
        jax.ShapeDtypeStruct((256, 10), jnp.float32),
    )
    ours = jaxbp.make_update_step(spec, opt, grads="autodiff")
    xlas = jaxbp.make_update_step(spec, opt, grads="autodiff", compiler_options={})
    if MEASURED_JAXLIB:
        # jaxlib 0.10's defaults give jax.grad's convs to YNNPACK; the options keep them XLA's.
        assert "ynn" in conv_libraries(xlas, shapes)
    if jaxbp.compiler_options():
        assert conv_libraries(ours, shapes) == {"xla"}


def test_the_update_is_the_same_with_and_without_them():
    params, x, y = problem(SPEC, 0, 4)
    opt = jaxbp.sgd(0.1)
    args = (params, opt.init(params), x, y)
    for grads in ("manual", "autodiff"):
        ours = jaxbp.make_update_step(SPEC, opt, grads=grads)(*args)
        xlas = jaxbp.make_update_step(SPEC, opt, grads=grads, compiler_options={})(*args)
        chex.assert_trees_all_close(ours, xlas, rtol=1e-12)


def test_the_step_runs_inside_jit_and_scan_with_the_same_update():
    # JAX refuses compiler options on a nested jit; the step then runs as a plain jit, inlined.
    params, x, y = problem(SPEC, 1, 4)
    opt = jaxbp.sgd(0.1)
    step = jaxbp.make_update_step(SPEC, opt)
    state = opt.init(params)
    top = step(step(params, state, x, y)[0], state, x, y)

    def two_steps(params, state):
        return jax.lax.scan(lambda c, _: (step(*c, x, y)[:2], None), (params, state), None, length=2)[0]

    for run in (jax.jit(two_steps), jax.jit(two_steps, compiler_options=jaxbp.compiler_options())):
        chex.assert_trees_all_close(run(params, state)[0], top[0], rtol=1e-12)
    assert step.lower(params, state, x, y).compile() is not None  # the top-level jit's API
