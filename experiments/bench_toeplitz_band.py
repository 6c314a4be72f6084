"""The Toeplitz band T and its fold as pads and slices (shipped) or as dots with a 0/1 selection.

The Toeplitz form (`jaxbp.conv_forms`) computes Z1 = R T with T the banded matrix of the filters,
and dE/df by folding dE/dT = delta1^T R back onto f. Both are a contraction with the constant

    S[b, w, j] = 1 where w = j s_w + b d_w, else 0:

T = einsum(S, f) and dE/df = einsum(S, dE/dT), as jaxbp wrote them up to git 3ed10df. Those are
dots, and XLA's CPU laid their operands out with copies, inside the chunks' loop. The shipped
`toeplitz_band` and `fold_band` write the same numbers as jb zero-padded copies of f and jb
strided slices of dE/dT added: each one fused loop. This times the two, the rest of the program
the same, at every grid point where `choose_formulation` takes the Toeplitz form for either
convolution: the whole jitted update step (median ms [quartiles], interleaved with
`jaxbp.tune.interleaved_samples`), its compile time (--compiles times, alternating), the kernels
XLA generates (`bench.generated_kernels`), and how far apart the two updates are (0: the same to
the bit).
With --per-example, also the per-example gradients (`jaxbp.make_per_example_grads`, each call
written into the last one's memory) where `per_example_formulation` uses the Toeplitz form.

    python experiments/bench_toeplitz_band.py [--repeats 15] [--compiles 3] [--batches 1 32 256 1024]

Writes experiments/results/bench_toeplitz_band.{json,md} (--name to rename).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import generated_kernels  # noqa: E402
from bench import machine_line  # noqa: E402
from bench import rel_error  # noqa: E402
from bench import script_record  # noqa: E402
from bench import step_inputs  # noqa: E402
from bench import write_results  # noqa: E402

FORMS = ("selection", "band")  # the dots with S (the baseline), the shipped pads and slices
INPUTS = ((28, 28, 1), (32, 32, 3))


def selection(spec, dtype):
    """S[b, w, j] = 1 where input column w of a block meets filter column b at output column j."""
    import jax.numpy as jnp
    import numpy as np

    from jaxbp import conv_forms

    (_, kw), (_, sw), (_, dw) = spec.kernel_size, spec.stride, spec.dilation
    jb, _, span = conv_forms.toeplitz_blocks(spec)
    b, w, j = np.ogrid[:kw, :span, :jb]
    return jnp.asarray(w == j * sw + b * dw, dtype)


def band_by_selection(f, spec):
    """`jaxbp.conv_forms.toeplitz_band` as it was: T = einsum(S, f), (kh span C, jb K)."""
    import jax.numpy as jnp

    kh, _, c, k = f.shape
    S = selection(spec, f.dtype)
    T = jnp.einsum("bwj,abck->awcjk", S, f, precision=spec.precision)
    return T.reshape(kh * S.shape[1] * c, S.shape[2] * k)


def fold_by_selection(G, spec, j_axis, w_axis):
    """`jaxbp.conv_forms.fold_band` as it was: the sum over j and w of S[b, w, j] dE/dT, for the two
    layouts `filter_grad_toeplitz` folds, (jb, K, kh, span, C) -> (K, kh, kw, C) and
    (kh, span, C, jb, K) -> (kh, kw, C, K). Where the old code wrote the first straight to
    (kh, kw, C, K), `filter_grad_toeplitz` now transposes this; at batch 32 with 8 filters, 5x5
    (28x28x1 and 32x32x3), the step and the per-example gradients compiled with these had the
    same ops, shapes and layouts as with the code of git 3ed10df (a check, not committed)."""
    import jax.numpy as jnp

    fold = {(0, 3): "bwj,jkawc->kabc", (3, 1): "bwj,awcjk->abck"}[(j_axis, w_axis)]
    return jnp.einsum(fold, selection(spec, G.dtype), G, precision=spec.precision)


@contextlib.contextmanager
def form(name: str):
    """Trace with `name`'s band and fold (the shipped ones for "band")."""
    from jaxbp import conv_forms

    if name == "band":
        yield
        return
    saved = conv_forms.toeplitz_band, conv_forms.fold_band
    conv_forms.toeplitz_band, conv_forms.fold_band = band_by_selection, fold_by_selection
    try:
        yield
    finally:
        conv_forms.toeplitz_band, conv_forms.fold_band = saved


def run_point(batch, in_shape, kernel, filters, repeats, compiles, per_example) -> dict | None:
    import jax
    import numpy as np

    import jaxbp
    from jaxbp.formulations import choose_formulation
    from jaxbp.formulations import per_example_formulation
    from jaxbp.tune import interleaved_samples
    from jaxbp.tune import timed_calls
    from jaxbp.tune import timed_calls_into

    spec = jaxbp.ConvNetSpec(in_shape=in_shape, n_filters=filters, kernel_size=(kernel, kernel), n_out=10)
    rule = choose_formulation(spec, batch)
    if "toeplitz" not in (rule.forward, rule.filter_grad):
        return None
    opt, args = step_inputs(spec, batch)
    compile_s = {name: [] for name in FORMS}
    compiled = {}
    for i in range(compiles):
        for name in FORMS[i % 2 :] + FORMS[: i % 2]:  # each first in turn
            with form(name):
                step = jaxbp.make_update_step(spec, opt, formulation=rule)
                start = time.perf_counter()
                compiled[name] = step.lower(*args).compile()
            compile_s[name].append(time.perf_counter() - start)
    calls = {name: timed_calls(c, args) for name, c in compiled.items()}
    outputs = {name: [np.asarray(v) for v in jax.tree.leaves(c(*args))] for name, c in compiled.items()}
    per_example_diff = None
    pe = per_example_formulation(spec, batch)
    if per_example and batch > 1 and "toeplitz" in (pe.forward, pe.filter_grad):
        params, _, x, y = args
        grads = {}
        for name in FORMS:
            with form(name):
                fn = jaxbp.make_per_example_grads(spec)
                first = fn(params, x, y)
                grads[name] = [np.asarray(g) for g in jax.tree.leaves(first)]  # first is donated below
                # Traced now, under this form: the timed calls reuse the compiled program.
                calls[f"per_ex_{name}"] = timed_calls_into(fn.jitted, (params, x, y), first)
                calls[f"per_ex_{name}"](1)
        per_example_diff = rel_diff(*grads.values())
    samples = interleaved_samples(calls, repeats, 0.02)
    return {
        "point": {"batch": batch, "input": list(in_shape), "kernel": kernel, "filters": filters},
        "rule": rule.label(),
        "per_example_form": pe.label() if per_example_diff is not None else None,
        "median_ms": {m: 1e3 * statistics.median(s) for m, s in samples.items()},
        "quartiles_ms": {m: [1e3 * q for q in np.percentile(s, [25, 75])] for m, s in samples.items()},
        "compile_s": {name: statistics.median(v) for name, v in compile_s.items()},
        "kernels": {name: generated_kernels(c.as_text()) for name, c in compiled.items()},
        "update_rel_diff": rel_diff(*outputs.values()),
        "per_example_rel_diff": per_example_diff,
    }


def rel_diff(a: list, b: list) -> float:
    """The largest `bench.rel_error` over the leaves: 0 where the two are the same to the bit."""
    return max(rel_error(x, y) for x, y in zip(a, b))


def spread(values) -> str:
    return f"{min(values):.2f}-{max(values):.2f} (median {statistics.median(values):.2f})"


def markdown(results: list, info: dict, command: str) -> str:
    lines = [
        "# The Toeplitz band and its fold: pads and slices (shipped) against dots with a selection",
        "",
        f"Command: `{command}`  ",
        machine_line(info),
        "",
        "`selection`: T = einsum(S, f) and dE/df = einsum(S, dE/dT), S the 0/1 selection (jaxbp up to "
        "git 3ed10df); `band`: `jaxbp.conv_forms.toeplitz_band` and `fold_band`, as shipped. The whole "
        "update step in the rule's formulation: median ms [quartiles], interleaved; compile time "
        "(median s); kernels XLA generates. `b/s`: band over selection (<1: the band faster). "
        "`diff`: the largest relative difference between the two updates (new params), 0 where they "
        "are the same to the bit, and after the slash between the two per-example gradients. "
        "`per-ex`: the per-example gradients, each call into "
        "the last one's memory, where their formulation uses the Toeplitz form.",
        "",
        "| batch | input | k | K | rule | selection ms | band ms | b/s | compile s/b | b/s | kernels s/b "
        "| diff | per-ex selection ms | per-ex band ms | b/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(r, m):
        med, q = r["median_ms"][m], r["quartiles_ms"][m]
        return f"{med:.3g} [{q[0]:.3g}-{q[1]:.3g}]"

    for r in results:
        p, m, c, k = r["point"], r["median_ms"], r["compile_s"], r["kernels"]
        shape = "x".join(map(str, p["input"]))
        diff = f"{r['update_rel_diff']:.1g}"
        if r["per_example_form"] is not None:
            diff += f" / {r['per_example_rel_diff']:.1g}"
            pe = (
                f"| {cell(r, 'per_ex_selection')} | {cell(r, 'per_ex_band')} "
                f"| {m['per_ex_band'] / m['per_ex_selection']:.2f} |"
            )
        else:
            pe = "| - | - | - |"
        lines.append(
            f"| {p['batch']} | {shape} | {p['kernel']} | {p['filters']} | {r['rule']} "
            f"| {cell(r, 'selection')} | {cell(r, 'band')} | {m['band'] / m['selection']:.2f} "
            f"| {c['selection']:.3f}/{c['band']:.3f} | {c['band'] / c['selection']:.2f} "
            f"| {k['selection']}/{k['band']} | {diff} {pe}"
        )
    if results:
        run = [r["median_ms"]["band"] / r["median_ms"]["selection"] for r in results]
        comp = [r["compile_s"]["band"] / r["compile_s"]["selection"] for r in results]
        fewer = [r["kernels"]["selection"] - r["kernels"]["band"] for r in results]
        lines += [
            "",
            f"Band over selection, the update step: run time {spread(run)}, faster at "
            f"{sum(v < 1 for v in run)} of {len(run)}; compile time {spread(comp)}, faster at "
            f"{sum(v < 1 for v in comp)} of {len(comp)}; {min(fewer)}-{max(fewer)} fewer kernels. "
            f"The updates the same to the bit at {sum(r['update_rel_diff'] == 0 for r in results)} of "
            f"{len(results)} (at most {max(r['update_rel_diff'] for r in results):.1g} relative apart).",
        ]
        pe = [r for r in results if r["per_example_form"] is not None]
        if pe:
            ratios = [r["median_ms"]["per_ex_band"] / r["median_ms"]["per_ex_selection"] for r in pe]
            lines.append(
                f"The per-example gradients: {spread(ratios)}, faster at {sum(v < 1 for v in ratios)} "
                f"of {len(ratios)}; at most {max(r['per_example_rel_diff'] for r in pe):.1g} relative apart."
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=15, help="timed samples of each (default 15)")
    parser.add_argument("--compiles", type=int, default=3, help="compiles of each (default 3)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256, 1024])
    parser.add_argument("--filters", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--kernels", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--per-example", action="store_true", help="also the per-example gradients")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    parser.add_argument("--name", default="bench_toeplitz_band")
    args = parser.parse_args(argv)
    if args.repeats < 2:
        parser.error(f"--repeats must be at least 2 (for the quartiles), got {args.repeats}")
    if args.compiles < 1:
        parser.error(f"--compiles must be a positive int, got {args.compiles}")
    if min(args.batches) < 1 or min(args.filters) < 1 or min(args.kernels) < 1:
        parser.error(
            f"--batches, --filters and --kernels must be positive, got {args.batches}, {args.filters} "
            f"and {args.kernels}"
        )
    import jax

    results = []
    points = itertools.product(args.batches, INPUTS, args.kernels, args.filters)
    for batch, in_shape, kernel, filters in points:
        r = run_point(batch, in_shape, kernel, filters, args.repeats, args.compiles, args.per_example)
        if r is not None:
            results.append(r)
            ratio = r["median_ms"]["band"] / r["median_ms"]["selection"]
            print(f"done {r['point']} {r['rule']}: band/selection {ratio:.2f}", file=sys.stderr)
    info, command = script_record(jax, __file__, argv)
    write_results(args.out, args.name, info, command, results, markdown(results, info, command))


if __name__ == "__main__":
    main()
