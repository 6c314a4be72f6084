"""Per-example gradients with one filter: the shipped batch-wide path against the vmapped one.

`jaxbp.per_example_manual_grads` computes, after the taps forward (one filter on fewer than 8
channels, `jaxbp.formulations.per_example_formulation`), the slides' terms of the whole batch at once
and dE/df per example by `jaxbp.conv_forms.filter_grad_rows`: for each tap, the sum over output rows
written out as one fused elementwise loop. Before, it vmapped the manual backward of one example
(the Toeplitz form's dE/df, batched dots), over the whole batch or under `lax.map` in chunks past a
working set. This script times, for each point (float32, VALID, 10 outputs), interleaved round by
round:

  batch_grad   the batch gradient alone (jaxbp.manual_value_and_grads), the reference
  per_ex       jaxbp.per_example_manual_grads as shipped
  reduce       the same with filter_grad_rows' sums as one reduction over (i, j) each
               (its form past PER_EXAMPLE_UNROLLED_MAX_TERMS terms)
  rows_chunks  per_ex's batch-wide path under lax.map in chunks of working_set_chunk examples
  products     per_ex with the taps forward's input channels contracted first (the batch
               step's form from 3 channels on, `conv_forward_tap_products`), the whole batch
  products_chunks  the same under lax.map in chunks of working_set_chunk examples
  vmap         jax.vmap of jaxbp.batched.value_and_grads_example over the whole batch
  chunks       the same under lax.map in chunks of working_set_chunk examples

Each sample is as many calls as fill --min-sample-s (`jaxbp.tune.interleaved_samples`, after a
warm-up call), right after --warm-calls untimed calls of the same method (1; none in the runs
before git 98889c7: in experiments/bench.py a program timed right after one that had freed
hundreds of MB read up to 2.2x slower), on the CPU each call waited for, and only the last output kept.
(The runs before filter_grad_rows kept every output of a sample until it ended: fresh buffers for each call,
which inflated the per-example times against the batch gradient's.) Before timing, every method
is checked against per_ex in float64 on a batch of 5 (relative error < 1e-10). Writes
experiments/results/<name>.json and .md.

    python experiments/bench_per_example.py         # batch 32, 256 and 1024, one filter, 3x3 and 5x5

The runs before filter_grad_rows (bench_per_example_64mib.md, bench_per_example_96mib.md) timed
the vmapped path's whole batch against its chunks, also at 2 filters (the taps forward then).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import machine_line  # noqa: E402
from bench import script_record  # noqa: E402
from bench import summarize  # noqa: E402
from bench import warm_text  # noqa: E402
from bench import write_results  # noqa: E402

METHODS = ("batch_grad", "per_ex", "reduce", "rows_chunks", "products", "products_chunks", "vmap", "chunks")


def methods(jax, jaxbp, spec, batch, itemsize, chunk=None):
    """The timed functions of (params, x, y), each jitted with jaxbp's options; `chunk` examples
    per lax.map step for "chunks" (None: working_set_chunk's)."""
    from jax import lax

    from jaxbp import batched
    from jaxbp import formulations

    jit = lambda fn: jax.jit(fn, compiler_options=jaxbp.compiler_options())  # noqa: E731
    form = formulations.per_example_formulation(spec, batch, itemsize=itemsize)
    chunk = chunk or formulations.working_set_chunk(spec, batch, itemsize) or batch

    def example(p):
        return lambda xy: batched.value_and_grads_example(p, *xy, spec, formulation=form)[1]

    def rows_chunks(p, x, y, contract_channels=False):  # the batch-wide path on chunks, a remainder last
        rows = lambda x, y: batched.per_example_grads_taps(p, x, y, spec, contract_channels=contract_channels)  # noqa: E731
        whole = x.shape[0] - x.shape[0] % chunk
        split = lambda a: a[:whole].reshape(-1, chunk, *a.shape[1:])  # noqa: E731
        out = lax.map(lambda xy: rows(*xy), (split(x), split(y)))
        out = jax.tree.map(lambda a: a.reshape(whole, *a.shape[2:]), out)
        if whole == x.shape[0]:
            return out
        rest = rows(x[whole:], y[whole:])
        return jax.tree.map(lambda a, b: jax.numpy.concatenate([a, b]), out, rest)

    return {
        "batch_grad": jit(lambda p, x, y: jaxbp.manual_value_and_grads(p, x, y, spec)),
        "per_ex": jit(lambda p, x, y: jaxbp.per_example_manual_grads(p, x, y, spec)),
        "reduce": jit(lambda p, x, y: batched.per_example_grads_taps(p, x, y, spec, max_terms=0)),
        "rows_chunks": jit(rows_chunks),
        "products": jit(
            lambda p, x, y: batched.per_example_grads_taps(p, x, y, spec, contract_channels=True)
        ),
        "products_chunks": jit(lambda p, x, y: rows_chunks(p, x, y, contract_channels=True)),
        "vmap": jit(lambda p, x, y: jax.vmap(example(p))((x, y))),
        "chunks": jit(lambda p, x, y: lax.map(example(p), (x, y), batch_size=chunk)),
    }


def problem(jax, jaxbp, spec, batch, dtype):
    rng = np.random.default_rng(0)
    params = jaxbp.init_params(jax.random.key(0), spec, dtype)
    x = jax.numpy.asarray(rng.normal(size=(batch, *spec.in_shape)).astype(dtype))
    y = jax.numpy.asarray(rng.uniform(size=(batch, spec.n_out)).astype(dtype))
    return params, x, y


def check(jax, jaxbp, spec) -> float:
    """The largest relative error of the other methods against per_ex, float64, a batch of 5
    (chunks of 2, the last one short)."""
    with jax.enable_x64(True):
        args = problem(jax, jaxbp, spec, 5, np.float64)
        fns = methods(jax, jaxbp, spec, 5, 8, chunk=2)
        ref = jax.tree.leaves(fns["per_ex"](*args))
        return max(
            float(np.abs(np.asarray(a) - np.asarray(r)).max() / np.abs(np.asarray(r)).max())
            for name in METHODS[2:]
            for a, r in zip(jax.tree.leaves(fns[name](*args)), ref)
        )


def point_spec(jaxbp, in_shape, kernel, filters):
    """The point's network; SystemExit unless its per-example path has the taps forward."""
    import jax

    spec = jaxbp.ConvNetSpec(in_shape=in_shape, n_filters=filters, kernel_size=kernel, n_out=10)
    form = jaxbp.formulations.per_example_formulation(spec, 2)  # the taps' choice is the batch's any
    if form.forward != "taps":
        raise SystemExit(
            f"{'x'.join(map(str, in_shape))}, {kernel}x{kernel}, {filters} filters: the per-example "
            f"forward on {jax.default_backend()} is {form.forward}, not the taps (one filter on "
            "fewer than 8 channels, on the CPU)"
        )
    return spec


def run_point(jax, jaxbp, in_shape, kernel, filters, batch, args) -> dict:
    from jaxbp import conv_forms
    from jaxbp import formulations

    spec = point_spec(jaxbp, in_shape, kernel, filters)
    error = check(jax, jaxbp, spec)
    if not error <= 1e-10:  # NaN included
        raise SystemExit(f"{in_shape}, {filters} filters: a method disagrees with per_ex: {error:.2e}")
    jargs = problem(jax, jaxbp, spec, batch, np.float32)
    fns = methods(jax, jaxbp, spec, batch, 4)
    calls = {name: jaxbp.tune.timed_calls(fn, jargs) for name, fn in fns.items()}
    samples = jaxbp.tune.interleaved_samples(calls, args.repeats, args.min_sample_s, args.warm_calls)
    return {
        "point": {"input": list(in_shape), "kernel": kernel, "filters": filters, "batch": batch},
        "chunk": formulations.working_set_chunk(spec, batch, 4),
        "unrolled_terms": conv_forms.rows_terms(spec),
        "unrolled": conv_forms.rows_terms(spec) <= conv_forms.PER_EXAMPLE_UNROLLED_MAX_TERMS,
        "check_rel_error": error,
        "times": {name: summarize(s) for name, s in samples.items()},
    }


def table_head(lead: list[str], methods, tail: list[str]) -> list[str]:
    """A markdown table's head: the `lead` columns, each method's time, each but the first's time
    over the first's (``/b``), and the `tail` columns."""
    columns = [*lead, *methods, *(f"{m}/b" for m in methods[1:]), *tail]
    return ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]


def markdown(results, info, command) -> str:
    ms = lambda r, k: r["times"][k]["median_ms"]  # noqa: E731
    lines = [
        "# Per-example gradients with one filter: batch-wide rows against the vmapped path",
        "",
        f"Command: `{command}`  ",
        machine_line(info),
        "",
        "Median ms per call over the repeats, interleaved (IQR in the JSON). `terms`: kh kw Ho, the "
        "products `filter_grad_rows` writes out per tap row sum (up to "
        f"{info['max_terms']}; past it `per_ex` is `reduce`). `/b`: over the batch gradient alone; "
        "`vmap/per_ex` > 1: the shipped path faster than the vmapped one. " + warm_text(info),
        "",
        *table_head(["input", "k", "K", "batch", "chunk", "terms"], METHODS, ["vmap/per_ex"]),
    ]
    for r in results:
        p = r["point"]
        b = ms(r, "batch_grad")
        lines.append(
            f"| {'x'.join(map(str, p['input']))} | {p['kernel']} | {p['filters']} | {p['batch']} "
            f"| {r['chunk'] or 'all'} | {r['unrolled_terms']} "
            + "".join(f"| {ms(r, k):.3g} " for k in METHODS)
            + "".join(f"| {ms(r, k) / b:.2f} " for k in METHODS[1:])
            + f"| {ms(r, 'vmap') / ms(r, 'per_ex'):.2f} |"
        )
    return "\n".join(lines) + "\n"


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        h, w, c = (int(v) for v in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"an input shape is HxWxC, e.g. 28x28x1; got {text!r}") from None
    return h, w, c


def grid_arguments(doc, name, argv, *, filters, filters_help, repeats, min_sample_s) -> argparse.Namespace:
    """The per-example scripts' arguments (this one's and bench_per_example_reuse's): the grid,
    the sampling and where the results go, parsed from `argv` and checked."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=doc, formatter_class=formatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 256, 1024])
    parser.add_argument("--inputs", type=parse_shape, nargs="+", default=[(28, 28, 1), (32, 32, 3)])
    parser.add_argument("--kernels", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--filters", type=int, nargs="+", default=filters, help=filters_help)
    parser.add_argument("--repeats", type=int, default=repeats, help=f"timed samples per method ({repeats})")
    parser.add_argument("--min-sample-s", type=float, default=min_sample_s, help="the shortest sample")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"), help="folder")
    parser.add_argument("--name", default=name, help="file stem of the outputs")
    parser.add_argument("--warm-calls", type=int, default=1, help="untimed calls before a sample")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.min_sample_s <= 0 or args.warm_calls < 0:
        parser.error("--repeats must be >= 1, --min-sample-s > 0 and --warm-calls >= 0")
    return args


def main(argv=None) -> None:
    taps = "the taps' 1 (default)"
    args = grid_arguments(
        __doc__, "bench_per_example", argv, filters=[1], filters_help=taps, repeats=7, min_sample_s=0.02
    )
    import jax

    import jaxbp

    points = list(itertools.product(args.inputs, args.kernels, args.filters, args.batches))
    for in_shape, kernel, filters, _ in points:  # every point's forward before any is timed
        point_spec(jaxbp, in_shape, kernel, filters)
    results = []
    for in_shape, kernel, filters, batch in points:
        results.append(run_point(jax, jaxbp, in_shape, kernel, filters, batch, args))
        print(f"done {in_shape} {kernel} {filters} {batch}", file=sys.stderr, flush=True)
    info, command = script_record(jax, __file__, argv)
    info["max_terms"] = jaxbp.conv_forms.PER_EXAMPLE_UNROLLED_MAX_TERMS
    info["warm_calls"] = args.warm_calls
    write_results(args.out, args.name, info, command, results, markdown(results, info, command))


if __name__ == "__main__":
    main()
