"""dE/df's conv in 2 parts or the rule's 4: the update step's run time and its compile time.

Where dE/df is XLA's conv with the batch as its contracted axis (one filter after the taps, and
32 filters), `choose_formulation` splits it into `CONV_FILTER_GRAD_PARTS` convs over slices of the
examples, so that XLA's CPU runtime runs them on both cores. Each part reads its own slice of x
and of delta1, and channels-last each slice is a transpose: a generated kernel per part and
operand, and XLA's CPU compile time grows with its kernels (experiments/probe_kernel_compile.py).
With 2 cores, 2 parts might do. This times the rule's formulation with 4 parts and with 2, as
the whole jitted update step, interleaved (`jaxbp.tune.interleaved_samples`), and compiles each
--compiles times, alternating, at the grid's points with batch 32 and more where dE/df is the conv.

    python experiments/bench_conv_parts.py [--repeats 15] [--compiles 3] [--batches 32 256 1024]

Writes experiments/results/bench_conv_parts.{json,md} (--name to rename).
"""

from __future__ import annotations

import argparse
import itertools
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import machine_line  # noqa: E402
from bench import rel_error  # noqa: E402
from bench import script_record  # noqa: E402
from bench import step_inputs  # noqa: E402
from bench import write_results  # noqa: E402

PARTS = (4, 2)
INPUTS = ((28, 28, 1), (32, 32, 3))


def run_point(batch, in_shape, kernel, filters, repeats, compiles) -> dict | None:
    import numpy as np

    import jaxbp
    from jaxbp.formulations import choose_formulation
    from jaxbp.tune import interleaved_samples
    from jaxbp.tune import timed_calls

    spec = jaxbp.ConvNetSpec(in_shape=in_shape, n_filters=filters, kernel_size=(kernel, kernel), n_out=10)
    rule = choose_formulation(spec, batch)
    if rule.filter_grad != "conv":
        return None
    opt, args = step_inputs(spec, batch)
    compile_s = {p: [] for p in PARTS}
    compiled = {}
    for i in range(compiles):
        for parts in PARTS[i % 2 :] + PARTS[: i % 2]:  # each first in turn
            step = jaxbp.make_update_step(spec, opt, formulation=rule._replace(conv_parts=parts))
            start = time.perf_counter()
            compiled[parts] = step.lower(*args).compile()
            compile_s[parts].append(time.perf_counter() - start)
    calls = {p: timed_calls(c, args) for p, c in compiled.items()}
    updates = {
        p: [np.asarray(new) - np.asarray(old) for new, old in zip(c(*args)[0], args[0])]
        for p, c in compiled.items()
    }
    # The parts as they run: each is a convolution of the optimized program.
    convolutions = {p: c.as_text().count(" convolution(") for p, c in compiled.items()}
    # The same sums in another order: the two updates (new params - params) agree to float32 rounding.
    err = max(rel_error(a, b) for a, b in zip(updates[2], updates[4]))
    samples = interleaved_samples(calls, repeats, 0.02)
    ms = {p: 1e3 * statistics.median(samples[p]) for p in PARTS}
    quartiles = {p: [1e3 * q for q in np.percentile(samples[p], [25, 75])] for p in PARTS}  # as bench.py's
    return {
        "point": {"batch": batch, "input": list(in_shape), "kernel": kernel, "filters": filters},
        "rule": rule.label(),
        "median_ms": ms,
        "quartiles_ms": quartiles,
        "compile_s": {p: statistics.median(v) for p, v in compile_s.items()},
        "convolutions": convolutions,
        "update_rel_diff": err,
    }


def markdown(results: list, info: dict, command: str) -> str:
    lines = [
        "# dE/df's conv in 2 parts against the rule's 4",
        "",
        f"Command: `{command}`  ",
        machine_line(info),
        "",
        "The rule's formulation with dE/df's conv in 4 parts and in 2: the whole update step's median "
        "ms [quartiles], interleaved, and its compile time (median s); `convs`: the convolutions in "
        "each optimized program; `2/4`: 2 parts over 4 (<1: 2 parts faster).",
        "",
        "| batch | input | k | K | rule | convs 4/2 | 4 parts ms | 2 parts ms | 2/4 | compile 4 s "
        "| compile 2 s | 2/4 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        p, m, q, c = r["point"], r["median_ms"], r["quartiles_ms"], r["compile_s"]
        convs = "/".join(str(r["convolutions"][k]) for k in PARTS) if "convolutions" in r else "-"
        shape = "x".join(map(str, p["input"]))
        lines.append(
            f"| {p['batch']} | {shape} | {p['kernel']} | {p['filters']} | {r['rule']} | {convs} "
            f"| {m[4]:.3g} [{q[4][0]:.3g}-{q[4][1]:.3g}] | {m[2]:.3g} [{q[2][0]:.3g}-{q[2][1]:.3g}] "
            f"| {m[2] / m[4]:.2f} | {c[4]:.3f} | {c[2]:.3f} | {c[2] / c[4]:.2f} |"
        )
    if results:
        run = [r["median_ms"][2] / r["median_ms"][4] for r in results]
        comp = [r["compile_s"][2] / r["compile_s"][4] for r in results]
        lines += [
            "",
            f"2 parts over 4: run time {min(run):.2f}-{max(run):.2f} (median {statistics.median(run):.2f}; "
            f"faster at {sum(v < 1 for v in run)} of {len(run)}), "
            f"compile time {min(comp):.2f}-{max(comp):.2f} "
            f"(median {statistics.median(comp):.2f}). The two updates differ by at most "
            f"{max(r['update_rel_diff'] for r in results):.1e} relative (the same sums in another order).",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=15, help="timed samples of each (default 15)")
    parser.add_argument("--compiles", type=int, default=3, help="compiles of each (default 3)")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 256, 1024])
    parser.add_argument("--filters", type=int, nargs="+", default=[32, 1])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    parser.add_argument("--name", default="bench_conv_parts")
    args = parser.parse_args(argv)
    if args.repeats < 2:
        parser.error(f"--repeats must be at least 2 (for the quartiles), got {args.repeats}")
    if args.compiles < 1:
        parser.error(f"--compiles must be a positive int, got {args.compiles}")
    if min(args.batches) < max(PARTS) or min(args.filters) < 1:
        parser.error(
            f"--batches must be at least {max(PARTS)} (a conv in {max(PARTS)} parts over the examples) and "
            f"--filters positive, got {args.batches} and {args.filters}"
        )
    import jax

    results = []
    for filters, batch, in_shape, kernel in itertools.product(args.filters, args.batches, INPUTS, (3, 5)):
        r = run_point(batch, in_shape, kernel, filters, args.repeats, args.compiles)
        if r is not None:
            results.append(r)
            print(f"done {r['point']}: 2/4 {r['median_ms'][2] / r['median_ms'][4]:.2f}", file=sys.stderr)
    info, command = script_record(jax, __file__, argv)
    write_results(args.out, args.name, info, command, results, markdown(results, info, command))


if __name__ == "__main__":
    main()
