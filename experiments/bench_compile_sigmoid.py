"""Compile time of an elementwise sigmoid on the CPU, by the width of the array's minor axis.

XLA's CPU compiler (LLVM) took several times longer to compile `jax.nn.sigmoid` of a 2-D
float32 array whose minor axis holds 16 to 32 numbers than of any other width: the shapes that
the steps' Z1 has after a matmul forward (the Toeplitz form's jb K = 32 columns with 8 filters,
the patches' K = 32 with 32 filters). `jaxbp.batched.slide_terms` keeps its sigmoid on the
(N, D) view for that reason. This script compiles, for each width w, the sigmoid, tanh and exp
of a (numbers / w, w) array, each freshly jitted (no cache), and keeps the fastest of --repeats
compiles; then the batch gradient (`jaxbp.manual_value_and_grads`) at the points that have
such a Z1, with the sigmoid on (N, D) as shipped and on the product's shape (no barrier).
Writes experiments/results/<name>.json and .md.

    python experiments/bench_compile_sigmoid.py     # half a minute
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import cores_text  # noqa: E402
from bench import machine_info  # noqa: E402
from bench import script_command  # noqa: E402
from bench import write_results  # noqa: E402

WIDTHS = (4, 8, 10, 16, 24, 32, 40, 64, 128, 256)
# (batch, input, kernel, filters): the Toeplitz form with 8 filters (jb K = 32), the patches
# with 32 filters (K = 32), and the taps with one filter (no barrier, for reference).
POINTS = (
    (32, (28, 28, 1), 5, 8),
    (256, (28, 28, 1), 5, 8),
    (256, (32, 32, 3), 3, 32),
    (256, (28, 28, 1), 3, 1),
)


def compile_s(jax, fn, args, repeats: int, options: dict) -> float:
    """The fastest of `repeats` lower + compile of a fresh jit of fn (a new function each time:
    jit caches compiled programs by the function)."""
    best = float("inf")
    for _ in range(repeats):
        jitted = jax.jit(lambda *a: fn(*a), compiler_options=options)
        start = time.perf_counter()
        jitted.lower(*args).compile()
        best = min(best, time.perf_counter() - start)
    return best


def barriers(jax, fn, args) -> int:
    """How many optimization barriers the lowered fn(*args) holds: the check that the step is
    timed with and without the barrier, as labelled."""
    return jax.jit(lambda *a: fn(*a)).lower(*args).as_text().count("optimization_barrier")  # fresh: no cache


def main(argv=None) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--numbers", type=int, default=147456, help="elements of each array (default 147456)")
    parser.add_argument("--repeats", type=int, default=3, help="compiles per function; the fastest counts")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"), help="folder")
    parser.add_argument("--name", default="bench_compile_sigmoid", help="file stem of the outputs")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.numbers < 256:
        parser.error("--repeats must be >= 1 and --numbers >= 256")
    import jax
    import jax.numpy as jnp

    import jaxbp
    from jaxbp import batched
    from jaxbp import formulations

    options = jaxbp.compiler_options()
    ops = {"sigmoid": jax.nn.sigmoid, "tanh": jnp.tanh, "exp": jnp.exp}
    widths = []
    for w in WIDTHS:
        z = jnp.zeros((args.numbers // w, w), jnp.float32)
        widths.append(
            {"width": w, **{k: compile_s(jax, f, (z,), args.repeats, options) for k, f in ops.items()}}
        )
        print(f"width {w} done", file=sys.stderr, flush=True)

    steps = []
    for batch, in_shape, kernel, filters in POINTS:
        spec = jaxbp.ConvNetSpec(in_shape=in_shape, n_filters=filters, kernel_size=kernel, n_out=10)
        params = jaxbp.init_params(jax.random.key(0), spec)
        x = jnp.zeros((batch, *in_shape), jnp.float32)
        y = jnp.zeros((batch, 10), jnp.float32)
        grad = lambda p, x, y, spec=spec: batched.value_and_grads(p, x, y, spec)  # noqa: E731
        shipped = compile_s(jax, grad, (params, x, y), args.repeats, options)
        shipped_barriers = barriers(jax, grad, (params, x, y))
        barrier = jax.lax.optimization_barrier
        jax.lax.optimization_barrier = lambda v: v  # the sigmoid on the product's shape
        try:
            unbarred = compile_s(jax, grad, (params, x, y), args.repeats, options)
            unbarred_barriers = barriers(jax, grad, (params, x, y))
        finally:
            jax.lax.optimization_barrier = barrier
        autodiff_grad = lambda p, x, y, spec=spec: jaxbp.autodiff_value_and_grads(p, x, y, spec)  # noqa: E731
        autodiff = compile_s(jax, autodiff_grad, (params, x, y), args.repeats, options)
        form = formulations.choose_formulation(spec, batch)
        steps.append(
            {
                "point": {"batch": batch, "input": list(in_shape), "kernel": kernel, "filters": filters},
                "formulation": form.label(),
                "shipped_s": shipped,
                "shipped_barriers": shipped_barriers,
                "no_barrier_s": unbarred,
                "no_barrier_barriers": unbarred_barriers,
                "autodiff_s": autodiff,
            }
        )
        print(f"point {batch} {in_shape} {kernel} {filters} done", file=sys.stderr, flush=True)

    info = machine_info(jax, {})
    command = script_command(__file__, argv)
    lines = [
        "# Compile time of an elementwise sigmoid by the width of its minor axis (CPU)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {info['cpu']}, {cores_text(info)}. jax {info['jax']}, jaxlib {info['jaxlib']}; "
        f"git {info['git_commit']}; {info['date_utc']}.",
        "",
        f"Seconds to lower and compile, the fastest of {args.repeats}, for a float32 array of "
        f"{args.numbers} numbers shaped (numbers / width, width):",
        "",
        "| width | sigmoid | tanh | exp |",
        "|---|---|---|---|",
        *(f"| {r['width']} | {r['sigmoid']:.3f} | {r['tanh']:.3f} | {r['exp']:.3f} |" for r in widths),
        "",
        "The batch gradient (`jaxbp.manual_value_and_grads`; jax.grad's for reference), "
        "with the sigmoid of Z1 on its (N, D) view behind `lax.optimization_barrier` as shipped, "
        "and without the barrier (on the matmul's shape):",
        "",
        "| batch | input | k | K | formulation | shipped | no barrier | jax.grad |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {s['point']['batch']} | {'x'.join(map(str, s['point']['input']))} | {s['point']['kernel']} "
            f"| {s['point']['filters']} | {s['formulation']} | {s['shipped_s']:.3f} "
            f"| {s['no_barrier_s']:.3f} | {s['autodiff_s']:.3f} |"
            for s in steps
        ),
    ]
    write_results(
        args.out, args.name, info, command, {"widths": widths, "steps": steps}, "\n".join(lines) + "\n"
    )


if __name__ == "__main__":
    main()
