"""Which way round to compute the per-example dE/df product: a^T b or (b^T a)^T?

Per example, dE/df contracts the patches (or the Toeplitz slabs) with delta1 over the output
positions: (M, p) by (M, q), vmapped over a chunk of examples into one batched dot. XLA's CPU
runs the two orders at different speeds; `jaxbp.conv_forms.fewer_rows_first` takes the one with
fewer output rows for the patches where the other has twice as many, and
`jaxbp.conv_forms.filter_grad_toeplitz` the one with fewer rows for the slabs. This times both at
the shapes of the benchmark grid, interleaved.

    python experiments/bench_dot_rows.py [--repeats 7]

Writes experiments/results/bench_dot_rows.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import machine_line  # noqa: E402
from bench import script_record  # noqa: E402
from bench import write_results  # noqa: E402

# (examples, M, p, q): p the patches' or slabs' columns, q delta1's (K, or jb K for the slabs),
# with the examples per chunk that jaxbp.per_example takes at batch 256 (128 or 64).
SHAPES = (
    (128, 676, 9, 8),  # patches, 28x28x1, 3x3, 8 filters
    (128, 900, 27, 8),  # patches, 32x32x3, 3x3, 8 filters
    (128, 676, 9, 32),  # patches, 28x28x1, 3x3, 32 filters
    (128, 900, 27, 32),  # patches, 32x32x3, 3x3, 32 filters
    (128, 576, 25, 8),  # patches, 28x28x1, 5x5 (the Toeplitz form's, were it the patches)
    (128, 784, 75, 8),  # patches, 32x32x3, 5x5
    (128, 182, 18, 32),  # slabs, 28x28x1, 3x3, 8 filters (jb K = 32)
    (128, 144, 40, 32),  # slabs, 28x28x1, 5x5, 8 filters
    (128, 196, 120, 32),  # slabs, 32x32x3, 5x5, 8 filters
    (128, 240, 54, 32),  # slabs, 32x32x3, 3x3, 8 filters
    (64, 182, 18, 128),  # slabs, 28x28x1, 3x3, 32 filters (jb K = 128)
    (64, 144, 40, 128),  # slabs, 28x28x1, 5x5, 32 filters
    (64, 196, 120, 128),  # slabs, 32x32x3, 5x5, 32 filters
    (64, 240, 54, 128),  # slabs, 32x32x3, 3x3, 32 filters
)


def run_shape(n, m, p, q, repeats) -> dict:
    import jax
    import numpy as np
    from jax import lax

    import jaxbp
    from jaxbp import conv_forms
    from jaxbp import tune

    a = jax.random.normal(jax.random.key(0), (n, m, p), np.float32)
    b = jax.random.normal(jax.random.key(1), (n, m, q), np.float32)
    jit = lambda fn: jax.jit(fn, compiler_options=jaxbp.compiler_options())  # noqa: E731
    batch_dims = (((1,), (1,)), ((0,), (0,)))
    fns = {
        "a_first": jit(lambda a, b: lax.dot_general(a, b, batch_dims)),  # (n, p, q)
        "b_first": jit(lambda a, b: lax.dot_general(b, a, batch_dims)),  # (n, q, p)
        "fewer_rows_first": jit(jax.vmap(conv_forms.fewer_rows_first)),  # (n, p, q)
    }
    ref = np.asarray(fns["a_first"](a, b))
    errors = {
        "b_first": float(
            np.abs(np.asarray(fns["b_first"](a, b)).swapaxes(1, 2) - ref).max() / np.abs(ref).max()
        ),
        "fewer_rows_first": float(
            np.abs(np.asarray(fns["fewer_rows_first"](a, b)) - ref).max() / np.abs(ref).max()
        ),
    }
    samples = tune.interleaved_samples({k: tune.timed_calls(f, (a, b)) for k, f in fns.items()}, repeats, 0.1)
    ms = {k: 1e3 * statistics.median(v) for k, v in samples.items()}
    return {"shape": [n, m, p, q], "median_ms": ms, "rel_error": errors}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    parser.add_argument(
        "--shapes", type=int, default=len(SHAPES), help="time only the first this many shapes"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.shapes < 1:
        parser.error(f"--repeats and --shapes must be at least 1, got {args.repeats} and {args.shapes}")
    import jax

    results = [run_shape(*shape, args.repeats) for shape in SHAPES[: args.shapes]]
    info, command = script_record(jax, __file__, argv)
    write_results(args.out, "bench_dot_rows", info, command, results, markdown(results, info, command, args))


def markdown(results, info, command, args) -> str:
    lines = [
        "# Per-example dE/df's batched product: which operand first",
        "",
        f"Command: `{command}`  ",
        machine_line(info),
        "",
        f"Median ms of {args.repeats} interleaved samples (float32). `a first`: the (n, p, q) product, p "
        "output rows per example; `b first`: (n, q, p); `fewer rows first`: "
        "`jaxbp.conv_forms.fewer_rows_first` vmapped (the (n, p, q) result either way: b first and a "
        "transpose where a has at least twice b's columns); `fewer rows / more rows`: the order with "
        "min(p, q) rows over the other. The patches' product was a first before fewer_rows_first; the "
        "Toeplitz form computes the order with fewer rows (filter_grad_toeplitz).",
        "",
        "| examples | M | p | q | a first | b first | fewer rows first | fewer rows / more rows "
        "| fewer rows first / a first |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        (n, m, p, q), t = r["shape"], r["median_ms"]
        fewer, more = (t["b_first"], t["a_first"]) if q < p else (t["a_first"], t["b_first"])
        lines.append(
            f"| {n} | {m} | {p} | {q} | {t['a_first']:.3f} | {t['b_first']:.3f} "
            f"| {t['fewer_rows_first']:.3f} | {fewer / more:.2f} "
            f"| {t['fewer_rows_first'] / t['a_first']:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
