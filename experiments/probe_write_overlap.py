"""Can writing the per-example dE/dW overlap the rest of the per-example work on this CPU?

Per-example gradients do the batch's forward and more, and write N x D x n_out numbers of dE/dW.
`experiments/bench.py`'s floor (`floor/b`) adds the forward's time to the write's. Here the batch
gradient and a write of that many bytes (numpy's fill of memory already mapped, in a thread: it
releases the GIL; write-only and as fast as XLA's write of the dE/dW product, 221 MB in 18-20 against
17 ms in a standalone timing; numpy's broadcast product itself runs several times slower, bound
by its loops, not by memory) run one after the other and at once, round by round; where at once is
no faster, adding the two is fair.

    python experiments/probe_write_overlap.py [--points 256:32x32x3:3:8 ...] [--rounds 9]

Writes experiments/results/probe_write_overlap.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import machine_line  # noqa: E402
from bench import script_record  # noqa: E402
from bench import write_results  # noqa: E402

POINTS = ("256:32x32x3:3:8", "256:28x28x1:3:32", "1024:32x32x3:5:8", "256:32x32x3:5:32")


def parse_point(text: str) -> tuple[int, tuple[int, int, int], int, int]:
    """ "batch:HxWxC:kernel:filters" -> (batch, (H, W, C), kernel, filters)."""
    try:
        batch, hwc, kernel, filters = text.split(":")
        point = int(batch), tuple(int(v) for v in hwc.split("x")), int(kernel), int(filters)
    except ValueError:
        point = None
    if point is None or len(point[1]) != 3 or min(point[0], *point[1], *point[2:]) < 1:
        raise argparse.ArgumentTypeError(
            f"a point is batch:HxWxC:kernel:filters, positive ints, got {text!r}"
        )
    return point


def run_point(batch, in_shape, kernel, filters, rounds) -> dict:
    import jax

    import jaxbp

    spec = jaxbp.ConvNetSpec(in_shape=in_shape, n_filters=filters, kernel_size=kernel, n_out=10)
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    params = jaxbp.init_params(kp, spec)
    x = jax.random.normal(kx, (batch, *in_shape), np.float32)
    y = jax.random.uniform(ky, (batch, 10), np.float32)
    grad_fn = jax.jit(
        lambda p, x, y: jaxbp.manual_value_and_grads(p, x, y, spec), compiler_options=jaxbp.compiler_options()
    )
    d = int(np.prod(spec.h1_shape))
    dst = np.zeros((batch, d, 10), np.float32)  # mapped once, here: the next calls write into it

    def grad():
        jax.block_until_ready(grad_fn(params, x, y))

    def write():
        dst.fill(1.0)

    def one_after_the_other():
        grad()
        write()

    def at_once():
        thread = threading.Thread(target=write)
        thread.start()
        grad()
        thread.join()

    methods = {"grad": grad, "write": write, "one_after_the_other": one_after_the_other, "at_once": at_once}
    for fn in methods.values():  # warm-up: compile, map the pages
        fn()
    samples = {name: [] for name in methods}
    order = list(methods)
    for r in range(rounds):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            start = time.perf_counter()
            methods[name]()
            samples[name].append(time.perf_counter() - start)
    ms = {name: 1e3 * statistics.median(v) for name, v in samples.items()}
    return {
        "point": {"batch": batch, "input": list(in_shape), "kernel": kernel, "filters": filters},
        "write_mb": dst.nbytes / 1e6,
        "median_ms": ms,
        "at_once_over_one_after_the_other": ms["at_once"] / ms["one_after_the_other"],
        "at_once_over_grad": ms["at_once"] / ms["grad"],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--points", nargs="+", type=parse_point, default=[parse_point(p) for p in POINTS])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    import jax

    results = []
    for point in args.points:
        results.append(run_point(*point, args.rounds))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    info, command = script_record(jax, __file__, argv)
    write_results(
        args.out, "probe_write_overlap", info, command, results, markdown(results, info, command, args)
    )


def markdown(results, info, command, args) -> str:
    lines = [
        "# The per-example dE/dW write beside the batch gradient: one after the other, or at once",
        "",
        f"Command: `{command}`  ",
        machine_line(info),
        "",
        f"Median ms of {args.rounds} rounds.",
        "",
        "| batch | input | k | K | write MB | grad | write | one after the other | at once | at once / "
        "one after the other | at once / grad |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        p, m = r["point"], r["median_ms"]
        lines.append(
            f"| {p['batch']} | {'x'.join(map(str, p['input']))} | {p['kernel']} | {p['filters']} "
            f"| {r['write_mb']:.0f} | {m['grad']:.2f} | {m['write']:.2f} | {m['one_after_the_other']:.2f} "
            f"| {m['at_once']:.2f} | {r['at_once_over_one_after_the_other']:.2f} "
            f"| {r['at_once_over_grad']:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
