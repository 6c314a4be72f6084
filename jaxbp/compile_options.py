"""The XLA options jaxbp compiles its steps with: on the CPU, Eigen's convolutions, not YNNPACK's.

jaxlib 0.10's CPU backend hands larger convolutions, and some dots, to the YNNPACK library by
default (the experimental option ``xla_cpu_experimental_ynn_fusion_type``; the compiled HLO shows
them as ``ynn_fusion``). An empty list of fusion types keeps all of them in XLA's own Eigen
kernels. On the 2-core CPU jaxbp was measured on, float32, VALID, the convolutions were up to
10x slower in YNNPACK (a standalone timing, median of 7, one process; not committed):

* (256, 32, 32, 3) by (5, 5, 3, 32): 121 ms against 12.7;
* the same with one filter: 24.4 ms against 15.7;
* (256, 28, 28, 1) by (5, 5, 1, 8): 5.8 ms against 4.9.

Over the benchmark grid (experiments/results/bench_variants.md: batch 32-1024, 28x28x1 and
32x32x3, 3x3 and 5x5, 1-32 filters) jax.grad's step, mostly convolutions, ran 1.11-4.3x faster
with these options than with XLA's defaults (median 1.66x), and the manual step 0.88-1.97x
(median 1.20x; 0.88-0.99x at five points, within the machine's noise). The run before, before
dE/df's conv was split in parts, had 0.99-4.4x (median 1.76x) and 1.0-3.2x (median 1.40x); one
before the Toeplitz form had jax.grad's step 1.04-6.7x faster (median 2.5x).
`choose_formulation` is tuned with them, and both of `make_update_step`'s gradients ("manual"
and "autodiff") compile with them, so that each is compared at its best.

The option is experimental and may be renamed or dropped by a later jaxlib: it is used only where
the installed jaxlib accepts it (checked once, by compiling a one-op function with it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

# YNNPACK off: an empty list of fusion types, so XLA's CPU backend keeps its Eigen convolutions.
CPU_OPTIONS: dict[str, object] = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def accepts(options: tuple[tuple[str, object], ...], backend: str) -> bool:
    """Whether `backend`'s compiler accepts `options` ((name, value) pairs), by compiling x + 1."""
    try:
        x = jax.device_put(jnp.zeros((), jnp.float32), jax.devices(backend)[0])
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(x).compile()
    except (jax.errors.JaxRuntimeError, RuntimeError):  # an unknown option, or no such backend
        return False
    return True


def compiler_options(backend: str | None = None) -> dict[str, object]:
    """The XLA options jaxbp's jitted steps use on `backend` (None: `jax.default_backend()`).

    `CPU_OPTIONS` on the CPU where the installed jaxlib accepts them, else none. Pass them to your
    own `jax.jit` of jaxbp's functions, ``jax.jit(fn, compiler_options=jaxbp.compiler_options())``,
    to compile them as `make_update_step` does.

    Returns:
      a new dict (empty for no options).
    """
    backend = jax.default_backend() if backend is None else backend
    if backend == "cpu" and accepts(tuple(CPU_OPTIONS.items()), backend):
        return dict(CPU_OPTIONS)
    return {}


class OptionsJit:
    """`fn` jitted with XLA `options` where they can apply: called at the top level (concrete
    arguments), `jax.jit(fn, compiler_options=options)`; called inside another transformation
    (`jax.jit`, `lax.scan`, `jax.vmap`: some argument is a tracer), `jax.jit(fn)`, inlined into
    the caller's program, whose own options hold (JAX refuses options on a nested jit).

    Everything else (``lower``, ``trace``, ``eval_shape``, ...) is the top-level jitted function's.
    """

    def __init__(self, fn: Callable, options: dict[str, object]):
        self._top = jax.jit(fn, compiler_options=options)
        self._nested = jax.jit(fn) if options else self._top
        functools.update_wrapper(self, fn)

    def __call__(self, *args):
        if self._nested is self._top:  # no options: nothing to tell apart on this per-step path
            return self._top(*args)
        nested = any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(args))
        return (self._nested if nested else self._top)(*args)

    def __getattr__(self, name):
        return getattr(self._top, name)
