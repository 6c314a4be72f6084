"""dE/dH1 = delta2 W^T as a matmul, or as n_out broadcast products fused into what reads delta1.

The batch step's delta1 = (delta2 W^T) * H1 (1 - H1) needs dE/dH1, an (m, D) product of an
(m, n_out) delta2 and W's n_out columns (10 here). As a matmul it is written out and read back;
as n_out broadcast products (`Formulation.w_delta2_terms`, `jaxbp.batched.slide_terms`) it is
elementwise, and XLA fuses it into the kernels that read delta1. This script times, interleaved
round by round, the jitted update step (`make_update_step(grads="manual")`) at the rule's
formulation with ``w_delta2_terms`` True and False, and each step's compile time (lower +
compile, the fastest of --compile-repeats fresh jits) and generated kernels. The two sides' batch
gradients (`jaxbp.batched.value_and_grads`) are compared in float32 before timing (a run stops
past GRAD_RTOL), and each program is checked to be the one its label says: the products have one
matmul less in each chunk body the program traces. Points whose rule is
the batch-minor layout (`jaxbp.batch_minor`, its own W delta2) are skipped. Writes
experiments/results/<name>.json and .md.

    python experiments/bench_w_delta2.py            # about 5 minutes on 2 cores
    python experiments/bench_w_delta2.py --quick    # batch 256, 5x5, 32x32x3 only
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import cores_text  # noqa: E402
from bench import cpu_text  # noqa: E402
from bench import generated_kernels  # noqa: E402
from bench import machine_info  # noqa: E402
from bench import script_command  # noqa: E402
from bench import summarize  # noqa: E402
from bench import warm_text  # noqa: E402
from bench import write_results  # noqa: E402

INPUTS = ((28, 28, 1), (32, 32, 3))
FILTERS = (1, 8, 32)
BATCHES = (32, 256, 1024)
KERNELS = (3, 5)
METHODS = ("terms", "dot")
# The two sides' gradients differ by float32 rounding only (sums in another order): at most
# 3.6e-7 of each leaf's largest in the committed run; a difference past this is a wrong program.
GRAD_RTOL = 1e-4


def parse_input(text: str) -> tuple[int, int, int]:
    """ "HxWxC" -> (H, W, C)."""
    try:
        shape = tuple(int(v) for v in text.split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"an input is HxWxC of positive ints, got {text!r}")
    return shape


def compiled_step(jax, jaxbp, spec, batch: int, formulation, repeats: int):
    """(the compiled update step, its arguments, its fastest compile seconds, its generated
    kernels, the matmuls of its lowered program) at `formulation`."""
    import jax.numpy as jnp

    params = jaxbp.init_params(jax.random.key(0), spec)
    x = jax.random.normal(jax.random.key(1), (batch, *spec.in_shape), jnp.float32)
    y = jax.random.uniform(jax.random.key(2), (batch, spec.n_out), jnp.float32)
    optimizer = jaxbp.sgd(0.1)
    args = (params, optimizer.init(params), x, y)
    best = float("inf")
    for _ in range(repeats):
        step = jaxbp.make_update_step(spec, optimizer, formulation=formulation)
        start = time.perf_counter()
        lowered = step.lower(*args)
        compiled = lowered.compile()
        best = min(best, time.perf_counter() - start)
    kernels = generated_kernels(compiled.as_text())
    return compiled, args, best, kernels, lowered.as_text().count("dot_general")


def main(argv=None) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--inputs", type=parse_input, nargs="+", default=list(INPUTS), help="HxWxC")
    parser.add_argument("--filters", type=int, nargs="+", default=list(FILTERS), help="filters K")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES), help="batch sizes")
    parser.add_argument("--kernels", type=int, nargs="+", default=list(KERNELS), help="square kernel sizes")
    parser.add_argument("--repeats", type=int, default=7, help="timed samples per method (default 7)")
    parser.add_argument("--compile-repeats", type=int, default=2, help="compiles per step; fastest counts")
    parser.add_argument("--min-sample-s", type=float, default=0.1, help="seconds per timed sample")
    parser.add_argument("--quick", action="store_true", help="batch 256, 5x5, 32x32x3 only; 2 repeats")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"), help="folder")
    parser.add_argument("--name", default="bench_w_delta2", help="file stem of the outputs")
    parser.add_argument("--warm-calls", type=int, default=1, help="untimed calls before a sample")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.kernels, args.inputs = [256], [5], [(32, 32, 3)]
        args.repeats, args.compile_repeats = 2, 1
    if min(args.filters) < 1 or min(args.batches) < 2 or min(args.kernels) < 1:
        parser.error("--filters and --kernels must be positive, --batches at least 2 (a batch gradient)")
    if args.repeats < 1 or args.compile_repeats < 1 or args.min_sample_s <= 0 or args.warm_calls < 0:
        parser.error("--repeats and --compile-repeats must be >= 1, --min-sample-s > 0, --warm-calls >= 0")
    import jax

    import jaxbp
    from jaxbp import batched
    from jaxbp import formulations
    from jaxbp.tune import interleaved_samples
    from jaxbp.tune import timed_calls

    results, skipped = [], []
    points = itertools.product(args.batches, args.inputs, args.kernels, args.filters)
    for batch, in_shape, kernel, filters in points:
        spec = jaxbp.ConvNetSpec(in_shape=in_shape, n_filters=filters, kernel_size=kernel, n_out=10)
        form = formulations.choose_formulation(spec, batch)
        point = {"batch": batch, "input": list(in_shape), "kernel": kernel, "filters": filters}
        if form.batch_minor:
            skipped.append({"point": point, "formulation": form.label(), "skipped": "batch_minor"})
            continue
        variants = {"terms": form._replace(w_delta2_terms=True), "dot": form._replace(w_delta2_terms=False)}
        compiled, compile_s, kernels, dots = {}, {}, {}, {}
        for name, formulation in variants.items():
            fn, fn_args, compile_s[name], kernels[name], dots[name] = compiled_step(
                jax, jaxbp, spec, batch, formulation, args.compile_repeats
            )
            compiled[name] = (fn, fn_args)
        # Each program as labelled: the products have one matmul less in each chunk body the
        # program traces (the loop's, and a remainder's where the chunk does not divide).
        chunk = form.chunk or batch
        bodies = (batch >= chunk) + (batch % chunk > 0)
        if dots["terms"] != dots["dot"] - bodies:
            raise AssertionError(f"{point}: matmuls {dots}, not {bodies} fewer with the products")
        params, _, x, y = compiled["dot"][1]
        grads = {
            name: jax.jit(batched.value_and_grads, static_argnums=3, static_argnames="formulation")(
                params, x, y, spec, formulation=formulation
            )[1]
            for name, formulation in variants.items()
        }
        rel_diff = max(
            float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(1e-30, np.max(np.abs(np.asarray(b)))))
            for a, b in zip(jax.tree.leaves(grads["terms"]), jax.tree.leaves(grads["dot"]))
        )
        if rel_diff > GRAD_RTOL:
            raise AssertionError(
                f"{point}: the two sides' gradients differ by {rel_diff:.2e} (> {GRAD_RTOL})"
            )
        calls = {name: timed_calls(fn, fn_args) for name, (fn, fn_args) in compiled.items()}
        samples = interleaved_samples(calls, args.repeats, args.min_sample_s, args.warm_calls)
        results.append(
            {
                "point": point,
                "formulation": form.label(),
                "rule_terms": formulations.w_delta2_as_terms(form, batch, spec.n_out),
                "grads_rel_diff": rel_diff,
                "times": {name: summarize(s) for name, s in samples.items()},
                "compile_s": compile_s,
                "kernels": kernels,
                "matmuls": dots,
            }
        )
        print(f"{point} done", file=sys.stderr, flush=True)

    info = machine_info(jax, {})
    info["warm_calls"] = args.warm_calls
    command = script_command(__file__, argv)
    write_results(
        args.out, args.name, info, command, results + skipped, markdown(args, info, command, results, skipped)
    )


def markdown(args, info: dict, command: str, results: list, skipped: list) -> str:
    rows = []
    for r in results:
        p, t = r["point"], {name: times["median_ms"] for name, times in r["times"].items()}
        cs, k = r["compile_s"], r["kernels"]
        rows.append(
            f"| {p['batch']} | {'x'.join(map(str, p['input']))} | {p['kernel']} | {p['filters']} "
            f"| {r['formulation']} | {'terms' if r['rule_terms'] else 'dot'} "
            f"| {t['terms']:.3g} | {t['dot']:.3g} | {t['terms'] / t['dot']:.2f} "
            f"| {cs['terms']:.2f} | {cs['dot']:.2f} | {k['terms']}/{k['dot']} | {r['grads_rel_diff']:.1e} |"
        )

    def ratio(r):
        return r["times"]["terms"]["median_ms"] / r["times"]["dot"]["median_ms"]

    by_form = {}  # the forward and dE/df's forms, without the taps' layout and the conv's parts
    for r in results:
        forward, filter_grad = r["formulation"].split("/")[:2]
        by_form.setdefault(f"{forward.split('(')[0]}/{filter_grad.split('*')[0]}", []).append(r)
    summary = [
        f"- `{g}`: the products faster at {sum(ratio(r) < 1 for r in rs)} of {len(rs)} points "
        f"(terms/dot {min(map(ratio, rs)):.2f}-{max(map(ratio, rs)):.2f}); compiled faster at "
        f"{sum(r['compile_s']['terms'] < r['compile_s']['dot'] for r in rs)}."
        for g, rs in sorted(by_form.items())
    ]
    if skipped:
        summary.append(
            f"- Skipped (the batch-minor layout, its own W delta2): {len(skipped)} point(s), "
            + "; ".join(
                f"{s['point']['batch']}, {'x'.join(map(str, s['point']['input']))}, "
                f"{s['point']['kernel']}x{s['point']['kernel']}, K {s['point']['filters']}"
                for s in skipped
            )
            + "."
        )
    lines = [
        "# dE/dH1 = delta2 W^T: n_out broadcast products (terms) or a matmul (dot)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {info['cpu']}{cpu_text(info)}, {cores_text(info)}. jax {info['jax']}, "
        f"jaxlib {info['jaxlib']}; git {info['git_commit']}; {info['date_utc']}.",
        "",
        f"Median ms per update step of {args.repeats} interleaved samples (quartiles in the JSON), 10 "
        "outputs, VALID, float32, at the rule's formulation with `w_delta2_terms` True (`terms`) and "
        "False (`dot`); `rule`: what None picks (`jaxbp.formulations.w_delta2_as_terms`). `t/d`: terms "
        "over dot (< 1: the products faster). Compile: seconds, the fastest of "
        f"{args.compile_repeats}; kernels: generated kernels, terms/dot. `diff`: the largest "
        "difference of the two sides' batch gradients, relative to each leaf's largest. " + warm_text(info),
        "",
        "| batch | input | k | K | formulation | rule | terms | dot | t/d | compile terms | compile dot "
        "| kernels | diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        *summary,
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
