"""Does dE/df's arithmetic alone put per-example gradients past 1.2x the batch gradient?

`experiments/bench.py`'s floor under per-example gradients (`floor/b`) is the batch's forward and
deltas (`batch_forward`) plus the per-example dE/dW written into the last call's memory: it
leaves dE/df out. Per example, dE/df is the same multiplies as the batch gradient's dE/df, not
summed over the examples. This times that product alone, from inputs made before the timing
(the patches or the Toeplitz slabs R of the examples, and a delta1), in every form jaxbp has:

  df_batch_patches    P^T delta1 over a chunk, summed over its examples (the batch step's)
  df_batch_toeplitz   R^T delta1, the same with the Toeplitz slabs
  df_batch_conv       XLA's conv with the examples as its contracted axis, in 4 parts
  df_example_patches  the patches' product per example (vmapped: a batched dot)
  df_example_toeplitz the slabs' product per example (vmapped)

each on one chunk of examples (the per-example gradients' chunk, `jaxbp.per_example_chunk`, or
the whole batch), scaled to the batch. With the batch step (`batch_grad`), the per-example
gradients into the last call's memory (`per_ex`), `batch_forward` and the dE/dW write
(`dW_reused`), interleaved round by round. ``floor_df`` is ``batch_forward + dW_reused`` plus the
fastest of the five: an estimate of the least per-example gradients can take with jaxbp's forms
when dE/df runs no faster than the fastest form measured here. The batch forms are one product
with the examples contracted, as fast as the same multiplies have run here; they are no
per-example gradient, and stand in for the best a per-example dE/df could do.

The same estimate as one program (``program_patches``, ``program_toeplitz``, ``program_conv``,
`program_floor`): the per-example gradients' forward, in their form and chunks, each example's
dE/dW and dE/db written into the last call's memory, and dE/df summed over the examples in each
of the three contracted forms. Separate timings miss what the parts cost each other in one
program (caches, the cores they share); ``program/b`` is the fastest of the three over the batch
gradient.

    python experiments/probe_filter_grad_floor.py [--points 256:32x32x3:5:8 ...] [--repeats 5]

Writes experiments/results/<--name, probe_filter_grad_floor>.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import os
import pathlib
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import batch_forward  # noqa: E402
from bench import machine_line  # noqa: E402
from bench import per_example_dW_write  # noqa: E402
from bench import script_record  # noqa: E402
from bench import write_results  # noqa: E402
from probe_write_overlap import parse_point  # noqa: E402

# The many-filter points of bench_amd_epyc_floor.md whose floor (floor/b) allows 1.2x.
POINTS = (
    "32:28x28x1:5:8",
    "32:32x32x3:3:8",
    "32:32x32x3:5:8",
    "32:28x28x1:5:32",
    "32:32x32x3:3:32",
    "32:32x32x3:5:32",
    "256:32x32x3:5:8",
    "256:32x32x3:5:32",
    "1024:32x32x3:3:8",
    "1024:32x32x3:5:8",
    "1024:32x32x3:5:32",
)
DF_METHODS = (
    "df_batch_patches",
    "df_batch_toeplitz",
    "df_batch_conv",
    "df_example_patches",
    "df_example_toeplitz",
)
PROGRAM_FORMS = ("patches", "toeplitz", "conv")
PROGRAM_METHODS = tuple(f"program_{form}" for form in PROGRAM_FORMS)


def filter_grads(jax, spec, x, delta1) -> dict:
    """name -> (fn, args): dE/df of `x` and `delta1` (one chunk) in each form, the inputs made."""
    import jaxbp
    from jaxbp import conv_forms
    from jaxbp import formulations

    jit = lambda fn: jax.jit(fn, compiler_options=jaxbp.compiler_options())  # noqa: E731
    n = x.shape[0]
    patches = jit(lambda x: conv_forms.conv_patches(x, spec))(x)
    rows = jit(lambda x: conv_forms.toeplitz_rows(x, spec))(x)
    per = lambda a: a.reshape(n, -1, a.shape[-1])  # noqa: E731  (examples, rows of one, columns)
    return {
        "df_batch_patches": (
            jit(lambda p, d: conv_forms.filter_grad_patches(p, d, spec, transposed=True)),
            (patches, delta1),
        ),
        "df_batch_toeplitz": (
            jit(lambda r, d: conv_forms.filter_grad_toeplitz(r, d, spec, transposed=True)),
            (rows, delta1),
        ),
        "df_batch_conv": (
            jit(lambda x, d: conv_forms.filter_grad_conv(x, d, spec, formulations.conv_filter_grad_parts(n))),
            (x, delta1),
        ),
        "df_example_patches": (
            jit(jax.vmap(lambda p, d: conv_forms.filter_grad_patches(p, d[None], spec))),
            (per(patches), delta1),
        ),
        "df_example_toeplitz": (
            jit(jax.vmap(lambda r, d: conv_forms.filter_grad_toeplitz(r, d[None], spec))),
            (per(rows), delta1),
        ),
    }


def program_floor(params, x, y, out, spec, df_form: str, chunk: int | None):
    """The per-example gradients with their dE/df replaced by the examples' sum, in one program:
    the per-example path's forward form and chunks (`jaxbp.formulations.per_example_formulation`,
    `jaxbp.per_example_chunk`), each example's dE/dW = H1 delta2^T and dE/db = delta2 written
    into `out`'s memory (donated) and dE/df as the contraction over the examples in `df_form`
    (the patches and slabs shared with the forward where it uses them, as the per-example path
    shares them). Returns ((dE/dW, dE/db) of each example, the sum of dE/df (K, kh kw C) or, in
    the conv form, (kh, kw, C, K)).

    Every per-example gradient does this work with a per-example dE/df in place of the sum: the
    same multiplies, whose every per-example form ran slower than the fastest contracted one
    here (`DF_METHODS`). So this is the floor plus dE/df measured as one program, in which the
    parts share caches and cores as they do in the per-example gradients, where ``floor_df``
    adds separate timings."""
    import jax.numpy as jnp
    from jax import lax

    from jaxbp import batched
    from jaxbp import conv_forms
    from jaxbp import formulations

    n = x.shape[0]
    forward = formulations.per_example_formulation(spec, n, itemsize=x.dtype.itemsize).forward

    def part(x, y):
        forms = (forward, df_form)
        patches = conv_forms.conv_patches(x, spec) if "patches" in forms else None
        rows = conv_forms.toeplitz_rows(x, spec) if "toeplitz" in forms else None
        # The taps, where they are the forward, as the per-example path runs them: channel by channel.
        H1, _, delta2, delta1 = batched.slide_terms(
            params, x, y, spec, forward, 1, patches=patches, rows=rows, contract_channels=False
        )
        if df_form == "patches":
            df = conv_forms.filter_grad_patches(patches, delta1, spec, transposed=True)
        elif df_form == "toeplitz":
            df = conv_forms.filter_grad_toeplitz(rows, delta1, spec, transposed=True)
        else:
            parts = formulations.conv_filter_grad_parts(x.shape[0])
            df = conv_forms.filter_grad_conv(x, delta1, spec, parts)
        return (H1[:, :, None] * delta2[:, None, :], delta2), df

    if chunk is None or chunk >= n:
        return part(x, y)
    if n % chunk:
        raise ValueError(f"chunk must divide the batch, got {chunk} and {n}")

    def add_chunk(i, carry):
        (W, b), df = carry
        start = i * chunk
        (W_i, b_i), df_i = part(
            lax.dynamic_slice_in_dim(x, start, chunk), lax.dynamic_slice_in_dim(y, start, chunk)
        )
        W = lax.dynamic_update_slice_in_dim(W, W_i, start, 0)
        b = lax.dynamic_update_slice_in_dim(b, b_i, start, 0)
        return (W, b), df + df_i

    W_b, df = out
    return lax.fori_loop(0, n // chunk, add_chunk, (W_b, jnp.zeros_like(df)))


def check(jax, spec) -> float:
    """The largest relative difference of the five forms' dE/df from XLA's conv, float64, 3
    examples: the batch forms against the sum, the per-example ones example by example; and the
    program floor's (`program_floor`) against `jaxbp.per_example_manual_grads`."""
    import jaxbp
    from jaxbp import conv_forms

    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        x = jax.numpy.asarray(rng.normal(size=(3, *spec.in_shape)))
        d1 = jax.numpy.asarray(rng.normal(size=(3, *spec.h1_shape)))
        one = jax.jit(lambda x, d: conv_forms.filter_grad_conv(x, d, spec))
        each = np.stack([np.asarray(one(x[i : i + 1], d1[i : i + 1])) for i in range(3)])  # (3, kh, kw, C, K)
        total = each.sum(0)
        errors = []
        for name, (fn, args) in filter_grads(jax, spec, x, d1).items():
            g = np.asarray(fn(*args), np.float64)
            if name.startswith("df_batch") and name != "df_batch_conv":  # (K, kh kw C), filters first
                g = g.reshape(spec.n_filters, *total.shape[:3]).transpose(1, 2, 3, 0)
            ref = each if name.startswith("df_example") else total
            errors.append(float(np.abs(g - ref).max() / np.abs(ref).max()))
        # The program floor's dE/dW, dE/db and summed dE/df against the per-example gradients,
        # whole and in chunks of one example.
        params = jaxbp.init_params(jax.random.key(1), spec, dtype=jax.numpy.float64)
        y = jax.numpy.asarray(rng.uniform(size=(3, spec.n_out)))
        want = jaxbp.per_example_manual_grads(params, x, y, spec)
        for df_form, chunk in itertools.product(PROGRAM_FORMS, (None, 1)):
            out = program_out(jax, spec, params, x, y, df_form)
            (W, b), df = program_floor(params, x, y, out, spec, df_form, chunk)
            if df_form != "conv":  # (K, kh kw C), filters first
                df = df.reshape(spec.n_filters, *total.shape[:3]).transpose(1, 2, 3, 0)
            for got, ref in ((W, want.W), (b, want.b), (df, want.f.sum(0))):
                errors.append(float(np.abs(np.asarray(got) - ref).max() / np.abs(ref).max()))
        return max(errors)


def program_out(jax, spec, params, x, y, df_form):
    """Zeros shaped as `program_floor`'s result, for its first call's `out`."""
    shapes = jax.eval_shape(lambda p, x, y: program_floor(p, x, y, None, spec, df_form, None), params, x, y)
    return jax.tree.map(lambda s: jax.numpy.zeros(s.shape, s.dtype), shapes)


def run_point(batch, in_shape, kernel, filters, repeats, min_sample_s) -> dict:
    import jax

    import jaxbp
    from jaxbp import tune
    from jaxbp.per_example import per_example_chunk

    spec = jaxbp.ConvNetSpec(in_shape=in_shape, n_filters=filters, kernel_size=kernel, n_out=10)
    error = check(jax, spec)
    if error > 1e-10:  # float64 sums of the same products in other orders: about 1e-15
        raise RuntimeError(f"the dE/df forms disagree at {spec}: relative difference {error:.1e}")
    rng = np.random.default_rng(0)
    params = jaxbp.init_params(jax.random.key(0), spec)
    x = jax.numpy.asarray(rng.normal(size=(batch, *in_shape)).astype(np.float32))
    y = jax.numpy.asarray(rng.uniform(size=(batch, 10)).astype(np.float32))
    args = (params, x, y)
    chunk = per_example_chunk(spec, batch) or batch
    delta1 = jax.numpy.asarray(rng.normal(size=(chunk, *spec.h1_shape)).astype(np.float32))
    jit = lambda fn, **kw: jax.jit(fn, compiler_options=jaxbp.compiler_options(), **kw)  # noqa: E731
    per_ex = jaxbp.make_per_example_grads(spec)
    dW = lambda p, x, y: per_example_dW_write(p, y)  # noqa: E731
    dW_into = jit(lambda p, x, y, out: dW(p, x, y), donate_argnums=3, keep_unused=True)
    calls = {
        "batch_grad": tune.timed_calls(
            jit(lambda p, x, y: jaxbp.manual_value_and_grads(p, x, y, spec)), args
        ),
        "per_ex": tune.timed_calls_into(per_ex, args, per_ex(*args)),
        "batch_forward": tune.timed_calls(jit(lambda p, x, y: batch_forward(p, x, y, spec)), args),
        "dW_reused": tune.timed_calls_into(dW_into, args, jit(dW)(*args)),
    }
    for name, (fn, fn_args) in filter_grads(jax, spec, x[:chunk], delta1).items():
        calls[name] = tune.timed_calls(fn, fn_args)
    for df_form in PROGRAM_FORMS:
        program = jit(
            lambda p, x, y, out, df_form=df_form: program_floor(p, x, y, out, spec, df_form, chunk),
            donate_argnums=3,
            keep_unused=True,  # unchunked, `out` is unused but for its memory
        )
        calls[f"program_{df_form}"] = tune.timed_calls_into(
            program, args, program_out(jax, spec, *args, df_form)
        )
    samples = tune.interleaved_samples(calls, repeats, min_sample_s)
    ms = {name: 1e3 * statistics.median(v) for name, v in samples.items()}
    for name in DF_METHODS:  # one chunk, scaled to the batch
        ms[name] *= batch / chunk
    fastest = min(DF_METHODS, key=ms.get)
    program = min(PROGRAM_METHODS, key=ms.get)
    b = ms["batch_grad"]
    return {
        "point": {"batch": batch, "input": list(in_shape), "kernel": kernel, "filters": filters},
        "chunk": chunk,
        "check_rel_error": error,
        "median_ms": ms,
        "fastest_df": fastest,
        "per_ex_over_batch_grad": ms["per_ex"] / b,
        "floor_over_batch_grad": (ms["batch_forward"] + ms["dW_reused"]) / b,
        "floor_df_over_batch_grad": (ms["batch_forward"] + ms["dW_reused"] + ms[fastest]) / b,
        "fastest_program": program,
        "program_over_batch_grad": ms[program] / b,
    }


def markdown(results, info, command, args) -> str:
    short = {m: m.replace("df_", "").replace("_", " ") for m in DF_METHODS + PROGRAM_METHODS}
    lines = [
        "# dE/df's arithmetic beside the floor under per-example gradients",
        "",
        f"Command: `{command}`  ",
        machine_line(info),
        "",
        f"Median ms per call of {args.repeats} interleaved samples (float32, VALID, 10 outputs); each "
        "dE/df form timed on one chunk of `chunk` examples and scaled to the batch. `/b`: over the "
        "batch gradient. `floor`: `batch_forward` + `dW_reused` (bench.py's `floor/b`); `floor+df`: "
        "that plus the fastest dE/df form, an estimate of the least per-example gradients can take "
        "where dE/df runs no faster than here. `program *`: the per-example gradients with dE/df "
        "summed over the examples in that form, one program (`program_floor`); `program/b`: the "
        "fastest of the three, the same estimate measured as one program.",
        "",
        "| batch | input | k | K | chunk | batch_grad | per_ex | batch_forward | dW_reused | "
        + " | ".join(short[m] for m in DF_METHODS + PROGRAM_METHODS)
        + " | fastest | per_ex/b | floor/b | floor+df/b | program/b |",
        "|---" * (14 + len(DF_METHODS) + len(PROGRAM_METHODS)) + "|",
    ]
    for r in results:
        p, m = r["point"], r["median_ms"]
        lines.append(
            f"| {p['batch']} | {'x'.join(map(str, p['input']))} | {p['kernel']} | {p['filters']} "
            f"| {r['chunk']} | "
            + " | ".join(
                f"{m[k]:.3g}"
                for k in ("batch_grad", "per_ex", "batch_forward", "dW_reused", *DF_METHODS, *PROGRAM_METHODS)
            )
            + f" | {short[r['fastest_df']]} | {r['per_ex_over_batch_grad']:.2f} "
            f"| {r['floor_over_batch_grad']:.2f} | {r['floor_df_over_batch_grad']:.2f} "
            f"| {r['program_over_batch_grad']:.2f} |"
        )
    over = [r for r in results if r["floor_df_over_batch_grad"] > 1.2]
    met = [r for r in results if r["per_ex_over_batch_grad"] <= 1.2]
    gap = [r["per_ex_over_batch_grad"] / r["floor_df_over_batch_grad"] for r in results]
    program_over = [r for r in results if r["program_over_batch_grad"] > 1.2]
    sums = [r["program_over_batch_grad"] / r["floor_df_over_batch_grad"] for r in results]
    lines += [
        "",
        f"- floor+df over 1.2x at {len(over)} of {len(results)} points; per-example within 1.2x at "
        f"{len(met)}; per-example over floor+df {np.median(gap):.2f}x (median; "
        f"{min(gap):.2f}-{max(gap):.2f})",
        f"- the program floor over 1.2x at {len(program_over)} of {len(results)} points; the program "
        f"over floor+df (one program against the sum of separate timings) {np.median(sums):.2f}x "
        f"(median; {min(sums):.2f}-{max(sums):.2f})",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--points", nargs="+", type=parse_point, default=[parse_point(p) for p in POINTS])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-sample-s", type=float, default=0.05)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    parser.add_argument("--name", default="probe_filter_grad_floor", help="the results' file name stem")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.min_sample_s <= 0:
        parser.error(
            f"--repeats must be at least 1 and --min-sample-s positive, got {args.repeats} and "
            f"{args.min_sample_s}"
        )
    import jax

    results = []
    for point in args.points:
        results.append(run_point(*point, args.repeats, args.min_sample_s))
        r = results[-1]
        print(
            f"{point}: per_ex/b {r['per_ex_over_batch_grad']:.2f} floor/b {r['floor_over_batch_grad']:.2f} "
            f"floor+df/b {r['floor_df_over_batch_grad']:.2f} ({r['fastest_df']}) "
            f"program/b {r['program_over_batch_grad']:.2f} ({r['fastest_program']})",
            file=sys.stderr,
            flush=True,
        )
    info, command = script_record(jax, __file__, argv)
    write_results(args.out, args.name, info, command, results, markdown(results, info, command, args))


if __name__ == "__main__":
    main()
