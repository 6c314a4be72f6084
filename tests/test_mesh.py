"""make_update_step on a device mesh: 4 CPU devices (a subprocess with XLA_FLAGS) vs one device."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, optax
    jax.config.update("jax_enable_x64", True)
    import jaxbp
    from jax.sharding import Mesh
    assert len(jax.devices()) == 4, jax.devices()

    spec = jaxbp.ConvNetSpec(in_shape=(10, 9, 2), n_filters=3, kernel_size=3, stride=(2, 1), n_out=2)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    mesh2d = Mesh(np.array(jax.devices()).reshape(2, 2), ("model", "data"))
    rng = np.random.default_rng(0)
    for dtype, rtol in ((jnp.float64, 1e-12), (jnp.float32, TOL32)):
        params0 = jaxbp.init_params(jax.random.key(0), spec, dtype)
        for grads in ("manual", "autodiff"):
            opt = optax.adam(1e-2)
            single = jaxbp.make_update_step(spec, opt, grads=grads)
            runs = [(single, params0, opt.init(params0))]
            for m, axis in ((mesh, None), (mesh2d, "data")):
                runs.append((jaxbp.make_update_step(spec, opt, grads=grads, mesh=m, batch_axis=axis),
                             params0, opt.init(params0)))
            for t in range(5):
                x = jnp.asarray(rng.normal(size=(8, 10, 9, 2)), dtype)
                y = jnp.asarray(rng.uniform(size=(8, 2)), dtype)
                runs = [(s, *s(p, o, x, y)[:2]) for s, p, o in runs]
            ref = runs[0][1]
            for _, p, _ in runs[1:]:
                for a, b in zip(p, ref):
                    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(jnp.abs(b).max()))
                    assert a.dtype == dtype
            assert float(jnp.abs(ref.f - params0.f).max()) > 1e-3  # the params did move
    # shards of 130 examples: more than one chunk (jaxbp.batched runs a loop over chunks of
    # 128 and then the remainder of 2), whose carry must vary over the mesh axis as the sums do.
    # Measured: one step's params differ from one device's by at most 3.3e-16 of the largest
    # entry; the 1e-12 of the float64 runs above holds.
    assert jaxbp.formulations.choose_formulation(spec, 130, itemsize=8).chunk == 128
    params0 = jaxbp.init_params(jax.random.key(2), spec, jnp.float64)
    xb = jnp.asarray(rng.normal(size=(4 * 130, 10, 9, 2)))
    yb = jnp.asarray(rng.uniform(size=(4 * 130, 2)))
    for grads in ("manual", "autodiff"):
        opt = jaxbp.sgd(0.5)
        new = [jaxbp.make_update_step(spec, opt, grads=grads, mesh=m)(params0, opt.init(params0), xb, yb)[0]
               for m in (None, mesh)]
        for a, b in zip(new[1], new[0]):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * float(jnp.abs(b).max()))
        assert float(jnp.abs(new[0].f - params0.f).max()) > 1e-4
    # any layer Network: the same data-parallel step
    net = jaxbp.lenet5((8, 8, 1), 4, pooling="max")
    params0 = net.init(jax.random.key(1), jnp.float64)
    opt = optax.adam(1e-2)
    runs = [(jaxbp.make_update_step(net, opt, mesh=m), params0, opt.init(params0)) for m in (None, mesh)]
    for t in range(3):
        x = jnp.asarray(rng.normal(size=(8, 8, 8, 1)))
        y = jax.nn.one_hot(rng.integers(0, 4, 8), 4, dtype=jnp.float64)
        runs = [(s, *s(p, o, x, y)[:2]) for s, p, o in runs]
    for a, b in zip(jax.tree.leaves(runs[1][1]), jax.tree.leaves(runs[0][1])):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * float(jnp.abs(b).max()))
    step = jaxbp.make_update_step(spec, jaxbp.sgd(0.1), mesh=mesh)
    params = jaxbp.init_params(jax.random.key(0), spec)
    try:
        x6, y6 = jnp.zeros((6, 10, 9, 2), jnp.float32), jnp.zeros((6, 2), jnp.float32)
        step(params, jaxbp.sgd(0.1).init(params), x6, y6)
    except ValueError as err:
        print("ERROR:", err)
    print("OK")
    """
)

# Measured: after 5 Adam steps, float32 params on 4 devices differ from one device by at most
# ~3e-7 relative (the pmean sums the 4 shard means in another order); tolerance 1e-5 (30x).
TOL32 = 1e-5


def test_mesh_step_equals_single_device_and_rejects_uneven_batch():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT.replace("TOL32", repr(TOL32))], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout
    error = next(line for line in out.stdout.splitlines() if line.startswith("ERROR:"))
    assert "batch size (6)" in error and "'data'" in error and "(4)" in error


def test_mesh_argument_errors():
    import jax

    import jaxbp

    spec = jaxbp.ConvNetSpec(in_shape=(6, 6, 1), n_filters=2, kernel_size=3, n_out=2)
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        jaxbp.make_update_step(spec, jaxbp.sgd(0.1), mesh="data")
    mesh = jax.sharding.Mesh(jax.devices()[:1], ("data",))
    with pytest.raises(ValueError, match="batch_axis must be one of"):
        jaxbp.make_update_step(spec, jaxbp.sgd(0.1), mesh=mesh, batch_axis="model")
    with pytest.raises(ValueError, match="only used with a mesh"):
        jaxbp.make_update_step(spec, jaxbp.sgd(0.1), batch_axis="data")
