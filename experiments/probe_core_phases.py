"""Why the two-core update step's time has two levels: the cores' round trip, round by round.

On the 2-core AMD EPYC of experiments/PERFORMANCE.md the manual step's time flipped between two
levels for stretches of seconds within one process, and work pinned to one core did not change.
Here each round times the round trip of a value between the two cores
(`jaxbp.machine.CoreRoundTrip`) and, interleaved, the manual update step, jax.grad's and PyTorch's
(in its own process and timed there, as `experiments/bench.py` runs it, checked against jaxbp in
float64 first, last in each round and followed by bench.py's pause for its spinning threads), for
--seconds. Rounds are split into "near" and "far" at --cut-ns, by default at the midpoint of this
run's round trip's 10th and 90th percentiles (meaningful where the round trip has two levels: the
plot shows whether it has; the midpoint differs from run to run, so compare runs at one cut); the
table gives each step's median in each and the correlation of its time with the round trip.

    python experiments/probe_core_phases.py [--point 32:32x32x3:5:8] [--seconds 180] [--no-torch]
        [--cut-ns NS]

Writes experiments/results/probe_core_phases.{json,md,png} (--name to rename).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import PEER_RTOL  # noqa: E402
from bench import SETTLE_S  # noqa: E402
from bench import calibrate  # noqa: E402
from bench import machine_line  # noqa: E402
from bench import peer_ask  # noqa: E402
from bench import rel_error  # noqa: E402
from bench import script_record  # noqa: E402
from bench import start_peer  # noqa: E402
from bench import step_inputs  # noqa: E402
from bench import write_results  # noqa: E402
from probe_write_overlap import parse_point  # noqa: E402

MIN_SAMPLE_S = 0.02  # each step's sample in a round: about the calibrated samples of bench.py


def steps(point, use_torch: bool, progress):
    """name -> call(inner), which returns seconds per call, for the manual step, jax.grad's and
    (where it runs and agrees with jaxbp) PyTorch's; and (process, pipe) of the peer, or None."""
    import jax

    import jaxbp
    from jaxbp.tune import timed_calls

    batch, in_shape, kernel, filters = point
    spec = jaxbp.ConvNetSpec(in_shape=in_shape, n_filters=filters, kernel_size=kernel, n_out=10)
    opt, args = step_inputs(spec, batch)
    params, _, x, y = args
    x, y = np.asarray(x), np.asarray(y)  # what the PyTorch peer is sent
    calls = {}
    for name, grads in (("manual", "manual"), ("autodiff", "autodiff")):
        calls[name] = seconds_per_call(timed_calls(jaxbp.make_update_step(spec, opt, grads=grads), args))
    if not use_torch:
        return calls, None
    conn, worker = start_peer("torch")
    peer = (worker, conn)
    reply = peer_ask(conn, "versions", ("cpu", None))
    if isinstance(reply, str) or not reply[0]:
        progress(f"PyTorch is not timed: {reply if isinstance(reply, str) else 'not installed'}")
        return calls, peer
    x64 = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)  # the check in float64, as bench.py's
    try:
        p64 = [np.asarray(a, np.float64) for a in params]
        ref = jaxbp.manual_grads(
            jaxbp.Params(*(jax.numpy.asarray(a) for a in p64)),
            jax.numpy.asarray(x[:4].astype(np.float64)),
            jax.numpy.asarray(y[:4].astype(np.float64)),
            spec,
        )
    finally:
        jax.config.update("jax_enable_x64", x64)
    grads = peer_ask(conn, "check", (*p64, x[:4].astype(np.float64), y[:4].astype(np.float64)))
    err = None if isinstance(grads, str) else max(rel_error(g, r) for g, r in zip(grads, ref))
    if err is None or err >= PEER_RTOL:
        progress(
            f"PyTorch is not timed: its float64 gradients {grads if err is None else f'rel error {err:.1e}'}"
        )
        return calls, peer
    if peer_ask(conn, "setup", (*(np.asarray(a) for a in params), x, y)) is not True:
        progress("PyTorch is not timed: its first step failed")
        return calls, peer

    def torch_call(inner):  # timed in its process, as bench.py times it (not the pipe's round trip)
        reply = peer_ask(conn, "time", inner)
        if isinstance(reply, str):
            raise RuntimeError(f"PyTorch's process: {reply}")
        return reply

    calls["torch"] = torch_call
    return calls, peer


def seconds_per_call(call):
    """`call(inner)` that returns its seconds per call."""

    def timed(inner):
        start = time.perf_counter()
        call(inner)
        return (time.perf_counter() - start) / inner

    return timed


def run(point, seconds: float, use_torch: bool, progress=print, cut_ns: float | None = None) -> dict:
    from jaxbp.machine import CoreRoundTrip

    calls, peer = steps(point, use_torch, progress)
    inner = {name: calibrate(call, MIN_SAMPLE_S) for name, call in calls.items()}
    rounds = []
    order = list(calls)
    jax_order = ["manual", "autodiff"]  # then PyTorch, then a pause: the next round's trip is JAX's alone
    start = time.perf_counter()
    with CoreRoundTrip() as trip:
        while time.perf_counter() - start < seconds:
            row = {"t_s": time.perf_counter() - start, "round_trip_ns": trip.measure(trips=1000, bursts=3)}
            shift = len(rounds) % len(jax_order)  # each round starts one JAX step later (bench.py)
            for name in jax_order[shift:] + jax_order[:shift] + [n for n in order if n not in jax_order]:
                calls[name](1)  # untimed, as bench.py's samples
                row[name + "_ms"] = calls[name](inner[name]) * 1e3
            if "torch" in calls:  # its OpenMP threads spin for a while after its sample (bench.py)
                time.sleep(SETTLE_S)
            rounds.append(row)
    if peer:
        worker, conn = peer
        peer_ask(conn, "stop", None)
        worker.join(timeout=10)
    return {
        "point": {"batch": point[0], "input": list(point[1]), "kernel": point[2], "filters": point[3]},
        "calls_per_sample": inner,
        "rounds": rounds,
        "summary": summarize(rounds, list(calls), cut_ns),
    }


def summarize(rounds: list, methods: list, cut_ns: float | None = None) -> dict:
    """Near and far rounds split at `cut_ns` (None: the midpoint of the round trip's 10th and 90th
    percentiles, which differs from run to run: compare runs at a cut given to both)."""
    trips = np.array([r["round_trip_ns"] for r in rounds])
    cut = float(np.mean(np.percentile(trips, [10, 90]))) if cut_ns is None else float(cut_ns)
    far = trips > cut
    out = {
        "cut_ns": cut,
        "cut_given": cut_ns is not None,
        "rounds": len(rounds),
        "far_rounds": int(far.sum()),
    }
    for side, sel in (("near", ~far), ("far", far)):
        out[f"{side}_round_trip_ns"] = float(np.median(trips[sel])) if sel.any() else None
    for name in methods:
        t = np.array([r[name + "_ms"] for r in rounds])
        near = float(np.median(t[~far])) if (~far).any() else None
        far_ms = float(np.median(t[far])) if far.any() else None
        out[name] = {
            "near_ms": near,
            "far_ms": far_ms,
            "far_over_near": far_ms / near if near and far_ms else None,
            "corr_with_round_trip": float(np.corrcoef(trips, t)[0, 1])
            if len(t) > 2 and t.std() > 0 and trips.std() > 0
            else None,
        }
    return out


def markdown(result: dict, info: dict, command: str) -> str:
    s, p = result["summary"], result["point"]

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    methods = [k for k in ("manual", "autodiff", "torch") if k in s]
    cut_text = (
        "--cut-ns"
        if s.get("cut_given")
        else "the midpoint of its 10th and 90th percentiles in this run; the plot shows if it has two levels"
    )
    lines = [
        "# The cores' round trip and the update steps, round by round",
        "",
        f"Command: `{command}`  ",
        machine_line(info),
        "",
        f"Point: batch {p['batch']}, {'x'.join(map(str, p['input']))}, {p['kernel']}x{p['kernel']}, "
        f"{p['filters']} filters, 10 outputs. {s['rounds']} rounds; each times the round trip between "
        f"the two cores (`jaxbp.machine.CoreRoundTrip`, median of 3 bursts of 1000) and one sample of "
        f"each step (calls per sample: {result['calls_per_sample']}). Far rounds: round trip above "
        f"{s['cut_ns']:.0f} ns ({cut_text}): {s['far_rounds']} of "
        f"{s['rounds']}; median round trip {num(s['near_round_trip_ns'], '.0f')} ns near, "
        f"{num(s['far_round_trip_ns'], '.0f')} ns far.",
        "",
        "| step | near ms | far ms | far / near | correlation with the round trip |",
        "|---|---|---|---|---|",
    ]
    names = {"manual": "manual (jaxbp)", "autodiff": "jax.grad", "torch": "PyTorch (own process)"}
    for name in methods:
        m = s[name]
        lines.append(
            f"| {names[name]} | {num(m['near_ms'], '.3g')} | {num(m['far_ms'], '.3g')} "
            f"| {num(m['far_over_near'], '.2f')} | {num(m['corr_with_round_trip'], '.2f')} |"
        )
    return "\n".join(lines) + "\n"


def plot(path: pathlib.Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = result["rounds"]
    t = [r["t_s"] for r in rounds]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(9, 5.5))
    top.plot(t, [r["round_trip_ns"] for r in rounds], ".", ms=2, color="k")
    top.axhline(result["summary"]["cut_ns"], color="grey", lw=0.8, ls="--")
    top.set_ylabel("round trip between\nthe cores (ns)")
    for name, label in (("manual", "manual (jaxbp)"), ("autodiff", "jax.grad"), ("torch", "PyTorch")):
        if name + "_ms" in rounds[0]:
            bottom.plot(t, [r[name + "_ms"] for r in rounds], ".", ms=2, label=label)
    bottom.set_ylabel("update step (ms)")
    bottom.set_xlabel("seconds")
    bottom.legend(markerscale=5)
    p = result["point"]
    shape = "x".join(map(str, p["input"]))
    top.set_title(f"batch {p['batch']}, {shape}, {p['kernel']}x{p['kernel']}, {p['filters']} filters")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--point", type=parse_point, default=parse_point("32:32x32x3:5:8"))
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--no-torch", action="store_true", help="time the JAX steps only")
    parser.add_argument(
        "--cut-ns", type=float, help="split near and far rounds here (default: this run's midpoint)"
    )
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    parser.add_argument("--name", default="probe_core_phases")
    args = parser.parse_args(argv)
    if not args.seconds > 0:
        parser.error(f"--seconds must be positive, got {args.seconds}")
    if args.cut_ns is not None and not args.cut_ns > 0:
        parser.error(f"--cut-ns must be positive, got {args.cut_ns}")
    from jaxbp.machine import CoreRoundTrip

    if not CoreRoundTrip.available():
        parser.error("a round trip between cores needs Linux and 2 usable cores")
    import jax

    result = run(
        args.point, args.seconds, not args.no_torch, lambda m: print(m, file=sys.stderr), args.cut_ns
    )
    info, command = script_record(jax, __file__, argv)
    write_results(args.out, args.name, info, command, [result], markdown(result, info, command))
    plot(args.out / f"{args.name}.png", result)


if __name__ == "__main__":
    main()
