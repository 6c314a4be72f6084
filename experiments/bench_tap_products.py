"""The taps forward with the input channels contracted first, against the per-channel loop and
the batch-minor layout.

With one filter on few channels the batch step's forward is the taps' shift-and-add, which
XLA fuses with the sigmoid into one elementwise loop (`jaxbp.conv_forms.conv_forward_taps`). Per
channel, that loop has kh*kw*C terms; from `TAPS_CONTRACT_CHANNELS_FROM` channels on it has
kh*kw, over U = X_pad f, each pixel's products with every tap (one small matmul,
`conv_forward_tap_products`). This script times, interleaved round by round, the jitted update
step (`make_update_step(grads="manual")`) with the channels contracted first and with the
per-channel loop (the rule's formulation channels last, with ``contract_channels`` True and
False, so both forms at every channel count), with the jax.grad step as a baseline in
the same process; and each step's compile time (lower + compile, the fastest of
--compile-repeats fresh jits). Beside them the same step in the batch-minor layout
(`Formulation(..., batch_minor=True)` at the rule's chunk and parts, `jaxbp.batch_minor`: the
per-channel loop with the examples as the minor axis). The forms' updates are compared in float32
before timing. Writes experiments/results/<name>.json and .md.

    python experiments/bench_tap_products.py            # about 3 minutes on 2 cores
    python experiments/bench_tap_products.py --quick    # one point per channel count
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
from bench import machine_info  # noqa: E402
from bench import script_command  # noqa: E402
from bench import summarize  # noqa: E402
from bench import warm_text  # noqa: E402
from bench import write_results  # noqa: E402

CHANNELS = (2, 3, 5, 7)
BATCHES = (32, 256, 1024)
KERNELS = (3, 5)
METHODS = ("products", "per_channel", "batch_minor", "autodiff")


def step_and_args(jax, jaxbp, spec, batch: int, grads: str, formulation=None):
    """The compiled update step, its arguments, its compile seconds and the matmuls of its lowered
    program (the check that each form is timed as labelled: the products have U's matmul more);
    `formulation` is `make_update_step`'s."""
    import jax.numpy as jnp

    params = jaxbp.init_params(jax.random.key(0), spec)
    x = jax.random.normal(jax.random.key(1), (batch, *spec.in_shape), jnp.float32)
    y = jax.random.uniform(jax.random.key(2), (batch, spec.n_out), jnp.float32)
    optimizer = jaxbp.sgd(0.1)
    args = (params, optimizer.init(params), x, y)
    step = jaxbp.make_update_step(spec, optimizer, grads=grads, formulation=formulation)
    start = time.perf_counter()
    lowered = step.lower(*args)
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    return compiled, args, seconds, lowered.as_text().count("dot_general")


def main(argv=None) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--channels", type=int, nargs="+", default=list(CHANNELS), help="input channels C")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES), help="batch sizes")
    parser.add_argument("--kernels", type=int, nargs="+", default=list(KERNELS), help="square kernel sizes")
    parser.add_argument("--size", type=int, default=32, help="input height and width (default 32)")
    parser.add_argument("--repeats", type=int, default=5, help="timed samples per method (default 5)")
    parser.add_argument("--compile-repeats", type=int, default=3, help="compiles per step; fastest counts")
    parser.add_argument("--min-sample-s", type=float, default=0.05, help="seconds per timed sample")
    parser.add_argument("--quick", action="store_true", help="batch 256, 5x5 only; 2 repeats")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"), help="folder")
    parser.add_argument("--name", default="bench_tap_products", help="file stem of the outputs")
    parser.add_argument("--warm-calls", type=int, default=1, help="untimed calls before a sample")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.kernels, args.repeats, args.compile_repeats = [256], [5], 2, 1
    if min(args.channels) < 1 or min(args.batches) < 1 or min(args.kernels) < 1:
        parser.error("--channels, --batches and --kernels must be positive")
    if args.repeats < 1 or args.compile_repeats < 1 or args.min_sample_s <= 0 or args.warm_calls < 0:
        parser.error("--repeats and --compile-repeats must be >= 1, --min-sample-s > 0, --warm-calls >= 0")
    import jax

    import jaxbp
    from jaxbp import conv_forms
    from jaxbp import formulations
    from jaxbp.tune import interleaved_samples
    from jaxbp.tune import timed_calls

    results = []
    for c, batch, kernel in itertools.product(args.channels, args.batches, args.kernels):
        spec = jaxbp.ConvNetSpec(
            in_shape=(args.size, args.size, c), n_filters=1, kernel_size=kernel, n_out=10
        )
        form = formulations.choose_formulation(spec, batch)
        channels_last = form._replace(batch_minor=False)
        variants = {
            "products": ("manual", channels_last._replace(contract_channels=True)),
            "per_channel": ("manual", channels_last._replace(contract_channels=False)),
            "batch_minor": ("manual", form._replace(batch_minor=True, contract_channels=None)),
            "autodiff": ("autodiff", None),
        }
        compiled, compile_s, dots = {}, {}, {}
        for name, (grads, formulation) in variants.items():
            best = float("inf")
            for _ in range(args.compile_repeats):
                fn, fn_args, seconds, dots[name] = step_and_args(jax, jaxbp, spec, batch, grads, formulation)
                best = min(best, seconds)
            compiled[name], compile_s[name] = (fn, fn_args), best
        # Each form timed as labelled: the products have U's matmul once more in each chunk body
        # the program traces (the loop's, and a remainder's where the chunk does not divide).
        chunk = form.chunk or batch
        bodies = (batch >= chunk) + (batch % chunk > 0)
        if dots["products"] != dots["per_channel"] + bodies:
            raise AssertionError(f"C {c}, batch {batch}: matmuls {dots}, not {bodies} more with the products")
        outs = {name: fn(*fn_args) for name, (fn, fn_args) in compiled.items()}
        # The updated params of the other manual forms against the products', relative to the
        # largest of each leaf.
        rel_diff = max(
            float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(1e-30, np.max(np.abs(np.asarray(b)))))
            for other in ("per_channel", "batch_minor")
            for a, b in zip(jax.tree.leaves(outs[other][0]), jax.tree.leaves(outs["products"][0]))
        )
        calls = {name: timed_calls(fn, fn_args) for name, (fn, fn_args) in compiled.items()}
        samples = interleaved_samples(calls, args.repeats, args.min_sample_s, args.warm_calls)
        times = {name: summarize(s) for name, s in samples.items()}
        results.append(
            {
                "point": {"batch": batch, "input": list(spec.in_shape), "kernel": kernel, "filters": 1},
                "formulation": form.label(),
                "params_rel_diff": rel_diff,
                "times": times,
                "compile_s": compile_s,
                "matmuls": dots,
            }
        )
        print(f"C {c}, batch {batch}, {kernel}x{kernel} done", file=sys.stderr, flush=True)

    info = machine_info(jax, {})
    info["warm_calls"] = args.warm_calls
    command = script_command(__file__, argv)
    rows = []
    for r in results:
        p, cs = r["point"], r["compile_s"]
        t = {name: times["median_ms"] for name, times in r["times"].items()}
        rows.append(
            f"| {p['batch']} | {'x'.join(map(str, p['input']))} | {p['kernel']} | {r['formulation']} "
            f"| {t['products']:.3g} | {t['per_channel']:.3g} | {t['batch_minor']:.3g} | {t['autodiff']:.3g} "
            f"| {t['per_channel'] / t['products']:.2f} "
            f"| {min(t['products'], t['per_channel']) / t['batch_minor']:.2f} "
            f"| {cs['products']:.2f} | {cs['per_channel']:.2f} | {cs['batch_minor']:.2f} "
            f"| {cs['autodiff']:.2f} "
            f"| {r['params_rel_diff']:.1e} |"
        )
    faster = [
        r for r in results if r["times"]["products"]["median_ms"] < r["times"]["per_channel"]["median_ms"]
    ]
    minor = [
        r
        for r in results
        if r["times"]["batch_minor"]["median_ms"]
        < min(r["times"][m]["median_ms"] for m in ("products", "per_channel"))
    ]
    lines = [
        "# The taps forward: input channels contracted first (products) or per channel",
        "",
        f"Command: `{command}`  ",
        f"Machine: {info['cpu']}, {cores_text(info)}. jax {info['jax']}, jaxlib {info['jaxlib']}; "
        f"git {info['git_commit']}; {info['date_utc']}.",
        "",
        f"Median ms per update step of {args.repeats} interleaved samples (quartiles in the JSON), one "
        "filter, 10 outputs, VALID, float32. `products`: the manual step with the channels "
        "contracted first (U = X_pad f, then kh*kw terms); `per_channel`: with the kh*kw*C-term loop "
        "(both channels last, the rule's chunk and parts); channels last the rule takes the products "
        f"from TAPS_CONTRACT_CHANNELS_FROM = {conv_forms.TAPS_CONTRACT_CHANNELS_FROM} channels on, "
        "and the formulation column is the rule's. `batch_minor`: the per-channel loop "
        "in the batch-minor layout (`jaxbp.batch_minor`), at the rule's chunk and parts. `autodiff`: "
        "the jax.grad step. `pc/pr`: per_channel over products (> 1: the products faster); `best/bm`: "
        "the faster of those two over batch_minor (> 1: batch_minor faster). Compile: seconds, the "
        f"fastest of {args.compile_repeats}. `diff`: the largest difference of the other manual steps' "
        "updated params from the products', relative to each leaf's largest. " + warm_text(info),
        "",
        "| batch | input | k | formulation | products | per_channel | batch_minor | jax.grad | pc/pr "
        "| best/bm | compile products | compile per_channel | compile batch_minor | compile jax.grad "
        "| diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Products faster than per_channel at {len(faster)} of {len(results)} points; batch_minor "
        f"faster than both at {len(minor)}.",
    ]
    write_results(args.out, args.name, info, command, results, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
