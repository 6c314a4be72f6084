"""Training: the slides' update rule as an optax transformation, and the jitted update step."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Union

import jax
import optax
from jax.sharding import Mesh

from jaxbp import batched
from jaxbp import formulations
from jaxbp import model
from jaxbp import network as network_module
from jaxbp.compile_options import OptionsJit
from jaxbp.compile_options import compiler_options as default_compiler_options
from jaxbp.model import batch_mean
from jaxbp.model import check_inputs
from jaxbp.network import Network
from jaxbp.parallel import check_mesh
from jaxbp.parallel import data_parallel_mean
from jaxbp.params import Params
from jaxbp.spec import ConvNetSpec

GradsFn = Callable[[Params, jax.Array, jax.Array, ConvNetSpec], tuple[jax.Array, Params]]
GRADS = ("autodiff", "manual")
# Batch (mean E, mean grads) used by the step: the manual one as contractions over the batch
# (jaxbp.batched); the autodiff one as jax.grad of the batch-mean loss, which is faster than
# vmapping the per-example jax.grad (experiments/bench.py measures both).
BATCH_GRADS = {"manual": batched.value_and_grads, "autodiff": jax.value_and_grad(model.loss)}
# The same for any stack of layers (`jaxbp.Network`): the layers' VJPs over the batch (sums over
# examples as contractions), and jax.grad of the network's batch-mean loss.
NETWORK_BATCH_GRADS = {
    "manual": network_module.batch_value_and_manual_grads,
    "autodiff": jax.value_and_grad(lambda params, x, y, net: net.loss_value(params, x, y)),
}


def sgd(learning_rate: Union[float, optax.Schedule]) -> optax.GradientTransformation:
    r"""The slides' update, :math:`w \leftarrow w - \alpha\, dE/dw`, as an optax transformation.

    Args:
      learning_rate: alpha, a float or an optax schedule of the step count.

    Returns:
      An `optax.GradientTransformation`; its update is ``-alpha * g`` (apply with
      `optax.apply_updates`). Equal to `optax.sgd(alpha)`, written out to show the rule.
    """
    if not callable(learning_rate) and not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}")

    def init(params):
        del params
        return optax.ScaleByScheduleState(count=jax.numpy.zeros([], jax.numpy.int32))

    def update(grads, state, params=None):
        del params
        alpha = learning_rate(state.count) if callable(learning_rate) else learning_rate
        updates = jax.tree.map(lambda g: -alpha * g, grads)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def make_update_step(
    spec: ConvNetSpec | Network,
    optimizer: optax.GradientTransformation,
    *,
    grads: Union[str, GradsFn] = "manual",
    mesh: Mesh | None = None,
    batch_axis: str | None = None,
    compiler_options: dict[str, object] | None = None,
    formulation: formulations.Formulation | None = None,
):
    """Build the jitted update step for the slides' network `spec`, or any layer `Network`.

    The step computes the batch's mean loss and mean gradient, then applies `optimizer`; all of
    it is one `jax.jit`, compiled once per input shape and dtype. "manual" computes the means
    with `jaxbp.batched` (the slides' formulas with the batch as a contraction axis), "autodiff"
    with jax.grad of the batch-mean loss; a callable is per example and is batched by `jax.vmap`
    and averaged. For a `Network`, "manual" is `network.batch_value_and_manual_grads` (each
    layer's VJP over the whole batch, the 1/N applied once), "autodiff" jax.grad of its batch-mean
    loss.

    With a `mesh`, the batch is split over the devices along `batch_axis`, params and optimizer
    state are replicated, each device computes the means of its shard, and `lax.pmean` averages
    them (`jaxbp.parallel`): the same update as on one device, up to the order of float sums.

    Args:
      spec: the network: a `ConvNetSpec` (the slides') or a `jaxbp.Network` (params its tuple).
      optimizer: any optax transformation (`jaxbp.sgd` for the slides' rule).
      grads: "manual" (the slides' backward), "autodiff" (jax.grad), or a per-example function
        ``(params, x, y, spec) -> (E, Params)`` of your own.
      mesh: None (one device) or a `jax.sharding.Mesh` to split the batch over.
      batch_axis: the mesh axis the batch is split along; None for the mesh's first axis.
      compiler_options: XLA options for compiling the step (`jax.jit`'s ``compiler_options``).
        None takes `jaxbp.compiler_options()` for the step's backend (on the CPU, Eigen's
        convolutions instead of YNNPACK's, `jaxbp.compile_options`), for "manual" and
        "autodiff" alike; a dict replaces them: ``{}`` for XLA's own defaults, or e.g.
        ``{**jaxbp.compiler_options(), "xla_cpu_multi_thread_eigen": False}`` to add one
        (meant to make Eigen single-threaded; jaxlib 0.10.2 does not act on it: a 1024^3
        matmul ran at the same speed with it, experiments/results/bench_filter_grad.md).
      formulation: with grads="manual" and a `ConvNetSpec`, the `jaxbp.Formulation` of
        `jaxbp.batched.value_and_grads` (how the two convolutions are computed, in what chunks);
        None lets `choose_formulation` pick it per batch size (with a mesh, per device's share
        of the batch, which is also what a given chunk divides). Its chunks were tuned on one
        CPU and were not the fastest on another (experiments/PERFORMANCE.md, "On a second CPU"):
        ``jaxbp.tune_formulation(spec, n).best`` is the fastest of a few candidates timed on
        this machine (n per device under a mesh). A ValueError for other grads or a `Network`,
        a TypeError for anything but a `jaxbp.Formulation`.

    Returns:
      ``step(params, opt_state, x, y) -> (params, opt_state, E)`` with x (N, H, W, C), y (N, n_out)
      and E the batch's mean loss at the params before the update. Called at the top level it is
      one `jax.jit` with `compiler_options`; called inside another transformation (your own
      `jax.jit`, `lax.scan` over steps, ...) it is inlined into that program, which XLA compiles
      with the outer jit's options (pass it ``jaxbp.compiler_options()``; `jaxbp.OptionsJit`).
      With a mesh, N must be a multiple of the number of devices along `batch_axis` (else a
      ValueError while tracing).
    """
    if isinstance(spec, Network):
        batch_grads, check = NETWORK_BATCH_GRADS, spec.check_inputs
    elif isinstance(spec, ConvNetSpec):
        batch_grads, check = BATCH_GRADS, lambda params, x, y: check_inputs(params, x, y, spec)
    else:
        raise TypeError(f"spec must be a ConvNetSpec or a jaxbp.Network, got {type(spec).__name__}")
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}")
    if isinstance(grads, str):
        if grads not in GRADS:
            raise ValueError(f"grads must be one of {sorted(GRADS)} or a callable, got {grads!r}")
        value_and_grads = batch_grads[grads]
    elif callable(grads):
        value_and_grads = batch_mean(grads)
    else:
        raise TypeError(f"grads must be one of {sorted(GRADS)} or a callable, got {grads!r}")
    if formulation is not None:
        if grads != "manual" or not isinstance(spec, ConvNetSpec):
            raise ValueError(
                "formulation only applies to grads='manual' with a ConvNetSpec (jaxbp.batched); "
                f"got grads={grads!r} and a {type(spec).__name__}"
            )
        value_and_grads = functools.partial(
            batched.value_and_grads, formulation=formulations.check_formulation(formulation)
        )
    mean_fn = lambda params, x, y: value_and_grads(params, x, y, spec)  # noqa: E731
    if mesh is not None:
        mean_fn = data_parallel_mean(mean_fn, mesh, check_mesh(mesh, batch_axis))
    elif batch_axis is not None:
        raise ValueError(f"batch_axis is only used with a mesh; got batch_axis={batch_axis!r} and no mesh")

    if compiler_options is None:
        compiler_options = default_compiler_options(None if mesh is None else mesh.devices.flat[0].platform)
    elif not (isinstance(compiler_options, dict) and all(isinstance(k, str) for k in compiler_options)):
        raise TypeError(f"compiler_options must be None or a dict with str keys, got {compiler_options!r}")

    def step(params: Params, opt_state, x: jax.Array, y: jax.Array):
        x, y, is_batch = check(params, x, y)
        if not is_batch:
            raise ValueError(f"x must be a batch (N, *{spec.in_shape}), got {x.shape}")
        E, g = mean_fn(params, x, y)
        updates, opt_state = optimizer.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, E

    return OptionsJit(step, compiler_options)
