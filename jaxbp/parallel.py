r"""Data parallelism over a device mesh: the batch split along one mesh axis, params replicated.

A batch mean over N examples split into P equal shards of N/P is the mean of the P shard means:

.. math:: \frac1N \sum_{n} g_n = \frac1P \sum_{p} \Big(\frac{P}{N} \sum_{n \in p} g_n\Big)

so each device computes the (loss, gradient) means of its shard with any batch-level function,
and one `lax.pmean` over the mesh axis gives every device the full-batch means, which is the
update of the single-device step, whether `fn` computes its gradients by hand or by jax.grad.
Nothing here knows about the network: it wraps any
``fn(params, x, y) -> pytree of means``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec


def check_mesh(mesh, batch_axis: str | None) -> str:
    """Validate `mesh` and return the name of the axis the batch is split along.

    Args:
      mesh: a `jax.sharding.Mesh`.
      batch_axis: one of ``mesh.axis_names``, or None for the first.

    Raises:
      TypeError: if mesh is not a Mesh.
      ValueError: if batch_axis is not an axis of the mesh.
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if batch_axis is None:
        return mesh.axis_names[0]
    if batch_axis not in mesh.axis_names:
        raise ValueError(f"batch_axis must be one of the mesh axes {mesh.axis_names}, got {batch_axis!r}")
    return batch_axis


def check_batch_divides(n: int, mesh: Mesh, batch_axis: str) -> None:
    """Raise ValueError unless the batch size `n` splits evenly over the mesh axis."""
    devices = mesh.shape[batch_axis]
    if n % devices:
        raise ValueError(
            f"x: the batch size ({n}) must be divisible by the number of devices along mesh axis "
            f"{batch_axis!r} ({devices}); got a remainder of {n % devices}. Drop or pad the last "
            f"{n % devices} examples, or use a batch size that is a multiple of {devices}."
        )


def data_parallel_mean(
    fn: Callable[[object, jax.Array, jax.Array], object], mesh: Mesh, batch_axis: str
) -> Callable[[object, jax.Array, jax.Array], object]:
    """Wrap ``fn(params, x, y) -> means`` to run on `mesh`: x and y split, params replicated.

    Each device applies `fn` to its shard of x and y (leading axis split along `batch_axis`,
    replicated along any other axis); the results are averaged over `batch_axis` with
    `lax.pmean` and come back replicated. Call it under `jax.jit`.
    """
    batch = PartitionSpec(batch_axis)

    def shard_fn(params, x, y):
        # Mark the replicated params as varying over the batch axis: then a gradient that `fn`
        # takes by jax.grad is this shard's own (under shard_map, the cotangent of a replicated
        # input is otherwise summed over devices already), and one pmean makes it the batch mean.
        params = lax.pcast(params, batch_axis, to="varying")
        return lax.pmean(fn(params, x, y), batch_axis)

    sharded = jax.shard_map(
        shard_fn, mesh=mesh, in_specs=(PartitionSpec(), batch, batch), out_specs=PartitionSpec()
    )

    def mean_fn(params, x, y):
        check_batch_divides(x.shape[0], mesh, batch_axis)
        return sharded(params, x, y)

    return mean_fn
