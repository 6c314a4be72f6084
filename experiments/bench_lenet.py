"""Benchmark: the LeNet-5 update step with the layers' hand-written backward against jax.grad.

For each point (input shape, pooling, batch), both jitted steps (`jaxbp.make_update_step` on
`jaxbp.lenet5`, grads "manual" and "autodiff", optax adam) are compiled, checked to compute the same
gradients (float32), then timed interleaved: each repeat times one sample of each method in turn, a
sample being as many calls as fill --sample-s (found by bench.calibrate after a warm-up call). A
sample queues its calls and waits for the last, so on an accelerator it times the device's work.
Medians and quartiles over the repeats, and the ratio jax.grad time / manual time (> 1: manual
faster). Writes JSON and a markdown table.

    python experiments/bench_lenet.py                      # 8x8x1 and 28x28x1, avg and max, batch 32 and 128
    python experiments/bench_lenet.py --quick
    # on a GPU, in full float32 (JAX_DEFAULT_MATMUL_PRECISION=float32 in the environment):
    python experiments/bench_lenet.py --sample-s 0.05 --name bench_lenet_gpu
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import calibrate  # noqa: E402
from bench import compile_stats  # noqa: E402
from bench import cores_text  # noqa: E402
from bench import machine_info  # noqa: E402
from bench import summarize  # noqa: E402
from bench import write_results  # noqa: E402

METHODS = ("manual", "autodiff")


def run_point(jax, jaxbp, optax, in_shape, pooling, batch, args) -> dict:
    import jax.numpy as jnp

    network = jaxbp.lenet5(in_shape, 10, pooling=pooling)
    params = network.init(jax.random.key(0), jnp.float32)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, *in_shape)), jnp.float32)
    y = jax.nn.one_hot(rng.integers(0, 10, batch), 10, dtype=jnp.float32)
    opt = optax.adam(1e-3)
    state = opt.init(params)
    compiled, stats, outs = {}, {}, {}
    for method in METHODS:
        step = jaxbp.make_update_step(network, opt, grads=method)
        stats[method], compiled[method] = compile_stats(step, (params, state, x, y))
        outs[method] = jax.block_until_ready(compiled[method](params, state, x, y))
    # The two must compute the same gradients before they are timed. float32: the layer_agreement
    # experiment measured LeNet-5 gradients within 1.5e-5 (28x28) of float64 for either path, so
    # 1e-4 between them. (Adam's updates g / sqrt(v) amplify differences in tiny entries, so
    # the check is on the gradients, not on the stepped params.)
    agreement = jaxbp.check.tree_relative_error(
        jaxbp.manual_grads(params, x, y, network), jaxbp.autodiff_grads(params, x, y, network)
    )
    if not agreement < 1e-4:
        raise RuntimeError(f"manual and autodiff gradients differ: relative {agreement:.2e}")

    def sampler(fn):
        def sample(calls):  # seconds per call; only the last output is kept alive
            start = time.perf_counter()
            for _ in range(calls):
                out = fn(params, state, x, y)
            jax.block_until_ready(out)
            return (time.perf_counter() - start) / calls

        return sample

    sample = {m: sampler(compiled[m]) for m in METHODS}
    calls = {m: calibrate(sample[m], args.sample_s) for m in METHODS}
    samples = {m: [] for m in METHODS}
    for _ in range(args.repeats):
        for m in METHODS:
            samples[m].append(sample[m](calls[m]))
    result = {
        "in_shape": list(in_shape),
        "pooling": pooling,
        "batch": batch,
        "grad_rel_diff": agreement,
        "calls_per_sample": calls,
        **{m: {**summarize(samples[m]), **stats[m]} for m in METHODS},
    }
    result["speedup"] = result["autodiff"]["median_ms"] / result["manual"]["median_ms"]
    return result


def markdown(results, info, command) -> str:
    lines = [
        "# LeNet-5 update step: hand-written layer VJPs vs jax.grad",
        "",
        f"`{command}` on {info['cpu']} ({cores_text(info)}), jax {info['jax']}, "
        f"{info['date_utc']}, load average {info['load_average']}"
        + (f", tree {info['tree_commit']}" if info.get("tree_commit") else "")
        + ".",
        *(
            [
                f"Device: {info['device_kind']} ({info['backend']}); jax_default_matmul_precision "
                f"{info['jax_default_matmul_precision']}."
            ]
            if info.get("backend", "cpu") != "cpu"
            else []
        ),
        "float32, optax adam; medians [quartiles] over interleaved repeats; speedup = jax.grad / manual.",
        "",
        "| input | pooling | batch | manual ms | jax.grad ms | speedup | compile manual / jax.grad s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        m, a = r["manual"], r["autodiff"]
        lines.append(
            f"| {'x'.join(map(str, r['in_shape']))} | {r['pooling']} | {r['batch']} "
            f"| {m['median_ms']:.2f} [{m['q1_ms']:.2f}, {m['q3_ms']:.2f}] "
            f"| {a['median_ms']:.2f} [{a['q1_ms']:.2f}, {a['q3_ms']:.2f}] | {r['speedup']:.2f} "
            f"| {m['compile_s']:.2f} / {a['compile_s']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="8x8x1 only, batch 128, 5 repeats")
    parser.add_argument("--repeats", type=int, default=15, help="timed samples per method (default 15)")
    parser.add_argument("--sample-s", type=float, default=0.2, help="seconds per sample (default 0.2)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"), help="folder")
    parser.add_argument("--name", default="bench_lenet", help="file stem of the outputs")
    parser.add_argument(
        "--tree-commit", help="the commit of this tree, recorded (where the checkout's git is stale)"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.sample_s <= 0:
        parser.error("--repeats must be >= 1 and --sample-s > 0")
    if args.quick:
        args.repeats = min(args.repeats, 5)
    import jax
    import optax
    from tqdm import tqdm

    import jaxbp

    points = [
        (shape, pooling, batch)
        for shape in ([(8, 8, 1)] if args.quick else [(8, 8, 1), (28, 28, 1)])
        for pooling in ("avg", "max")
        for batch in ([128] if args.quick else [32, 128])
    ]
    info = machine_info(jax, {})
    # JAX's float32 precision on an accelerator (JAX_DEFAULT_MATMUL_PRECISION sets it).
    info["jax_default_matmul_precision"] = jax.config.jax_default_matmul_precision
    if args.tree_commit:
        info["tree_commit"] = args.tree_commit
    command = "python " + shlex.join(
        [os.path.relpath(os.path.abspath(__file__))] + (sys.argv[1:] if argv is None else list(argv))
    )
    results = []
    for p in tqdm(points, desc="lenet bench", unit="point"):
        results.append(run_point(jax, jaxbp, optax, *p, args))
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
        # The points so far, so that a run cut short (a time limit) keeps them.
        last = len(results) == len(points)
        table = markdown(results, info, command)
        write_results(args.out, args.name, info, command, results, table, echo=last)


if __name__ == "__main__":
    main()
