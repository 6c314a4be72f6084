"""Per-example gradients that write into the arrays of the call before, chunk by chunk.

A per-example gradient is big: dE/dW alone is N x D x n_out numbers (222 MB at batch 256 of
28x28x1 with 3x3 filters and 32 of them). Each call of a jitted function gets fresh memory for
its output and for its temporaries, and on Linux memory that glibc's malloc takes from the
kernel (every block over 32 MiB) starts unmapped: the first write to each 4 KiB page is a page
fault, in which the kernel maps and zeroes the page. On the 2-core VM jaxbp was measured on
(experiments/results/bench_per_example_reuse.md) writing that 222 MB array took 122 ms fresh
and 18.4 ms into the array of the call before, 54081 page faults a call against none: about
1.9 us a fault. The ``per_ex_dW_write`` floor of ``experiments/bench.py`` timed those faults:
dE/dW written fresh took 0.08-6.39x the batch gradient there, into the last call's array
0.08-0.98x.

So `make_per_example_grads` jits the per-example gradients with their output donated: pass the
previous call's result as ``out`` and XLA writes the new gradients into its memory, which is
already mapped. And where the whole batch's temporaries would be fresh pages too it computes
the gradients in chunks of examples (`per_example_chunk`), each written into its rows of
``out``, so that the temporaries stay a few MB, reused chunk after chunk (at that point 73 MB
of temporaries, 17.7 thousand faults a call, whole). Together: 1.9-3.7x faster than fresh
with 8 or 32 filters at batch 256 and 1024 in that file; at the other 20 points 0.89-2.71x
(median 1.01x: the outputs and temporaries of most are under 32 MiB, reused either way).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Union

import jax
import jax.numpy as jnp
from jax import lax

from jaxbp import formulations
from jaxbp import model
from jaxbp.backward import per_example_manual_grads
from jaxbp.compile_options import compiler_options as default_compiler_options
from jaxbp.network import Network
from jaxbp.spec import ConvNetSpec

GRADS = ("manual", "autodiff")


def per_example_fn(spec: ConvNetSpec | Network, grads: str) -> Callable:
    """``fn(params, x, y)``: the per-example gradients of a batch, each leaf with a leading N.

    "manual" is `jaxbp.per_example_manual_grads`; "autodiff" is `jax.vmap` of `jax.grad` of the
    per-example loss (the baseline it is checked and timed against).
    """
    if grads not in GRADS:
        raise ValueError(f"grads must be one of {GRADS}, got {grads!r}")
    if grads == "manual":
        return lambda params, x, y: per_example_manual_grads(params, x, y, spec)
    if isinstance(spec, Network):
        return jax.vmap(jax.grad(spec.loss_example), in_axes=(None, 0, 0))
    grad_example = jax.grad(model.loss_example)
    return jax.vmap(lambda params, x, y: grad_example(params, x, y, spec), in_axes=(None, 0, 0))


# glibc's largest threshold for serving an allocation by mmap (32 MiB on 64-bit Linux): freed
# blocks up to it are kept and reused, larger ones go back to the kernel, so temporaries past it
# are fresh pages on every call.
FRESH_PAGES_FROM = 32 * 2**20


def per_example_chunk(spec: ConvNetSpec | Network, batch: int, itemsize: int = 4) -> int | None:
    """Examples per chunk for the slides' network on the CPU: `jaxbp.formulations.working_set_chunk`'s
    (about 16 MB of temporaries) where the whole batch's would pass `FRESH_PAGES_FROM`
    (`jaxbp.formulations.temporaries_per_example`), except after the taps forward (one filter on few
    channels); else None, the whole batch. None for a `Network` and off the CPU.

    Measured with the output reused (experiments/results/bench_per_example_reuse.md, AMD EPYC):
    with 8 or 32 filters at batch 256 and 1024 the estimate passes 32 MiB at 14 of the 16
    points; there the chunks took 0.52-0.76x the whole batch's time at 13, whose whole batch
    cost 7.7-111 thousand page faults a call (the chunks' none), and 1.07x at the 14th (the
    Toeplitz form at batch 256, 32x32x3, 5x5: its temporaries are smaller than estimated, no
    faults whole). At the two under it (22 and 28 MiB) the chunks took 1.18x and 1.26x. After
    the taps forward the whole batch's temporaries are small (no faults at any of the 12
    one-filter points), and the chunks took 1.63x and 1.98x the whole batch's time at batch 256
    and 1024 of 28x28x1 with 3x3 (1.28x and 1.17x with 5x5, 0.92-1.09x on 32x32x3).
    """
    if isinstance(spec, Network) or jax.default_backend() != "cpu":
        return None
    if formulations.per_example_formulation(spec, batch, itemsize=itemsize).forward == "taps":
        return None
    if batch * formulations.temporaries_per_example(spec, itemsize) <= FRESH_PAGES_FROM:
        return None
    return formulations.working_set_chunk(spec, batch, itemsize=itemsize)


def grads_into(fn: Callable, params, x: jax.Array, y: jax.Array, out, chunk: int | None):
    """``fn(params, x, y)`` written into `out` (a pytree of the same shapes), `chunk` examples at a
    time (None: the whole batch at once, `out` unused but for its memory). Pure: under `jax.jit`
    with `out` donated the result is written where `out` was; without donation the chunks' loop
    copies `out` first."""
    n = x.shape[0]
    if chunk is None or chunk >= n:
        return fn(params, x, y)  # donated, out's memory holds the result (same shapes)

    def write(out, start, size):
        g = fn(params, lax.dynamic_slice_in_dim(x, start, size), lax.dynamic_slice_in_dim(y, start, size))
        return jax.tree.map(lambda o, a: lax.dynamic_update_slice_in_dim(o, a, start, 0), out, g)

    whole = n // chunk
    out = lax.fori_loop(0, whole, lambda i, out: write(out, i * chunk, chunk), out)
    if whole * chunk < n:  # the remainder, n not a multiple of chunk
        out = write(out, whole * chunk, n - whole * chunk)
    return out


def check_out(out, expected) -> None:
    """A ValueError naming ``out`` unless it has `expected`'s structure, shapes and dtypes."""
    if jax.tree.structure(out) != jax.tree.structure(expected):
        raise ValueError(
            f"out must be the per-example gradients of an earlier call, structured "
            f"{jax.tree.structure(expected)}, got {jax.tree.structure(out)}"
        )
    for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(expected)):
        if (got.shape, got.dtype) != (want.shape, want.dtype):
            raise ValueError(
                f"out must hold this batch's per-example gradients: a leaf of shape {want.shape} and "
                f"dtype {want.dtype}, got {got.shape} and {got.dtype}"
            )


class PerExampleGrads:
    """``fn(params, x, y, out=None)``: jitted per-example gradients, written into ``out``.

    Made by `make_per_example_grads`. ``into(params, x, y, out)`` is the pure function behind it
    (to call inside your own jit), ``jitted`` its `jax.jit` with ``out`` donated. ``out``, when
    given, is consumed: its arrays are donated and deleted by the call, and the result lives in
    their memory (using them afterwards raises JAX's "Array has been deleted"; passing them as
    ``out`` again, a ValueError). Pass the result of the call before, once you are done with it::

        per_example = jaxbp.make_per_example_grads(spec)
        g = None
        for x, y in batches:
            g = per_example(params, x, y, out=g)  # the previous g's memory, reused
    """

    def __init__(
        self,
        spec: ConvNetSpec | Network,
        fn: Callable,
        chunk: Union[int, None, str],
        options: dict[str, object],
    ):
        self.spec, self.fn, self.chunk = spec, fn, chunk
        self._shapes = jax.jit(fn).eval_shape  # cached per signature: 0.1 ms a call, not a trace

        def into(params, x, y, out):
            check_out(out, self._shapes(params, x, y))  # at trace time: shapes are static
            return grads_into(fn, params, x, y, out, self.chunk_for(x))

        self.into = into
        self.jitted = jax.jit(into, donate_argnums=3, keep_unused=True, compiler_options=options)

    def chunk_for(self, x: jax.Array) -> int | None:
        """The examples per chunk for batch `x` (None: all at once)."""
        if self.chunk == "auto":
            return per_example_chunk(self.spec, x.shape[0], x.dtype.itemsize)
        return self.chunk

    def __call__(self, params, x, y, out=None):
        if out is None:  # fresh zeros (their pages faulted in once), the shapes from a cached trace
            out = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self._shapes(params, x, y))
        elif any(isinstance(a, jax.Array) and a.is_deleted() for a in jax.tree.leaves(out)):
            raise ValueError(
                "out was consumed by an earlier call (its arrays were donated): pass that call's "
                "result instead, or None for fresh arrays"
            )
        return self.jitted(params, x, y, out)


def make_per_example_grads(
    spec: ConvNetSpec | Network,
    *,
    grads: str = "manual",
    chunk: Union[int, None, str] = "auto",
    compiler_options: dict[str, object] | None = None,
) -> PerExampleGrads:
    """Jitted per-example gradients of a batch that reuse the memory of the call before.

    Args:
      spec: the network: a `ConvNetSpec` or a `jaxbp.Network`.
      grads: "manual" (`jaxbp.per_example_manual_grads`) or "autodiff" (vmap of jax.grad).
      chunk: examples per chunk: "auto" for `per_example_chunk`'s, None for the whole batch at
        once, or a positive int.
      compiler_options: XLA options; None takes `jaxbp.compiler_options()`.

    Returns:
      a `PerExampleGrads`: ``fn(params, x, y, out=None) -> grads``, each leaf of grads with a
      leading axis N; ``out``, a result of an earlier call with the same shapes, is donated.
    """
    if not isinstance(spec, (ConvNetSpec, Network)):
        raise TypeError(f"spec must be a jaxbp.ConvNetSpec or jaxbp.Network, got {type(spec).__name__}")
    if isinstance(chunk, numbers.Integral) and not isinstance(chunk, bool) and chunk >= 1:
        chunk = int(chunk)
    elif not (chunk is None or (isinstance(chunk, str) and chunk == "auto")):
        raise ValueError(f'chunk must be "auto", None or a positive int, got {chunk!r}')
    options = default_compiler_options() if compiler_options is None else dict(compiler_options)
    return PerExampleGrads(spec, per_example_fn(spec, grads), chunk, options)
