"""Per-example gradients into fresh memory against the memory of the call before.

`jaxbp.make_per_example_grads` donates the previous call's per-example gradients, so that the
next call writes into memory that is already mapped, and computes them in chunks where the whole
batch's temporaries would be large (`jaxbp.per_example`). This script times, for each point
(float32, VALID, 10 outputs), interleaved round by round:

  batch_grad      the batch gradient alone (jaxbp.manual_value_and_grads), the reference
  fresh           jax.jit of jaxbp.per_example_manual_grads: a fresh output every call
  reused_whole    make_per_example_grads(spec, chunk=None): the whole batch, into the last output
  reused_chunks   make_per_example_grads(spec, chunk=working_set_chunk): in chunks of about
                  16 MB of temporaries (where one chunk holds the batch, the same program as
                  reused_whole, not timed again); the default, chunk="auto", is one of the two
                  (`jaxbp.per_example.per_example_chunk`, the table's `rule`)
  dW_fresh        writing an array the size of the per-example dE/dW (N x D x n_out), fresh
  dW_reused       the same into the last call's array

and counts the page faults of a call (getrusage's minor faults over 3 calls after the timing,
divided by 3) for each method: 4 KiB pages the kernel mapped (and zeroed) during the call.
Each sample is as many calls as fill --min-sample-s, after --warm-calls untimed calls of the
same method; only the last output is kept. Before timing, the reused methods are checked against
fresh in float64 on a batch of 5 in chunks of 2 (relative error < 1e-10). Writes
experiments/results/<name>.json and .md.

    python experiments/bench_per_example_reuse.py    # batch 32, 256 and 1024, 1-32 filters, 3x3 and 5x5
"""

from __future__ import annotations

import itertools
import math
import os
import resource
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import machine_line  # noqa: E402
from bench import per_example_dW_write  # noqa: E402
from bench import rel_error  # noqa: E402
from bench import script_record  # noqa: E402
from bench import summarize  # noqa: E402
from bench import write_results  # noqa: E402
from bench_per_example import grid_arguments  # noqa: E402
from bench_per_example import problem  # noqa: E402
from bench_per_example import table_head  # noqa: E402

METHODS = ("batch_grad", "fresh", "reused_whole", "reused_chunks", "dW_fresh", "dW_reused")


def calls(jax, jaxbp, spec, args):
    """name -> call(inner), each call of (params, x, y) of `args`; the reused ones thread their
    last output through (`jaxbp.tune.timed_calls_into`)."""
    from jaxbp import tune

    jit = lambda fn, **kw: jax.jit(fn, compiler_options=jaxbp.compiler_options(), **kw)  # noqa: E731
    fresh = jit(lambda p, x, y: jaxbp.per_example_manual_grads(p, x, y, spec))
    batch = jit(lambda p, x, y: jaxbp.manual_value_and_grads(p, x, y, spec))
    dW = lambda p, x, y: per_example_dW_write(p, y)  # noqa: E731
    dW_into = jit(lambda p, x, y, out: dW(p, x, y), donate_argnums=3, keep_unused=True)
    whole = jaxbp.make_per_example_grads(spec, chunk=None)
    chunk = jaxbp.formulations.working_set_chunk(spec, args[1].shape[0], args[1].dtype.itemsize)
    out = {
        "batch_grad": tune.timed_calls(batch, args),
        "fresh": tune.timed_calls(fresh, args),
        "reused_whole": tune.timed_calls_into(whole, args, whole(*args)),
        "dW_fresh": tune.timed_calls(jit(dW), args),
        "dW_reused": tune.timed_calls_into(dW_into, args, jit(dW)(*args)),
    }
    if chunk is not None:
        chunks = jaxbp.make_per_example_grads(spec, chunk=chunk)
        out["reused_chunks"] = tune.timed_calls_into(chunks, args, chunks(*args))
    return out


def check(jax, jaxbp, spec) -> float:
    """The largest relative error of the reused methods against fresh: float64, a batch of 5,
    chunks of 2 (the last one short)."""
    with jax.enable_x64(True):
        args = problem(jax, jaxbp, spec, 5, np.float64)
        ref = jax.tree.leaves(jax.jit(jaxbp.per_example_manual_grads, static_argnums=3)(*args, spec))
        errors = []
        for chunk in (None, 2):
            fn = jaxbp.make_per_example_grads(spec, chunk=chunk)
            out = fn(*args)
            errors += [rel_error(a, r) for a, r in zip(jax.tree.leaves(fn(*args, out=out)), ref)]
        return max(errors)


def faults_per_call(call, calls_=3) -> float:
    """Minor page faults of this process per call of `call` (after the timing: warm)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    call(calls_)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls_


def run_point(jax, jaxbp, in_shape, kernel, filters, batch, args) -> dict:
    spec = jaxbp.ConvNetSpec(in_shape=in_shape, n_filters=filters, kernel_size=kernel, n_out=10)
    error = check(jax, jaxbp, spec)
    if not error <= 1e-10:  # NaN included
        raise SystemExit(f"{in_shape}, {filters} filters: reused gradients disagree with fresh: {error:.2e}")
    jargs = problem(jax, jaxbp, spec, batch, np.float32)
    fns = calls(jax, jaxbp, spec, jargs)
    samples = jaxbp.tune.interleaved_samples(fns, args.repeats, args.min_sample_s, args.warm_calls)
    return {
        "point": {"input": list(in_shape), "kernel": kernel, "filters": filters, "batch": batch},
        "chunk": jaxbp.formulations.working_set_chunk(spec, batch, 4),
        "rule_chunk": jaxbp.per_example.per_example_chunk(spec, batch, 4),
        "dW_bytes": 4 * batch * math.prod(spec.h1_shape) * spec.n_out,
        "check_rel_error": error,
        "times": {name: summarize(s) for name, s in samples.items()},
        "faults_per_call": {name: faults_per_call(call) for name, call in fns.items()},
    }


def rule_ms(r) -> float | None:
    """The time of the reused method that `per_example_chunk` picks (None: not recorded)."""
    if "rule_chunk" not in r:  # runs before the rule
        return None
    name = "reused_whole" if r["rule_chunk"] is None else "reused_chunks"
    return r["times"][name]["median_ms"]


def markdown(results, info, command) -> str:
    ms = lambda r, k: r["times"][k]["median_ms"] if k in r["times"] else None  # noqa: E731
    cell = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines = [
        "# Per-example gradients: fresh memory against the last call's",
        "",
        f"Command: `{command}`  ",
        machine_line(info),
        "",
        "Median ms per call over the repeats, interleaved (IQR in the JSON); `/b` over the batch "
        "gradient alone. `chunk`: `working_set_chunk`'s examples per chunk, timed as `reused_chunks` "
        "(all: the whole batch, not timed); `rule`: which of the two `per_example_chunk` picks, the "
        "default of `make_per_example_grads`. `dW MB`: the per-example dE/dW. `faults`: minor page "
        "faults per call (4 KiB pages mapped during the call), fresh / reused_whole / reused_chunks. "
        "`best/b`: the faster of the two reused methods over the batch gradient.",
        "",
        *table_head(
            ["input", "k", "K", "batch", "chunk", "rule", "dW MB"], METHODS, ["rule/b", "best/b", "faults"]
        ),
    ]
    best, rule, fresh = [], [], []
    for r in results:
        p, b = r["point"], ms(r, "batch_grad")
        best.append(min(v for v in (ms(r, "reused_whole"), ms(r, "reused_chunks")) if v is not None) / b)
        rule.append(None if rule_ms(r) is None else rule_ms(r) / b)
        fresh.append(ms(r, "fresh") / b)
        faults = " / ".join(
            cell(r["faults_per_call"].get(k), ".0f") for k in ("fresh", "reused_whole", "reused_chunks")
        )
        picked = "-" if "rule_chunk" not in r else ("whole" if r["rule_chunk"] is None else "chunks")
        lines.append(
            f"| {'x'.join(map(str, p['input']))} | {p['kernel']} | {p['filters']} | {p['batch']} "
            f"| {r['chunk'] or 'all'} | {picked} | {r['dW_bytes'] / 1e6:.0f} "
            + "".join(f"| {cell(ms(r, k), '.3g')} " for k in METHODS)
            + "".join(f"| {cell(None if ms(r, k) is None else ms(r, k) / b, '.2f')} " for k in METHODS[1:])
            + f"| {cell(rule[-1], '.2f')} | {best[-1]:.2f} | {faults} |"
        )
    count = lambda vals: f"{sum(v <= 1.2 for v in vals)} of {len(vals)} (median {np.median(vals):.2f})"  # noqa: E731
    lines += [
        "",
        f"- per-example within 1.2x of the batch gradient: fresh at {count(fresh)}, the better reused "
        f"at {count(best)}" + ("" if None in rule else f", the rule's pick at {count(rule)}"),
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    name, filters = "bench_per_example_reuse", [1, 8, 32]
    args = grid_arguments(
        __doc__, name, argv, filters=filters, filters_help=None, repeats=5, min_sample_s=0.03
    )
    import jax

    import jaxbp

    results = []
    for batch, filters, in_shape, kernel in itertools.product(
        args.batches, args.filters, args.inputs, args.kernels
    ):
        results.append(run_point(jax, jaxbp, in_shape, kernel, filters, batch, args))
        r = results[-1]
        b = r["times"]["batch_grad"]["median_ms"]
        print(
            f"{batch} {'x'.join(map(str, in_shape))} k{kernel} K{filters}: "
            + " ".join(f"{k} {v['median_ms'] / b:.2f}" for k, v in r["times"].items()),
            file=sys.stderr,
            flush=True,
        )
    info, command = script_record(jax, __file__, argv)
    info["warm_calls"] = args.warm_calls
    write_results(args.out, args.name, info, command, results, markdown(results, info, command))


if __name__ == "__main__":
    main()
